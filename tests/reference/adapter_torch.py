"""Independent float32 PyTorch reference of InternViT-6B-Adapter (ViT-Adapter), written
from the facts of OpenGVLab/InternVL-MMDetSeg `mmseg/models/backbones/vit_adapter.py`,
`adapter_modules.py` and `ops/deformable_attention` (no mmcv, no compiled op).

Parameter names follow the original, so `state_dict()` of ``InternViTAdapterTorch`` has
the keys of the original's ``backbone.*`` (``spm.*``, ``level_embed``,
``interactions.{i}.{injector,extractor,extra_extractors.{j}}.*``, ``up.*``,
``norm1..4.*``, ``patch_embed.*``, ``pos_embed``, ``blocks.*``; no ``cls_token``).

The deformable sampling is ``F.grid_sample(bilinear, zeros, align_corners=False)`` on
``2 * location - 1``, the pure-PyTorch form the ViT-Adapter authors use to check their
CUDA op.  The ViT blocks are those of ``intern_vit_torch``.
"""
import math
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.reference.intern_vit_torch import InternViTTorch, LayerScale, RMSNorm
from tests.reference.seg_torch import LayerNorm2dTorch

__all__ = ["ms_deform_attn_grid_sample", "MSDeformAttnTorch", "InjectorTorch", "ExtractorTorch",
           "SpatialPriorModuleTorch", "InternViTAdapterTorch", "deform_inputs_torch",
           "randomize_adapter_"]


def ms_deform_attn_grid_sample(value: torch.Tensor, shapes: Sequence[Tuple[int, int]],
                               locations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """value (N, S, M, D), locations (N, Lq, M, L, P, 2) (x, y) in [0, 1], weights
    (N, Lq, M, L, P) -> (N, Lq, M*D).  One grid_sample per level over (N*M) maps."""
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = locations.shape
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2.0 * locations - 1.0
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        maps = per_level[lvl].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        grid = grids[:, :, :, lvl].permute(0, 2, 1, 3, 4).reshape(n * m, lq, n_points, 2)
        sampled.append(F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))          # (N*M, D, Lq, P)
    stacked = torch.stack(sampled, dim=-2).reshape(n * m, d, lq, n_levels * n_points)
    w = weights.permute(0, 2, 1, 3, 4).reshape(n * m, 1, lq, n_levels * n_points)
    out = (stacked * w).sum(-1).reshape(n, m * d, lq)
    return out.transpose(1, 2)


class MSDeformAttnTorch(nn.Module):
    """Deformable DETR's MSDeformAttn with the value width ratio of ViT-Adapter."""

    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int,
                 ratio: float = 1.0):
        super().__init__()
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.value_dim = int(d_model * ratio)
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, self.value_dim)
        self.output_proj = nn.Linear(self.value_dim, d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Offsets: weight 0, bias = per-head direction (cos, sin of 2*pi*h/M, scaled to
        max-norm 1) times (point + 1); attention weights 0; projections Xavier, bias 0."""
        m, lv, p = self.n_heads, self.n_levels, self.n_points
        self.sampling_offsets.weight.zero_()
        angle = torch.arange(m, dtype=torch.float32) * (2.0 * math.pi / m)
        direction = torch.stack([angle.cos(), angle.sin()], dim=-1)
        direction = direction / direction.abs().amax(dim=-1, keepdim=True)
        steps = torch.arange(1, p + 1, dtype=torch.float32).view(1, 1, p, 1)
        bias = direction.view(m, 1, 1, 2).expand(m, lv, p, 2) * steps
        self.sampling_offsets.bias.copy_(bias.reshape(-1))
        self.attention_weights.weight.zero_()
        self.attention_weights.bias.zero_()
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            proj.bias.zero_()

    def forward(self, query, reference_points, value_input, shapes):
        n, lq, _ = query.shape
        m, lv, p = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(value_input).view(n, value_input.shape[1], m, self.value_dim // m)
        offsets = self.sampling_offsets(query).view(n, lq, m, lv, p, 2)
        weights = F.softmax(self.attention_weights(query).view(n, lq, m, lv * p), -1)
        weights = weights.view(n, lq, m, lv, p)
        normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype)
        locations = (reference_points[:, :, None, :, None, :]
                     + offsets / normalizer[None, None, None, :, None, :])
        return self.output_proj(ms_deform_attn_grid_sample(value, shapes, locations, weights))


def cell_centres(shapes: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """(1, sum H*W, 1, 2): (x, y) cell centres of each level normalised by (W, H)."""
    out = []
    for h, w in shapes:
        ys = torch.linspace(0.5, h - 0.5, h, dtype=torch.float32) / h
        xs = torch.linspace(0.5, w - 0.5, w, dtype=torch.float32) / w
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        out.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1))
    return torch.cat(out, dim=0)[None, :, None]


def deform_inputs_torch(h: int, w: int):
    """Levels h//8, h//16, h//32 of the image.  Injector: ViT-grid queries over the
    three SPM levels; extractor: the three levels' queries over the ViT grid."""
    levels = [(h // 8, w // 8), (h // 16, w // 16), (h // 32, w // 32)]
    vit = [(h // 16, w // 16)]
    return (cell_centres(vit), levels), (cell_centres(levels), vit)


class InjectorTorch(nn.Module):
    """x + gamma * attn(query_norm(x), feat_norm(c)); nn.LayerNorm eps 1e-5."""

    def __init__(self, dim, num_heads, n_points, n_levels, ratio, init_values):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-5)
        self.feat_norm = nn.LayerNorm(dim, eps=1e-5)
        self.attn = MSDeformAttnTorch(dim, n_levels, num_heads, n_points, ratio)
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, query, ref, feat, shapes):
        attn = self.attn(self.query_norm(query), ref, self.feat_norm(feat), shapes)
        return query + self.gamma * attn


class DWConvTorch(nn.Module):
    """One depth-wise 3x3 conv run on each of the three scales of the c tokens
    (16n, 4n, n tokens for 2H x 2W, H x W, H/2 x W/2)."""

    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x, h, w):
        b, n_tok, c = x.shape
        n = n_tok // 21
        outs, start = [], 0
        for count, (hh, ww) in zip((16 * n, 4 * n, n), ((2 * h, 2 * w), (h, w), (h // 2, w // 2))):
            part = x[:, start:start + count].transpose(1, 2).reshape(b, c, hh, ww)
            outs.append(self.dwconv(part).flatten(2).transpose(1, 2))
            start += count
        return torch.cat(outs, dim=1)


class ConvFFNTorch(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConvTorch(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, h, w):
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class DropPathTorch(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = 1.0 - self.p
        return x * x.new_empty((x.shape[0], 1, 1)).bernoulli_(keep) / keep


class ExtractorTorch(nn.Module):
    """c + attn(query_norm(c), feat_norm(x)); then c + drop_path(ffn(ffn_norm(c)))."""

    def __init__(self, dim, num_heads, n_points, ratio, cffn_ratio, drop_path=0.0):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-5)
        self.feat_norm = nn.LayerNorm(dim, eps=1e-5)
        self.attn = MSDeformAttnTorch(dim, 1, num_heads, n_points, ratio)
        self.ffn = ConvFFNTorch(dim, int(dim * cffn_ratio))
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-5)
        self.drop_path = DropPathTorch(drop_path)

    def forward(self, query, ref, feat, shapes, h, w):
        query = query + self.attn(self.query_norm(query), ref, self.feat_norm(feat), shapes)
        return query + self.drop_path(self.ffn(self.ffn_norm(query), h, w))


class InteractionBlockTorch(nn.Module):
    def __init__(self, dim, num_heads, n_points, ratio, cffn_ratio, init_values, extra,
                 drop_path=0.0):
        super().__init__()
        self.injector = InjectorTorch(dim, num_heads, n_points, 3, ratio, init_values)
        self.extractor = ExtractorTorch(dim, num_heads, n_points, ratio, cffn_ratio, drop_path)
        self.extra_extractors = nn.ModuleList([
            ExtractorTorch(dim, num_heads, n_points, ratio, cffn_ratio, drop_path)
            for _ in range(2)]) if extra else None

    def forward(self, x, c, blocks, inputs1, inputs2, h, w):
        x = self.injector(x, inputs1[0], c, inputs1[1])
        for blk in blocks:
            x = blk(x)
        extractors = [self.extractor] + list(self.extra_extractors or [])
        for extractor in extractors:
            c = extractor(c, inputs2[0], x, inputs2[1], h, w)
        return x, c


def _conv_norm_relu(cin, cout, stride):
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), LayerNorm2dTorch(cout), nn.ReLU()]


class SpatialPriorModuleTorch(nn.Module):
    """Conv stem (3 conv-LN-ReLU, max pool) -> 1/4; three stride-2 conv-LN-ReLU -> 1/8,
    1/16, 1/32; 1x1 convs to the ViT width.  LayerNorms channels-first, eps 1e-6."""

    def __init__(self, inplanes, embed_dim):
        super().__init__()
        self.stem = nn.Sequential(*_conv_norm_relu(3, inplanes, 2),
                                  *_conv_norm_relu(inplanes, inplanes, 1),
                                  *_conv_norm_relu(inplanes, inplanes, 1),
                                  nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.conv2 = nn.Sequential(*_conv_norm_relu(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*_conv_norm_relu(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*_conv_norm_relu(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, embed_dim, 1)
        self.fc2 = nn.Conv2d(2 * inplanes, embed_dim, 1)
        self.fc3 = nn.Conv2d(4 * inplanes, embed_dim, 1)
        self.fc4 = nn.Conv2d(4 * inplanes, embed_dim, 1)

    def forward(self, x):
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        tokens = lambda t: t.flatten(2).transpose(1, 2)
        return self.fc1(c1), tokens(self.fc2(c2)), tokens(self.fc3(c3)), tokens(self.fc4(c4))


class InternViTAdapterTorch(InternViTTorch):
    """The adapter backbone with 4 outputs (1/4, 1/8, 1/16, 1/32), NCHW float32, after the
    final channels-first LayerNorms.  Runs at exactly ``img_size`` (pos_embed[:, 1:] is
    added without interpolation); no cls token."""

    def __init__(self, embed_dim=3200, depth=48, num_heads=25, mlp_ratio=4.0, patch_size=16,
                 img_size=512, qkv_bias=False, qk_normalization=True, init_values=0.1,
                 drop_path_rate=0.0, conv_inplane=64, n_points=4, deform_num_heads=25,
                 injector_init_values=0.0, interaction_indexes=((0, 11), (12, 23), (24, 35), (36, 47)),
                 cffn_ratio=0.25, deform_ratio=0.25):
        super().__init__(embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                         mlp_ratio=mlp_ratio, patch_size=patch_size, pretrain_size=img_size,
                         qkv_bias=qkv_bias, qk_normalization=qk_normalization,
                         init_values=init_values, drop_path_rate=drop_path_rate,
                         out_indices=(depth - 1,))
        self.cls_token = None  # as the original: dropped from the state dict
        self.interaction_indexes = [tuple(ix) for ix in interaction_indexes]
        self.level_embed = nn.Parameter(torch.zeros(3, embed_dim))
        self.spm = SpatialPriorModuleTorch(conv_inplane, embed_dim)
        last = len(self.interaction_indexes) - 1
        self.interactions = nn.ModuleList([
            InteractionBlockTorch(embed_dim, deform_num_heads, n_points, deform_ratio,
                                  cffn_ratio, injector_init_values, i == last, drop_path_rate)
            for i in range(len(self.interaction_indexes))])
        self.up = nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2)
        for k in range(1, 5):
            setattr(self, f"norm{k}", LayerNorm2dTorch(embed_dim))

    def forward(self, img: torch.Tensor) -> List[torch.Tensor]:
        b, _, h, w = img.shape
        inputs1, inputs2 = deform_inputs_torch(h, w)
        c1, c2, c3, c4 = self.spm(img)
        c2, c3, c4 = c2 + self.level_embed[0], c3 + self.level_embed[1], c4 + self.level_embed[2]
        c = torch.cat([c2, c3, c4], dim=1)
        x = self.patch_embed(img)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]
        for layer, (start, end) in zip(self.interactions, self.interaction_indexes):
            x, c = layer(x, c, self.blocks[start:end + 1], inputs1, inputs2, gh, gw)
        n2, n3 = c2.shape[1], c3.shape[1]
        dim = self.embed_dim
        c2 = c[:, :n2].transpose(1, 2).reshape(b, dim, 2 * gh, 2 * gw)
        c3 = c[:, n2:n2 + n3].transpose(1, 2).reshape(b, dim, gh, gw)
        c4 = c[:, n2 + n3:].transpose(1, 2).reshape(b, dim, gh // 2, gw // 2)
        c1 = self.up(c2) + c1
        x3 = x.transpose(1, 2).reshape(b, dim, gh, gw)
        up = lambda t, s: F.interpolate(t, scale_factor=s, mode="bilinear", align_corners=False)
        c1, c2, c3, c4 = c1 + up(x3, 4), c2 + up(x3, 2), c3 + x3, c4 + up(x3, 0.5)
        return [self.norm1(c1.float()), self.norm2(c2.float()), self.norm3(c3.float()),
                self.norm4(c4.float())]


@torch.no_grad()
def randomize_adapter_(model: nn.Module, seed: int = 0, offset_scale: float = 2.0) -> nn.Module:
    """Non-trivial random values for every parameter of the adapter (deterministic in seed).

    Linear/conv weights ~ N/sqrt(fan_in) (sampling offsets times ``offset_scale``, so that
    points land between pixels and outside the maps), biases ~ 0.02 N, norm weights
    ~ 1 + 0.2 N, LayerScale and injector gamma ~ +-U(0.05, 0.5), level_embed ~ N,
    pos_embed ~ 0.1 N.  Unhandled parameters raise.
    """
    g = torch.Generator().manual_seed(int(seed))
    randn = lambda shape: torch.randn(tuple(shape), generator=g)
    done = set()

    def fill(p, value):
        p.copy_(value)
        done.add(id(p))

    def signed_uniform(shape):
        mag = 0.05 + 0.45 * torch.rand(tuple(shape), generator=g)
        return mag * torch.where(torch.rand(tuple(shape), generator=g) < 0.5, -1.0, 1.0)

    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            w = mod.weight
            fan_in = w.shape[0] if isinstance(mod, nn.ConvTranspose2d) else math.prod(w.shape[1:])
            scale = offset_scale if name.endswith("sampling_offsets") else 1.0
            fill(w, scale * randn(w.shape) / math.sqrt(fan_in))
            if mod.bias is not None:
                bias = 0.02 * randn(mod.bias.shape)
                if name.endswith("sampling_offsets"):  # keep the grid directions, perturbed
                    bias = mod.bias + 0.3 * randn(mod.bias.shape)
                fill(mod.bias, bias)
        elif isinstance(mod, (nn.LayerNorm, LayerNorm2dTorch)):
            fill(mod.weight, 1.0 + 0.2 * randn(mod.weight.shape))
            fill(mod.bias, 0.02 * randn(mod.bias.shape))
        elif isinstance(mod, RMSNorm):
            fill(mod.weight, 1.0 + 0.2 * randn(mod.weight.shape))
        elif isinstance(mod, (LayerScale, InjectorTorch)):
            fill(mod.gamma, signed_uniform(mod.gamma.shape))
    for name in ("level_embed", "pos_embed"):
        if hasattr(model, name):
            p = getattr(model, name)
            fill(p, (1.0 if name == "level_embed" else 0.1) * randn(p.shape))
    missing = [n for n, p in model.named_parameters() if id(p) not in done]
    if missing:
        raise ValueError(f"randomize_adapter_: unhandled parameters {missing!r}")
    return model
