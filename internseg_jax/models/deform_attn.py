"""Multi-scale deformable attention (Deformable DETR, as used by ViT-Adapter) in JAX.

Each query attends, per head, to `n_points` sampling points on each of
`n_levels` value maps: reference point + offsets (predicted from the query, in
pixels of each level), bilinearly sampled and mixed with softmax weights
(softmax over levels x points). The sampling is that of the authors' pure
PyTorch check `ms_deform_attn_core_pytorch`: `F.grid_sample(mode='bilinear',
padding_mode='zeros', align_corners=False)` on `2 * location - 1`, i.e. the
pixel coordinate is `location * size - 0.5` and neighbours outside the map
count as zeros.

No compiled op: the four neighbours of every sampling point are gathered from
the flattened value maps, so memory grows with queries x levels x points x 4,
never with queries x the value map.
"""
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Shapes = Sequence[Sequence[int]]  # ((H_0, W_0), (H_1, W_1), ...), static


def reference_points(shapes: Shapes) -> np.ndarray:
  """(sum H*W, 2) float32 (x, y) centres of every cell of each level, row-major,
  normalised by that level's (W, H): ((j + 0.5) / W, (i + 0.5) / H)."""
  points = []
  for h, w in shapes:
    y, x = np.meshgrid((np.arange(h, dtype=np.float32) + 0.5) / np.float32(h),
                       (np.arange(w, dtype=np.float32) + 0.5) / np.float32(w), indexing='ij')
    points.append(np.stack([x.ravel(), y.ravel()], axis=-1))
  return np.concatenate(points, axis=0)


def _neighbour_gather(value, indices):
  """value (B, M, S, D), indices (B, M, K) -> (B, M, K, D)."""
  # The indices are clamped into the map already: no bounds handling in the gather.
  take = lambda v, i: v.at[i].get(mode='promise_in_bounds')
  return jax.vmap(jax.vmap(take))(value, indices)


def ms_deform_attn_core(value, spatial_shapes: Shapes, sampling_locations, attention_weights):
  """The sampling and weighted sum, with the signature of the reference's
  `ms_deform_attn_core_pytorch`.

  value: (B, S, M, D) with S = sum H_l * W_l (levels flattened row-major, in order);
  sampling_locations: (B, Lq, M, L, P, 2) as (x, y) in [0, 1] of each level
  (outside is allowed: those neighbours are zeros); attention_weights:
  (B, Lq, M, L, P). Returns (B, Lq, M * D) in value's dtype.

  Positions and bilinear weights are computed in float32 whatever the value
  dtype (the original casts the locations to the value dtype, fp16 there), and
  the weighted sum accumulates in float32.
  """
  b, s, m, d = value.shape
  _, lq, _, n_levels, n_points, _ = sampling_locations.shape
  shapes = [tuple(int(v) for v in hw) for hw in spatial_shapes]
  if len(shapes) != n_levels or sum(h * w for h, w in shapes) != s:
    raise ValueError(f'spatial shapes {shapes} do not match {n_levels} levels of {s} values')
  heights = np.array([h for h, _ in shapes], np.float32)[:, None]   # (L, 1) over points
  widths = np.array([w for _, w in shapes], np.float32)[:, None]
  starts = np.cumsum([0] + [h * w for h, w in shapes[:-1]]).astype(np.int32)[:, None]

  loc = sampling_locations.astype(jnp.float32).transpose(0, 2, 1, 3, 4, 5)  # (B, M, Lq, L, P, 2)
  attn = attention_weights.astype(jnp.float32).transpose(0, 2, 1, 3, 4)     # (B, M, Lq, L, P)
  # align_corners=False: location 0 is the left edge of pixel 0, 1 the right edge of the last.
  x = loc[..., 0] * widths - 0.5
  y = loc[..., 1] * heights - 0.5
  x0, y0 = jnp.floor(x), jnp.floor(y)
  fx, fy = x - x0, y - y0
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
  w_int, h_int = widths.astype(np.int32), heights.astype(np.int32)

  indices, weights = [], []
  for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
    xi, yi = x0 + dx, y0 + dy
    inside = (xi >= 0) & (xi < w_int) & (yi >= 0) & (yi < h_int)
    bilinear = (fx if dx else 1.0 - fx) * (fy if dy else 1.0 - fy)
    # Outside neighbours read a clamped (valid) index with weight 0: zeros padding.
    weights.append(jnp.where(inside, bilinear, 0.0) * attn)
    indices.append(starts + jnp.clip(yi, 0, h_int - 1) * w_int + jnp.clip(xi, 0, w_int - 1))
  k = n_levels * n_points * 4
  indices = jnp.stack(indices, axis=-1).reshape(b, m, lq * k)
  weights = jnp.stack(weights, axis=-1).reshape(b, m, lq, k)

  neighbours = _neighbour_gather(value.transpose(0, 2, 1, 3), indices).reshape(b, m, lq, k, d)
  out = jnp.einsum('bmqkd,bmqk->bqmd', neighbours, weights.astype(value.dtype),
                   preferred_element_type=jnp.float32, precision='highest')
  return out.reshape(b, lq, m * d).astype(value.dtype)


def grid_offsets_init(n_heads: int, n_levels: int, n_points: int):
  """The original's bias init of `sampling_offsets`: head h points along the
  angle 2*pi*h/n_heads, scaled so that the larger of |cos|, |sin| is 1, point p
  at (p + 1) times that; the same for every level. Flat (M * L * P * 2,)."""
  def init(key, shape, dtype=jnp.float32):
    del key
    thetas = np.arange(n_heads, dtype=np.float32) * np.float32(2.0 * math.pi / n_heads)
    grid = np.stack([np.cos(thetas), np.sin(thetas)], axis=-1)
    grid = grid / np.abs(grid).max(axis=-1, keepdims=True)
    scale = np.arange(1, n_points + 1, dtype=np.float32)[None, None, :, None]
    grid = np.broadcast_to(grid[:, None, None, :] * scale, (n_heads, n_levels, n_points, 2))
    flat = grid.reshape(-1)
    if tuple(shape) != flat.shape:
      raise ValueError(f'sampling_offsets bias has shape {shape}, expected {flat.shape}')
    return jnp.asarray(flat, dtype)
  return init


class MSDeformAttn(nn.Module):
  """MSDeformAttn(d_model = query width, n_levels, n_heads, n_points, ratio).

  Parameters (PyTorch names): `value_proj` C -> int(C * ratio), `sampling_offsets`
  C -> M*L*P*2, `attention_weights` C -> M*L*P, `output_proj` int(C * ratio) -> C.
  Init as the original's `_reset_parameters`: offsets kernel 0 with the grid
  bias, attention weights 0, value/output projections Xavier-uniform with bias 0.
  """
  n_heads: int
  n_levels: int
  n_points: int = 4
  ratio: float = 1.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query, reference_points, value_input, spatial_shapes: Shapes):
    """query (B, Lq, C); reference_points (B or 1, Lq, L or 1, 2) (x, y) in [0, 1];
    value_input (B, S, C) with S = sum H*W of the static `spatial_shapes`."""
    b, lq, c = query.shape
    s = value_input.shape[1]
    m, n_levels, n_points = self.n_heads, self.n_levels, self.n_points
    value_dim = int(c * self.ratio)
    if value_dim % m:
      raise ValueError(f'int(d_model * ratio) = {value_dim} is not divisible by {m} heads')

    def dense(features, name, kernel_init, bias_init=nn.initializers.zeros):
      return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=kernel_init, bias_init=bias_init, name=name)

    xavier, zeros = nn.initializers.xavier_uniform(), nn.initializers.zeros
    value = dense(value_dim, 'value_proj', xavier)(value_input.astype(self.dtype))
    value = value.reshape(b, s, m, value_dim // m)
    offsets = dense(m * n_levels * n_points * 2, 'sampling_offsets', zeros,
                    grid_offsets_init(m, n_levels, n_points))(query.astype(self.dtype))
    offsets = offsets.reshape(b, lq, m, n_levels, n_points, 2).astype(jnp.float32)
    logits = dense(m * n_levels * n_points, 'attention_weights', zeros)(query.astype(self.dtype))
    # Softmax in float32 (the original runs it in the compute dtype).
    weights = jax.nn.softmax(logits.reshape(b, lq, m, n_levels * n_points).astype(jnp.float32))
    weights = weights.reshape(b, lq, m, n_levels, n_points)

    # Offsets are in pixels of each level: normalised by that level's (W, H).
    normalizer = np.array([[w, h] for h, w in spatial_shapes], np.float32)
    ref = jnp.asarray(reference_points, jnp.float32)[:, :, None, :, None, :]
    locations = ref + offsets / normalizer[None, None, None, :, None, :]
    out = ms_deform_attn_core(value, spatial_shapes, locations, weights)
    return dense(c, 'output_proj', xavier)(out)
