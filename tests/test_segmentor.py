"""Neck, heads and segmentor vs the float32 PyTorch reference (tests/reference/seg_torch.py),
through mmseg-style .pth files converted by convert.pth_to_orbax.

Tolerance: relative L2 error <= 1e-5 in float32, eval mode with non-trivial
BatchNorm statistics.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert import pth_to_orbax
from convert.torch_io import ConversionError
from internseg_jax import api, sharding, weights
from internseg_jax.models.heads import BatchNorm, adaptive_avg_pool
from internseg_jax.models.segmentor import segmentation_loss
from tests import seg_fixtures as fx
from tests.reference import seg_torch as ref_seg


def images(n=2, h=fx.CROP, w=fx.CROP + 14, seed=0):
  return np.random.default_rng(seed).normal(size=(n, h, w, 3)).astype(np.float32)


@pytest.fixture(scope='module', params=['linear', 'uper'])
def converted(request, tmp_path_factory):
  kind = request.param
  torch_model = fx.torch_segmentor(kind, seed=3)
  folder = tmp_path_factory.mktemp(kind)
  src = fx.save_mmseg(torch_model, folder / f'{kind}.pth')
  info = pth_to_orbax.convert(str(src), str(folder / 'out'), fx.tiny_config(kind))
  model = api.init_model(fx.tiny_config(kind), str(folder / 'out'))
  return kind, torch_model, model, info


def test_converter_detects_the_segmentor(converted):
  kind, _, _, info = converted
  assert info['kind'] == 'segmentor' and info['wrapper'] == 'state_dict'
  assert info['heads']['type'] == kind and info['heads']['num_classes'] == fx.CLASSES
  assert info['heads']['with_fpn'] == (kind == 'uper')


def test_logits_match_reference(converted):
  _, torch_model, model, _ = converted
  x = images()
  got = np.asarray(api.compute_logits(model, x))
  want = fx.torch_logits(torch_model, x)
  assert got.shape == want.shape == (2, fx.CROP, fx.CROP + 14, fx.CLASSES)
  assert fx.rel_l2(got, want) <= 1e-5


def test_neck_features_match_reference(converted):
  kind, torch_model, model, _ = converted
  x = images(seed=1)
  got = model.module.apply(model.variables, jnp.asarray(x), method='features')
  with torch.no_grad():
    want = torch_model.extract_feat(torch.from_numpy(x).permute(0, 3, 1, 2))
  assert len(got) == len(want) == (4 if kind == 'uper' else 1)
  for g, w in zip(got, want):
    w = w.permute(0, 2, 3, 1).numpy()
    assert g.shape == w.shape and fx.rel_l2(g, w) <= 1e-5


def test_auxiliary_head_matches_reference(converted):
  kind, torch_model, model, _ = converted
  if kind != 'uper':
    assert 'auxiliary_head' not in model.params
    return
  x = images(seed=2)
  got = model.module.apply(model.variables, jnp.asarray(x))['aux_logits']
  with torch.no_grad():
    feats = torch_model.extract_feat(torch.from_numpy(x).permute(0, 3, 1, 2))
    want = torch_model.auxiliary_head(feats).permute(0, 2, 3, 1).numpy()
  assert fx.rel_l2(got, want) <= 1e-5


def test_eval_mode_loss_matches_reference(converted):
  _, torch_model, model, _ = converted
  x = images(seed=4)
  rng = np.random.default_rng(5)
  labels = rng.integers(0, fx.CLASSES, size=x.shape[:3]).astype(np.int64)
  labels[rng.random(labels.shape) < 0.2] = 255
  with torch.no_grad():
    want = torch_model.forward_train_loss(torch.from_numpy(x).permute(0, 3, 1, 2),
                                          torch.from_numpy(labels))
  outputs = model.module.apply(model.variables, jnp.asarray(x))
  total, parts = segmentation_loss(outputs, jnp.asarray(labels))
  for name, value in want.items():
    np.testing.assert_allclose(float(parts[name]), float(value), rtol=1e-5)
  np.testing.assert_allclose(float(total), float(sum(want.values())), rtol=1e-5)


def test_train_mode_batch_norm_matches_reference():
  """Batch statistics normalize in training, and the running stats update with
  momentum 0.1 and the unbiased variance, as torch.nn.BatchNorm2d."""
  torch_bn = torch.nn.BatchNorm2d(6).train()
  x = np.random.default_rng(0).normal(2.0, 3.0, size=(4, 5, 7, 6)).astype(np.float32)
  with torch.no_grad():
    want = torch_bn(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  bn = BatchNorm()
  variables = bn.init(jax.random.key(0), x)
  got, updates = bn.apply(variables, x, train=True, mutable=['batch_stats'])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(updates['batch_stats']['mean'], torch_bn.running_mean.numpy(),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(updates['batch_stats']['var'], torch_bn.running_var.numpy(),
                             rtol=1e-5, atol=1e-6)


def test_batch_norm_statistics_are_synchronized_across_devices():
  """With the batch split over 8 fake devices, the statistics are those of the
  whole batch (synchronized BatchNorm), not of each device's share."""
  mesh = sharding.make_mesh(data=2, fsdp=4)
  x = np.random.default_rng(0).normal(size=(8, 3, 3, 4)).astype(np.float32)
  x += np.arange(8, dtype=np.float32)[:, None, None, None]  # per-device means differ
  bn = BatchNorm()
  variables = bn.init(jax.random.key(0), x)
  step = jax.jit(lambda v, x: bn.apply(v, x, train=True, mutable=['batch_stats']))
  sharded_x = jax.device_put(x, sharding.batch_sharding(mesh))
  got, got_stats = step(variables, sharded_x)
  want, want_stats = step(variables, jax.device_put(x, jax.devices()[0]))
  assert len(sharded_x.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  for key in ('mean', 'var'):
    np.testing.assert_allclose(got_stats['batch_stats'][key], want_stats['batch_stats'][key],
                               rtol=1e-5)
  np.testing.assert_allclose(got_stats['batch_stats']['mean'], 0.1 * x.mean((0, 1, 2)), rtol=1e-5)


@pytest.mark.parametrize('n,s', [(5, 6), (7, 3), (12, 6), (1, 2), (36, 6)])
def test_adaptive_avg_pool_matches_torch(n, s):
  x = np.random.default_rng(0).normal(size=(1, n, n + 2, 3)).astype(np.float32)
  want = torch.nn.functional.adaptive_avg_pool2d(
      torch.from_numpy(x).permute(0, 3, 1, 2), s).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(adaptive_avg_pool(jnp.asarray(x), s), want, rtol=1e-5, atol=1e-6)


def test_bf16_backbone_checkpoint_restores_into_float32(tmp_path):
  torch_model = fx.torch_segmentor('uper', seed=7)
  src = fx.save_mmseg(torch_model, tmp_path / 'bf16.pth', dtype=torch.bfloat16)
  pth_to_orbax.convert(str(src), str(tmp_path / 'out'), fx.tiny_config('uper'))
  model = api.init_model(fx.tiny_config('uper'), str(tmp_path / 'out'))
  # The reference with its backbone rounded to bf16 (and computing in float32).
  for p in torch_model.backbone.parameters():
    p.data = p.data.to(torch.bfloat16).float()
  x = images(seed=8)
  assert fx.rel_l2(api.compute_logits(model, x), fx.torch_logits(torch_model, x)) <= 1e-5


def test_converter_without_config_reads_the_heads_from_the_tensors(tmp_path):
  torch_model = fx.torch_segmentor('uper', seed=9)
  src = fx.save_mmseg(torch_model, tmp_path / 'u.pth')
  info = pth_to_orbax.convert(str(src), str(tmp_path / 'out'))
  assert info['heads'] == dict(type='uper', num_classes=fx.CLASSES, with_fpn=True,
                               channels=fx.CHANNELS, pool_scales=4, aux_channels=fx.CHANNELS)
  stored = weights.params_metadata(weights.find_params_dir(tmp_path / 'out'))
  assert stored['batch_stats']['decode_head']['psp_modules_3']['bn']['var'].shape == (fx.CHANNELS,)
  assert stored['params']['backbone']['pos_embed'].shape == (1, 1 + 16, fx.WIDTH)


@pytest.mark.parametrize('mutate,match', [
    (lambda sd: sd.pop('decode_head.fpn_convs.1.conv.weight'), 'missing: decode_head.fpn_convs.1'),
    (lambda sd: sd.__setitem__('decode_head.extra.weight', torch.zeros(3)),
     'unexpected: decode_head.extra.weight'),
    (lambda sd: sd.__setitem__('decode_head.lateral_convs.0.bn.running_var', torch.ones(5)),
     'wrong shape: decode_head.lateral_convs.0.bn.running_var'),
    (lambda sd: sd.pop('backbone.up1.3.bias'), 'missing: backbone.up1.3.bias'),
    (lambda sd: sd.__setitem__('backbone.up3.0.weight', torch.zeros(2)),
     'unexpected: backbone.up3.0.weight'),
])
def test_converter_rejects_bad_segmentor_files(tmp_path, mutate, match):
  sd = fx.torch_segmentor('uper').state_dict()
  mutate(sd)
  src = tmp_path / 'bad.pth'
  torch.save({'meta': {}, 'state_dict': sd}, src)
  with pytest.raises(ConversionError, match=match):
    pth_to_orbax.convert(str(src), str(tmp_path / 'out'), fx.tiny_config('uper'))
  assert not (tmp_path / 'out').exists()


def test_converter_rejects_a_config_of_another_head(tmp_path):
  src = fx.save_mmseg(fx.torch_segmentor('linear'), tmp_path / 'lin.pth')
  with pytest.raises(ConversionError, match='decode_head.type: file has linear'):
    pth_to_orbax.convert(str(src), str(tmp_path / 'out'), fx.tiny_config('uper'))


def test_loss_averages_over_all_pixels_including_ignored():
  logits = jnp.zeros((1, 2, 2, 3))
  labels = jnp.array([[[0, 255], [1, 255]]])
  total, parts = segmentation_loss({'logits': logits}, labels)
  np.testing.assert_allclose(float(total), 2 * np.log(3) / 4, rtol=1e-6)  # not / 2
