"""Released mmseg segmentation checkpoints: backbone, pyramid neck and heads.

mmseg files are `{'meta': ..., 'state_dict': {...}}` with `backbone.` (InternViT
plus `backbone.up1/up2` of the neck), `decode_head.` and `auxiliary_head.` keys.
The head kind (linear or UperNet), widths, classes and the auxiliary head are
read from the tensors; the backbone's `pos_embed` is already at the crop grid.
"""
import jax
import ml_collections
import numpy as np

from configs import common
from convert import name_map, torch_io
from convert.torch_io import ConversionError
from internseg_jax.models.build import build_segmentor, module_inits

NECK_PREFIXES = ('backbone.up1.', 'backbone.up2.', 'backbone.up3.', 'backbone.up4.')
HEAD_PREFIXES = ('decode_head.', 'auxiliary_head.')


def is_segmentor(sd) -> bool:
  return any(k.startswith(HEAD_PREFIXES) for k in sd)


def backbone_part(sd) -> dict:
  """The InternViT tensors of a segmentor state dict (neck and heads left out)."""
  return {k: v for k, v in sd.items()
          if k.startswith('backbone.') and not k.startswith(NECK_PREFIXES)}


def detect_heads(sd) -> dict:
  """Head kind, widths and classes from the tensors."""
  def shape(key):
    if key not in sd:
      raise ConversionError(f'cannot detect the head: {key!r} is missing')
    return tuple(sd[key].shape)

  uper = 'decode_head.psp_modules.0.1.conv.weight' in sd
  heads = dict(type='uper' if uper else 'linear',
               num_classes=shape('decode_head.conv_seg.weight')[0],
               with_fpn='backbone.up1.0.weight' in sd,
               aux_channels=None)
  if uper:
    heads['channels'] = shape('decode_head.bottleneck.conv.weight')[0]
    heads['pool_scales'] = len({k.split('.')[2] for k in sd
                                if k.startswith('decode_head.psp_modules.')})
  if any(k.startswith('auxiliary_head.') for k in sd):
    heads['aux_channels'] = shape('auxiliary_head.convs.0.conv.weight')[0]
  return heads


def model_config(arch: dict, heads: dict, num_heads: int, img_size: int, config=None):
  """The `model` config of the checkpoint: the given config's, checked against
  the file, or one built from what the tensors say."""
  if config is not None:
    model = config.model
    head = model.decode_head
    aux = model.get('auxiliary_head')
    wrong = [f'{name}: file has {have}, config says {want}' for name, have, want in (
        ('decode_head.type', heads['type'], head.type),
        ('decode_head.num_classes', heads['num_classes'], head.num_classes),
        ('decode_head.channels', heads.get('channels', head.get('channels')), head.get('channels')),
        ('backbone.with_fpn', heads['with_fpn'], model.backbone.with_fpn),
        ('auxiliary_head.channels', heads['aux_channels'], aux.channels if aux else None))
        if have != want]
    if wrong:
      raise ConversionError('the file does not match the config:\n  ' + '\n  '.join(wrong))
    return model
  model = common.base_config('224').model
  model.unlock()
  bb = model.backbone
  for key in ('embed_dim', 'depth', 'mlp_ratio', 'patch_size', 'qkv_bias', 'qk_normalization'):
    bb[key] = arch[key]
  bb.num_heads, bb.img_size, bb.with_fpn = num_heads, img_size, heads['with_fpn']
  bb.out_indices = [0, 1, 2, 3] if heads['with_fpn'] else [arch['depth'] - 1]
  model.decode_head = ml_collections.ConfigDict(dict(
      type=heads['type'], num_classes=heads['num_classes'], channels=heads.get('channels', 0),
      pool_scales=(1, 2, 3, 6)[:heads.get('pool_scales', 4)]))
  model.auxiliary_head = None if heads['aux_channels'] is None else ml_collections.ConfigDict(
      dict(channels=heads['aux_channels'], in_index=0, loss_weight=0.4))
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


def heads_variables(sd, model) -> dict:
  """Flat numpy variables of the neck and heads, strictly checked."""
  expected = expected_heads(model)
  rows = {path: (key, t) for path, key, t in name_map.NECK}
  neck = {key: (path, t) for path, key, t in name_map.NECK}
  problems = []
  for key in sorted(k for k in sd if k.startswith(HEAD_PREFIXES + NECK_PREFIXES)):
    try:
      mapped = neck[key] if key.startswith(NECK_PREFIXES) else name_map.head_path(key)
    except KeyError:
      problems.append(f'unexpected: {key} {tuple(sd[key].shape)}')
      continue
    if mapped is not None:
      rows[mapped[0]] = (key, mapped[1])
  out = {}
  for path, leaf in expected.items():
    if path not in rows or rows[path][0] not in sd:
      problems.append(f'missing: {rows[path][0] if path in rows else name_map.head_key(path)}')
      continue
    key, transform = rows[path]
    value = transform.apply(torch_io.to_numpy(sd[key]))
    if value.shape != leaf.shape:
      problems.append(f'wrong shape: {key} is {tuple(sd[key].shape)}, expected '
                      f'{transform.torch_shape(leaf.shape)}')
      continue
    out[path] = np.array(value)
  extra = [p for p, (k, _) in rows.items() if p not in expected and k in sd]
  problems += [f'unexpected: {rows[p][0]} {tuple(sd[rows[p][0]].shape)}' for p in extra]
  if problems:
    raise ConversionError(f'{len(problems)} problem(s) with the state dict:\n  '
                          + '\n  '.join(problems[:40]))
  return out
