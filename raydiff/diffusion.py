"""The DDPM noise process: schedule, q(x_t | x0), posterior and eps/x0/v conversions.

Knows nothing of networks. Notation follows Ho et al. (2020): beta_t, alpha_t = 1 - beta_t,
alpha_bar_t = prod_{s<=t} alpha_s, with t in {0, ..., T-1} (index 0 is the paper's t = 1).

What the network predicts is ``diffusion.prediction``: eps (DDPM, the released code), x0, or
v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022). Whatever it predicts,
the samplers and the CCUA/CBDM terms work with the eps it implies (``eps_from_output``).

``make_process`` builds the process a config names: this one, or the flow-matching process of
the SiT presets (raydiff/flow.py), which offers the same methods to the losses.
"""

from __future__ import annotations

import torch

from raydiff.config import DiffusionConfig
from raydiff.flow import FlowMatching


class GaussianDiffusion:
    """Linear-beta schedule with float64 tables, cast to the input's dtype on use."""

    process = "ddpm"
    term = "ddpm"  # name of the denoising term in the loss dict

    def __init__(self, cfg: DiffusionConfig):
        self.num_timesteps = cfg.num_timesteps
        self.prediction = cfg.prediction
        self.loss_weighting = cfg.loss_weighting
        self.min_snr_gamma = cfg.min_snr_gamma
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

    # -- what the network predicts ---------------------------------------------------------

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The training target of the configured prediction: eps, x0 or v."""
        if self.prediction == "eps":
            return eps
        if self.prediction == "x0":
            return x0
        return (self.at(self.sqrt_alpha_bar, t, x0) * eps
                - self.at(self.sqrt_one_minus_alpha_bar, t, x0) * x0)

    def eps_from_output(self, x_t: torch.Tensor, t: torch.Tensor,
                        out: torch.Tensor) -> torch.Tensor:
        """The eps a network output implies: eps itself, (x_t - sqrt(ab) x0) / sqrt(1 - ab)
        for x0, and sqrt(ab) v + sqrt(1 - ab) x_t for v."""
        if self.prediction == "eps":
            return out
        if self.prediction == "x0":
            return self.predict_eps(x_t, t, out)
        return (self.at(self.sqrt_alpha_bar, t, x_t) * out
                + self.at(self.sqrt_one_minus_alpha_bar, t, x_t) * x_t)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor | None:
        """Per-row weight of the denoising loss; None for the uniform weighting of DDPM.

        ``min_snr`` (Hang et al. 2023) caps the signal-to-noise ratio at gamma, written for the
        configured target: min(SNR, gamma) / SNR for eps, min(SNR, gamma) for x0 and
        min(SNR, gamma) / (SNR + 1) for v, so that every target gets the same effective weight
        on the x0 error.
        """
        if self.loss_weighting == "uniform":
            return None
        ab = self.alpha_bar.to(t.device)[t]
        snr = ab / (1.0 - ab)
        capped = snr.clamp(max=self.min_snr_gamma)
        weight = {"eps": capped / snr, "x0": capped, "v": capped / (snr + 1.0)}[self.prediction]
        return weight.float()

    # -- what the losses ask of a process ------------------------------------------------------

    def draw(self, x0: torch.Tensor, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """t ~ U{0 .. T-1}, eps ~ N(0, I), and (t, x_t, training target) for data x0."""
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device,
                          generator=generator)
        eps = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        return t, self.q_sample(x0, t, eps), self.target(x0, eps, t)

    def comparable(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """What AL, CBDM and diffrop compare: the eps an output implies."""
        return self.eps_from_output(x_t, t, out)

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        """t / T in [0, 1): CBDM's weight, largest at the noisy end."""
        return t.float() / self.num_timesteps


def make_process(cfg: DiffusionConfig) -> GaussianDiffusion | FlowMatching:
    """The noise process ``cfg.process`` names: ``ddpm`` or ``flow``."""
    return FlowMatching(cfg) if cfg.process == "flow" else GaussianDiffusion(cfg)
