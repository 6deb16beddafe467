"""InternViT-6B-Adapter (ViT-Adapter around the InternViT blocks) in Flax, NHWC.

As OpenGVLab/InternVL-MMDetSeg `mmseg/models/backbones/vit_adapter.py` and
`adapter_modules.py` (the 512 ADE20K config): a convolutional spatial prior
module (SPM) gives maps at 1/4 .. 1/32; the 1/8, 1/16 and 1/32 ones, plus a
level embedding, are the adapter tokens `c`. Around each group of ViT blocks an
interaction injects `c` into the ViT tokens (deformable attention over the
three levels, scaled by `gamma`) and extracts the ViT tokens back into `c`
(deformable attention over the ViT grid, then a ConvFFN with a depth-wise conv
per scale); the last interaction has two extra extractors. Outputs: c1 =
ConvT2x2(c2) + SPM c1, and c1..c4 plus the last ViT tokens resized to each
scale (bilinear x4, x2, x1, x0.5), each through a channels-first LayerNorm.

The ViT part is InternViT's: its stacked `blocks` params (leading depth axis)
scanned over each interaction's slice, with the same remat policies. No cls
token, and `pos_embed[:, 1:]` is added without interpolation, so the model
runs at exactly `img_size` (the original does the same).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from internseg_jax.models.deform_attn import MSDeformAttn, Shapes, reference_points
from internseg_jax.models.intern_vit import (REMAT_POLICIES, InternViT, drop_path,
                                             embed_patches, scan_blocks)
from internseg_jax.models.resize import resize_bilinear

# The original's `_init_weights`: conv kernels ~ N(0, 2 / (k*k*out/groups)), Linear
# ~ trunc_normal(0.02) (timm truncates at +-2 absolute, i.e. not at all for std 0.02,
# hence a plain normal here), norms 1 / 0, level_embed ~ N(0, 1).
CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
LINEAR_INIT = nn.initializers.normal(0.02)


def layer_norm(x, eps: float, name: str, param_dtype):
  """LayerNorm over C in float32, cast back to x's dtype (call inside a compact
  method). Two-pass variance as PyTorch (Flax's default single-pass E[x^2]-E[x]^2
  loses digits when the mean is large)."""
  y = nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype,
                   use_fast_variance=False, name=name)(x.astype(jnp.float32))
  return y.astype(x.dtype)


class SpatialPriorModule(nn.Module):
  """SPM: stem (3x [3x3 conv, LN, ReLU], max pool 3/2) -> 1/4; conv2..4 (3x3 stride 2,
  LN, ReLU) -> 1/8, 1/16, 1/32 with 2, 4, 4 x `inplanes` channels; fc1..fc4 1x1
  convs with bias to `embed_dim`. LayerNorms eps 1e-6 in float32 (the original's
  channels-first LayerNorm). Names follow the PyTorch Sequential indices."""
  inplanes: int = 64
  embed_dim: int = 3200
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    def conv_norm_relu(x, features, stride, conv_name, norm_name):
      x = nn.Conv(features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                  use_bias=False, kernel_init=CONV_INIT, dtype=self.dtype,
                  param_dtype=self.param_dtype, name=conv_name)(x)
      return nn.relu(layer_norm(x, 1e-6, norm_name, self.param_dtype))

    n = self.inplanes
    x = conv_norm_relu(x, n, 2, 'stem_0', 'stem_1')
    x = conv_norm_relu(x, n, 1, 'stem_3', 'stem_4')
    x = conv_norm_relu(x, n, 1, 'stem_6', 'stem_7')
    c1 = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # pads with -inf
    c2 = conv_norm_relu(c1, 2 * n, 2, 'conv2_0', 'conv2_1')
    c3 = conv_norm_relu(c2, 4 * n, 2, 'conv3_0', 'conv3_1')
    c4 = conv_norm_relu(c3, 4 * n, 2, 'conv4_0', 'conv4_1')
    fc = lambda x, name: nn.Conv(self.embed_dim, (1, 1), kernel_init=CONV_INIT, dtype=self.dtype,
                                 param_dtype=self.param_dtype, name=name)(x)
    return fc(c1, 'fc1'), fc(c2, 'fc2'), fc(c3, 'fc3'), fc(c4, 'fc4')


class ConvFFN(nn.Module):
  """fc1 -> one depth-wise 3x3 conv (with bias) run on each scale's tokens -> exact
  GELU -> fc2. The original's dropout is fixed at 0."""
  hidden: int
  shapes: Shapes           # the scales of the tokens, in order
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, _, c = x.shape
    dense = lambda features, name: nn.Dense(features, dtype=self.dtype, kernel_init=LINEAR_INIT,
                                            param_dtype=self.param_dtype, name=name)
    h = dense(self.hidden, 'fc1')(x)
    # groups = channels: the original's fan_out is 3*3*out/groups = 9.
    dwconv = nn.Conv(self.hidden, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=self.hidden,
                     kernel_init=nn.initializers.normal((2.0 / 9.0) ** 0.5), dtype=self.dtype,
                     param_dtype=self.param_dtype, name='dwconv')
    parts, start = [], 0
    for hh, ww in self.shapes:
      part = h[:, start:start + hh * ww].reshape(b, hh, ww, self.hidden)
      parts.append(dwconv(part).reshape(b, hh * ww, self.hidden))
      start += hh * ww
    h = nn.gelu(jnp.concatenate(parts, axis=1), approximate=False)
    return dense(c, 'fc2')(h)


class Injector(nn.Module):
  """ViT tokens (queries on the ViT grid `query_shapes`) += gamma * deformable
  attention over the adapter tokens (levels `value_shapes`). LayerNorms eps 1e-5."""
  num_heads: int
  n_points: int
  deform_ratio: float
  init_values: float
  query_shapes: Shapes
  value_shapes: Shapes
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query, feat):
    pd = self.param_dtype
    ref = reference_points(self.query_shapes)[None, :, None, :]
    attn = MSDeformAttn(self.num_heads, len(self.value_shapes), self.n_points, self.deform_ratio,
                        self.dtype, pd, name='attn')(
        layer_norm(query, 1e-5, 'query_norm', pd), ref,
        layer_norm(feat, 1e-5, 'feat_norm', pd), self.value_shapes)
    gamma = self.param('gamma', nn.initializers.constant(self.init_values), (query.shape[-1],), pd)
    return query + gamma.astype(self.dtype) * attn


class Extractor(nn.Module):
  """Adapter tokens (queries at `query_shapes`, one reference point per cell) +=
  deformable attention over the ViT tokens (`value_shapes`); then += ConvFFN of
  the LayerNormed tokens, with stochastic depth `drop_path` (0 = off; needs a
  'dropout' rng). LayerNorms eps 1e-5."""
  num_heads: int
  n_points: int
  deform_ratio: float
  cffn_ratio: float
  query_shapes: Shapes
  value_shapes: Shapes
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query, feat):
    pd, c = self.param_dtype, query.shape[-1]
    ref = reference_points(self.query_shapes)[None, :, None, :]
    query = query + MSDeformAttn(self.num_heads, len(self.value_shapes), self.n_points,
                                 self.deform_ratio, self.dtype, pd, name='attn')(
        layer_norm(query, 1e-5, 'query_norm', pd), ref,
        layer_norm(feat, 1e-5, 'feat_norm', pd), self.value_shapes)
    h = ConvFFN(int(c * self.cffn_ratio), self.query_shapes, self.dtype, pd, name='ffn')(
        layer_norm(query, 1e-5, 'ffn_norm', pd))
    if self.drop_path > 0:
      h = drop_path(h, jnp.float32(self.drop_path), self.make_rng('dropout'))
    return query + h


class InteractionBlock(nn.Module):
  """The adapter layers of one interaction: `inject` before its ViT blocks,
  `extract` after them (the blocks themselves are the backbone's stack)."""
  num_heads: int
  n_points: int
  deform_ratio: float
  cffn_ratio: float
  init_values: float
  vit_shape: tuple          # (H/16, W/16)
  levels: Shapes            # (H/8, W/8), (H/16, W/16), (H/32, W/32)
  extra_extractor: bool = False
  drop_path: float = 0.0
  remat: str = 'full'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    # The original checkpoints injector and extractors (with_cp); remat is a no-op
    # when nothing is differentiated.
    wrap = ((lambda cls: nn.remat(cls, policy=REMAT_POLICIES[self.remat]))
            if self.remat != 'none' else (lambda cls: cls))
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.injector = wrap(Injector)(self.num_heads, self.n_points, self.deform_ratio,
                                   self.init_values, (self.vit_shape,), self.levels, **common)
    make_extractor = lambda: wrap(Extractor)(
        self.num_heads, self.n_points, self.deform_ratio, self.cffn_ratio, self.levels,
        (self.vit_shape,), self.drop_path, **common)
    self.extractor = make_extractor()
    self.extra_extractors = [make_extractor() for _ in range(2)] if self.extra_extractor else []

  def inject(self, x, c):
    return self.injector(x, c)

  def extract(self, x, c):
    for extractor in [self.extractor, *self.extra_extractors]:
      c = extractor(c, x)
    return c


class Upsample2x(nn.Module):
  """PyTorch ConvTranspose2d(C, C, 2, stride 2): each pixel writes its own 2x2
  patch (one matmul and a pixel shuffle); kernel (2, 2, in, out), init as the
  original's `_init_weights` (normal, fan_out = 2*2*out)."""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    kernel = self.param('kernel', CONV_INIT, (2, 2, c, c), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (c,), self.param_dtype)
    y = jnp.einsum('bhwi,acio->bhawco', x, kernel.astype(self.dtype))
    return y.reshape(b, 2 * h, 2 * w, c) + bias.astype(self.dtype)


class InternViTAdapter(nn.Module):
  """InternViT-6B-Adapter backbone. Input (B, img_size, img_size, 3) normalized
  images (img_size a multiple of 32, patch 16); output four float32 maps
  (B, H/4, W/4, C), (B, H/8, W/8, C), (B, H/16, W/16, C), (B, H/32, W/32, C).

  ViT fields as `InternViT` (`init_values` is the ViT's layer scale). The
  original's adapter `init_values` is `injector_init_values` here (the
  injector's gamma), its `deform_num_heads` the deformable attention heads.
  """
  embed_dim: int = 3200
  depth: int = 48
  num_heads: int = 25
  mlp_ratio: float = 4.0
  patch_size: int = 16
  img_size: int = 512
  qkv_bias: bool = False
  qk_normalization: bool = True
  init_values: float = 0.1
  drop_path_rate: float = 0.0
  conv_inplane: int = 64
  n_points: int = 4
  deform_num_heads: int = 25
  injector_init_values: float = 0.0
  interaction_indexes: Sequence[Sequence[int]] = ((0, 11), (12, 23), (24, 35), (36, 47))
  cffn_ratio: float = 0.25
  deform_ratio: float = 0.25
  attention: str = 'auto'
  remat: str = 'full'
  # The ViT blocks are differentiated (not in the recipe: its ViT is frozen):
  # each interaction's scan then closes over its own slice of the stack, so the
  # backward pass keeps slice-sized gradients instead of 4 full-depth ones.
  trained_blocks: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def vit(self) -> InternViT:
    """The unbound InternViT of the same fields: its block and stacked-block init."""
    return InternViT(embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
                     mlp_ratio=self.mlp_ratio, patch_size=self.patch_size,
                     img_size=self.img_size, qkv_bias=self.qkv_bias,
                     qk_normalization=self.qk_normalization, init_values=self.init_values,
                     drop_path_rate=self.drop_path_rate, attention=self.attention,
                     remat=self.remat, dtype=self.dtype, param_dtype=self.param_dtype,
                     parent=None)

  def _check(self, h, w):
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}')
    if self.patch_size != 16:
      raise ValueError(f'the adapter needs patch_size 16 (its ViT grid is the 1/16 level), '
                       f'got {self.patch_size}')
    if (h, w) != (self.img_size, self.img_size) or h % 32:
      raise ValueError(f'the adapter runs at exactly img_size x img_size (a multiple of 32), '
                       f'got {h}x{w} for img_size {self.img_size}: pos_embed is added without '
                       f'interpolation; use windows of the crop size')
    ends = [int(i) for ix in self.interaction_indexes for i in (ix[0], ix[-1])]
    if any(b < a for a, b in zip(ends, ends[1:])) or ends[0] < 0 or ends[-1] >= self.depth:
      raise ValueError(f'interaction_indexes {self.interaction_indexes} must be ordered '
                       f'[start, end] pairs within 0..{self.depth - 1}')

  @nn.compact
  def __call__(self, images, train: bool = False):
    b, h, w, _ = images.shape
    self._check(h, w)
    c, pd, dtype = self.embed_dim, self.param_dtype, self.dtype
    grid = (h // 16, w // 16)
    levels = ((h // 8, w // 8), grid, (h // 32, w // 32))
    images = images.astype(dtype)

    c1, c2, c3, c4 = SpatialPriorModule(self.conv_inplane, c, dtype, pd, name='spm')(images)
    level_embed = self.param('level_embed', nn.initializers.normal(1.0), (3, c), pd)
    tokens = jnp.concatenate([m.reshape(b, -1, c) + level_embed[k].astype(dtype)
                              for k, m in enumerate((c2, c3, c4))], axis=1)

    x = embed_patches(images, c, self.patch_size, dtype, pd)
    pos_embed = self.param('pos_embed', nn.initializers.truncated_normal(0.02),
                           (1, 1 + grid[0] * grid[1], c), pd)
    x = x + pos_embed[:, 1:].astype(dtype)

    vit = self.vit()
    blocks = self.param('blocks', vit._init_blocks)
    stochastic = train and self.drop_path_rate > 0
    rates = jnp.linspace(0.0, self.drop_path_rate, self.depth)
    keys = jax.random.split(self.make_rng('dropout'), self.depth) if stochastic else None
    block = vit.block()
    n = len(self.interaction_indexes)
    for i, ix in enumerate(self.interaction_indexes):
      # The original gives every extractor's FFN the backbone's drop_path_rate (not a ramp).
      layer = InteractionBlock(self.deform_num_heads, self.n_points, self.deform_ratio,
                               self.cffn_ratio, self.injector_init_values, grid, levels,
                               extra_extractor=i == n - 1,
                               drop_path=self.drop_path_rate if stochastic else 0.0,
                               remat=self.remat, dtype=dtype, param_dtype=pd,
                               name=f'interactions_{i}')
      x = layer.inject(x, tokens)
      x = scan_blocks(block, blocks, x, int(ix[0]), int(ix[-1]), self.remat, rates, keys,
                      sliced=self.trained_blocks)
      tokens = layer.extract(x, tokens)

    sizes = np.cumsum([lh * lw for lh, lw in levels])
    c2, c3, c4 = (t.reshape(b, lh, lw, c) for t, (lh, lw) in
                  zip(jnp.split(tokens, sizes[:-1], axis=1), levels))
    c1 = Upsample2x(dtype, pd, name='up')(c2) + c1
    x3 = x.reshape(b, *grid, c)
    maps = [c1 + resize_bilinear(x3, c1.shape[1:3]), c2 + resize_bilinear(x3, c2.shape[1:3]),
            c3 + x3, c4 + resize_bilinear(x3, c4.shape[1:3])]
    # Final channels-first LayerNorms on float32 maps, outputs float32 (as the original).
    return [nn.LayerNorm(1e-6, dtype=jnp.float32, param_dtype=pd, use_fast_variance=False,
                         name=f'norm{k}')(m.astype(jnp.float32)) for k, m in enumerate(maps, 1)]
