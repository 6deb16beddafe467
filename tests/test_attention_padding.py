"""Padded tokens with masked keys (what a trained backbone does on cuDNN, whose
flash attention has a backward pass only for suitable sequence lengths) leave
the real tokens' outputs and every gradient unchanged."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internseg_jax.models.intern_vit import InternViT, xla_attention


def tiny(pad, **kwargs):
  return InternViT(embed_dim=32, depth=2, num_heads=2, img_size=56, out_indices=(0, 1),
                   attention='xla', remat='none', pad_tokens_to=pad, **kwargs)


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.parametrize('pad', [64, 7])
def test_padded_forward_and_gradients_equal_unpadded(pad):
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 42, 28, 3)), jnp.float32)
  plain, padded = tiny(0), tiny(pad)
  params = plain.init(jax.random.key(0), images)
  feats = plain.apply(params, images)
  got = padded.apply(params, images)
  for f, g in zip(feats, got):  # forward: float32 rounding only
    assert rel(g, f) <= 1e-6

  def loss(module, p, x):
    outs = module.apply(p, x)
    return sum(jnp.sum(jnp.sin(o) * (i + 1)) for i, o in enumerate(outs))
  grads = jax.grad(loss, argnums=(1, 2))
  (gp, gx), (hp, hx) = grads(plain, params, images), grads(padded, params, images)
  for a, b in zip(jax.tree.leaves(hp), jax.tree.leaves(gp)):
    assert rel(a, b) <= 1e-5
  assert rel(hx, gx) <= 1e-5


def test_trained_stochastic_depth_path_is_padded_too():
  images = jnp.asarray(np.random.default_rng(1).normal(size=(2, 28, 28, 3)), jnp.float32)
  plain, padded = tiny(0, drop_path_rate=0.3), tiny(64, drop_path_rate=0.3)
  params = plain.init(jax.random.key(0), images)
  rngs = {'dropout': jax.random.key(3)}
  for f, g in zip(plain.apply(params, images, True, rngs=rngs),
                  padded.apply(params, images, True, rngs=rngs)):
    assert rel(g, f) <= 1e-6


def test_cudnn_call_semantics_match_our_masked_attention():
  """The cuDNN path calls jax.nn.dot_product_attention with
  key_value_seq_lengths; its XLA implementation (runnable on CPU) must mask
  exactly like our XLA attention."""
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 64, 2, 16)), jnp.float32) for _ in range(3))
  want = xla_attention(q, k, v, valid_keys=17)
  got = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=jnp.full((2,), 17),
                                     implementation='xla')
  assert rel(got[:, :17], want[:, :17]) <= 1e-6
