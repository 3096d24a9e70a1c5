"""Flow matching on SiT's linear interpolant: the noise process of the SiT presets.

Knows nothing of networks. Notation and conventions of SiT (Ma et al. 2024) and its released
``transport/`` code (``path.ICPlan``, ``transport.Transport``), which the CCUA-SiT code uses
unchanged: x1 is data, x0 ~ N(0, I) is noise and

    x_t = alpha_t x1 + sigma_t x0,   alpha_t = t,  sigma_t = 1 - t,   t in [0, 1],

so **t = 1 is data and t = 0 is noise** (the reverse of DDPM's t). The network predicts the
velocity; the training target is d x_t / dt = x1 - x0, t ~ U[0, 1) (SiT's ``train_eps`` is 0
for velocity prediction on the linear path), and the loss is the mean squared error.
Samplers integrate dx/dt = v from t = 0 to 1 (``raydiff.samplers``); the SDE sampler also
needs the score implied by the velocity, ``(t v - x) / (1 - t)`` (``get_score_from_velocity``).

``GaussianDiffusion`` (raydiff/diffusion.py) has the same methods for the DDPM process, so the
losses and samplers take either.
"""

from __future__ import annotations

import torch

from raydiff.config import DiffusionConfig


def expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t of shape (B,) shaped to broadcast against ``like`` (B, C, H, W), in its dtype."""
    return t.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


class FlowMatching:
    """The linear-interpolant flow of SiT with velocity prediction."""

    process = "flow"
    term = "flow"  # name of the regression term in the loss dict (DDPM's is "ddpm")

    def __init__(self, cfg: DiffusionConfig | None = None):
        del cfg  # the linear path has no parameters; the argument mirrors GaussianDiffusion

    # -- the path ----------------------------------------------------------------------------

    @staticmethod
    def interpolate(x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = t x1 + (1 - t) x0 (``ICPlan.compute_xt``)."""
        t = expand(t, x1)
        return t * x1 + (1 - t) * x0

    @staticmethod
    def velocity(x1: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The target d x_t / dt = x1 - x0 (``ICPlan.compute_ut``)."""
        return x1 - x0

    @staticmethod
    def score(x: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """grad log p_t(x) implied by the velocity v: (t v - x) / (1 - t) on the linear path
        (``ICPlan.get_score_from_velocity``; undefined at t = 1)."""
        t = expand(t, x)
        return (t * v - x) / (1 - t)

    @staticmethod
    def sde_diffusion(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """w(t) of the sampling SDE dx = [v + w s] dt + sqrt(2 w) dW: SiT's default
        ``--diffusion-form sigma`` with norm 1, w(t) = sigma_t = 1 - t."""
        return 1 - expand(t, like)

    # -- what the losses ask of a process ------------------------------------------------------

    def draw(self, x1: torch.Tensor, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """t ~ U[0, 1), noise x0 ~ N(0, I), and (t, x_t, target velocity) for data x1."""
        t = torch.rand((x1.shape[0],), device=x1.device, generator=generator)
        x0 = torch.randn(x1.shape, device=x1.device, generator=generator, dtype=x1.dtype)
        return t, self.interpolate(x1, x0, t), self.velocity(x1, x0)

    @staticmethod
    def loss_weight(t: torch.Tensor) -> None:
        """SiT's velocity loss weighs every t alike (``--loss-weight None``)."""
        return None

    @staticmethod
    def comparable(x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """What AL, CBDM and diffrop compare: the velocity itself (the released code compares
        the network outputs)."""
        return out

    @staticmethod
    def noise_level(t: torch.Tensor) -> torch.Tensor:
        """sigma_t = 1 - t in [0, 1]: 1 at pure noise (DDPM's t / T plays this role)."""
        return 1 - t.float()

    @staticmethod
    def regulariser_weight(t: torch.Tensor, end: str, power: float = 1.0) -> torch.Tensor:
        """Weight of UCL / AL / diffrop: t^p for ``end="data"`` (the released
        ``ccua_ucl_loss``/``ccua_al_loss``/diffrop multiply by t, largest at the data end),
        (1 - t)^p for ``end="noise"`` (largest at the noise end, as the UNet's t / T)."""
        if end not in ("data", "noise"):
            raise ValueError(f"end={end!r}: expected 'data' or 'noise'")
        level = t.float() if end == "data" else 1 - t.float()
        return level ** power
