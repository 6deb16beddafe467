"""convert.pth_to_orbax: round trips against the PyTorch reference, info.json,
clear failures, atomic output, and how checkpoints are found and loaded.

Tiny models only (width 64, 2 heads, depth 4, pretrain 56 = a 4x4 grid).
"""
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
import numpy as np
import pytest
import torch

from configs.common import VARIANTS
from convert import pth_to_orbax
from convert.torch_io import ConversionError
from internseg_jax import api, checkpoint
from tests.reference.intern_vit_torch import InternViTTorch, randomize_

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH, HEADS, DEPTH, PRETRAIN, PATCH = 64, 2, 4, 56, 14
OUT = (1, 3)


def torch_model(depth=DEPTH, width=WIDTH, heads=HEADS, seed=0):
  model = InternViTTorch(embed_dim=width, depth=depth, num_heads=heads, pretrain_size=PRETRAIN,
                         patch_size=PATCH, out_indices=[i for i in OUT if i < depth])
  return randomize_(model, seed=seed).eval()


@pytest.fixture(scope='module')
def state_dict():
  return {k: v.detach().clone() for k, v in torch_model().state_dict().items()}


def tiny_config(img_size=PRETRAIN, depth=DEPTH):
  config = api.load_config(os.path.join(ROOT, f'configs/features.py:tiny,img_size={img_size}'))
  bb = config.model.backbone
  bb.pretrain_size, bb.depth, bb.out_indices = PRETRAIN, depth, list(OUT)
  config.model.dtype = 'float32'
  return config


def config_flags(img_size):
  return [f'--config={ROOT}/configs/features.py:tiny,img_size={img_size}',
          f'--config.model.backbone.pretrain_size={PRETRAIN}']


def run_cli(*args, **kwargs):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-m', 'convert.pth_to_orbax', *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=120, **kwargs)


def stored_backbone(dst):
  """The converted backbone's stored shapes and dtypes (no data read)."""
  tree = checkpoint.params_metadata(checkpoint.find_params_dir(dst))
  return tree['params']['backbone'] if 'params' in tree else tree['backbone']


def rel_l2(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def reference_features(sd, images):
  """The float32 torch reference on `sd` (cast to float32), as NHWC numpy."""
  model = torch_model()
  model.load_state_dict({k: v.float() for k, v in sd.items()})
  with torch.no_grad():
    feats = model(torch.from_numpy(images).permute(0, 3, 1, 2))
  return [f.permute(0, 2, 3, 1).numpy() for f in feats]


def check_features(sd, dst, img_size):
  model = api.init_model(tiny_config(img_size), dst)
  images = np.random.default_rng(img_size).standard_normal((2, img_size, img_size, 3),
                                                            np.float32)
  ours = api.extract_features(model, images)
  ref = reference_features(sd, images)
  assert len(ours) == len(ref) == len(OUT)
  grid = img_size // PATCH
  for a, b in zip(ours, ref):
    assert a.shape == b.shape == (2, grid, grid, WIDTH)
    assert rel_l2(np.asarray(a), b) <= 1e-5
  return model


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
  assert stored_backbone(dst)['pos_embed'].shape == (1, 1 + 6 * 6, WIDTH)
  check_features(state_dict, dst, 84)


def test_bf16_module_wrapped_resized_at_conversion(state_dict, tmp_path):
  src, dst = tmp_path / 'tiny_bf16.pth', tmp_path / 'out'
  bf16 = {k: v.to(torch.bfloat16) for k, v in state_dict.items()}
  torch.save({'module': bf16}, src)
  info = pth_to_orbax.convert(str(src), str(dst), tiny_config(84))
  assert info['wrapper'] == 'module'
  stored = stored_backbone(dst)
  assert stored['blocks']['attn']['qkv']['kernel'].dtype == np.dtype('bfloat16')
  assert stored['pos_embed'].dtype == np.dtype('float32')  # resized: not rounded to bf16
  model = check_features(bf16, dst, 84)  # reference on the bf16-rounded weights, in float32
  leaves = [x.dtype for x in jax.tree.leaves(model.params)]
  assert set(leaves) == {np.dtype('float32')}


def test_no_config_resized_at_load(state_dict, tmp_path):
  src, dst = tmp_path / 'tiny.pth', tmp_path / 'out'
  torch.save(state_dict, src)
  info = pth_to_orbax.convert(str(src), str(dst))
  assert info['backbone']['img_size'] == PRETRAIN and info['backbone']['num_heads'] == 1
  assert stored_backbone(dst)['pos_embed'].shape == (1, 1 + 4 * 4, WIDTH)
  check_features(state_dict, dst, 70)  # a 5x5 grid: resized when the model loads it
  check_features(state_dict, dst, PRETRAIN)  # and the file's own grid, no resize


def test_info_json(state_dict, tmp_path):
  src, dst = tmp_path / 'tiny.pth', tmp_path / 'out'
  torch.save(state_dict, src)
  returned = pth_to_orbax.convert(str(src), str(dst), tiny_config())
  info = json.loads((dst / 'info.json').read_text())
  assert info == returned == checkpoint.read_info(dst)
  assert info['sha256'] == hashlib.sha256(src.read_bytes()).hexdigest()
  assert info['source'] == os.path.abspath(src)
  assert info['kind'] == 'backbone' and info['wrapper'] is None
  assert info['variant'] == f'custom (width {WIDTH}, depth {DEPTH})'
  assert info['backbone'] == dict(
      embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_ratio=4.0, patch_size=PATCH,
      pretrain_size=PRETRAIN, img_size=PRETRAIN, qkv_bias=False, qk_normalization=True)


def test_variant_name():
  def arch(depth, size, width=3200):
    return dict(embed_dim=width, depth=depth, pretrain_size=size)

  assert pth_to_orbax.variant_name(arch(48, 224), '/x/intern_vit_6b_224px.pth') == '224'
  assert pth_to_orbax.variant_name(arch(48, 224), 'renamed.pth') == '224'
  for name, (depth, size, filename) in VARIANTS.items():
    if name != '224':
      assert pth_to_orbax.variant_name(arch(depth, size), f'/w/{filename}') == name
  generic = pth_to_orbax.variant_name(arch(45, 448), 'renamed.pth')
  assert generic.startswith('448') and 'v2_5' in generic
  # A file name that does not match its contents is not trusted.
  assert pth_to_orbax.variant_name(arch(45, 448), 'intern_vit_6b_224px.pth').startswith('448 (')
  assert pth_to_orbax.variant_name(arch(4, 56, 64), 'intern_vit_6b_224px.pth') == \
      'custom (width 64, depth 4)'


# ----------------------------------------------------------------------------- failures

def convert_error(tmp_path, obj, config=None, name='bad.pth'):
  src = tmp_path / name
  torch.save(obj, src)
  with pytest.raises(ConversionError) as e:
    pth_to_orbax.convert(str(src), str(tmp_path / 'out'), config)
  assert not (tmp_path / 'out').exists()
  return str(e.value)


def test_missing_key(state_dict, tmp_path):
  sd = dict(state_dict)
  del sd['blocks.2.attn.proj.bias']
  msg = convert_error(tmp_path, sd)
  assert 'missing: blocks.2.attn.proj.bias' in msg


def test_unexpected_keys(state_dict, tmp_path):
  sd = dict(state_dict, **{'norm.weight': torch.ones(WIDTH),
                           'blocks.1.attn.qkv.bias': torch.zeros(3 * WIDTH)})
  msg = convert_error(tmp_path, sd)
  assert 'unexpected: norm.weight' in msg
  assert 'unexpected: blocks.1.attn.qkv.bias' in msg


def test_wrong_shape_and_all_problems_in_one_message(state_dict, tmp_path):
  sd = dict(state_dict)
  sd['blocks.3.mlp.fc2.weight'] = torch.zeros(WIDTH, 2 * WIDTH)
  sd['cls_token'] = torch.zeros(1, 2, WIDTH)
  del sd['blocks.0.ls2.gamma']
  sd['extra'] = torch.zeros(3)
  msg = convert_error(tmp_path, sd)
  assert re.search(r'wrong shape: blocks\.3\.mlp\.fc2\.weight is \(64, 128\), '
                   r'expected \(64, 256\)', msg), msg
  assert 'wrong shape: cls_token' in msg
  assert 'missing: blocks.0.ls2.gamma' in msg
  assert 'unexpected: extra' in msg
  assert msg.startswith('4 problem(s)')


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


def test_not_a_checkpoint(tmp_path):
  src = tmp_path / 'junk.pth'
  src.write_bytes(b'this is not a pytorch file')
  with pytest.raises(ConversionError, match='junk.pth'):
    pth_to_orbax.convert(str(src), str(tmp_path / 'out'))


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
  assert 'decode_head' in msg or 'mmseg' in msg, msg


class Exploit:
  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return os.system, (f'touch {self.path}',)


def test_malicious_pickle_refused_by_cli(state_dict, tmp_path):
  marker = tmp_path / 'PWNED'
  src = tmp_path / 'evil.pth'
  torch.save(dict(state_dict, payload=Exploit(marker)), src)
  result = run_cli(f'--src={src}', f'--dst={tmp_path / "out"}')
  assert result.returncode != 0
  assert 'refused to load' in result.stderr, result.stderr[-3000:]
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


# ----------------------------------------------------------------------------- atomicity

def test_exception_mid_write_leaves_nothing(state_dict, tmp_path, monkeypatch):
  src, dst = tmp_path / 'tiny.pth', tmp_path / 'out'
  torch.save(state_dict, src)
  init = checkpoint.LazyStack.__init__

  def failing_init(self, n, slice_shape, dtype, get_slice, on_written=None):
    def get(i):
      if i == 2:
        raise RuntimeError('disk on fire at slice 2')
      return get_slice(i)
    init(self, n, slice_shape, dtype, get, on_written)

  monkeypatch.setattr(checkpoint.LazyStack, '__init__', failing_init)
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
  stored = checkpoint.params_metadata(found)
  restored = checkpoint.restore_params(found, stored)
  assert float(np.asarray(restored['backbone']['cls_token']).ravel()[0]) == 10.0

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
