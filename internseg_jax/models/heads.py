"""Necks and decode heads with MMSegmentation semantics, NHWC.

ConvModule = conv (no bias) -> BatchNorm -> ReLU. BatchNorm follows PyTorch:
eps 1e-5, momentum 0.1, running_var updated with the unbiased batch variance.
Under `jit` with the batch sharded over the mesh, the batch statistics are
means over the global batch, i.e. synchronized BatchNorm. `norm_eval` (mmseg's
name) keeps BatchNorm on its running statistics in training too.

New layers start as mmseg/mmcv 0.x initialises them, not as Flax would
(docs/reference.md): ConvModule convs Kaiming normal (fan_out, ReLU gain),
`conv_seg` N(0, 0.01), BatchNorm and LayerNorm (1, 0), the neck's transposed
convs N(0, sqrt(2 / (k * k * out))) as InternViT6B._init_weights; biases 0.
"""
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from internseg_jax.models.resize import resize_bilinear


# mmcv kaiming_init(mode='fan_out', nonlinearity='relu', distribution='normal'):
# std = sqrt(2 / fan_out), fan_out = kh * kw * out. Flax's 'normal' is untruncated.
KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
CONV_SEG_INIT = nn.initializers.normal(0.01)   # mmseg BaseDecodeHead: Normal(std=0.01)


class BatchNorm(nn.Module):
  momentum: float = 0.1  # PyTorch convention: running = 0.9 * running + 0.1 * batch
  eps: float = 1e-5
  norm_eval: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    train = train and not self.norm_eval
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    running_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    running_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    xf = x.astype(jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      n = int(np.prod([x.shape[a] for a in axes]))
      mean = jnp.mean(xf, axes)
      var = jnp.mean(jnp.square(xf - mean), axes)  # biased, used to normalize
      if not self.is_initializing():
        m = self.momentum
        running_mean.value = (1 - m) * running_mean.value + m * mean
        running_var.value = (1 - m) * running_var.value + m * var * (n / max(n - 1, 1))
    else:
      mean, var = running_mean.value, running_var.value
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
    return y.astype(x.dtype)


class ConvModule(nn.Module):
  features: int
  kernel_size: int = 1
  dtype: Any = jnp.float32
  norm_eval: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    p = self.kernel_size // 2
    x = nn.Conv(self.features, (self.kernel_size,) * 2, padding=((p, p), (p, p)), use_bias=False,
                dtype=self.dtype, kernel_init=KAIMING_FAN_OUT, name='conv')(x)
    return nn.relu(BatchNorm(norm_eval=self.norm_eval, name='bn')(x, train))


@functools.lru_cache(maxsize=64)
def adaptive_pool_matrix(n: int, s: int) -> np.ndarray:
  """(s, n) averaging matrix of PyTorch AdaptiveAvgPool: bin i spans
  [floor(i*n/s), ceil((i+1)*n/s)), so sizes not divisible by s work too."""
  m = np.zeros((s, n))
  for i in range(s):
    lo, hi = (i * n) // s, -(-((i + 1) * n) // s)
    m[i, lo:hi] = 1.0 / (hi - lo)
  return m


def adaptive_avg_pool(x, size: int):
  mh = jnp.asarray(adaptive_pool_matrix(x.shape[1], size), x.dtype)
  mw = jnp.asarray(adaptive_pool_matrix(x.shape[2], size), x.dtype)
  x = jnp.einsum('oh,bhwc->bowc', mh, x, precision='highest')
  return jnp.einsum('pw,bowc->bopc', mw, x, precision='highest')


def classify(x, num_classes: int, dropout: float, dtype, train: bool):
  """mmseg `cls_seg` (call inside a compact method): channel dropout (Dropout2d),
  then a 1x1 conv with bias named `conv_seg` in the calling module."""
  if dropout > 0:
    x = nn.Dropout(dropout, broadcast_dims=(1, 2))(x, deterministic=not train)
  return nn.Conv(num_classes, (1, 1), dtype=dtype, kernel_init=CONV_SEG_INIT, name='conv_seg')(x)


class LinearHead(nn.Module):
  """Linear probing head: BatchNorm over C then a 1x1 conv (on the last map)."""
  num_classes: int = 150
  dropout: float = 0.0
  dtype: Any = jnp.float32
  norm_eval: bool = False

  @nn.compact
  def __call__(self, feats: Sequence[jax.Array], train: bool = False):
    x = BatchNorm(norm_eval=self.norm_eval, name='norm')(feats[-1].astype(self.dtype), train)
    return classify(x, self.num_classes, self.dropout, self.dtype, train)


class UPerHead(nn.Module):
  """UPerNet: PPM on the last map, lateral 1x1 convs, top-down sum, 3x3 FPN
  convs, fusion of all levels at the finest resolution."""
  channels: int = 1536
  num_classes: int = 150
  pool_scales: Sequence[int] = (1, 2, 3, 6)
  dropout: float = 0.1
  dtype: Any = jnp.float32
  norm_eval: bool = False

  @nn.compact
  def __call__(self, feats: Sequence[jax.Array], train: bool = False):
    conv = functools.partial(ConvModule, self.channels, dtype=self.dtype,
                             norm_eval=self.norm_eval)
    feats = [f.astype(self.dtype) for f in feats]
    top = feats[-1]
    psp = [top] + [
        resize_bilinear(conv(1, name=f'psp_modules_{j}')(adaptive_avg_pool(top, s), train),
                        top.shape[1:3])
        for j, s in enumerate(self.pool_scales)]
    laterals = [conv(1, name=f'lateral_convs_{k}')(f, train) for k, f in enumerate(feats[:-1])]
    laterals.append(conv(3, name='bottleneck')(jnp.concatenate(psp, -1), train))
    for i in range(len(laterals) - 1, 0, -1):
      laterals[i - 1] = laterals[i - 1] + resize_bilinear(laterals[i], laterals[i - 1].shape[1:3])
    outs = [conv(3, name=f'fpn_convs_{k}')(lat, train) for k, lat in enumerate(laterals[:-1])]
    outs.append(laterals[-1])
    outs = [outs[0]] + [resize_bilinear(o, outs[0].shape[1:3]) for o in outs[1:]]
    x = conv(3, name='fpn_bottleneck')(jnp.concatenate(outs, -1), train)
    return classify(x, self.num_classes, self.dropout, self.dtype, train)


class FCNHead(nn.Module):
  """Auxiliary head: one 3x3 ConvModule, dropout, 1x1 classifier."""
  channels: int = 1536
  num_classes: int = 150
  dropout: float = 0.1
  dtype: Any = jnp.float32
  norm_eval: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = ConvModule(self.channels, 3, self.dtype, self.norm_eval, name='convs_0')(
        x.astype(self.dtype), train)
    return classify(x, self.num_classes, self.dropout, self.dtype, train)


class ConvTranspose2x2(nn.Module):
  """PyTorch ConvTranspose2d(C, C, kernel 2, stride 2): each input pixel writes
  its own 2x2 output patch, so it is one matmul and a pixel shuffle."""
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    # InternViT6B._init_weights: N(0, sqrt(2 / (kh * kw * out))), i.e. fan_out.
    kernel = self.param('kernel', KAIMING_FAN_OUT, (2, 2, c, self.features), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), self.param_dtype)
    y = jnp.einsum('bhwi,acio->bhawco', x.astype(self.dtype), kernel.astype(self.dtype))
    return y.reshape(b, 2 * h, 2 * w, self.features) + bias.astype(self.dtype)


class PyramidNeck(nn.Module):
  """`with_fpn`: four maps at strides 14/4, 14/2, 14, 28 from four block outputs."""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats: Sequence[jax.Array]):
    f0, f1, f2, f3 = feats
    c = f0.shape[-1]
    up = functools.partial(ConvTranspose2x2, c, self.dtype, self.param_dtype)
    x = up(name='up1_0')(f0)
    x = nn.LayerNorm(1e-6, dtype=jnp.float32, param_dtype=self.param_dtype, name='up1_1')(
        x.astype(jnp.float32)).astype(self.dtype)
    x = up(name='up1_3')(nn.gelu(x, approximate=False))
    pooled = nn.max_pool(f3, (2, 2), strides=(2, 2), padding='VALID')
    return [x, up(name='up2_0')(f1), f2, pooled]
