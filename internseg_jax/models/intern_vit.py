"""InternViT (the InternViT-6B backbone) in Flax.

Follows the reference block by block: fused qkv without bias, RMSNorm computed in
float32, QK-norm over the full width before the head split, layer scale, exact
GELU, stochastic depth rising over depth, a cls token and no final norm.

The blocks' parameters are stacked on a leading `depth` axis and run with
`lax.scan`, so compile time does not grow with depth. The scan is split at the
requested `out_indices`, so only those feature maps are kept, and blocks after
the last requested index are never run.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from internseg_jax.models.resize import resize_pos_embed

REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'everything': jax.checkpoint_policies.everything_saveable,
}


def forward_flops(embed_dim: int, depth: int, height: int, width: int | None = None,
                  patch_size: int = 14, mlp_ratio: float = 4.0, cls_token: bool = True) -> float:
  """Matmul FLOPs of one image through `depth` blocks: qkv, proj, MLP, the two
  attention products, and the patch embedding (tokens: the patches, plus the
  cls token unless `cls_token` is False, as in the adapter)."""
  width = height if width is None else width
  patches = (height // patch_size) * (width // patch_size)
  n = int(cls_token) + patches
  per_block = 2 * n * embed_dim * embed_dim * (4 + 2 * mlp_ratio) + 4 * n * n * embed_dim
  return depth * per_block + 2 * patches * 3 * patch_size * patch_size * embed_dim


class RMSNorm(nn.Module):
  """RMSNorm: normalized in float32, cast back to the input dtype, then scaled."""
  eps: float = 1e-6
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return xf.astype(x.dtype) * scale.astype(x.dtype)


def attention_implementation(name: str, dtype) -> str | None:
  """Resolves 'auto' to cuDNN flash attention on GPU in 16-bit, XLA elsewhere."""
  if name == 'auto':
    on_gpu = jax.default_backend() == 'gpu'
    name = 'cudnn' if on_gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else 'xla'
  if name not in ('xla', 'cudnn'):
    raise ValueError(f"attention must be 'auto', 'xla' or 'cudnn', got {name!r}")
  return name


def xla_attention(q, k, v, valid_keys: int = 0):
  """Softmax attention on (B, T, N, H) inputs, heads-major matmuls with float32
  logits and softmax. Same maths as `jax.nn.dot_product_attention`'s XLA path,
  laid out so that XLA's CPU backend runs it ~30 % faster. With `valid_keys`,
  keys from that index on (padding) get no weight."""
  q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
  logits = jnp.matmul(q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype), k.swapaxes(-1, -2),
                      preferred_element_type=jnp.float32)
  if valid_keys:
    keep = jnp.arange(logits.shape[-1]) < valid_keys
    logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.matmul(probs, v).transpose(0, 2, 1, 3)


class Attention(nn.Module):
  num_heads: int
  qkv_bias: bool = False
  qk_normalization: bool = True
  implementation: str = 'xla'
  valid_tokens: int = 0      # tokens from this index on are padding (0: none)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, n, c = x.shape
    dense = lambda features, bias, name: nn.Dense(
        features, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    q, k, v = jnp.split(dense(3 * c, self.qkv_bias, 'qkv')(x), 3, axis=-1)
    if self.qk_normalization:  # over all heads together, before the head split
      q = RMSNorm(param_dtype=self.param_dtype, name='q_norm')(q)
      k = RMSNorm(param_dtype=self.param_dtype, name='k_norm')(k)
    split_heads = lambda t: t.reshape(b, n, self.num_heads, c // self.num_heads)
    q, k, v = split_heads(q), split_heads(k), split_heads(v)
    if self.implementation == 'cudnn':
      lengths = jnp.full((b,), self.valid_tokens, jnp.int32) if self.valid_tokens else None
      out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths,
                                         implementation='cudnn')
    else:
      out = xla_attention(q, k, v, self.valid_tokens)
    return dense(c, True, 'proj')(out.reshape(b, n, c))


class Mlp(nn.Module):
  hidden_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.hidden_dim, dtype=self.dtype, param_dtype=self.param_dtype, name='fc1')(x)
    h = nn.gelu(h, approximate=False)
    return nn.Dense(x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype, name='fc2')(h)


class LayerScale(nn.Module):
  init_values: float = 0.1
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    gamma = self.param('gamma', nn.initializers.constant(self.init_values), (x.shape[-1],),
                       self.param_dtype)
    return x * gamma.astype(x.dtype)


def drop_path(x, rate, key):
  """Stochastic depth: drops whole samples with probability `rate`, rescales the rest."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))


class Block(nn.Module):
  """Pre-norm transformer block: x + ls1*attn(norm1(x)), then x + ls2*mlp(norm2(x))."""
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = False
  qk_normalization: bool = True
  init_values: float = 0.1
  attention: str = 'xla'
  valid_tokens: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, drop_rate=None, key=None):
    """`drop_rate`/`key` given: training with stochastic depth; else deterministic."""
    pd = self.param_dtype
    branches = (
        lambda h: Attention(self.num_heads, self.qkv_bias, self.qk_normalization,
                            self.attention, self.valid_tokens, self.dtype, pd, name='attn')(h),
        lambda h: Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype, pd, name='mlp')(h),
    )
    for i, branch in enumerate(branches, start=1):
      h = RMSNorm(param_dtype=pd, name=f'norm{i}')(x)
      h = LayerScale(self.init_values, pd, name=f'ls{i}')(branch(h))
      if key is not None:
        h = drop_path(h, drop_rate, jax.random.fold_in(key, i))
      x = x + h
    return x


def embed_patches(images, embed_dim: int, patch_size: int, dtype, param_dtype):
  """The patch embedding (call inside a compact method): a p x p conv with
  stride p named `patch_embed` in the calling module; (B, H, W, 3) images ->
  (B, H/p * W/p, C) tokens in row-major order."""
  b = images.shape[0]
  x = nn.Conv(embed_dim, (patch_size, patch_size), strides=(patch_size, patch_size),
              padding='VALID', dtype=dtype, param_dtype=param_dtype,
              name='patch_embed')(images.astype(dtype))
  return x.reshape(b, -1, embed_dim)


def scan_blocks(block: Block, blocks, x, start: int, end: int, remat: str = 'full',
                rates=None, keys=None, sliced: bool = False, emit: bool = False):
  """Runs blocks start..end (inclusive) of the stacked `blocks` params on x with
  `lax.scan`, each step rematerialized with the `remat` policy. `keys` given:
  stochastic depth with `rates[i]` for block i. `sliced`: the scan closes over
  its own slice of the stack (the adapter's trained-ViT case). `emit`: also
  returns every block's output, stacked (end - start + 1, ...)."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f'remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}')
  stack, offset = blocks, 0
  if sliced:
    # Differentiated: each scan closes over its own slice, so the backward
    # pass accumulates one slice-sized gradient per scan instead of one
    # full-depth buffer per scan (4x the weights for UperNet's 4 outputs).
    stack = jax.tree.map(lambda a: a[start:end + 1], blocks)
    offset = start

  def body(x, i):
    # The stack is closed over and indexed, so the scan does not copy it.
    layer = jax.tree.map(
        lambda a: jax.lax.dynamic_index_in_dim(a, i - offset, keepdims=False), stack)
    if keys is not None:
      x = block.apply({'params': layer}, x, rates[i], keys[i])
    else:
      x = block.apply({'params': layer}, x)
    return x, (x if emit else None)

  if remat != 'none':
    body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
  x, outputs = jax.lax.scan(body, x, jnp.arange(start, end + 1))
  return (x, outputs) if emit else x


class InternViT(nn.Module):
  """InternViT backbone. Input (B, H, W, 3) normalized images, H and W multiples of
  `patch_size`; output a list of (B, H/p, W/p, C) maps, one per `out_indices`."""
  embed_dim: int = 3200
  depth: int = 48
  num_heads: int = 25
  mlp_ratio: float = 4.0
  patch_size: int = 14
  img_size: int = 224
  qkv_bias: bool = False
  qk_normalization: bool = True
  init_values: float = 0.1
  drop_path_rate: float = 0.0
  out_indices: Sequence[int] = (47,)
  attention: str = 'auto'
  remat: str = 'full'
  trained_blocks: bool = False  # the blocks are differentiated (see __call__)
  pad_tokens_to: int = 0      # pad the tokens to a multiple of this, keys masked (0: none)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def block(self, valid_tokens: int = 0) -> Block:
    """An unbound block, applied functionally to one slice of the stacked params."""
    return Block(self.num_heads, self.mlp_ratio, self.qkv_bias, self.qk_normalization,
                 self.init_values, attention_implementation(self.attention, self.dtype),
                 valid_tokens, self.dtype, self.param_dtype, parent=None)

  def _init_blocks(self, rng):
    dummy = jnp.zeros((1, 1, self.embed_dim), self.dtype)
    init_one = lambda key: self.block().init(key, dummy)['params']
    return jax.vmap(init_one)(jax.random.split(rng, self.depth))

  @nn.compact
  def __call__(self, images, train: bool = False):
    p, c = self.patch_size, self.embed_dim
    b, h, w, _ = images.shape
    if h % p or w % p:
      raise ValueError(f'image size {h}x{w} is not a multiple of the patch size {p}')
    indices = sorted(set(int(i) % self.depth for i in self.out_indices))
    grid = (h // p, w // p)
    g = self.img_size // p

    x = embed_patches(images, c, p, self.dtype, self.param_dtype)
    init = nn.initializers.truncated_normal(0.02)
    cls_token = self.param('cls_token', init, (1, 1, c), self.param_dtype)
    pos_embed = self.param('pos_embed', init, (1, 1 + g * g, c), self.param_dtype)
    pos_embed = resize_pos_embed(pos_embed, grid)  # only when the input grid differs
    x = jnp.concatenate([jnp.broadcast_to(cls_token, (b, 1, c)).astype(self.dtype), x], axis=1)
    x = x + pos_embed.astype(self.dtype)
    # Padding (for cuDNN's backward pass, see freeze.CUDNN_TRAIN_PAD): extra
    # tokens whose keys are masked in every block, dropped from the outputs.
    # Each real token sees exactly the real keys, so its values do not change.
    tokens = x.shape[1]
    padded = -(-tokens // self.pad_tokens_to) * self.pad_tokens_to if self.pad_tokens_to else tokens
    if padded != tokens:
      x = jnp.pad(x, ((0, 0), (0, padded - tokens), (0, 0)))

    blocks = self.param('blocks', self._init_blocks)
    stochastic = train and self.drop_path_rate > 0
    rates = jnp.linspace(0.0, self.drop_path_rate, self.depth)
    keys = jax.random.split(self.make_rng('dropout'), self.depth) if stochastic else None
    block = self.block(valid_tokens=tokens if padded != tokens else 0)

    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}')

    to_map = lambda t: t[:, 1:tokens].reshape(b, grid[0], grid[1], c)
    features = {}
    if self.trained_blocks and len(indices) > 1:
      # Differentiated: ONE scan over blocks 0..last emits every block's tokens
      # (depth x the activations, small next to the weights) and the outputs
      # are picked from them. A scan per output would either close over the
      # whole stack (a full-depth float32 gradient buffer per scan) or over its
      # own slice (float32 copies of the slices and of their gradients): with
      # one scan the backward pass holds one gradient buffer and no copies.
      _, outputs = scan_blocks(block, blocks, x, 0, indices[-1], self.remat, rates, keys,
                               emit=True)
      features = {i: to_map(outputs[i]) for i in indices}
    else:
      # Not differentiated (or one output): a scan per output, so only those
      # outputs are kept; blocks after the last output never run.
      start = 0
      for end in indices:
        x = scan_blocks(block, blocks, x, start, end, self.remat, rates, keys)
        features[end] = to_map(x)
        start = end + 1
    return [features[int(i) % self.depth] for i in self.out_indices]
