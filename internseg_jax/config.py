"""Configs: load `configs/NAME.py[:ARG]` and check a config before anything runs.

`validate` names the key, its value and what is allowed, so a typo in a
`--config.KEY=VALUE` override fails in the first second, not after the model
has been built and the data listed.
"""
import importlib.util
import os

import ml_collections

from internseg_jax.errors import ConfigError

# Keys with a fixed set of values.
CHOICES = {
    'model.decode_head.type': ('linear', 'uper'),
    'model.decode_head.dtype': ('float32', 'bfloat16'),
    'model.dtype': ('bfloat16', 'float32'),
    'model.param_dtype': ('float32', 'bfloat16'),
    'model.backbone.attention': ('auto', 'xla', 'cudnn'),
    'model.backbone.remat': ('none', 'full', 'dots', 'everything'),
    'data.source': ('folder', 'tfds'),
    'eval.mode': ('slide', 'whole'),
    'eval.resize': ('short_side', 'fit'),
    'train.frozen_dtype': ('bfloat16', 'float32'),
}


def load_config(config) -> ml_collections.ConfigDict:
  """A ConfigDict, or 'configs/NAME.py[:ARG]' -> get_config(ARG)."""
  if isinstance(config, ml_collections.ConfigDict):
    return config
  path, _, arg = str(config).partition(':')
  if not os.path.isfile(path):
    raise ConfigError(f'config file {path} not found')
  spec = importlib.util.spec_from_file_location(f'_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _get(config, key: str):
  node = config
  for part in key.split('.'):
    node = node[part]
  return node


def _require(ok: bool, key: str, value, allowed: str) -> None:
  if not ok:
    raise ConfigError(f'{key}={value!r}: {allowed}')


def _validate_adapter(config) -> None:
  """model.adapter: the ViT-Adapter runs at exactly img_size on a 1/16 grid, and
  its interactions split the ViT blocks."""
  bb, ad, ev = config.model.backbone, config.model.adapter, config.eval
  _require(not bb.with_fpn, 'model.backbone.with_fpn', bb.with_fpn,
           'must be False with model.adapter (its four maps go straight to the head)')
  _require(bb.patch_size == 16, 'model.backbone.patch_size', bb.patch_size,
           'must be 16 with model.adapter (its ViT grid is the 1/16 level)')
  _require(bb.img_size % 32 == 0, 'model.backbone.img_size', bb.img_size,
           'must be a multiple of 32 with model.adapter (levels 1/8, 1/16, 1/32); it is also '
           'data.crop_size and eval.crop_size')
  pairs = [list(map(int, ix)) for ix in ad.interaction_indexes]
  ends = [i for pair in pairs for i in pair]
  _require(bool(pairs) and all(len(p) == 2 for p in pairs) and ends[0] >= 0
           and ends[-1] < bb.depth and all(a <= b for a, b in zip(ends, ends[1:]))
           and all(b < a for (_, b), (a, _) in zip(pairs, pairs[1:])),
           'model.adapter.interaction_indexes', ad.interaction_indexes,
           f'must be ordered, non-overlapping [first, last] block pairs within 0..{bb.depth - 1}')
  last = [p[1] for p in pairs]
  _require([int(i) for i in bb.out_indices] == last, 'model.backbone.out_indices',
           list(bb.out_indices), f'must be the last block of each interaction ({last}) with '
           'model.adapter (set model.adapter.interaction_indexes to change them)')
  for key in ('conv_inplane', 'n_points', 'deform_num_heads'):
    _require(int(ad[key]) >= 1, f'model.adapter.{key}', ad[key], 'must be a positive integer')
  value_width = int(bb.embed_dim * ad.deform_ratio)
  _require(value_width >= 1 and value_width % ad.deform_num_heads == 0,
           'model.adapter.deform_ratio', ad.deform_ratio,
           f'embed_dim x deform_ratio ({value_width}) must be a positive multiple of '
           f'model.adapter.deform_num_heads ({ad.deform_num_heads})')
  _require(int(bb.embed_dim * ad.cffn_ratio) >= 1, 'model.adapter.cffn_ratio', ad.cffn_ratio,
           'must leave the ConvFFN at least one channel')
  # Windows must be exactly crop x crop: whole images, or a resize that can leave
  # a side below the crop, would reach the model at another size.
  _require(ev.mode == 'slide', 'eval.mode', ev.mode,
           "must be 'slide' with model.adapter (it runs at exactly img_size: windows of the crop)")
  _require(ev.resize == 'short_side', 'eval.resize', ev.resize,
           "must be 'short_side' with model.adapter (the short side never below the crop, so "
           'every window is crop x crop)')


def validate(config) -> ml_collections.ConfigDict:
  """Raises ConfigError for the first value that cannot work; returns the config."""
  for key, allowed in CHOICES.items():
    value = _get(config, key)
    _require(value in allowed, key, value, f'must be one of {", ".join(map(repr, allowed))}')
  bb, head, aux = config.model.backbone, config.model.decode_head, config.model.auxiliary_head
  for key in ('embed_dim', 'depth', 'num_heads', 'patch_size', 'img_size'):
    _require(int(bb[key]) > 0, f'model.backbone.{key}', bb[key], 'must be a positive integer')
  _require(bb.embed_dim % bb.num_heads == 0, 'model.backbone.num_heads', bb.num_heads,
           f'must divide model.backbone.embed_dim ({bb.embed_dim})')
  adapter = config.model.get('adapter')
  if adapter is not None:
    _validate_adapter(config)
  _require(bb.img_size % bb.patch_size == 0, 'model.backbone.img_size', bb.img_size,
           f'must be a multiple of model.backbone.patch_size ({bb.patch_size}); it is also '
           'data.crop_size and eval.crop_size')
  indices = list(bb.out_indices)
  _require(bool(indices) and all(-bb.depth <= int(i) < bb.depth for i in indices),
           'model.backbone.out_indices', indices, f'must be block indices in 0..{bb.depth - 1}')
  _require(0.0 <= bb.drop_path_rate < 1.0, 'model.backbone.drop_path_rate', bb.drop_path_rate,
           'must be in [0, 1)')
  maps = 4 if bb.with_fpn or adapter is not None else len(indices)
  if (bb.with_fpn or head.type == 'uper') and adapter is None:
    _require(len(indices) == 4, 'model.backbone.out_indices', indices,
             'UperNet and the pyramid neck (with_fpn) need exactly 4 block indices')
  if aux is not None:
    _require(0 <= aux.in_index < maps, 'model.auxiliary_head.in_index', aux.in_index,
             f'must index one of the {maps} feature maps')
  _require(head.num_classes > 0, 'model.decode_head.num_classes', head.num_classes,
           'must be positive')
  names = config.data.class_names
  _require(names is None or len(names) == head.num_classes, 'data.class_names', names,
           f'must be None or {head.num_classes} names (model.decode_head.num_classes)')
  _require(int(config.data.fraction) >= 1, 'data.fraction', config.data.fraction,
           'must be 1 (all data) or N for a 1/N few-shot subset')
  ev = config.eval
  _require(0 < ev.stride <= ev.crop_size, 'eval.stride', ev.stride,
           f'must be in 1..eval.crop_size ({ev.crop_size})')
  _require(ev.windows_per_device >= 1, 'eval.windows_per_device', ev.windows_per_device,
           'must be at least 1')
  _require(len(ev.scales) >= 1 and all(s > 0 for s in ev.scales), 'eval.scales', ev.scales,
           'must be positive ratios, e.g. (0.75, 1.0, 1.25)')
  _require(ev.size_divisor >= 0, 'eval.size_divisor', ev.size_divisor, 'must be >= 0 (0: none)')
  t = config.train
  for key in ('batch_size', 'steps', 'log_every', 'checkpoint_every', 'accumulate',
              'max_to_keep'):
    _require(int(t[key]) >= 1, f'train.{key}', t[key], 'must be a positive integer')
  _require(t.batch_size % t.accumulate == 0, 'train.accumulate', t.accumulate,
           f'must divide train.batch_size ({t.batch_size})')
  _require(t.eval_every >= 0, 'train.eval_every', t.eval_every, 'must be >= 0 (0: only at the end)')
  _require(t.warmup_steps >= 0, 'train.warmup_steps', t.warmup_steps, 'must be >= 0')
  _require(t.seed >= 0, 'train.seed', t.seed, 'must be a non-negative integer')
  mesh = config.mesh
  for key in ('data', 'fsdp'):
    _require(mesh[key] == -1 or mesh[key] >= 1, f'mesh.{key}', mesh[key],
             'must be a positive axis size or -1 (all remaining devices)')
  _require(not (mesh.data == -1 and mesh.fsdp == -1), 'mesh.fsdp', mesh.fsdp,
           'at most one of mesh.data and mesh.fsdp can be -1')
  return config
