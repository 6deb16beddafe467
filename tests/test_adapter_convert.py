"""InternViT-Adapter weights end to end: files written the way the original writes
them, `python -m convert.pth_to_orbax`, `api.init_model`, `--mode=eval`.

- A model trained with the original code: its state dict with the backbone in
  fp16 (the original trains with DeepSpeed fp16 and ToFloat16Hook, heads
  float32), saved in the release format {'module': sd} and as an mmcv
  checkpoint; both convert to the same variables, strictly, and give the
  float32 reference's logits (relative L2 <= 1e-5, float32 model).
- The pretrained InternViT file loads into the adapter as the original's
  InternViT6B.init_weights loads it (F.interpolate bicubic on the file's bf16
  tensors: patch kernel 14 -> 16, pos_embed to img_size // 16, cls_token
  unused); the adapter's own layers start random; the four feature maps match
  the reference (relative L2 <= 1e-5).
Tiny model: the `configs/upernet_adapter.py:tiny` sizes (width 64, 4 heads, 8 blocks
in 4 interactions, 4 deformable heads, SPM width 16, 64 px, 8 classes, heads 32 wide).
"""
import collections
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from convert import pth_to_orbax
from internseg_jax import api, config as config_lib, inference, metrics, weights
from internseg_jax.data import sources, synthetic, transforms
from internseg_jax.errors import ConversionError
from tests import seg_fixtures as fx
from tests.convert_helpers import (ROOT, as_numpy, bf16_steps, original_init_weights, restored,
                                   stored, torch_model)
from tests.reference import adapter_torch as ref
from tests.reference import seg_torch as ref_seg

CONFIG = 'configs/upernet_adapter.py:tiny'
WIDTH, SIZE, CLASSES, CHANNELS = 64, 64, 8, 32
ARCH = dict(embed_dim=WIDTH, depth=8, num_heads=4, img_size=SIZE, conv_inplane=16,
            deform_num_heads=4, interaction_indexes=((0, 1), (2, 3), (4, 5), (6, 7)))


def tiny_config(**changes):
  """The tiny adapter config, float32 throughout: the frozen ViT too (its default
  bf16 storage would round the fp16 file's values)."""
  config = config_lib.load_config(CONFIG)
  config.train.frozen_dtype = 'float32'
  config.model.backbone.attention = 'xla'
  for key, value in changes.items():
    node, *path = key.split('.')
    target = config[node]
    for part in path[:-1]:
      target = target[part]
    target[path[-1]] = value
  return config


def convert_cli(*args) -> int:
  """`python -m convert.pth_to_orbax ARGS` in this process -> its exit status."""
  pth_to_orbax.FLAGS(['convert', *args])
  try:
    pth_to_orbax.main([])
  except SystemExit as e:
    return e.code
  finally:
    pth_to_orbax.FLAGS.unparse_flags()
  return 0


def images(seed, n=2, size=SIZE):
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def mmcv_file(state_dict):
  """An mmcv 1.7 checkpoint: meta with numpy scalars (EvalHook save_best), the
  state dict as an OrderedDict, an optimizer state dict."""
  meta = dict(mmseg_version='0.27.0', mmcv_version='1.7.0', iter=80000, epoch=1, seed=0,
              hook_msgs=dict(best_score=np.float64(0.581), last_ckpt='/work/iter_80000.pth'))
  optimizer = dict(state={0: dict(step=torch.tensor(3.0), exp_avg=torch.zeros(3))},
                   param_groups=[dict(lr=4e-5, weight_decay=0.05, params=[0])])
  return {'meta': meta, 'state_dict': collections.OrderedDict(state_dict), 'optimizer': optimizer}


@pytest.fixture(scope='module')
def original(tmp_path_factory):
  """(reference segmentor on the file's numbers, fp16-backbone state dict, folder with
  release.pth, iter_80000.pth (mmcv) and converted/ (from the release file))."""
  adapter = ref.randomize_adapter_(ref.InternViTAdapterTorch(**ARCH), seed=1)
  decode = ref_seg.randomize_seg_(ref_seg.UPerHeadTorch(WIDTH, CHANNELS, CLASSES), seed=2)
  aux = ref_seg.randomize_seg_(ref_seg.FCNAuxHeadTorch(WIDTH, CHANNELS, CLASSES, in_index=2), 3)
  model = ref_seg.SegmentorTorch(adapter, False, decode, aux).eval()
  sd = {k: v.detach().clone().half() if k.startswith('backbone.') else v.detach().clone()
        for k, v in model.state_dict().items()}
  model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
  tmp = tmp_path_factory.mktemp('adapter_files')
  torch.save({'module': sd}, tmp / 'release.pth')
  torch.save(mmcv_file(sd), tmp / 'iter_80000.pth')
  assert convert_cli(f'--src={tmp / "release.pth"}', f'--dst={tmp / "converted"}',
                  f'--config={CONFIG}') == 0
  return model, sd, tmp


def test_original_files_convert_and_give_the_reference_logits(original, tmp_path):
  torch_model, sd, tmp = original
  assert convert_cli(f'--src={tmp / "iter_80000.pth"}', f'--dst={tmp_path / "mmcv"}',
                  f'--config={CONFIG}') == 0
  infos = [json.loads((folder / 'info.json').read_text())
           for folder in (tmp / 'converted', tmp_path / 'mmcv')]
  assert [i['wrapper'] for i in infos] == ['module', 'state_dict']
  assert all(i['kind'] == 'segmentor' and i['unexpected_keys'] == [] for i in infos)
  assert infos[0]['adapter']['interaction_indexes'] == [[0, 1], [2, 3], [4, 5], [6, 7]]
  meta = stored(tmp / 'converted')['params']
  assert meta['backbone']['blocks']['mlp']['fc1']['kernel'].dtype == np.float16  # the file's
  assert meta['backbone']['interactions_3']['extra_extractors_1']['ffn']['dwconv']['kernel'].shape \
      == (3, 3, 1, 16)
  assert meta['decode_head']['conv_seg']['kernel'].dtype == np.float32
  release, mmcv = restored(tmp / 'converted'), restored(tmp_path / 'mmcv')
  assert weights.flatten(release).keys() == weights.flatten(mmcv).keys()
  for key, value in weights.flatten(release).items():
    np.testing.assert_array_equal(value, weights.flatten(mmcv)[key], err_msg=key)

  model = api.init_model(tiny_config(), str(tmp / 'converted'))
  x = images(seed=3)
  got = api.compute_logits(model, x)
  assert got.shape == (2, SIZE, SIZE, CLASSES)
  assert fx.rel_l2(got, fx.torch_logits(torch_model, x)) <= 1e-5
  # The adapter runs at exactly img_size: another size is a clear error.
  with pytest.raises(ValueError, match='exactly img_size'):
    api.compute_logits(model, images(seed=4, size=96))


def reference_predictions(torch_model, image, ev):
  """mmseg's slide inference with the reference: SETR_Resize (no multiple),
  windows of the crop, logits averaged, resized bilinearly, argmax."""
  x = transforms.test_transform(image, resize=ev.resize, scale=tuple(ev.scale),
                                divisor=ev.size_divisor, crop_size=ev.crop_size)
  h, w = x.shape[:2]
  sums, count = torch.zeros(1, CLASSES, h, w), torch.zeros(1, 1, h, w)
  for y1, y2, x1, x2 in inference.slide_windows(h, w, ev.crop_size, ev.stride):
    crop = torch.from_numpy(np.ascontiguousarray(x[y1:y2, x1:x2])).permute(2, 0, 1)[None]
    with torch.no_grad():
      sums[..., y1:y2, x1:x2] += torch_model.encode_decode(crop)
    count[..., y1:y2, x1:x2] += 1
  logits = ref_seg.bilinear_resize(sums / count, image.shape[:2])
  return logits[0].argmax(0).numpy()


def test_eval_mode_on_a_converted_original_checkpoint(original, tmp_path):
  torch_model, _, tmp = original
  root = synthetic.write_ade_folder(str(tmp_path / 'ade'), num_train=1, num_val=3,
                                    num_classes=CLASSES, size_range=(64, 100), seed=2)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8 '
             '--xla_backend_optimization_level=0')  # as in-process
  result = subprocess.run(
      [sys.executable, '-m', 'internseg_jax.main', f'--config={CONFIG}', '--mode=eval',
       f'--workdir={tmp_path / "wd"}', f'--config.init.checkpoint={tmp / "converted"}',
       f'--config.data.root={root}', '--config.train.frozen_dtype=float32'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  config = tiny_config()
  out = json.loads((tmp_path / 'wd' / 'eval_results.json').read_text())
  dataset = sources.ADEFolder(root, 'validation', CLASSES)
  labels = [dataset[i]['label'] for i in range(len(dataset))]
  preds = [reference_predictions(torch_model, dataset[i]['image'], config.eval)
           for i in range(len(dataset))]
  want = metrics.mean_iou(preds, labels, CLASSES)
  assert out['num_images'] == 3
  # float32 on both sides; a pixel whose two best classes tie within ~1e-6 may flip.
  np.testing.assert_allclose(out['aAcc'], want['aAcc'], atol=1e-3)
  np.testing.assert_allclose(out['mIoU'], want['mIoU'], atol=1e-2)


def test_conversion_is_strict(original, tmp_path):
  _, sd, _ = original
  bad = dict(sd)
  del bad['backbone.interactions.1.extractor.attn.value_proj.bias']
  bad['backbone.interactions.0.extra_extractors.0.ffn_norm.weight'] = torch.ones(WIDTH).half()
  bad['backbone.spm.fc3.weight'] = torch.zeros(WIDTH, 64, 3, 3).half()
  torch.save({'module': bad}, tmp_path / 'bad.pth')
  with pytest.raises(ConversionError) as e:
    pth_to_orbax.convert(str(tmp_path / 'bad.pth'), str(tmp_path / 'out'), tiny_config())
  assert str(e.value).splitlines()[1:] == [
      '  missing: backbone.interactions.1.extractor.attn.value_proj.bias (16,)',
      '  unexpected: backbone.interactions.0.extra_extractors.0.ffn_norm.weight (64,)',
      '  wrong shape: backbone.spm.fc3.weight is (64, 64, 3, 3), expected (64, 64, 1, 1)']
  assert 'the adapter tensors do not fit the model: 3 problem(s)' in str(e.value)
  assert not (tmp_path / 'out').exists()
  # Interaction indexes and deformable heads are not in the tensors: a config is needed.
  with pytest.raises(ConversionError, match='--config=configs/upernet_adapter.py'):
    pth_to_orbax.convert(str(tmp_path / 'bad.pth'), str(tmp_path / 'out'))
  # A config of another adapter (2 extra interactions' worth of blocks): every key named.
  with pytest.raises(ConversionError, match='file has 8, config says 12'):
    pth_to_orbax.convert(str(tmp_path / 'bad.pth'), str(tmp_path / 'out'),
                         tiny_config(**{'model.backbone.depth': 12}))
  # A plain InternViT segmentor is not an adapter.
  plain = fx.torch_segmentor('uper')
  torch.save({'module': plain.state_dict()}, tmp_path / 'plain.pth')
  with pytest.raises(ConversionError, match='without an adapter'):
    pth_to_orbax.convert(str(tmp_path / 'plain.pth'), str(tmp_path / 'out'), tiny_config())


def test_pretrained_file_loads_into_the_adapter_as_the_original_loads_it(tmp_path, caplog):
  """A pretrained InternViT file (bf16, {'module': ...}, patch 14, a 3x3 grid) with the
  adapter config: the original's init_weights route, then load_state_dict(strict=False)."""
  vit = torch_model(depth=8, width=WIDTH, heads=4, pretrain=42, seed=7)
  pretrained = {k: v.detach().to(torch.bfloat16) for k, v in vit.state_dict().items()}
  src, dst = tmp_path / 'intern_vit_tiny.pth', tmp_path / 'converted'
  torch.save({'module': pretrained}, src)
  # --strict: the unused cls_token is listed, not an error.
  info = pth_to_orbax.convert(str(src), str(dst), tiny_config(**{
      'model.backbone.pretrain_size': 42}), strict=True)
  assert info['resized_patch_kernel'] == [14, 16] and info['for_adapter']
  assert info['unexpected_keys'] == ['cls_token'] and info['dropped_keys'] == ['cls_token']

  # The numbers: InternViT6B.init_weights on the file (bf16 bicubic on the CPU).
  original_sd = original_init_weights({'module': pretrained}, img_size=SIZE, patch_size=16)
  ours = restored(dst)['params']['backbone']
  assert 'cls_token' not in ours
  assert ours['pos_embed'].shape == (1, 1 + 4 * 4, WIDTH)
  for got, want in ((ours['pos_embed'], original_sd['pos_embed']),
                    (ours['patch_embed']['kernel'],
                     original_sd['patch_embed.proj.weight'].permute(2, 3, 1, 0))):
    differ, steps = bf16_steps(got, as_numpy(want.contiguous()))
    assert differ <= 2 and steps <= 1.0, (differ, steps)  # see convert/torch_bicubic.py
  np.testing.assert_array_equal(ours['blocks']['mlp']['fc2']['kernel'][5],
                                as_numpy(pretrained['blocks.5.mlp.fc2.weight']).T)

  # Loaded by api.init_model: the ViT from the file, the adapter's own layers and
  # the heads random (one warning); inference keeps the config's param dtype.
  config = tiny_config()
  with caplog.at_level(logging.WARNING):
    model = api.init_model(config, str(dst))
  assert 'adapter, auxiliary_head, decode_head not in' in caplog.text
  params = weights.flatten(model.params)
  assert params['backbone/blocks/mlp/fc1/kernel'].dtype == np.float32
  assert params['backbone/level_embed'].dtype == np.float32
  np.testing.assert_array_equal(np.asarray(params['backbone/blocks/mlp/fc1/kernel']),
                                np.asarray(ours['blocks']['mlp']['fc1']['kernel'], np.float32))
  np.testing.assert_array_equal(np.asarray(params['backbone/pos_embed']), ours['pos_embed'])

  # The reference: original_sd loaded non-strictly into the adapter (cls_token is
  # unexpected there), its own layers random; the same adapter weights in ours.
  reference = ref.randomize_adapter_(ref.InternViTAdapterTorch(**ARCH), seed=8).eval()
  result = reference.load_state_dict({k: v.float() for k, v in original_sd.items()}, strict=False)
  assert result.unexpected_keys == ['cls_token']
  assert all(k.startswith(('spm.', 'interactions.', 'level_embed', 'up.', 'norm'))
             for k in result.missing_keys)
  own = api_adapter_params(reference, model)
  variables = dict(model.variables, params=weights.unflatten(
      {k: own[k] if weights.part_of('params/' + k) == 'adapter' else v for k, v in params.items()}))
  x = images(seed=9)
  feats = api.extract_features(api.Model(model.config, model.module, variables, model.mesh), x)
  with torch.no_grad():
    want = reference(torch.from_numpy(x).permute(0, 3, 1, 2))
  assert [f.shape for f in feats] == [(2, SIZE // s, SIZE // s, WIDTH) for s in (4, 8, 16, 32)]
  for level, (got, w) in enumerate(zip(feats, want)):
    assert fx.rel_l2(got, w.permute(0, 2, 3, 1).numpy()) <= 1e-5, level


def api_adapter_params(reference, model) -> dict:
  """Flat 'backbone/...' params of the torch reference adapter, through the converter."""
  from convert.adapter import adapter_params
  sd = {'backbone.' + k: v for k, v in reference.state_dict().items()}
  return weights.flatten({'backbone': adapter_params(sd, model.module.backbone)})
