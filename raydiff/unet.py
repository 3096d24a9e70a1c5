"""The class-conditional DDPM UNet (Ho et al. 2020, as in pytorch-ddpm, CBDM and CCUA).

The network knows nothing of noise schedules: it maps (x_t, t, y) to a prediction of eps and,
on request, also returns its bottleneck features (the output of the two middle residual blocks,
C x H/8 x W/8 for the 32x32 network), which the UCL loss of CCUA contrasts.

Class conditioning adds a label embedding to the time embedding. Label ``num_classes`` is a
learned null label: feeding it gives the unconditional prediction used by classifier-free
guidance and by the alignment loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from raydiff.config import ModelConfig

_NUM_GROUPS = 32  # GroupNorm groups, as in the original DDPM


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, sin/cos interleaved as in pytorch-ddpm."""
    half = torch.arange(0, dim, 2, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-half / dim * math.log(10000.0))
    angles = t.float()[:, None] * freqs[None, :]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(t.shape[0], dim)


def _init_(module: nn.Module, gain: float = 1.0) -> nn.Module:
    nn.init.xavier_uniform_(module.weight, gain=gain)
    nn.init.zeros_(module.bias)
    return module


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, with a residual connection."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = nn.GroupNorm(_NUM_GROUPS, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        # q, k and v are one convolution here but three in the released code: each third gets
        # the Xavier bound of a (ch, ch) layer, as three separate layers would.
        for w in self.qkv.weight.data.chunk(3):
            nn.init.xavier_uniform_(w)
        nn.init.zeros_(self.qkv.bias)
        # Gain 1, not pytorch-ddpm's 1e-5: the released UNet builds this block inside a ResBlock
        # whose initialiser then re-initialises every conv it holds, this projection included.
        # So attention contributes from the first step, as in the released training runs.
        self.proj = _init_(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, 1, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C), as in the original
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, attn: bool):
        super().__init__()
        self.block1 = nn.Sequential(nn.GroupNorm(_NUM_GROUPS, in_ch), nn.SiLU(),
                                    _init_(nn.Conv2d(in_ch, out_ch, 3, padding=1)))
        self.emb_proj = nn.Sequential(nn.SiLU(), _init_(nn.Linear(emb_dim, out_ch)))
        self.block2 = nn.Sequential(nn.GroupNorm(_NUM_GROUPS, out_ch), nn.SiLU(),
                                    nn.Dropout(dropout),
                                    _init_(nn.Conv2d(out_ch, out_ch, 3, padding=1), gain=1e-5))
        self.shortcut = _init_(nn.Conv2d(in_ch, out_ch, 1)) if in_ch != out_ch else nn.Identity()
        self.attn = AttnBlock(out_ch) if attn else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x) + self.emb_proj(emb)[:, :, None, None]
        h = self.block2(h) + self.shortcut(x)
        return self.attn(h)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = _init_(nn.Conv2d(ch, ch, 3, stride=2, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = _init_(nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """eps_theta(x_t, t, y); ``forward(..., return_features=True)`` also returns the bottleneck."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.null_label = cfg.num_classes
        emb_dim = 4 * cfg.ch
        self.time_mlp = nn.Sequential(_init_(nn.Linear(cfg.ch, emb_dim)), nn.SiLU(),
                                      _init_(nn.Linear(emb_dim, emb_dim)))
        # Row num_classes is the learned null label (DiT convention) for CFG.
        self.label_emb = nn.Embedding(cfg.num_classes + 1, emb_dim)
        self.head = _init_(nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1))

        self.down = nn.ModuleList()
        skip_chs, ch, res = [cfg.ch], cfg.ch, cfg.resolution
        for level, mult in enumerate(cfg.ch_mult):
            out_ch = cfg.ch * mult
            for _ in range(cfg.num_res_blocks):
                self.down.append(ResBlock(ch, out_ch, emb_dim, cfg.dropout,
                                          attn=res in cfg.attn_resolutions))
                ch = out_ch
                skip_chs.append(ch)
            if level != len(cfg.ch_mult) - 1:
                self.down.append(Downsample(ch))
                skip_chs.append(ch)
                res //= 2

        self.middle = nn.ModuleList([ResBlock(ch, ch, emb_dim, cfg.dropout, attn=True),
                                     ResBlock(ch, ch, emb_dim, cfg.dropout, attn=False)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.ch_mult))):
            out_ch = cfg.ch * mult
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(ResBlock(skip_chs.pop() + ch, out_ch, emb_dim, cfg.dropout,
                                        attn=res in cfg.attn_resolutions))
                ch = out_ch
            if level != 0:
                self.up.append(Upsample(ch))
                res *= 2
        assert not skip_chs

        self.tail = nn.Sequential(nn.GroupNorm(_NUM_GROUPS, ch), nn.SiLU(),
                                  _init_(nn.Conv2d(ch, cfg.in_channels, 3, padding=1), gain=1e-5))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                return_features: bool | str = False):
        """Predict eps for x_t at integer timesteps t with labels y (null label allowed).
        ``return_features`` (True, "ucl" or "dispersive") also returns the bottleneck, the
        one representation both regularisers read in this network."""
        emb = self.time_mlp(timestep_embedding(t, self.cfg.ch)) + self.label_emb(y)
        h = self.head(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.middle:
            h = layer(h, emb)
        features = h
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = layer(h)
        eps = self.tail(h)
        return (eps, features) if return_features else eps


def build_model(cfg: ModelConfig) -> nn.Module:
    """The network ``cfg.backbone`` names (``raydiff.networks.build_model``): a UNet for
    ``unet``, SiT for ``sit``."""
    from raydiff.networks import build_model as build_network  # networks imports this module

    return build_network(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
