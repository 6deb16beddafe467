r"""Converts a PyTorch InternViT-6B `.pth` into an Orbax checkpoint folder.

  python -m convert.pth_to_orbax --src=pretrained/intern_vit_6b_224px.pth \
      --dst=converted/intern_vit_6b_224px [--config=configs/features.py:224 --config.KEY=VALUE]

The architecture (width, depth, MLP width, patch, pretrain grid, qkv bias,
QK-norm) is read from the tensors; heads and the target img_size come from the
config (default: width/128 heads, no resize). Loading is `weights_only` and
memory-mapped, and tensors are written one block slice at a time, so peak memory
stays far below the file size. The output appears only when complete:

  DST/params/    Orbax PyTree checkpoint of the variables: {'params': {'backbone': ...}}
  DST/info.json  source path and SHA-256, detected variant and architecture
"""
import datetime
import os
import re

from absl import app, flags, logging
import jax
import numpy as np
from ml_collections import config_flags
from tqdm import tqdm

from configs.common import VARIANTS
from convert import name_map, segmentor, torch_io
from convert.torch_io import ConversionError
from internseg_jax import checkpoint
from internseg_jax.trees import flatten, unflatten
from internseg_jax.models.intern_vit import InternViT
from internseg_jax.models.resize import resize_pos_embed

ARCH_KEYS = ('embed_dim', 'depth', 'mlp_ratio', 'patch_size', 'pretrain_size', 'qkv_bias',
             'qk_normalization')


def detect_backbone(sd, prefix: str = '') -> dict:
  """Architecture of the backbone whose tensors are in `sd` (keys under `prefix`)."""
  def get(key):
    if prefix + key not in sd:
      raise ConversionError(f'cannot detect the architecture: {prefix + key!r} is missing')
    return sd[prefix + key]

  blocks = sorted({int(m.group(1)) for k in sd
                   if (m := re.match(re.escape(prefix) + r'blocks\.(\d+)\.', k))})
  if not blocks:
    raise ConversionError(f'no {prefix}blocks.N.* keys: not an InternViT state dict')
  first = f'blocks.{blocks[0]}.'
  patch = get('patch_embed.proj.weight')
  width = int(patch.shape[0])
  n = get('pos_embed').shape[1] - 1
  grid = int(round(n ** 0.5))
  if grid * grid != n:
    raise ConversionError(f'{prefix}pos_embed has {n} patch positions, not a square grid')
  return dict(
      embed_dim=width, depth=blocks[-1] + 1, patch_size=int(patch.shape[-1]),
      mlp_ratio=get(first + 'mlp.fc1.weight').shape[0] / width,
      pretrain_size=grid * int(patch.shape[-1]),
      qkv_bias=prefix + first + 'attn.qkv.bias' in sd,
      qk_normalization=prefix + first + 'attn.q_norm.weight' in sd)


def variant_name(arch: dict, src: str, segmentor: bool = False) -> str:
  """'224' / '448_v1_5' etc. by file name, else by shape ('448' for depth 45).
  A segmentor's grid is its crop grid, so only its depth tells the variant."""
  if segmentor:
    names = {d: n for n, (d, _, _) in VARIANTS.items() if n in ('224', '448_v1_0')}
    name = names.get(arch['depth']) if arch['embed_dim'] == 3200 else None
    return {'224': '224', '448_v1_0': '448 (v1_0, v1_2, v1_5 or v2_5)'}.get(
        name, f"custom (width {arch['embed_dim']}, depth {arch['depth']})")
  for name, (depth, size, filename) in VARIANTS.items():
    if os.path.basename(src) == filename and (depth, size) == (arch['depth'], arch['pretrain_size']):
      return name
  for name, (depth, size, _) in VARIANTS.items():
    if (depth, size) == (arch['depth'], arch['pretrain_size']) and arch['embed_dim'] == 3200:
      return name if name == '224' else '448 (v1_0, v1_2, v1_5 or v2_5)'
  return f"custom (width {arch['embed_dim']}, depth {arch['depth']})"


def check_against_config(arch: dict, bb, skip=()) -> None:
  wrong = [f'{k}: file has {arch[k]}, config says {bb[k]}' for k in ARCH_KEYS
           if k in bb and k not in skip and (arch[k] != bb[k] if not isinstance(arch[k], float)
                           else abs(arch[k] - bb[k]) > 1e-9)]
  if wrong:
    raise ConversionError('the file does not match the config:\n  ' + '\n  '.join(wrong))


def expected_tree(arch: dict, num_heads: int):
  """Our backbone's parameter shapes at the file's own grid."""
  model = InternViT(embed_dim=arch['embed_dim'], depth=arch['depth'], num_heads=num_heads,
                    mlp_ratio=arch['mlp_ratio'], patch_size=arch['patch_size'],
                    img_size=arch['pretrain_size'], qkv_bias=arch['qkv_bias'],
                    qk_normalization=arch['qk_normalization'], attention='xla')
  size = arch['pretrain_size']
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, size, size, 3))))
  return shapes['params']


def check_keys(sd, rows, expected, prefix: str = '', other_prefixes=()) -> None:
  """Strict: every missing, unexpected or mis-shaped key, in one message."""
  problems, wanted = [], set()
  for path, key, transform, _ in rows:
    if path not in expected:
      continue  # e.g. qkv bias rows for a model without it
    wanted.add(key)
    want = transform.torch_shape(expected[path].shape[1:] if path.startswith('blocks/')
                                 else expected[path].shape)
    if key not in sd:
      problems.append(f'missing: {key} {want}')
    elif tuple(sd[key].shape) != want:
      problems.append(f'wrong shape: {key} is {tuple(sd[key].shape)}, expected {want}')
  extra = sorted(k for k in sd if k.startswith(prefix) and k not in wanted)
  extra += sorted(k for k in sd if not k.startswith((prefix, *other_prefixes)))
  problems += [f'unexpected: {k} {tuple(sd[k].shape)}' for k in extra]
  if problems:
    shown = problems[:40] + ([f'... and {len(problems) - 40} more'] if len(problems) > 40 else [])
    raise ConversionError(f'{len(problems)} problem(s) with the state dict:\n  ' + '\n  '.join(shown))


def backbone_tree(sd, arch: dict, num_heads: int, img_size: int, mapped: bool,
                  prefix: str = ''):
  """Our backbone tree: small tensors as numpy copies, stacked block params as
  LazyStacks that read, transpose and release one block at a time."""
  expected = flatten(expected_tree(arch, num_heads))
  rows = list(name_map.backbone_rows(arch['depth'], prefix))
  check_keys(sd, rows, expected, prefix)
  grid = img_size // arch['patch_size']
  flat = {}
  for path, key, transform in name_map.BACKBONE_TOP:
    value = np.array(transform.apply(torch_io.to_numpy(sd[prefix + key])))
    if path == 'pos_embed' and value.shape[1] != 1 + grid * grid:
      # Resized values are not bf16-representable: keep them in float32, as the
      # reference (which resizes in float32 at run time) sees them.
      value = resize_pos_embed(value.astype(np.float32), (grid, grid))
    flat[path] = value
  for path, key, transform in name_map.BACKBONE_BLOCK:
    if 'blocks/' + path not in expected:
      continue
    keys = [f'{prefix}blocks.{i}.{key}' for i in range(arch['depth'])]
    first = transform.apply(torch_io.to_numpy(sd[keys[0]]))

    def get_slice(i, keys=keys, transform=transform):
      return transform.apply(torch_io.to_numpy(sd[keys[i]]))

    def written(i, keys=keys):
      if mapped:
        torch_io.release(sd[keys[i]])

    flat['blocks/' + path] = checkpoint.LazyStack(arch['depth'], first.shape, first.dtype,
                                                  get_slice, written)
  return unflatten(flat)


def materialize(tree):
  """The same tree with every LazyStack read into one numpy array (small models)."""
  return jax.tree.map(
      lambda x: np.stack([np.asarray(x.get_slice(i), x.dtype) for i in range(x.shape[0])])
      if isinstance(x, checkpoint.LazyStack) else x,
      tree, is_leaf=lambda x: isinstance(x, checkpoint.LazyStack))


def build_variables(sd, config=None, mapped: bool = False):
  """A state dict (pretrained backbone or mmseg segmentor) -> (our variables tree
  with LazyStack block params, a description of what was found)."""
  kind = 'segmentor' if segmentor.is_segmentor(sd) else 'backbone'
  prefix = 'backbone.' if kind == 'segmentor' else ''
  backbone_sd = segmentor.backbone_part(sd) if kind == 'segmentor' else sd
  arch = detect_backbone(backbone_sd, prefix)
  bb = config.model.backbone if config is not None else None
  if bb is not None:  # a segmentor's pos_embed is at the crop grid, not the pretrain one
    check_against_config(arch, bb, skip=('pretrain_size',) if kind == 'segmentor' else ())
  num_heads = bb.num_heads if bb is not None else max(1, arch['embed_dim'] // 128)
  img_size = bb.img_size if bb is not None else arch['pretrain_size']
  if img_size % arch['patch_size']:
    raise ConversionError(f'img_size {img_size} is not a multiple of the patch size')
  tree = {'params': {'backbone': backbone_tree(backbone_sd, arch, num_heads, img_size, mapped,
                                               prefix)}}
  found = dict(kind=kind, backbone=dict(arch, num_heads=num_heads, img_size=img_size))
  if kind == 'segmentor':
    heads = segmentor.detect_heads(sd)
    model = segmentor.model_config(arch, heads, num_heads, img_size, config)
    for collection, modules in unflatten(segmentor.heads_variables(sd, model)).items():
      tree.setdefault(collection, {}).update(modules)
    found['heads'] = heads
  return tree, found


def state_dict_to_variables(sd, config=None):
  """An in-memory state dict -> our variables as numpy (tests, small models)."""
  return materialize(build_variables(sd, config)[0])


def state_dict_to_params(sd, num_heads: int | None = None, img_size: int | None = None):
  """An in-memory backbone state dict -> our {'backbone': ...} numpy tree."""
  arch = detect_backbone(sd)
  num_heads = num_heads or max(1, arch['embed_dim'] // 128)
  tree = backbone_tree(sd, arch, num_heads, img_size or arch['pretrain_size'], mapped=False)
  return {'backbone': materialize(tree)}


def convert(src: str, dst: str, config=None) -> dict:
  """Converts `src` into the folder `dst`; returns the info written next to it."""
  if os.path.exists(dst):
    raise ConversionError(f'{dst} already exists; remove it or choose another --dst')
  if not os.path.isfile(src):
    raise ConversionError(f'{src}: no such file')
  digest = torch_io.sha256(src)
  sd, wrapper, mapped = torch_io.load_state_dict(src)
  tree, found = build_variables(sd, config, mapped)
  info = dict(found, source=os.path.abspath(src), sha256=digest, wrapper=wrapper,
              variant=variant_name(found['backbone'], src, found['kind'] == 'segmentor'),
              converted_at=datetime.datetime.now().isoformat())
  logging.info('converting %s (%s %s) -> %s', src, info['variant'], info['kind'], dst)
  checkpoint.save_params(dst, tree, info, progress=tqdm)
  return info


FLAGS = flags.FLAGS
flags.DEFINE_string('src', None, 'PyTorch .pth file', required=True)
flags.DEFINE_string('dst', None, 'output folder (must not exist)', required=True)
config_flags.DEFINE_config_file('config', None, 'optional config for heads and img_size',
                                lock_config=True)


def main(argv):
  del argv
  try:
    info = convert(FLAGS.src, FLAGS.dst, FLAGS.config)
  except ConversionError as e:
    raise app.UsageError(str(e)) from None
  print(f"wrote {FLAGS.dst}: {info['variant']} {info['kind']}, "
        f"{info['backbone']['depth']} blocks, width {info['backbone']['embed_dim']}, "
        f"img_size {info['backbone']['img_size']}")


if __name__ == '__main__':
  app.run(main)
