"""The networks raydiff trains, by ``model.backbone``: the DDPM UNet and SiT.

Both take (x_t, t, y) with label ``num_classes`` as the null label, keep their config as
``model.cfg`` and the null label as ``model.null_label``, and return ``(output, features)``
with ``return_features``: ``True`` or ``"ucl"`` for the representation UCL contrasts,
``"dispersive"`` for the one Dispersive Loss spreads (the UNet's bottleneck serves both; SiT
gives the tokens after block depth // 4 and after its last block).
"""

from __future__ import annotations

from torch import nn

from raydiff.config import ModelConfig
from raydiff.sit import SiT
from raydiff.unet import UNet, count_parameters

NETWORKS: dict[str, type[nn.Module]] = {"unet": UNet, "sit": SiT}

__all__ = ["NETWORKS", "build_model", "count_parameters"]


def build_model(cfg: ModelConfig) -> nn.Module:
    """The network ``cfg.backbone`` names, freshly initialised."""
    return NETWORKS[cfg.backbone](cfg)
