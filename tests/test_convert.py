"""convert.pth_to_orbax on .pth files: round trips against the PyTorch reference,
the original's pretrained-load resizes, the release and mmcv formats, unexpected
keys, clear failures, atomic output, and how checkpoints are found and loaded.

Tiny models only (width 64, 2 heads, depth 4, pretrain 56 = a 4x4 grid).
Feature tolerance: relative L2 error <= 1e-5 (float32 compute on both sides).
"""
import collections
import hashlib
import json
import os
import pickle
import re
import select
import signal
import subprocess
import sys
import time

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import torch.nn.functional as F

from configs.common import VARIANTS
from convert import backbone, lazy_stack, pth_to_orbax, torch_bicubic, torch_io
from internseg_jax import api, checkpoint
from internseg_jax.errors import ConversionError
from tests import seg_fixtures as fx
from tests.convert_helpers import original_init_weights
from tests.reference.intern_vit_torch import InternViTTorch, randomize_

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH, HEADS, DEPTH, PRETRAIN, PATCH = 64, 2, 4, 56, 14
OUT = (1, 3)


def torch_model(depth=DEPTH, width=WIDTH, heads=HEADS, seed=0, pretrain=PRETRAIN, patch=PATCH):
  model = InternViTTorch(embed_dim=width, depth=depth, num_heads=heads, pretrain_size=pretrain,
                         patch_size=patch, out_indices=[i for i in OUT if i < depth])
  return randomize_(model, seed=seed).eval()


@pytest.fixture(scope='module')
def state_dict():
  return {k: v.detach().clone() for k, v in torch_model().state_dict().items()}


def tiny_config(img_size=PRETRAIN, depth=DEPTH, patch=PATCH):
  config = api.load_config(os.path.join(ROOT, f'configs/features.py:tiny,img_size={img_size}'))
  bb = config.model.backbone
  bb.pretrain_size, bb.depth, bb.out_indices, bb.patch_size = PRETRAIN, depth, list(OUT), patch
  config.model.dtype = 'float32'
  return config


def config_flags(img_size):
  return [f'--config={ROOT}/configs/features.py:tiny,img_size={img_size}',
          f'--config.model.backbone.pretrain_size={PRETRAIN}']


def run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-m', 'convert.pth_to_orbax', *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=120)


def stored(dst):
  """The converted variables' stored shapes and dtypes (no data read)."""
  return checkpoint.params_metadata(checkpoint.find_params_dir(dst))


def restored(dst):
  params_dir = checkpoint.find_params_dir(dst)
  return checkpoint.restore_params(params_dir, checkpoint.params_metadata(params_dir))


def as_numpy(tensor):
  return torch_io.to_numpy(tensor.contiguous())


def rel_l2(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def reference_features(sd, images, pretrain=PRETRAIN, patch=PATCH):
  """The float32 torch reference on `sd` (cast to float32), as NHWC numpy."""
  model = torch_model(pretrain=pretrain, patch=patch)
  model.load_state_dict({k: v.float() for k, v in sd.items()})
  with torch.no_grad():
    feats = model(torch.from_numpy(images).permute(0, 3, 1, 2))
  return [f.permute(0, 2, 3, 1).numpy() for f in feats]


def check_features(sd, dst, img_size, patch=PATCH, reference_pretrain=PRETRAIN):
  model = api.init_model(tiny_config(img_size, patch=patch), str(dst))
  images = np.random.default_rng(img_size).standard_normal((2, img_size, img_size, 3),
                                                            np.float32)
  ours = api.extract_features(model, images)
  ref = reference_features(sd, images, reference_pretrain, patch)
  assert len(ours) == len(ref) == len(OUT)
  grid = img_size // patch
  for a, b in zip(ours, ref):
    assert a.shape == b.shape == (2, grid, grid, WIDTH)
    assert rel_l2(np.asarray(a), b) <= 1e-5
  return model


def with_stored_resizes(sd, dst):
  """`sd` with our stored pos_embed and patch kernel, in the PyTorch layout (so
  the features compare the model, not the one-step bf16 differences above)."""
  back = restored(dst)['params']['backbone']
  kernel = np.asarray(back['patch_embed']['kernel'], np.float32).transpose(3, 2, 0, 1)
  return dict(sd, pos_embed=torch.from_numpy(np.asarray(back['pos_embed'], np.float32)),
              **{'patch_embed.proj.weight': torch.from_numpy(kernel.copy())})


def bf16_steps(got, want):
  """Elements that differ, and the largest difference in bf16 steps (ulps)."""
  got = np.asarray(got, ml_dtypes.bfloat16).astype(np.float32)
  want = np.asarray(want, ml_dtypes.bfloat16).astype(np.float32)
  ulp = np.spacing(np.abs(want).astype(ml_dtypes.bfloat16)).astype(np.float32)
  steps = np.abs(got - want) / np.maximum(ulp, np.finfo(np.float32).tiny)
  return int((got != want).sum()), float(steps.max())


# ----------------------------------------------------------------------------- round trips

def test_cli_float32_resized_at_conversion(state_dict, tmp_path):
  src, dst = tmp_path / 'tiny.pth', tmp_path / 'out'
  torch.save(state_dict, src)
  result = run_cli(f'--src={src}', f'--dst={dst}', *config_flags(84))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'wrote' in result.stdout
  info = checkpoint.read_info(dst)
  assert info['backbone']['img_size'] == 84 and info['backbone']['pretrain_size'] == PRETRAIN
  # The position embedding was resized to the config's 6x6 grid when converting.
  assert stored(dst)['params']['backbone']['pos_embed'].shape == (1, 1 + 6 * 6, WIDTH)
  check_features(state_dict, dst, 84)


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


def test_no_config_resized_at_load(state_dict, tmp_path):
  src, dst = tmp_path / 'tiny.pth', tmp_path / 'out'
  torch.save(state_dict, src)
  info = pth_to_orbax.convert(str(src), str(dst))
  assert info['backbone']['img_size'] == PRETRAIN and info['backbone']['num_heads'] == 1
  assert stored(dst)['params']['backbone']['pos_embed'].shape == (1, 1 + 4 * 4, WIDTH)
  check_features(state_dict, dst, 70)  # a 5x5 grid: resized when the model loads it


def test_info_json(state_dict, tmp_path):
  src, dst = tmp_path / 'tiny.pth', tmp_path / 'out'
  torch.save(state_dict, src)
  returned = pth_to_orbax.convert(str(src), str(dst), tiny_config())
  info = json.loads((dst / 'info.json').read_text())
  assert info == returned == checkpoint.read_info(dst)
  digest = hashlib.sha256(src.read_bytes()).hexdigest()
  assert info['sha256'] == digest
  assert info['files'] == [dict(path=os.path.abspath(src), sha256=digest,
                                bytes=os.path.getsize(src))]
  assert info['source'] == os.path.abspath(src)
  assert info['kind'] == 'backbone' and info['wrapper'] is None and info['unexpected_keys'] == []
  assert info['variant'] == f'custom (width {WIDTH}, depth {DEPTH})'
  assert info['backbone'] == dict(
      embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_ratio=4.0, patch_size=PATCH,
      pretrain_size=PRETRAIN, img_size=PRETRAIN, qkv_bias=False, qk_normalization=True)


def test_variant_name():
  def arch(depth, size, width=3200):
    return dict(embed_dim=width, depth=depth, pretrain_size=size)

  assert backbone.variant_name(arch(48, 224), '/x/intern_vit_6b_224px.pth') == '224'
  assert backbone.variant_name(arch(48, 224), 'renamed.pth') == '224'
  for name, (depth, size, filename) in VARIANTS.items():
    if name != '224':
      assert backbone.variant_name(arch(depth, size), f'/w/{filename}') == name
  generic = backbone.variant_name(arch(45, 448), 'renamed.pth')
  assert generic.startswith('448') and 'v2_5' in generic
  # A file name that does not match its contents is not trusted.
  assert backbone.variant_name(arch(45, 448), 'intern_vit_6b_224px.pth').startswith('448 (')
  assert backbone.variant_name(arch(4, 56, 64), 'intern_vit_6b_224px.pth') == \
      'custom (width 64, depth 4)'


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


def run_main(*args):
  """`python -m convert.pth_to_orbax ARGS` in this process -> its exit code."""
  pth_to_orbax.FLAGS(['convert', *args])
  try:
    with pytest.raises(SystemExit) as e:
      pth_to_orbax.main([])
  finally:
    pth_to_orbax.FLAGS.unparse_flags()
  return e.value.code


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


def test_upernet_without_auxiliary_head(tmp_path):
  model = fx.torch_segmentor('uper', seed=2)
  sd = {k: v for k, v in model.state_dict().items() if not k.startswith('auxiliary_head.')}
  src = tmp_path / 'no_aux.pth'
  torch.save({'module': sd}, src)
  info = pth_to_orbax.convert(str(src), str(tmp_path / 'out'))
  assert info['heads']['type'] == 'uper' and info['heads']['aux_channels'] is None
  assert 'auxiliary_head' not in stored(tmp_path / 'out')['params']
  with pytest.raises(ConversionError) as e:
    pth_to_orbax.convert(str(src), str(tmp_path / 'out2'), fx.tiny_config('uper'))
  message = str(e.value)
  assert '\n' not in message and message.startswith(f'{src}: the file has no auxiliary head')
  assert 'convert without --config' in message


# ----------------------------------------------------------------------------- failures

def convert_error(tmp_path, obj, config=None, name='bad.pth', strict=False):
  src = tmp_path / name
  torch.save(obj, src)
  with pytest.raises(ConversionError) as e:
    pth_to_orbax.convert(str(src), str(tmp_path / 'out'), config, strict=strict)
  assert not (tmp_path / 'out').exists()
  assert str(e.value).startswith(str(src))
  return str(e.value)


def test_missing_key(state_dict, tmp_path):
  sd = dict(state_dict)
  del sd['blocks.2.attn.proj.bias']
  msg = convert_error(tmp_path, sd)
  assert 'missing: blocks.2.attn.proj.bias (64,)' in msg


def test_wrong_shape_and_all_problems_in_one_message(state_dict, tmp_path):
  sd = dict(state_dict)
  sd['blocks.3.mlp.fc2.weight'] = torch.zeros(WIDTH, 2 * WIDTH)
  sd['cls_token'] = torch.zeros(1, 2, WIDTH)
  del sd['blocks.0.ls2.gamma']
  sd['extra'] = torch.zeros(3)  # unused: a warning, not one of the problems
  msg = convert_error(tmp_path, sd)
  assert re.search(r'wrong shape: blocks\.3\.mlp\.fc2\.weight is \(64, 128\), '
                   r'expected \(64, 256\)', msg), msg
  assert 'wrong shape: cls_token' in msg
  assert 'missing: blocks.0.ls2.gamma' in msg
  assert 'extra' not in msg
  assert ': 3 problem(s)' in msg.splitlines()[0]


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


def test_config_mismatch(state_dict, tmp_path):
  msg = convert_error(tmp_path, state_dict, tiny_config(depth=5))
  assert 'depth: file has 4, config says 5' in msg
  config = tiny_config()
  config.model.backbone.embed_dim = 128
  msg = convert_error(tmp_path, state_dict, config, name='bad2.pth')
  assert 'embed_dim: file has 64, config says 128' in msg


def test_dst_exists(state_dict, tmp_path):
  src, dst = tmp_path / 'tiny.pth', tmp_path / 'out'
  torch.save(state_dict, src)
  dst.mkdir()
  with pytest.raises(ConversionError, match='already exists'):
    pth_to_orbax.convert(str(src), str(dst))
  assert list(dst.iterdir()) == []


def test_src_missing(tmp_path):
  with pytest.raises(ConversionError, match='no such file'):
    pth_to_orbax.convert(str(tmp_path / 'nope.pth'), str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()


def test_broken_file_one_line(state_dict, tmp_path):
  src = tmp_path / 'junk.pth'
  src.write_bytes(b'this is not a pytorch file')
  with pytest.raises(ConversionError, match=r'junk\.pth: not a readable PyTorch checkpoint'):
    pth_to_orbax.convert(str(src), str(tmp_path / 'out'))
  truncated = tmp_path / 'truncated.pth'
  torch.save(state_dict, truncated)
  truncated.write_bytes(truncated.read_bytes()[:5000])
  with pytest.raises(ConversionError) as e:
    pth_to_orbax.convert(str(truncated), str(tmp_path / 'out'))
  assert '\n' not in str(e.value) and str(e.value).startswith(f'{truncated}: not a readable')
  assert not (tmp_path / 'out').exists()


def test_non_tensor_entries(state_dict, tmp_path):
  msg = convert_error(tmp_path, dict(state_dict, step=5, nested={'a': torch.zeros(1)}))
  assert 'not tensors' in msg and "'step'" in msg and "'nested'" in msg


def test_not_a_state_dict(tmp_path):
  msg = convert_error(tmp_path, [torch.zeros(1)])
  assert 'expected a state dict' in msg


def test_mmseg_checkpoint_with_unusable_head(state_dict, tmp_path):
  # An mmseg {'state_dict': {'backbone.*', 'decode_head.*'}} file is not taken for a
  # backbone; with a head that fits no known head it is refused, saying why.
  sd = {'backbone.' + k: v for k, v in state_dict.items()}
  sd['decode_head.conv_seg.weight'] = torch.zeros(150, 64, 1, 1)
  msg = convert_error(tmp_path, {'meta': {'epoch': 1}, 'state_dict': sd})
  assert 'decode_head' in msg, msg


# ----------------------------------------------------------------------------- atomicity, Orbax

def test_exception_mid_write_leaves_nothing(state_dict, tmp_path, monkeypatch):
  src, dst = tmp_path / 'tiny.pth', tmp_path / 'out'
  torch.save(state_dict, src)
  init = lazy_stack.LazyStack.__init__

  def failing_init(self, n, slice_shape, dtype, get_slice, on_written=None):
    def get(i):
      if i == 2:
        raise RuntimeError('disk on fire at slice 2')
      return get_slice(i)
    init(self, n, slice_shape, dtype, get, on_written)

  monkeypatch.setattr(lazy_stack.LazyStack, '__init__', failing_init)
  with pytest.raises(Exception, match='disk on fire'):
    pth_to_orbax.convert(str(src), str(dst))
  assert sorted(p.name for p in tmp_path.iterdir()) == ['tiny.pth']


def test_sigkill_mid_write_leaves_no_dst(tmp_path):
  width, depth = 256, 24  # about 75 MB of float32 to write
  src, dst = tmp_path / 'medium.pth', tmp_path / 'out'
  torch.save(torch_model(depth=depth, width=width, heads=2).state_dict(), src)
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  proc = subprocess.Popen([sys.executable, '-m', 'convert.pth_to_orbax', f'--src={src}',
                           f'--dst={dst}'], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
  seen, deadline = b'', time.monotonic() + 90
  try:
    while b'writing' not in seen and time.monotonic() < deadline:
      ready, _, _ = select.select([proc.stderr], [], [], 1.0)
      if not ready:
        continue
      chunk = os.read(proc.stderr.fileno(), 4096)  # tqdm's bar goes to stderr
      if not chunk:
        break
      seen += chunk
    assert b'writing' in seen, seen.decode(errors='replace')[-2000:]
    assert proc.poll() is None, 'the conversion finished before it could be killed'
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    proc.stderr.close()
  assert not dst.exists()
  leftovers = [p.name for p in tmp_path.iterdir() if p.name != 'medium.pth']
  assert all(re.fullmatch(r'\.out\.incomplete-\d+', n) for n in leftovers), leftovers
  config = tiny_config()
  config.model.backbone.update(embed_dim=width, depth=depth)
  with pytest.raises(FileNotFoundError, match='does not exist'):
    api.init_model(config, str(dst))


def test_orbax_is_used_publicly_and_nothing_is_registered(state_dict, tmp_path):
  src = tmp_path / 'tiny.pth'
  torch.save(state_dict, src)
  pth_to_orbax.convert(str(src), str(tmp_path / 'out'))
  assert not ocp.type_handlers.has_type_handler(lazy_stack.LazyStack)
  sources = ''.join(open(os.path.join(ROOT, 'convert', name)).read()
                    for name in os.listdir(os.path.join(ROOT, 'convert')) if name.endswith('.py'))
  assert '_src' not in sources
  # The stacked block parameters read back as plain numpy arrays.
  blocks = restored(tmp_path / 'out')['params']['backbone']['blocks']
  np.testing.assert_array_equal(np.asarray(blocks['mlp']['fc1']['kernel'][2]),
                                state_dict['blocks.2.mlp.fc1.weight'].numpy().T)


# ----------------------------------------------------------------------------- finding, loading

def small_tree(value):
  return {'backbone': {'cls_token': np.full((1, 1, 4), value, np.float32)}}


def test_find_params_dir(state_dict, tmp_path):
  src, dst = tmp_path / 'tiny.pth', tmp_path / 'converted'
  torch.save(state_dict, src)
  pth_to_orbax.convert(str(src), str(dst))
  assert checkpoint.find_params_dir(dst) == dst / 'params'
  assert checkpoint.find_params_dir(dst / 'params') == dst / 'params'  # the params dir itself

  holder = tmp_path / 'holder'
  checkpoint.save_params(holder, small_tree(1.0))  # a folder holding params/, no info.json
  assert checkpoint.find_params_dir(holder) == holder / 'params'
  assert checkpoint.read_info(holder) == {}

  workdir = tmp_path / 'workdir'
  for step in (2, 10, 9):  # newest is 10, not '9' (names compare as numbers)
    checkpoint.save_params(workdir / 'checkpoints' / str(step), small_tree(step))
  (workdir / 'checkpoints' / '11.orbax-checkpoint-tmp-123').mkdir()  # unfinished: ignored
  found = checkpoint.find_params_dir(workdir)
  assert found == workdir / 'checkpoints' / '10' / 'params'
  meta = checkpoint.params_metadata(found)
  back = checkpoint.restore_params(found, meta)
  assert float(np.asarray(back['backbone']['cls_token']).ravel()[0]) == 10.0

  with pytest.raises(FileNotFoundError, match='does not exist'):
    checkpoint.find_params_dir(tmp_path / 'nowhere')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='holds no parameters'):
    checkpoint.find_params_dir(tmp_path / 'empty')


def test_load_params_is_strict(state_dict, tmp_path):
  src, dst = tmp_path / 'tiny.pth', tmp_path / 'out'
  torch.save(state_dict, src)
  pth_to_orbax.convert(str(src), str(dst), tiny_config())
  with pytest.raises(ValueError) as e:
    api.init_model(tiny_config(depth=5), str(dst))
  msg = str(e.value)
  assert 'does not fit the model' in msg
  assert re.search(r'wrong shape: (params/)?backbone/blocks/mlp/fc1/kernel: '
                   r'stored \(4, 64, 256\), model \(5, 64, 256\)', msg), msg
