"""Parameters on a (data, fsdp) mesh of 8 fake CPU devices."""
import jax
import numpy as np
import pytest

from configs import features
from internseg_jax import api, sharding
from internseg_jax.models.build import build_backbone


def _tiny_config():
  config = features.get_config('224,tiny,img_size=56')
  config.model.dtype = 'float32'
  config.model.backbone.out_indices = [1, 3]
  config.model.backbone.attention = 'xla'
  return config


def test_sharded_forward_equals_single_device():
  config = _tiny_config()
  mesh8 = sharding.make_mesh(data=2, fsdp=4)
  sharded = api.init_model(config, mesh=mesh8)
  qkv = sharded.params['backbone']['blocks']['attn']['qkv']['kernel']
  head = sharded.params['decode_head']['conv_seg']['kernel']  # (1, 1, C, classes)
  assert head.sharding.spec == jax.sharding.PartitionSpec(None, None, None, None)  # 150 % 4
  assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', None)
  assert qkv.addressable_shards[0].data.shape == (4, 64 // 4, 192)

  mesh1 = sharding.make_mesh(devices=jax.devices()[:1])
  single = api.Model(config, sharded.module,
                     jax.device_put(jax.device_get(sharded.variables), jax.devices()[0]), mesh1)
  images = np.random.default_rng(0).normal(size=(8, 56, 70, 3)).astype(np.float32)
  got = api.extract_features(sharded, images)
  want = api.extract_features(single, images)
  assert got[0].sharding.is_fully_replicated  # gathered so every process can read it
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(api.compute_logits(sharded, images)),
                             np.asarray(api.compute_logits(single, images)), rtol=1e-5, atol=1e-5)


def test_full_size_model_is_created_sharded_without_host_copies():
  """The 6B model's shapes come from eval_shape and each device only ever holds
  its shard: the compiled init's per-device output is ~1/8 of the model."""
  config = features.get_config('224')
  config.model.param_dtype = 'float32'
  mesh = sharding.make_mesh(data=1, fsdp=8)
  backbone = build_backbone(config.model)
  init = lambda rng: backbone.init(rng, np.zeros((1, 14, 14, 3)))
  shapes = jax.eval_shape(init, jax.random.key(0))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert 5.8e9 < n_params < 6.0e9
  out_shardings = sharding.param_shardings(shapes, mesh)
  compiled = jax.jit(init, out_shardings=out_shardings).lower(jax.random.key(0)).compile()
  per_device = compiled.memory_analysis().output_size_in_bytes
  assert per_device < 1.02 * n_params * 4 / 8


@pytest.mark.parametrize('data,fsdp,n', [(-1, 1, 8), (2, -1, 8), (2, 4, 8)])
def test_make_mesh(data, fsdp, n):
  mesh = sharding.make_mesh(data, fsdp)
  assert mesh.size == n and mesh.axis_names == ('data', 'fsdp')


def test_make_mesh_rejects_bad_sizes():
  with pytest.raises(ValueError, match='does not use all'):
    sharding.make_mesh(3, 2)


def test_indivisible_axis_falls_back_to_replication():
  mesh = sharding.make_mesh(data=2, fsdp=4)
  assert sharding.spec_for('backbone/blocks/attn/qkv/kernel', (2, 30, 90), mesh) == \
      jax.sharding.PartitionSpec(None, None, None)
