"""SiT: the class-conditional diffusion transformer of Ma et al. (2024), as released with CCUA.

A transcription of the released ``CCUA-SiT/SiT/models.py`` (itself DiT's network) without
timm: patch embedding, fixed 2-D sin-cos positions, adaLN-Zero blocks (attention and MLP
gated by the time-and-label embedding, the gates initialised at zero), and a final
adaLN-modulated linear layer back to patches. Like the UNet it knows nothing of the noise
process: it maps (x_t, t, y) to one output of the input's shape (the velocity, under the flow
process) and feeds t to its sinusoidal embedding as it is (SiT's t in [0, 1], or DDPM's integer
timesteps, as DiT).

Label ``num_classes`` is a learned null label (the released code's CFG row). Label dropout is
done by the loss (``raydiff.losses.drop_labels``), not inside the network.

``return_features`` names the representation the regularisers read: ``"ucl"`` (or ``True``)
gives the tokens after block ``depth // 4`` (0-based, the released ``--ccua-act-layer N/4``:
``act[len(act) // 4]``, block 3 of SiT-S/2's 12), which CCUA's UCL contrasts; ``"dispersive"``
gives the last block's tokens (``act[-1]``), which Dispersive Loss spreads.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raydiff.config import ModelConfig

FREQUENCY_EMBEDDING_SIZE = 256  # SiT's TimestepEmbedder default


def sincos_pos_embed(dim: int, grid: int) -> np.ndarray:
    """(grid * grid, dim) fixed positions of MAE / DiT: half the channels encode the row, half
    the column, each as [sin, cos] of position * 10000^(-k / (dim / 4))."""
    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    coords = np.arange(grid, dtype=np.float32)
    w, h = np.meshgrid(coords, coords)  # DiT: "here w goes first"
    return np.concatenate([one_axis(dim // 2, w), one_axis(dim // 2, h)], axis=1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[cos, sin] of t * max_period^(-k / (dim / 2)), as SiT's TimestepEmbedder (t may be
    fractional)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head self-attention (timm's ``Attention`` with qkv bias)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads) \
            .permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head dim), as timm
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class SiTBlock(nn.Module):
    """adaLN-Zero block: x += gate * f(modulate(norm(x))) for attention, then the MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SiT(nn.Module):
    """v_theta(x_t, t, y) on (C, H, W) inputs; see the module docstring for the features."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.null_label = cfg.num_classes
        dim, p = cfg.hidden_size, cfg.patch_size
        self.grid = cfg.resolution // p
        self.feature_block = cfg.depth // 4  # released --ccua-act-layer N/4: act[len(act)//4]
        self.x_embedder = nn.Conv2d(cfg.in_channels, dim, kernel_size=p, stride=p)
        self.t_embedder = nn.Sequential(nn.Linear(FREQUENCY_EMBEDDING_SIZE, dim), nn.SiLU(),
                                        nn.Linear(dim, dim))
        # Row num_classes is the learned null label (the released LabelEmbedder's CFG row).
        self.y_embedder = nn.Embedding(cfg.num_classes + 1, dim)
        # Fixed, so not stored in checkpoints: rebuilt identically from the config.
        self.register_buffer("pos_embed", torch.from_numpy(
            sincos_pos_embed(dim, self.grid)).float().unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(SiTBlock(dim, cfg.num_heads, cfg.mlp_ratio)
                                    for _ in range(cfg.depth))
        self.final_layer = FinalLayer(dim, p, cfg.in_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """SiT's ``initialize_weights``: Xavier-uniform linears with zero bias, the patch
        projection initialised like a linear layer, N(0, 0.02) label and time embeddings, and
        every adaLN modulation and the output layer at zero (so each block starts as the
        identity and the network outputs 0)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p * p * C) tokens -> (B, C, H, W), as SiT's ``unpatchify``."""
        b, g, p, c = x.shape[0], self.grid, self.cfg.patch_size, self.cfg.in_channels
        x = x.reshape(b, g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                return_features: bool | str = False):
        """The prediction for x_t at times t with labels y (null label allowed); with
        ``return_features`` also the tokens (B, N, hidden) it names."""
        if return_features not in (False, True, "ucl", "dispersive"):
            raise ValueError(f"return_features={return_features!r}: expected True, 'ucl' "
                             "or 'dispersive'")
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(timestep_embedding(t, FREQUENCY_EMBEDDING_SIZE)) + self.y_embedder(y)
        features = None
        for i, block in enumerate(self.blocks):
            h = block(h, c)
            if i == self.feature_block:
                features = h
        out = self.unpatchify(self.final_layer(h, c))
        if not return_features:
            return out
        return out, (h if return_features == "dispersive" else features)
