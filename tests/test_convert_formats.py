"""convert.pth_to_orbax on the files the original writes: the release format
and mmcv checkpoints (numpy scalars in meta, a pickle that runs code refused),
unexpected keys, a UperNet file without auxiliary head, the original's
pretrained-load resizes on bf16 tensors, and one-line CLI errors.

Tiny models only (width 64, 2 heads, depth 4, pretrain 56 = a 4x4 grid).
Feature tolerance: relative L2 error <= 1e-5 (float32 compute on both sides).
"""
import collections
import logging
import os
import pickle

import jax
import ml_dtypes
import numpy as np
import pytest
import torch

from convert import pth_to_orbax, torch_bicubic, torch_io
from internseg_jax import api
from internseg_jax.errors import ConversionError
from tests import seg_fixtures as fx
from tests.convert_helpers import (PRETRAIN, WIDTH, as_numpy, bf16_steps, check_features,
                                   original_init_weights, restored, run_main, stored,
                                   tiny_config, torch_model, with_stored_resizes)


@pytest.fixture(scope='module')
def state_dict():
  return {k: v.detach().clone() for k, v in torch_model().state_dict().items()}


# ----------------------------------------------------------------------------- resizes

def test_release_format_bf16_resized_like_the_original(state_dict, tmp_path):
  # tools/release.py writes {'module': state_dict}; the pretrained files are bf16.
  src, dst = tmp_path / 'tiny_bf16.pth', tmp_path / 'out'
  bf16 = {k: v.to(torch.bfloat16) for k, v in state_dict.items()}
  torch.save({'module': bf16}, src)
  info = pth_to_orbax.convert(str(src), str(dst), tiny_config(84))
  assert info['wrapper'] == 'module' and info['format'] == 'pth'
  meta = stored(dst)['params']['backbone']
  assert meta['blocks']['attn']['qkv']['kernel'].dtype == np.dtype('bfloat16')
  assert meta['pos_embed'].dtype == np.dtype('bfloat16')  # rounded to the file's dtype
  # The original's numbers: F.interpolate on the file's bf16 tensors.
  original = original_init_weights({'module': bf16}, img_size=84)
  ours = restored(dst)['params']['backbone']['pos_embed']
  differ, steps = bf16_steps(ours, as_numpy(original['pos_embed']))
  assert differ <= 2 and steps <= 1.0, (differ, steps)  # of 2368; see convert/torch_bicubic.py
  model = check_features(with_stored_resizes(original, dst), dst, 84, reference_pretrain=84)
  assert {x.dtype for x in jax.tree.leaves(model.params)} == {np.dtype('float32')}


def test_patch_kernel_resized_for_patch_16(state_dict, tmp_path):
  # The adapter runs patch 16 from the 14x14 kernel: the original resizes it on load.
  src, dst = tmp_path / 'tiny_bf16.pth', tmp_path / 'out'
  bf16 = {k: v.to(torch.bfloat16) for k, v in state_dict.items()}
  torch.save(bf16, src)
  info = pth_to_orbax.convert(str(src), str(dst), tiny_config(96, patch=16))
  assert info['backbone']['patch_size'] == 16 and info['resized_patch_kernel'] == [14, 16]
  original = original_init_weights(bf16, img_size=96, patch_size=16)
  kernel = restored(dst)['params']['backbone']['patch_embed']['kernel']  # (16, 16, 3, C)
  want = as_numpy(original['patch_embed.proj.weight']).transpose(2, 3, 1, 0)
  assert kernel.shape == want.shape == (16, 16, 3, WIDTH)
  differ, steps = bf16_steps(kernel, want)
  assert differ <= 2 and steps <= 1.0, (differ, steps)  # of 49152
  check_features(with_stored_resizes(original, dst), dst, 96, patch=16, reference_pretrain=96)


@pytest.mark.parametrize('grid_in,grid_out,width', [(16, 36, 256), (32, 36, 128), (32, 16, 128)])
def test_torch_bicubic_matches_pytorch_on_bf16(grid_in, grid_out, width):
  # The original's call: a (1, g*g, C) bf16 pos_embed viewed as (1, C, g, g).
  pos = (torch.randn(1, 1 + grid_in ** 2, width, generator=torch.Generator().manual_seed(0))
         * 0.02).to(torch.bfloat16)
  want = as_numpy(original_init_weights(
      {'pos_embed': pos, 'patch_embed.proj.weight': torch.zeros(1, 3, 14, 14, dtype=torch.bfloat16)},
      img_size=grid_out * 14)['pos_embed'])
  got = torch_bicubic.resize_pos_embed(as_numpy(pos), grid_out)
  assert got.dtype == want.dtype == ml_dtypes.bfloat16
  differ, steps = bf16_steps(got, want)
  # Tolerance: at most 1 element in 10^4 differs, by one bf16 step (measured:
  # ~1e-5, where the taps nearly cancel). Resizing in float64 and rounding once
  # is not the original's function: ~40 % of the elements differ.
  assert differ <= want.size * 1e-4 and steps <= 1.0, (differ, steps)
  if grid_out > grid_in:  # upsampling, as from the pretrain grid to the crop grid
    float64_way = torch_bicubic.resize_pos_embed(as_numpy(pos).astype(np.float64), grid_out)
    assert bf16_steps(float64_way.astype(ml_dtypes.bfloat16), want)[0] > want.size * 0.2


# ----------------------------------------------------------------------------- unexpected keys

def test_unexpected_keys_are_listed_and_skipped(state_dict, tmp_path, caplog):
  # Pretrained files may hold tensors the model does not use (the original
  # loads them with strict=False): a warning, info.json, and the conversion goes on.
  sd = dict(state_dict, **{'clip_projector.norm.weight': torch.ones(WIDTH),
                           'blocks.1.attn.qkv.bias': torch.zeros(3 * WIDTH)})
  src, dst = tmp_path / 'extra.pth', tmp_path / 'out'
  torch.save(sd, src)
  info = pth_to_orbax.convert(str(src), str(dst), tiny_config())
  assert info['unexpected_keys'] == ['blocks.1.attn.qkv.bias', 'clip_projector.norm.weight']
  assert 'clip_projector.norm.weight' in caplog.text and '--strict' in caplog.text
  check_features(state_dict, dst, PRETRAIN)

  with pytest.raises(ConversionError) as e:
    pth_to_orbax.convert(str(src), str(tmp_path / 'strict'), tiny_config(), strict=True)
  assert 'unexpected: clip_projector.norm.weight (64,)' in str(e.value)
  assert 'unexpected: blocks.1.attn.qkv.bias (192,)' in str(e.value)
  assert not (tmp_path / 'strict').exists()

# ----------------------------------------------------------------------------- mmcv and release files

def mmcv_checkpoint(model, hook_msgs=True):
  """A checkpoint as mmcv 1.7's save_checkpoint writes it (runner.meta with
  hook_msgs of the EvalHook, mmcv_version/time, CLASSES; the state dict an
  OrderedDict with _metadata; the optimizer's state dict)."""
  state_dict = collections.OrderedDict((k, v.detach().cpu()) for k, v in model.state_dict().items())
  state_dict._metadata = getattr(model.state_dict(), '_metadata', collections.OrderedDict())
  optimizer = torch.optim.AdamW(model.parameters(), lr=4e-5)
  sum(p.sum() for p in model.parameters()).backward()
  optimizer.step()
  meta = dict(env_info='sys.platform: linux\nPython: 3.8.0', seed=1234, exp_name='upernet.py',
              mmseg_version='0.27.0', config='norm_cfg = dict(type="SyncBN")',
              CLASSES=('wall', 'building'), PALETTE=[[120, 120, 120], [180, 120, 120]],
              epoch=1, iter=16000, mmcv_version='1.7.0', time='Mon Jan  8 10:00:00 2024')
  if hook_msgs:  # EvalHook(save_best='auto'): best_score is mmseg's numpy.float64 mIoU
    meta['hook_msgs'] = dict(last_ckpt='/work/iter_16000.pth', best_score=np.float64(0.4721),
                             best_ckpt='/work/best_mIoU_iter_16000.pth')
  return {'meta': meta, 'state_dict': state_dict, 'optimizer': optimizer.state_dict()}


def test_mmcv_checkpoint_with_numpy_meta_converts(tmp_path):
  model = fx.torch_segmentor('linear', seed=5)
  src = tmp_path / 'iter_16000.pth'
  torch.save(mmcv_checkpoint(model), src)
  info = pth_to_orbax.convert(str(src), str(tmp_path / 'out'), fx.tiny_config('linear'))
  assert info['kind'] == 'segmentor' and info['wrapper'] == 'state_dict'
  got = restored(tmp_path / 'out')
  np.testing.assert_array_equal(got['params']['decode_head']['conv_seg']['bias'],
                                model.decode_head.conv_seg.bias.detach().numpy())


def test_mmcv_checkpoint_written_with_numpy_1_names(tmp_path):
  # The original ran numpy 1.x: its pickles name numpy.core.multiarray.scalar.
  model = fx.torch_segmentor('linear', seed=6)
  src = tmp_path / 'legacy.pth'
  torch.save(mmcv_checkpoint(model), src, _use_new_zipfile_serialization=False)
  data = src.read_bytes()
  assert b'numpy._core.multiarray\nscalar' in data
  src.write_bytes(data.replace(b'numpy._core.multiarray\n', b'numpy.core.multiarray\n'))
  info = pth_to_orbax.convert(str(src), str(tmp_path / 'out'))
  assert info['kind'] == 'segmentor'


def test_numpy_scalar_allowance_is_exact():
  names = {g[1] if isinstance(g, tuple) else f'{g.__module__}.{g.__qualname__}'
           for g in torch_io.numpy_scalar_globals()}
  assert 'numpy.core.multiarray.scalar' in names and 'numpy._core.multiarray.scalar' in names
  assert 'numpy.dtype' in names and 'numpy.dtypes.Float64DType' in names
  assert not [n for n in names if 'reconstruct' in n or 'Object' in n or n.startswith(('os', 'builtins'))]


class Exploit:
  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return os.system, (f'touch {self.path}',)


def test_code_in_meta_is_refused_in_one_line(tmp_path, capsys):
  marker = tmp_path / 'PWNED'
  checkpoint_ = mmcv_checkpoint(fx.torch_segmentor('linear'))
  checkpoint_['meta']['hook_msgs']['evil'] = Exploit(marker)
  src = tmp_path / 'evil.pth'
  torch.save(checkpoint_, src)
  assert run_main(f'--src={src}', f'--dst={tmp_path / "out"}') == 2
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'error: {src}: refused to load'), lines
  assert 'posix.system' in lines[0]
  assert not marker.exists()
  assert not (tmp_path / 'out').exists()


def test_malicious_raw_pickle_refused(tmp_path):
  marker = tmp_path / 'PWNED'
  src = tmp_path / 'evil_legacy.pth'
  with open(src, 'wb') as f:
    pickle.dump({'cls_token': Exploit(marker)}, f, protocol=2)
  with pytest.raises(ConversionError, match='refused to load'):
    pth_to_orbax.convert(str(src), str(tmp_path / 'out'))
  assert not marker.exists()
  assert not (tmp_path / 'out').exists()


def test_upernet_without_auxiliary_head(tmp_path, caplog):
  model = fx.torch_segmentor('uper', seed=2)
  sd = {k: v for k, v in model.state_dict().items() if not k.startswith('auxiliary_head.')}
  src = tmp_path / 'no_aux.pth'
  torch.save({'module': sd}, src)
  info = pth_to_orbax.convert(str(src), str(tmp_path / 'out'))
  assert info['heads']['type'] == 'uper' and info['heads']['aux_channels'] is None
  assert 'auxiliary_head' not in stored(tmp_path / 'out')['params']
  # With a config that has an auxiliary head: converted without it, one warning
  # line with the fix; the model of that config loads it (aux random) and its
  # logits are the file's.
  config = fx.tiny_config('uper')
  with caplog.at_level(logging.WARNING):
    pth_to_orbax.convert(str(src), str(tmp_path / 'out2'), config)
  warning = [r.getMessage() for r in caplog.records if 'no auxiliary head' in r.getMessage()]
  assert len(warning) == 1 and '--config.model.auxiliary_head=None' in warning[0]
  assert 'auxiliary_head' not in stored(tmp_path / 'out2')['params']
  ours = api.init_model(config, str(tmp_path / 'out2'))
  x = np.random.default_rng(0).normal(size=(1, fx.CROP, fx.CROP, 3)).astype(np.float32)
  assert fx.rel_l2(api.compute_logits(ours, x), fx.torch_logits(model, x)) <= 1e-5

def test_cli_prints_one_line_and_the_keys(state_dict, tmp_path, capsys):
  sd = dict(state_dict)
  del sd['blocks.2.attn.proj.bias'], sd['cls_token']
  src = tmp_path / 'bad.pth'
  torch.save(sd, src)
  assert run_main(f'--src={src}', f'--dst={tmp_path / "out"}') == 2
  assert capsys.readouterr().err.splitlines() == [
      f'error: {src}: the tensors do not fit an InternViT: 2 problem(s)',
      '  missing: blocks.2.attn.proj.bias (64,)',
      '  missing: cls_token (1, 1, 64)']
