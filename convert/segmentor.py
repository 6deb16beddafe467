"""Released mmseg segmentation checkpoints: backbone, pyramid neck and heads.

Segmentor files hold `backbone.` (InternViT plus `backbone.up1/up2` of the
neck), `decode_head.` and `auxiliary_head.` tensors, as mmcv checkpoints
`{'meta', 'state_dict', 'optimizer'}` or in the original's release format
`{'module': state_dict}`. The head kind (linear or UperNet), widths, classes and
the auxiliary head are read from the tensors; the backbone's `pos_embed` is
already at the crop grid. Neck and head tensors are matched strictly (an
unknown one means a head we would not build).
"""
from absl import logging
import jax
import ml_collections

from configs import common
from convert import name_map
from internseg_jax.errors import ConversionError
from internseg_jax.models.build import build_segmentor, module_inits
from internseg_jax.weights import key_problems, raise_problems

NECK_PREFIXES = ('backbone.up1.', 'backbone.up2.', 'backbone.up3.', 'backbone.up4.')
HEAD_PREFIXES = ('decode_head.', 'auxiliary_head.')


def is_segmentor(names) -> bool:
  return any(k.startswith(HEAD_PREFIXES) for k in names)


def backbone_names(names) -> list[str]:
  """The InternViT tensors of a segmentor (neck and heads left out)."""
  return [k for k in names if k.startswith('backbone.') and not k.startswith(NECK_PREFIXES)]


def detect_heads(source) -> dict:
  """Head kind, widths and classes from the tensors."""
  names = source.tensors

  def shape(key):
    if key not in names:
      raise ConversionError(f'cannot detect the head: {key!r} is missing')
    return source.shape(key)

  uper = 'decode_head.psp_modules.0.1.conv.weight' in names
  heads = dict(type='uper' if uper else 'linear',
               num_classes=shape('decode_head.conv_seg.weight')[0],
               with_fpn='backbone.up1.0.weight' in names,
               aux_channels=None)
  if uper:
    heads['channels'] = shape('decode_head.bottleneck.conv.weight')[0]
    heads['pool_scales'] = len({k.split('.')[2] for k in names
                                if k.startswith('decode_head.psp_modules.')})
  if any(k.startswith('auxiliary_head.') for k in names):
    heads['aux_channels'] = shape('auxiliary_head.convs.0.conv.weight')[0]
  return heads


def model_config(arch: dict, heads: dict, num_heads: int, img_size: int, config=None):
  """The `model` config of the checkpoint: the given config's, checked against
  the file, or one built from what the tensors say."""
  if config is not None:
    model = config.model
    head = model.decode_head
    aux = model.auxiliary_head
    wrong = [f'{name}: file has {have}, config says {want}' for name, have, want in (
        ('decode_head.type', heads['type'], head.type),
        ('decode_head.num_classes', heads['num_classes'], head.num_classes),
        ('decode_head.channels', heads.get('channels', head.channels), head.channels),
        ('backbone.with_fpn', heads['with_fpn'], model.backbone.with_fpn),
        ('auxiliary_head.channels', heads['aux_channels'], aux.channels if aux else None))
        if have != want]
    if wrong and all(w.startswith('auxiliary_head.channels: file has None') for w in wrong):
      # A released file without its training-only auxiliary head: convert the rest.
      logging.warning(
          'the file has no auxiliary head (no auxiliary_head.* tensors) but the config has '
          'model.auxiliary_head: converting without it. Evaluation does not use it; training '
          'from this checkpoint starts it from random weights (or set '
          '--config.model.auxiliary_head=None)')
      model = model.copy_and_resolve_references()
      model.auxiliary_head = None
      return model
    raise_problems(wrong, 'the file does not match the config', ConversionError)
    return model
  model = common.base_config('224').model
  model.unlock()
  bb = model.backbone
  for key in ('embed_dim', 'depth', 'mlp_ratio', 'patch_size', 'qkv_bias', 'qk_normalization'):
    bb[key] = arch[key]
  bb.num_heads, bb.img_size, bb.with_fpn = num_heads, img_size, heads['with_fpn']
  bb.out_indices = [0, 1, 2, 3] if heads['with_fpn'] else [arch['depth'] - 1]
  model.decode_head.update(dict(
      type=heads['type'], num_classes=heads['num_classes'], channels=heads.get('channels', 0),
      pool_scales=(1, 2, 3, 6)[:heads.get('pool_scales', 4)]))
  model.auxiliary_head = None if heads['aux_channels'] is None else ml_collections.ConfigDict(
      dict(channels=heads['aux_channels'], in_index=0, loss_weight=0.4, dropout=0.1))
  return model


def expected_heads(model) -> dict:
  """Flat 'collection/module/...' -> ShapeDtypeStruct of the neck and heads."""
  segmentor = build_segmentor(model)
  out = {}
  for name, init in module_inits(segmentor).items():
    if name == 'backbone':
      continue
    shapes = jax.eval_shape(init, jax.random.key(0))
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
      collection, *rest = [str(k.key) for k in path]
      out['/'.join([collection, name, *rest])] = leaf
  return out


def _rows(model) -> dict:
  """mmseg key -> (our path, transform, our shape) of every neck and head tensor."""
  neck = {path: (key, t) for path, key, t in name_map.NECK}
  rows = {}
  for path, leaf in expected_heads(model).items():
    if path in neck:
      key, transform = neck[path]
    else:
      key = name_map.head_key(path)
      transform = name_map.head_path(key)[1]
    rows[key] = (path, transform, tuple(leaf.shape))
  return rows


def heads_variables(source, model) -> dict:
  """Flat numpy variables of the neck and heads; every missing, unexpected or
  mis-shaped tensor is an error (BatchNorm step counters are dropped)."""
  rows = _rows(model)
  expected = {key: transform.torch_shape(shape) for key, (_, transform, shape) in rows.items()}
  found = {}
  for key in source.tensors:
    if not key.startswith(HEAD_PREFIXES + NECK_PREFIXES):
      continue
    try:
      if key not in rows and not key.startswith(NECK_PREFIXES) and name_map.head_path(key) is None:
        continue  # num_batches_tracked
    except KeyError:
      pass  # a key the map does not know: unexpected
    found[key] = source.shape(key)
  raise_problems(key_problems(expected, found, describe=source.describe),
                 'the neck and head tensors do not fit the model', ConversionError)
  out = {}
  for key, (path, transform, _) in rows.items():
    out[path] = transform.apply(source.read(key)).copy()
    source.release(key)
  return out
