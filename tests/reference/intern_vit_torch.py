"""Independent float32 PyTorch reference of the InternViT-6B backbone (OpenGVLab, mmseg).

Conv patch embed, cls token, absolute pos embed (bicubically resized when the input grid
differs from the pretraining grid), pre-norm RMSNorm blocks with full-width QK norm,
LayerScale and stochastic depth, no final norm. Ground truth for the JAX port; also
runs in bfloat16 (RMSNorm and pos-embed resizing always compute in float32).
"""
from typing import Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["RMSNorm", "LayerScale", "DropPath", "Attention", "Mlp", "Block", "PatchEmbed",
           "InternViTTorch", "randomize_", "torch_bicubic_resize_pos_embed"]


class RMSNorm(nn.Module):
    """RMS normalization over the last axis, computed in float32, weight only."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class LayerScale(nn.Module):
    """Per-channel scaling ``x * gamma``."""

    def __init__(self, dim: int, init_values: float = 0.1):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Per-sample stochastic depth; identity in eval mode or when ``p == 0``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * (mask / keep if keep > 0.0 else mask)


class Attention(nn.Module):
    """Multi-head self-attention with optional full-width RMS QK normalization."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False,
                 qk_normalization: bool = True, use_sdpa: bool = False):
        super().__init__()
        assert dim % num_heads == 0, "embed_dim must be divisible by num_heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qk_normalization = qk_normalization
        self.use_sdpa = use_sdpa
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        if qk_normalization:
            self.q_norm = RMSNorm(dim)
            self.k_norm = RMSNorm(dim)
        self.proj = nn.Linear(dim, dim, bias=True)

    def _norm_full_width(self, t: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        # (B, heads, N, d) -> (B, N, heads*d) head-major -> RMSNorm over C -> back.
        b, h, n, d = t.shape
        t = norm(t.transpose(1, 2).reshape(b, n, h * d))
        return t.reshape(b, n, h, d).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, d)
        if self.qk_normalization:
            q = self._norm_full_width(q, self.q_norm)
            k = self._norm_full_width(k, self.k_norm)
        if self.use_sdpa:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            out = attn.softmax(dim=-1) @ v
        out = out.transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale and stochastic depth."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
                 qk_normalization: bool, init_values: float, drop_path: float,
                 use_sdpa: bool):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_normalization, use_sdpa)
        self.ls1 = LayerScale(dim, init_values)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = RMSNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class PatchEmbed(nn.Module):
    """Non-overlapping conv patch embedding (NCHW in, NCHW out)."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _resize_pos_embed_torch(pos_embed: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """(1, 1+g*g, C) -> (1, 1+h*w, C) in float32; the cls entry is kept as is."""
    pe = pos_embed.float()
    c = pe.shape[-1]
    g = int(round((pe.shape[1] - 1) ** 0.5))
    assert g * g == pe.shape[1] - 1, "pos_embed patch part must be a square grid"
    grid = pe[:, 1:].reshape(1, g, g, c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(hw), mode="bicubic", align_corners=False)
    grid = grid.reshape(1, c, hw[0] * hw[1]).permute(0, 2, 1)
    return torch.cat([pe[:, :1], grid], dim=1)


def torch_bicubic_resize_pos_embed(pos_embed, new_grid: Union[int, Sequence[int]]):
    """Resize a (1, 1+g*g, C) or (1+g*g, C) pos embed to grid ``new_grid``.

    Applies exactly the forward-time interpolation (always, even if the grid is
    unchanged).  numpy in -> numpy out, torch in -> torch out; dtype preserved.
    """
    hw = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
    is_np = not isinstance(pos_embed, torch.Tensor)
    t = torch.from_numpy(np.asarray(pos_embed, dtype=np.float32)) if is_np else pos_embed
    out = _resize_pos_embed_torch(t.reshape(1, *t.shape[-2:]), hw)
    out = out.reshape(*t.shape[:-2], -1, t.shape[-1])
    if is_np:
        return out.numpy().astype(np.asarray(pos_embed).dtype, copy=False)
    return out.to(pos_embed.dtype)


class InternViTTorch(nn.Module):
    """InternViT-6B backbone; ``forward`` returns a list of (B, C, H/p, W/p) maps."""

    def __init__(self, embed_dim: int = 3200, depth: int = 48, num_heads: int = 25,
                 mlp_ratio: float = 4.0, patch_size: int = 14, pretrain_size: int = 224,
                 qkv_bias: bool = False, qk_normalization: bool = True,
                 init_values: float = 0.1, drop_path_rate: float = 0.0,
                 out_indices: Sequence[int] = (47,), use_sdpa: bool = False):
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.grid_size = pretrain_size // patch_size
        self.out_indices = tuple(int(i) for i in out_indices)
        assert all(0 <= i < depth for i in self.out_indices), "out_indices out of range"
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid_size ** 2, embed_dim))
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_normalization,
                  init_values, dpr[i], use_sdpa)
            for i in range(depth)
        ])

    def _pos_embed_for(self, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
        if (h, w) == (self.grid_size, self.grid_size):
            return self.pos_embed.to(dtype)
        return _resize_pos_embed_torch(self.pos_embed, (h, w)).to(dtype)

    def forward(self, x: torch.Tensor):
        b = x.shape[0]
        x = self.patch_embed(x)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)
        x = x + self._pos_embed_for(h, w, x.dtype)
        feats = {}
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in self.out_indices:
                feats[i] = x[:, 1:].transpose(1, 2).reshape(b, self.embed_dim, h, w)
        return [feats[i] for i in self.out_indices]


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter with non-trivial random values (deterministic in seed).

    norm weights ~ 1 + 0.2 N(0,1); LayerScale gamma ~ +-U(0.05, 0.5); biases ~
    0.02 N(0,1); conv/linear weights ~ N(0,1)/sqrt(fan_in); cls_token and
    pos_embed ~ 0.1 N(0,1).  Unknown parameters raise.  Returns ``model``.
    """
    g = torch.Generator().manual_seed(int(seed))

    def randn(shape):
        return torch.randn(shape, generator=g)

    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        if name.endswith(("norm1.weight", "norm2.weight", "q_norm.weight", "k_norm.weight")):
            val = 1.0 + 0.2 * randn(shape)
        elif name.endswith(".gamma"):
            mag = 0.05 + 0.45 * torch.rand(shape, generator=g)
            sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
            val = mag * sign
        elif name.endswith(".bias"):
            val = 0.02 * randn(shape)
        elif name.endswith(".weight") and p.ndim >= 2:
            val = randn(shape) / float(np.prod(shape[1:])) ** 0.5
        elif name in ("cls_token", "pos_embed"):
            val = 0.1 * randn(shape)
        else:
            raise ValueError(f"randomize_: unhandled parameter {name!r}")
        p.copy_(val.to(p.dtype))
    return model
