"""Resizes with PyTorch `F.interpolate` semantics (align_corners=False, no antialias).

On device: `jax.image.resize` with method 'bicubic-pytorch' (Keys a = -0.75,
edge-clamped taps) or 'bilinear', and `antialias=False`, matches PyTorch to
float32 rounding (tests/test_resize.py). `antialias=False` matters: the default
(True) filters when shrinking, which PyTorch does not, and plain 'bicubic' uses
a = -0.5.

On the host (numpy): bicubic in float64 by interpolation matrices, for the
converter, which resizes position embeddings and patch kernels once and rounds
them to the file's dtype as the original does; bilinear by two-tap gathers in
the array's own dtype, for large logit maps in evaluation (OpenCV cannot resize
150 channels).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys' cubic convolution weights for taps at offsets -1, 0, 1, 2."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) float64 matrix of PyTorch bicubic, align_corners=False, size=out."""
  scale = in_size / out_size
  # PyTorch does not clamp the cubic source coordinate; it clamps the tap indices.
  src = (np.arange(out_size) + 0.5) * scale - 0.5
  base = np.floor(src)
  weights = _cubic_weights(src - base)
  taps = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3), 0, in_size - 1)
  matrix = np.zeros((out_size, in_size))
  np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.ravel()), weights.ravel())
  return matrix


def _device_resize(x, size, method: str):
  """Axes 1 and 2 of a (B, H, W, C) jax array, computed in float32."""
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  shape = (x.shape[0], *size, x.shape[3])
  return jax.image.resize(x.astype(jnp.float32), shape, method=method,
                          antialias=False).astype(x.dtype)


def resize_bicubic(x, size):
  """PyTorch `interpolate(mode='bicubic', align_corners=False)` on NHWC input;
  numpy input in float64 maths (result in its dtype), jax input on device."""
  if isinstance(x, np.ndarray):
    if tuple(x.shape[1:3]) == tuple(size):
      return x
    out = np.einsum('oh,bhwc->bowc', bicubic_matrix(x.shape[1], size[0]), x.astype(np.float64))
    out = np.einsum('pw,bowc->bopc', bicubic_matrix(x.shape[2], size[1]), out)
    return out.astype(x.dtype)
  return _device_resize(x, size, 'bicubic-pytorch')


def resize_bilinear(x, size):
  """PyTorch `interpolate(mode='bilinear', align_corners=False)` on NHWC input;
  numpy input by two-tap gathers on the host, jax input on device."""
  if isinstance(x, np.ndarray):
    return _bilinear_gather(_bilinear_gather(x, size[0], 1), size[1], 2)
  return _device_resize(x, size, 'bilinear')


def _bilinear_gather(x: np.ndarray, out_size: int, axis: int) -> np.ndarray:
  in_size = x.shape[axis]
  if in_size == out_size:
    return x
  src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  shape = [1] * x.ndim
  shape[axis] = out_size
  frac = (src - lo).astype(x.dtype if x.dtype.kind == 'f' else np.float64).reshape(shape)
  return np.take(x, lo, axis) * (1 - frac) + np.take(x, hi, axis) * frac


def resize_pos_embed(pos_embed, grid):
  """Resizes a (1, 1 + g*g, C) position embedding to (1, 1 + h*w, C).

  The cls part is kept; the patch part is resized as an image (bicubic, PyTorch).
  Works on numpy (float64 maths, result in the input dtype) and jax arrays.
  """
  h, w = grid
  n = pos_embed.shape[1] - 1
  g = int(round(n ** 0.5))
  if g * g != n:
    raise ValueError(f'pos_embed has {n} patch positions, not a square grid')
  if (g, g) == (h, w):
    return pos_embed
  cls_part, patch_part = pos_embed[:, :1], pos_embed[:, 1:]
  c = pos_embed.shape[-1]
  patch = resize_bicubic(patch_part.reshape(1, g, g, c), (h, w)).reshape(1, h * w, c)
  concat = np.concatenate if isinstance(pos_embed, np.ndarray) else jnp.concatenate
  return concat([cls_part, patch], axis=1)
