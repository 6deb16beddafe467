"""Hugging Face safetensors checkpoints of InternViT-6B (a `TensorSource`).

Takes a `.safetensors` file, a folder with `model.safetensors` or a sharded
folder (`model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`),
and `config.json` where present. In an InternVL-Chat folder the vision tower's
tensors are `vision_model.*` next to language-model ones: only `vision_model.*`
is listed and read, and only the shards that hold them are opened.

Tensor names of InternVisionModel (modeling_intern_vit.py) are renamed to the
`.pth` names (convert/name_map.py). No torch here: safetensors reads numpy,
bf16 as ml_dtypes.bfloat16.
"""
import json
import os

import ml_dtypes  # noqa: F401  (registers 'bfloat16' with numpy: safetensors asks numpy for it)
import numpy as np
import safetensors

from convert import name_map
from convert.tensors import TensorInfo, TensorSource
from internseg_jax.errors import ConversionError
from internseg_jax.weights import raise_problems

INDEX = 'model.safetensors.index.json'
SINGLE = 'model.safetensors'
CONFIG = 'config.json'
VISION_PREFIX = 'vision_model.'

DTYPES = {'BF16': ml_dtypes.bfloat16, 'F16': np.float16, 'F32': np.float32, 'F64': np.float64,
          'I8': np.int8, 'I16': np.int16, 'I32': np.int32, 'I64': np.int64, 'U8': np.uint8,
          'BOOL': np.bool_}

# config.json (InternVisionConfig) key -> our architecture key.
CONFIG_ARCH = {'hidden_size': 'embed_dim', 'num_hidden_layers': 'depth',
               'patch_size': 'patch_size', 'image_size': 'pretrain_size',
               'qkv_bias': 'qkv_bias', 'qk_normalization': 'qk_normalization'}


def _read_json(path: str, what: str) -> dict:
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, ValueError) as e:
    raise ConversionError(f'{path}: not a readable {what} ({e})') from None
  if not isinstance(value, dict):
    raise ConversionError(f'{path}: not a {what} (expected a JSON object)')
  return value


def _header(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
  """name -> (shape, dtype string) of one file, from its header (no data read)."""
  try:
    with safetensors.safe_open(path, framework='numpy') as f:
      out = {}
      for name in f.keys():
        piece = f.get_slice(name)
        out[name] = (tuple(piece.get_shape()), piece.get_dtype())
      return out
  except (safetensors.SafetensorError, OSError) as e:
    raise ConversionError(f'{path}: not a readable safetensors file ({e}); '
                          'it is corrupt or truncated: download it again') from None


def vision_config(config: dict | None) -> dict:
  """The InternVisionConfig part of a config.json (itself, or `vision_config`)."""
  if not config:
    return {}
  return config.get('vision_config', config) or {}


def _hints(config_path: str | None, config: dict | None) -> dict:
  vision = vision_config(config)
  if vision.get('norm_type', 'rms_norm') != 'rms_norm':
    raise ConversionError(
        f"{config_path}: norm_type {vision['norm_type']!r}: a LayerNorm InternViT "
        "(e.g. InternViT-300M) is not supported; only the RMSNorm InternViT-6B is")
  hints = {ours: vision[theirs] for theirs, ours in CONFIG_ARCH.items() if theirs in vision}
  if 'intermediate_size' in vision:
    hints['mlp_hidden'] = vision['intermediate_size']
  if 'num_attention_heads' in vision:
    hints['num_heads'] = vision['num_attention_heads']
  if hints:
    hints['from'] = config_path
  return hints


class SafetensorsSource(TensorSource):
  """See the module docstring. `read` opens the shard, copies one tensor out
  and closes it again: an open mapping would keep every page it touched
  resident, so memory would grow to the size of the shards."""

  def __init__(self, path: str):
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    index_path = os.path.join(folder, INDEX) if os.path.isdir(path) else None
    config_path = os.path.join(folder, CONFIG)
    config = _read_json(config_path, 'config.json') if os.path.isfile(config_path) else None
    hints = _hints(config_path, config)

    if index_path and os.path.isfile(index_path):
      weight_map = _read_json(index_path, 'safetensors index').get('weight_map')
      if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f'{index_path}: has no weight_map (name -> shard file)')
      located = {name: os.path.join(folder, shard) for name, shard in weight_map.items()}
    else:
      index_path = None
      single = os.path.join(folder, SINGLE) if os.path.isdir(path) else path
      if not os.path.isfile(single):
        raise ConversionError(f'{path}: holds neither {INDEX} nor {SINGLE}')
      located = {name: single for name in _header(single)}
    where_problems = index_path or path

    prefix = VISION_PREFIX if any(n.startswith(VISION_PREFIX) for n in located) else ''
    wanted = {n: f for n, f in located.items() if n.startswith(prefix)}
    shards = sorted(set(wanted.values()))
    missing = [f for f in shards if not os.path.isfile(f)]
    if missing:
      raise ConversionError(
          f'{where_problems}: {len(missing)} shard(s) missing: '
          + ', '.join(os.path.basename(f) for f in missing) + ' (download them again)')

    problems, tensors, self._where = [], {}, {}
    for shard in shards:
      header = _header(shard)
      for name in sorted(n for n, f in wanted.items() if f == shard and n not in header):
        problems.append(f'the index places {name} in {os.path.basename(shard)}, '
                        'which does not hold it')
      for name in sorted(n for n in header if n.startswith(prefix) and wanted.get(n) != shard):
        other = wanted.get(name)
        problems.append(f'{os.path.basename(shard)} holds {name}, which the index '
                        + (f'places in {os.path.basename(other)}' if other else 'does not list'))
      for name, (shape, dtype) in header.items():
        if wanted.get(name) != shard:
          continue
        if dtype not in DTYPES:
          problems.append(f'{name} has dtype {dtype}, which the converter does not read')
          continue
        ours = name_map.hf_to_pth(name[len(prefix):]) or name
        tensors[ours] = TensorInfo(shape, np.dtype(DTYPES[dtype]))
        self._where[ours] = (shard, name)
    raise_problems(problems, f'{where_problems}: the index does not match the shards',
                   ConversionError)

    files = [p for p in (config_path if config else None, index_path) if p] + shards
    meta = dict(format='safetensors', prefix=prefix,
                layout='InternVL-Chat (vision_model.*)' if prefix else 'InternVisionModel')
    super().__init__(path, tensors, files, meta, hints)

  def read(self, name: str) -> np.ndarray:
    shard, stored = self._where[name]
    try:
      with safetensors.safe_open(shard, framework='numpy') as f:
        return f.get_tensor(stored)
    except (safetensors.SafetensorError, OSError) as e:
      raise ConversionError(f'{shard}: cannot read {stored} ({e})') from None

  def describe(self, name: str) -> str:
    if name in self._where:
      return self._where[name][1]
    return self.meta['prefix'] + name_map.pth_to_hf(name)


def open_safetensors(path: str) -> SafetensorsSource:
  return SafetensorsSource(path)
