"""convert.pth_to_orbax on Hugging Face safetensors: InternViT-6B repositories
(model-0000k-of-0000n.safetensors + model.safetensors.index.json + config.json,
InternVisionModel names) and InternVL-Chat folders (vision_model.* next to
language-model tensors), written here the way Hugging Face writes them
(safetensors.torch.save_file with {'format': 'pt'}, shards filled in state-dict
order, an index with metadata.total_size and weight_map). The same weights in
the .pth layout must give exactly the same variables.
"""
import hashlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors
import torch
from safetensors.torch import save_file

from convert import pth_to_orbax
from internseg_jax import api
from internseg_jax import weights as weights_lib
from internseg_jax.errors import ConversionError
from tests.convert_helpers import hf_name, intern_vision_config, save_pretrained
from tests.reference.intern_vit_torch import InternViTTorch, randomize_

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH, HEADS, DEPTH, PRETRAIN = 64, 2, 4, 56


def vision_config():
  return intern_vision_config(width=WIDTH, depth=DEPTH, heads=HEADS, image_size=PRETRAIN)


def pth_state_dict():
  model = InternViTTorch(embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, pretrain_size=PRETRAIN,
                         out_indices=[DEPTH - 1])
  return {k: v.detach().to(torch.bfloat16) for k, v in randomize_(model, 3).state_dict().items()}


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
  """The same bf16 weights as a .pth, a sharded InternViT folder and its conversion."""
  folder = tmp_path_factory.mktemp('weights')
  sd = pth_state_dict()
  torch.save(sd, folder / 'intern_vit.pth')
  shards = save_pretrained(folder / 'hf', {hf_name(k): v for k, v in sd.items()},
                           vision_config(), max_shard_bytes=60_000)
  assert len(shards) >= 3
  pth_to_orbax.convert(str(folder / 'intern_vit.pth'), str(folder / 'from_pth'), tiny_config())
  return folder, sd, shards


def tiny_config():
  config = api.load_config(os.path.join(ROOT, 'configs/features.py:tiny'))
  bb = config.model.backbone
  bb.pretrain_size, bb.img_size, bb.depth, bb.out_indices = PRETRAIN, PRETRAIN, DEPTH, [DEPTH - 1]
  return config


def restored(dst):
  params_dir = weights_lib.find_params_dir(dst)
  return weights_lib.restore_params(params_dir, weights_lib.params_metadata(params_dir))


def assert_same_variables(a, b):
  a, b = restored(a), restored(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sharded_folder_equals_pth(weights):
  folder, _, shards = weights
  info = pth_to_orbax.convert(str(folder / 'hf'), str(folder / 'from_hf'), tiny_config())
  assert_same_variables(folder / 'from_hf', folder / 'from_pth')
  assert info['format'] == 'safetensors' and info['layout'] == 'InternVisionModel'
  listed = [f['path'] for f in info['files']]
  assert listed == [str(folder / 'hf' / 'config.json'),
                    str(folder / 'hf' / 'model.safetensors.index.json')] + [str(s) for s in shards]
  for entry in info['files']:
    assert entry['sha256'] == hashlib.sha256(open(entry['path'], 'rb').read()).hexdigest()
  assert 'sha256' not in info  # several files: see 'files'


def test_heads_come_from_config_json(weights, tmp_path):
  folder, _, _ = weights
  info = pth_to_orbax.convert(str(folder / 'hf'), str(tmp_path / 'out'))  # no --config
  assert info['backbone']['num_heads'] == HEADS  # not width / 128
  config = tiny_config()
  config.model.backbone.num_heads = 4
  with pytest.raises(ConversionError, match='num_attention_heads 2, the config says num_heads 4'):
    pth_to_orbax.convert(str(folder / 'hf'), str(tmp_path / 'out2'), config)


def test_single_file_with_an_unused_tensor(weights, tmp_path):
  folder, sd, _ = weights
  tensors = {hf_name(k): v for k, v in sd.items()}
  tensors['embeddings.unused'] = torch.ones(3)
  save_file(tensors, str(tmp_path / 'model.safetensors'), metadata={'format': 'pt'})
  info = pth_to_orbax.convert(str(tmp_path / 'model.safetensors'), str(tmp_path / 'out'),
                              tiny_config())
  assert info['unexpected_keys'] == ['embeddings.unused'] and 'sha256' in info
  assert_same_variables(tmp_path / 'out', folder / 'from_pth')


def chat_folder(folder, sd):
  """An InternVL-Chat folder: vision_model.*, then language_model.*, then mlp1.*
  (InternVLChatModel's module order); the language model fills its own shards."""
  g = torch.Generator().manual_seed(0)
  tensors = {'vision_model.' + hf_name(k): v for k, v in sd.items()}
  for i in range(3):
    tensors[f'language_model.model.layers.{i}.mlp.up_proj.weight'] = \
        torch.randn(128, 96, generator=g).to(torch.bfloat16)
  tensors['language_model.lm_head.weight'] = torch.randn(200, 96, generator=g).to(torch.bfloat16)
  tensors['mlp1.1.weight'] = torch.randn(96, 4 * WIDTH, generator=g).to(torch.bfloat16)
  config = dict(architectures=['InternVLChatModel'], model_type='internvl_chat',
                vision_config=vision_config(), llm_config={'hidden_size': 96},
                downsample_ratio=0.5, template='internlm2-chat')
  return save_pretrained(folder, tensors, config, max_shard_bytes=60_000)


def test_chat_folder_reads_only_the_vision_tensors(weights, tmp_path, monkeypatch):
  folder, sd, _ = weights
  shards = chat_folder(tmp_path / 'chat', sd)
  index = json.loads((tmp_path / 'chat' / 'model.safetensors.index.json').read_text())
  vision_shards = {f for n, f in index['weight_map'].items() if n.startswith('vision_model.')}
  language_only = [s for s in shards if s.name not in vision_shards]
  assert language_only
  for shard in language_only:  # never opened: garbage would fail to open
    shard.write_bytes(b'not a safetensors file')
  read, opened = [], []
  real_open = safetensors.safe_open

  class Spy:
    def __init__(self, path, framework):
      opened.append(os.path.basename(path))
      self.inner = real_open(path, framework=framework)

    def __enter__(self):
      self.file = self.inner.__enter__()
      return self

    def __exit__(self, *exc):
      return self.inner.__exit__(*exc)

    def get_tensor(self, name):
      read.append(name)
      return self.file.get_tensor(name)

    def __getattr__(self, name):
      return getattr(self.file, name)

  monkeypatch.setattr(safetensors, 'safe_open', Spy)
  info = pth_to_orbax.convert(str(tmp_path / 'chat'), str(tmp_path / 'out'), tiny_config())
  assert info['layout'] == 'InternVL-Chat (vision_model.*)' and info['unexpected_keys'] == []
  assert sorted(set(read)) == sorted('vision_model.' + hf_name(k) for k in sd)
  assert set(opened) == vision_shards
  monkeypatch.undo()
  assert_same_variables(tmp_path / 'out', folder / 'from_pth')


@pytest.mark.parametrize('damage,message', [
    ('corrupt', r'model-00002-of-\d+\.safetensors: not a readable safetensors file'),
    ('truncated', r'model-00002-of-\d+\.safetensors: not a readable safetensors file .*truncated'),
    ('missing', r'index\.json: 1 shard\(s\) missing: model-00002-of-\d+\.safetensors'),
    ('index', r'index\.json: the index does not match the shards: 2 problem\(s\)\n'
              r'  model-00001-\S+ holds embeddings\.class_embedding, which the index places in'),
])
def test_broken_shards_are_refused_clearly(weights, tmp_path, damage, message):
  _, sd, _ = weights
  shards = save_pretrained(tmp_path / 'hf', {hf_name(k): v for k, v in sd.items()},
                           vision_config(), max_shard_bytes=60_000)
  second = shards[1]
  if damage == 'corrupt':
    second.write_bytes(b'\xff' * 64 + second.read_bytes()[64:])
  elif damage == 'truncated':
    second.write_bytes(second.read_bytes()[:-1000])
  elif damage == 'missing':
    second.unlink()
  else:  # the index places a tensor in the wrong shard
    index_path = tmp_path / 'hf' / 'model.safetensors.index.json'
    index = json.loads(index_path.read_text())
    name = next(n for n, f in index['weight_map'].items() if f == shards[0].name)
    index['weight_map'][name] = second.name
    index_path.write_text(json.dumps(index))
  with pytest.raises(ConversionError, match=message) as e:
    pth_to_orbax.convert(str(tmp_path / 'hf'), str(tmp_path / 'out'), tiny_config())
  if damage != 'index':
    assert '\n' not in str(e.value)
  assert not (tmp_path / 'out').exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['hf']


def test_layer_norm_variant_is_refused(weights, tmp_path):
  folder, sd, _ = weights
  config = dict(vision_config(), norm_type='layer_norm', hidden_size=WIDTH)
  save_pretrained(tmp_path / 'hf', {hf_name(k): v for k, v in sd.items()}, config, 10 ** 9)
  with pytest.raises(ConversionError, match="norm_type 'layer_norm'.*InternViT-300M") as e:
    pth_to_orbax.convert(str(tmp_path / 'hf'), str(tmp_path / 'out'))
  assert '\n' not in str(e.value)


def test_hugging_face_route_needs_no_torch(weights, tmp_path):
  folder, _, _ = weights
  code = ('import sys; sys.modules["torch"] = None\n'  # any `import torch` now fails
          'from absl import app\n'
          'from convert import pth_to_orbax\n'
          f'sys.argv = ["convert", "--src={folder / "hf"}", "--dst={tmp_path / "out"}"]\n'
          'app.run(pth_to_orbax.main)\n')
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert_same_variables(tmp_path / 'out', folder / 'from_pth')


def test_problems_are_named_as_in_the_file(weights, tmp_path):
  _, sd, _ = weights
  tensors = {hf_name(k): v for k, v in sd.items()}
  del tensors['encoder.layers.1.ls2']
  tensors['encoder.layers.2.mlp.fc2.bias'] = torch.zeros(3)
  save_file(tensors, str(tmp_path / 'model.safetensors'), metadata={'format': 'pt'})
  with pytest.raises(ConversionError) as e:
    pth_to_orbax.convert(str(tmp_path / 'model.safetensors'), str(tmp_path / 'out'))
  lines = str(e.value).splitlines()
  assert lines[0] == f'{tmp_path / "model.safetensors"}: the tensors do not fit an InternViT: ' \
                     '2 problem(s)'
  assert lines[1:] == ['  missing: encoder.layers.1.ls2 (64,)',
                       '  wrong shape: encoder.layers.2.mlp.fc2.bias is (3,), expected (64,)']
  assert not (tmp_path / 'out').exists()
