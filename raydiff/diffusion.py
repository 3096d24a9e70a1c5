"""The DDPM noise process: schedule, q(x_t | x0), posterior and eps/x0 conversions.

Knows nothing of networks. Notation follows Ho et al. (2020): beta_t, alpha_t = 1 - beta_t,
alpha_bar_t = prod_{s<=t} alpha_s, with t in {0, ..., T-1} (index 0 is the paper's t = 1).
"""

from __future__ import annotations

import torch

from raydiff.config import DiffusionConfig


class GaussianDiffusion:
    """Linear-beta schedule with float64 tables, cast to the input's dtype on use."""

    def __init__(self, cfg: DiffusionConfig):
        self.num_timesteps = cfg.num_timesteps
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, cfg.num_timesteps,
                               dtype=torch.float64)
        alphas = 1.0 - betas
        alpha_bar = torch.cumprod(alphas, dim=0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        self.betas = betas
        self.alpha_bar = alpha_bar
        self.alpha_bar_prev = alpha_bar_prev
        self.sqrt_alpha_bar = alpha_bar.sqrt()
        self.sqrt_one_minus_alpha_bar = (1.0 - alpha_bar).sqrt()
        # alpha_bar with a leading 1: entry t + 1 is alpha_bar_t, entry 0 is "t = -1".
        self._alpha_bar_ext = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar])
        # Posterior q(x_{t-1} | x_t, x0) = N(coef_x0 x0 + coef_xt x_t, posterior_var)  (Eq. 7).
        self.posterior_var = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        self.posterior_coef_x0 = betas * alpha_bar_prev.sqrt() / (1.0 - alpha_bar)
        self.posterior_coef_xt = (1.0 - alpha_bar_prev) * alphas.sqrt() / (1.0 - alpha_bar)
        # "fixedlarge" variance of pytorch-ddpm: beta_t, with the first entry replaced by the
        # posterior variance at t = 1 (index 1), since posterior_var[0] is 0.
        self.fixedlarge_std = torch.cat([self.posterior_var[1:2], betas[1:]]).sqrt()

    @staticmethod
    def at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] shaped to broadcast against ``like`` (B, C, H, W)."""
        values = table.to(device=t.device)[t].to(like.dtype)
        return values.reshape(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps."""
        return (self.at(self.sqrt_alpha_bar, t, x0) * x0
                + self.at(self.sqrt_one_minus_alpha_bar, t, x0) * eps)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert q_sample: x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        return ((x_t - self.at(self.sqrt_one_minus_alpha_bar, t, x_t) * eps)
                / self.at(self.sqrt_alpha_bar, t, x_t))

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return ((x_t - self.at(self.sqrt_alpha_bar, t, x_t) * x0)
                / self.at(self.sqrt_one_minus_alpha_bar, t, x_t))

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (self.at(self.posterior_coef_x0, t, x_t) * x0
                + self.at(self.posterior_coef_xt, t, x_t) * x_t)

    def alpha_bar_at(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alpha_bar_t for t >= 0, and 1 for t = -1 (the end of a DDIM trajectory)."""
        return self.at(self._alpha_bar_ext, t + 1, like)
