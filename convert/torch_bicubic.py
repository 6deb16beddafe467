"""PyTorch's CPU bicubic resize, number for number, in the tensor's own dtype.

When the original loads a pretrained file (InternViT6B.init_weights in
InternVL-MMDetSeg's intern_vit_6b.py) it resizes `pos_embed` (patch part, as a
(1, C, g, g) image) and the patch kernel (C, 3, k, k) with
`F.interpolate(mode='bicubic', align_corners=False)` on the file's own bf16
tensors, on the CPU. PyTorch's CPU kernel (aten/native/cpu/UpSampleKernel.cpp,
HelperInterpCubic and Interpolate) computes the source coordinates and the cubic
coefficients (a = -0.75) in float32, stores the coefficients in the tensor's
dtype (so they are rounded to bf16), sums the four width taps and then the four
height taps in float32 (the compiled kernel fuses each multiply-add), and rounds
the result to the tensor's dtype. Resizing in float64 and rounding once differs
from that in about 40 % of the elements (by one bf16 step); this emulation
matches torch 2.13's bf16 result in all but about 1 element in 10^5 (where the
taps nearly cancel; one bf16 step). `internseg_jax/models/resize.py` is the
float (run-time) version of the same function.
"""
import numpy as np

A = -0.75  # PyTorch's cubic convolution coefficient


def _accumulator(dtype: np.dtype):
  # PyTorch's opmath type: float32 for bf16/f16/f32, float64 for f64.
  return np.float64 if dtype == np.float64 else np.float32


def _near(x, acc):  # |x| <= 1: ((A + 2) x - (A + 3)) x x + 1
  a = acc(A)
  return ((a + acc(2)) * x - (a + acc(3))) * x * x + acc(1)


def _far(x, acc):  # 1 < |x| < 2: ((A x - 5 A) x + 8 A) x - 4 A
  a = acc(A)
  return ((a * x - acc(5) * a) * x + acc(8) * a) * x - acc(4) * a


def taps_and_weights(in_size: int, out_size: int, dtype) -> tuple[np.ndarray, np.ndarray]:
  """(out, 4) source indices and (out, 4) weights (rounded to `dtype`, returned
  in the accumulator type) of a bicubic resize, align_corners=False, by size."""
  dtype = np.dtype(dtype)
  acc = _accumulator(dtype)
  scale = acc(in_size) / acc(out_size)
  src = (np.arange(out_size, dtype=acc) + acc(0.5)) * scale - acc(0.5)
  index = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  t = np.clip(src - index.astype(acc), acc(0), acc(1)).astype(acc)
  one = acc(1)
  weights = np.stack([_far(t + one, acc), _near(t, acc), _near(one - t, acc),
                      _far((one - t) + one, acc)], axis=-1).astype(acc)
  weights = weights.astype(dtype).astype(acc)  # PyTorch keeps them in the tensor's dtype
  taps = np.clip(index[:, None] + np.arange(-1, 3), 0, in_size - 1)
  return taps, weights


def resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """`F.interpolate(x, size, mode='bicubic', align_corners=False)` on the CPU,
  for x of shape (..., H, W) in its own dtype (bf16, f16, f32 or f64)."""
  dtype = x.dtype
  out_h, out_w = size
  if x.shape[-2:] == (out_h, out_w):
    return x  # PyTorch's weights are then (0, 1, 0, 0): the identity
  acc = _accumulator(dtype)
  xs = x.astype(acc)
  taps_w, weights_w = taps_and_weights(x.shape[-1], out_w, dtype)
  taps_h, weights_h = taps_and_weights(x.shape[-2], out_h, dtype)
  # The width taps first (the inner sum of PyTorch's kernel), then the height
  # taps, one tap at a time, each step rounded to float32 as there.
  inner = (xs[..., taps_w[:, 0]] * weights_w[:, 0]).astype(acc)
  for j in range(1, 4):
    inner = _fused_multiply_add(xs[..., taps_w[:, j]], weights_w[:, j], inner)
  out = (inner[..., taps_h[:, 0], :] * weights_h[:, 0, None]).astype(acc)
  for i in range(1, 4):
    out = _fused_multiply_add(inner[..., taps_h[:, i], :], weights_h[:, i, None], out)
  return out.astype(dtype)


def _fused_multiply_add(a, b, c):
  """round(a * b + c) once, as the compiled kernel's FMA: exact for float32
  operands through float64 (the product is exact there). float64: plain."""
  if c.dtype == np.float64:
    return a * b + c
  return (a.astype(np.float64) * b.astype(np.float64) + c).astype(np.float32)


def resize_pos_embed(pos_embed: np.ndarray, grid: int) -> np.ndarray:
  """(1, 1 + g*g, C) -> (1, 1 + grid*grid, C): the patch part as a (1, C, g, g)
  image, the cls part kept (as the original's resize_pos_embed)."""
  n, c = pos_embed.shape[1] - 1, pos_embed.shape[2]
  g = int(round(n ** 0.5))
  if g * g != n:
    raise ValueError(f'pos_embed has {n} patch positions, not a square grid')
  if g == grid:
    return pos_embed
  image = pos_embed[:, 1:].reshape(1, g, g, c).transpose(0, 3, 1, 2)
  patch = resize(image, (grid, grid)).transpose(0, 2, 3, 1).reshape(1, grid * grid, c)
  return np.concatenate([pos_embed[:, :1], patch], axis=1)


def resize_patch_kernel(kernel: np.ndarray, size: int) -> np.ndarray:
  """A Conv2d weight (C, 3, k, k) -> (C, 3, size, size), as the original does
  when the model's patch size differs from the file's (e.g. 14 -> 16)."""
  return resize(kernel, (size, size))
