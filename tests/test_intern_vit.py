"""InternViT in Flax vs the independent float32 PyTorch reference (tests/reference).

Tolerances: relative L2 error <= 1e-5 in float32; <= 2e-2 for the bfloat16
compute path (float32 params) against the float32 reference.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert import name_map
from tests.convert_helpers import state_dict_to_params
from internseg_jax.models.intern_vit import Block, InternViT
from tests.reference import intern_vit_torch as ref


def rel_l2(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.linalg.norm(got - want) / np.linalg.norm(want)


def torch_features(model, images):
  with torch.no_grad():
    outs = model(torch.from_numpy(images).permute(0, 3, 1, 2))
  return [o.permute(0, 2, 3, 1).numpy() for o in outs]


def images_of(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_block_matches_reference():
  c, heads = 64, 4
  block = ref.randomize_(ref.Block(c, heads, 4.0, False, True, 0.1, 0.0, False), seed=3)
  sd = {k: v.numpy() for k, v in block.state_dict().items()}
  params = {}
  for path, key, t in name_map.BACKBONE_BLOCK:
    if key in sd:
      node = params
      *parents, leaf = path.split('/')
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = t.apply(sd[key])
  x = images_of((2, 17, c))
  with torch.no_grad():
    want = block(torch.from_numpy(x)).numpy()
  got = Block(heads).apply({'params': params}, jnp.asarray(x))
  assert rel_l2(got, want) <= 1e-5


# (depth, out_indices, pretrain_size, input HxW, qkv_bias): the 224-style layout
# (depth divisible by 4, four outputs), the 448-style one (odd depth, last block
# and a mid block), inputs at and away from the pretrain grid, and with a qkv bias.
CASES = [
    (8, (1, 3, 5, 7), 56, (56, 56), False),
    (8, (3, 7), 42, (70, 70), False),
    (8, (1, 3, 5, 7), 56, (84, 70), False),
    (5, (4,), 112, (70, 98), False),
    (5, (2, 4), 42, (56, 42), True),
]


# Either keep the pretrain grid (the model resizes pos_embed per forward) or let
# the converter resize it once to the (square) input size.
RESIZE_CASES = [case + ('forward',) for case in CASES] + [
    case + ('conversion',) for case in CASES if case[3][0] == case[3][1] != case[2]]


@pytest.mark.parametrize('depth,out_indices,pretrain,hw,qkv_bias,resize_at', RESIZE_CASES)
def test_backbone_matches_reference(depth, out_indices, pretrain, hw, qkv_bias, resize_at):
  c, heads = 64, 4
  torch_model = ref.randomize_(ref.InternViTTorch(
      embed_dim=c, depth=depth, num_heads=heads, pretrain_size=pretrain, qkv_bias=qkv_bias,
      out_indices=out_indices), seed=depth)
  images = images_of((2, *hw, 3))
  want = torch_features(torch_model, images)
  img_size = pretrain if resize_at == 'forward' else hw[0]
  params = state_dict_to_params(torch_model.state_dict(), heads, img_size)['backbone']
  model = InternViT(embed_dim=c, depth=depth, num_heads=heads, img_size=img_size,
                    qkv_bias=qkv_bias, out_indices=out_indices, attention='xla')
  got = model.apply({'params': params}, jnp.asarray(images))
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert g.shape == w.shape == (2, hw[0] // 14, hw[1] // 14, c)
    assert rel_l2(g, w) <= 1e-5


@pytest.mark.parametrize('remat', ['none', 'full', 'dots'])
def test_bfloat16_path_close_to_float32_reference(remat):
  c, heads, depth = 64, 4, 6
  torch_model = ref.randomize_(ref.InternViTTorch(
      embed_dim=c, depth=depth, num_heads=heads, pretrain_size=56, out_indices=(2, 5)), seed=1)
  images = images_of((2, 56, 70, 3), seed=2)
  want = torch_features(torch_model, images)
  params = state_dict_to_params(torch_model.state_dict(), heads)['backbone']
  model = InternViT(embed_dim=c, depth=depth, num_heads=heads, img_size=56, out_indices=(2, 5),
                    dtype=jnp.bfloat16, remat=remat, attention='xla')
  got = model.apply({'params': params}, jnp.asarray(images))
  for g, w in zip(got, want):
    assert g.dtype == jnp.bfloat16
    err = rel_l2(g, w)
    assert 1e-5 < err <= 2e-2  # bf16 really ran, and stays close


def _tiny(depth=4, **kw):
  return InternViT(embed_dim=32, depth=depth, num_heads=2, img_size=28, attention='xla', **kw)


def test_out_indices_order_negative_and_skipped_blocks():
  model = _tiny(depth=6, out_indices=(5, 1, -3))
  x = jnp.asarray(images_of((1, 28, 28, 3)))
  params = model.init(jax.random.key(0), x)['params']
  f5, f1, f3 = model.apply({'params': params}, x)
  ref_model = _tiny(depth=6, out_indices=(1, 3, 5))
  r1, r3, r5 = ref_model.apply({'params': params}, x)
  np.testing.assert_array_equal(f1, r1)
  np.testing.assert_array_equal(f3, r3)
  np.testing.assert_array_equal(f5, r5)
  # Blocks after the last requested index are not run: their params don't matter.
  early = _tiny(depth=6, out_indices=(1,))
  poisoned = jax.tree.map(lambda a: a, params)
  poisoned['blocks'] = jax.tree.map(lambda a: a.at[2:].set(jnp.nan), params['blocks'])
  np.testing.assert_array_equal(early.apply({'params': poisoned}, x)[0], r1)


def test_drop_path_schedule_and_eval_mode():
  # Rates rise linearly 0 -> rate over depth: with rate 1 the last block always
  # drops both branches, so its output equals the previous block's output.
  model = _tiny(depth=3, drop_path_rate=1.0, out_indices=(1, 2))
  x = jnp.asarray(images_of((4, 28, 28, 3)))
  params = model.init(jax.random.key(0), x)['params']
  f1, f2 = model.apply({'params': params}, x, train=True, rngs={'dropout': jax.random.key(1)})
  np.testing.assert_allclose(f2, f1, rtol=0, atol=0)
  e1, e2 = model.apply({'params': params}, x)  # eval: no drop path
  assert not np.allclose(e2, e1)
  # Middle block (rate 0.5): some samples dropped, kept ones rescaled by 1/keep.
  model = _tiny(depth=3, drop_path_rate=1.0, out_indices=(0, 1))
  t0, t1 = model.apply({'params': params}, jnp.tile(x[:1], (64, 1, 1, 1)), train=True,
                       rngs={'dropout': jax.random.key(2)})
  dropped = np.all(np.isclose(np.asarray(t1), np.asarray(t0)), axis=(1, 2, 3))
  assert 10 < dropped.sum() < 54


def test_rejects_sizes_not_multiple_of_patch():
  model = _tiny()
  with pytest.raises(ValueError, match='multiple of the patch size'):
    model.init(jax.random.key(0), jnp.zeros((1, 30, 28, 3)))


def test_trained_layout_gives_the_same_features_and_gradients():
  """The trained-backbone layout (one scan over all blocks emitting every
  block's output) computes the same function and gradients as a scan per output."""
  x = jnp.asarray(images_of((2, 28, 28, 3)))
  plain = _tiny(depth=6, out_indices=(1, 3, 5))
  trained = _tiny(depth=6, out_indices=(1, 3, 5), trained_blocks=True)
  params = plain.init(jax.random.key(0), x)['params']
  loss = lambda m: lambda p: sum(jnp.sum(f ** 2) for f in m.apply({'params': p}, x, train=True))
  for f, g in zip(plain.apply({'params': params}, x), trained.apply({'params': params}, x)):
    np.testing.assert_allclose(f, g, rtol=1e-6, atol=1e-6)
  g_plain, g_trained = jax.grad(loss(plain))(params), jax.grad(loss(trained))(params)
  for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_trained)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)