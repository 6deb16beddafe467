"""convert.pth_to_orbax on .pth files: round trips against the PyTorch reference,
info.json, clear failures, atomic output, public Orbax use, and how checkpoints
are found and loaded. (The original's file formats, unexpected keys and resizes:
test_convert_formats.py; Hugging Face safetensors: test_convert_safetensors.py.)

Tiny models only (width 64, 2 heads, depth 4, pretrain 56 = a 4x4 grid).
Feature tolerance: relative L2 error <= 1e-5 (float32 compute on both sides).
"""
import hashlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch

from configs.common import VARIANTS
from convert import backbone, lazy_stack, pth_to_orbax
from internseg_jax import api, weights
from internseg_jax.errors import WeightsError
from internseg_jax.errors import ConversionError
from tests.convert_helpers import (DEPTH, HEADS, PATCH, PRETRAIN, WIDTH, check_features,
                                   restored, stored, tiny_config, torch_model)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def state_dict():
  return {k: v.detach().clone() for k, v in torch_model().state_dict().items()}


def config_flags(img_size):
  return [f'--config={ROOT}/configs/features.py:tiny,img_size={img_size}',
          f'--config.model.backbone.pretrain_size={PRETRAIN}']


def run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-m', 'convert.pth_to_orbax', *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=120)


def test_cli_float32_resized_at_conversion(state_dict, tmp_path):
  src, dst = tmp_path / 'tiny.pth', tmp_path / 'out'
  torch.save(state_dict, src)
  result = run_cli(f'--src={src}', f'--dst={dst}', *config_flags(84))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'wrote' in result.stdout
  info = weights.read_info(dst)
  assert info['backbone']['img_size'] == 84 and info['backbone']['pretrain_size'] == PRETRAIN
  # The position embedding was resized to the config's 6x6 grid when converting.
  assert stored(dst)['params']['backbone']['pos_embed'].shape == (1, 1 + 6 * 6, WIDTH)
  check_features(state_dict, dst, 84)


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
  assert info == returned == weights.read_info(dst)
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
  with pytest.raises(WeightsError, match='does not exist'):
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
  assert weights.find_params_dir(dst) == dst / 'params'
  assert weights.find_params_dir(dst / 'params') == dst / 'params'  # the params dir itself

  holder = tmp_path / 'holder'
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:  # params/, no info.json
    ckptr.save(holder / 'params', args=ocp.args.PyTreeSave(small_tree(1.0)))
  assert weights.find_params_dir(holder) == holder / 'params'
  assert weights.read_info(holder) == {}

  workdir = tmp_path / 'workdir'
  manager = ocp.CheckpointManager(workdir / 'checkpoints', item_names=('params',))
  for step in (2, 10, 9):  # newest is 10, not '9' (the manager knows its steps)
    manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(small_tree(step))),
                 force=True)
  manager.wait_until_finished()
  (workdir / 'checkpoints' / '11.orbax-checkpoint-tmp-123').mkdir()  # unfinished: ignored
  found = weights.find_params_dir(workdir)
  assert found == workdir / 'checkpoints' / '10' / 'params'
  meta = weights.params_metadata(found)
  back = weights.restore_params(found, meta)
  assert float(np.asarray(back['backbone']['cls_token']).ravel()[0]) == 10.0
  # A run's best/: the step Orbax kept by mIoU, with its step and mIoU.
  ckpts = weights.TrainCheckpoints(str(workdir), every=1, max_to_keep=1)
  ckpts.save_best(4, small_tree(4.0), 0.5)
  ckpts.save_best(7, small_tree(7.0), 0.6)
  ckpts.wait()
  assert weights.find_params_dir(workdir / 'best') == workdir / 'best' / '7' / 'params'
  assert weights.read_info(workdir / 'best') == {'step': 7, 'mIoU': 0.6}

  with pytest.raises(WeightsError, match='does not exist'):
    weights.find_params_dir(tmp_path / 'nowhere')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(WeightsError, match='holds no parameters'):
    weights.find_params_dir(tmp_path / 'empty')


def test_load_params_is_strict(state_dict, tmp_path):
  src, dst = tmp_path / 'tiny.pth', tmp_path / 'out'
  torch.save(state_dict, src)
  pth_to_orbax.convert(str(src), str(dst), tiny_config())
  with pytest.raises(WeightsError) as e:
    api.init_model(tiny_config(depth=5), str(dst))
  msg = str(e.value)
  assert 'does not fit the model' in msg
  assert re.search(r'wrong shape: params/backbone/blocks/mlp/fc1/kernel '
                   r'is \(4, 64, 256\), expected \(5, 64, 256\)', msg), msg
