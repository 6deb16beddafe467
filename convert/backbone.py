"""The InternViT backbone of a weights file: architecture, strict key check,
the original's pretrained-load resizes, and our stacked parameter tree.

Works on a `TensorSource` (convert/tensors.py) with `.pth` names; keys under
`prefix` (e.g. 'backbone.' in a segmentor file).
"""
import os
import re

import jax
import numpy as np

from configs.common import VARIANTS
from convert import lazy_stack, name_map, torch_bicubic
from internseg_jax.errors import ConversionError
from internseg_jax.models.intern_vit import InternViT
from internseg_jax.models.resize import resize_pos_embed
from internseg_jax.weights import flatten, unflatten
from internseg_jax.weights import key_problems, raise_problems

ARCH_KEYS = ('embed_dim', 'depth', 'mlp_ratio', 'patch_size', 'pretrain_size', 'qkv_bias',
             'qk_normalization')


def detect(source, prefix: str = '') -> dict:
  """Architecture of the backbone whose tensors are under `prefix`."""
  names = source.tensors

  def shape(key):
    if prefix + key not in names:
      raise ConversionError(f'cannot detect the architecture: '
                            f'{source.describe(prefix + key)!r} is missing')
    return source.shape(prefix + key)

  blocks = sorted({int(m.group(1)) for k in names
                   if (m := re.match(re.escape(prefix) + r'blocks\.(\d+)\.', k))})
  if not blocks:
    raise ConversionError(f'no {prefix}blocks.N.* tensors: not an InternViT checkpoint')
  first = f'{prefix}blocks.{blocks[0]}.'
  if first + 'norm1.bias' in names:
    raise ConversionError(f'{source.describe(first + "norm1.bias")} exists: a LayerNorm '
                          'InternViT (e.g. InternViT-300M) is not supported; only the RMSNorm '
                          'InternViT-6B is')
  patch = shape('patch_embed.proj.weight')
  width = int(patch[0])
  n = shape('pos_embed')[1] - 1
  grid = int(round(n ** 0.5))
  if grid * grid != n:
    raise ConversionError(f'{source.describe(prefix + "pos_embed")} has {n} patch positions, '
                          'not a square grid')
  return dict(
      embed_dim=width, depth=blocks[-1] + 1, patch_size=int(patch[-1]),
      mlp_ratio=shape(f'blocks.{blocks[0]}.mlp.fc1.weight')[0] / width,
      pretrain_size=grid * int(patch[-1]),
      qkv_bias=first + 'attn.qkv.bias' in names,
      qk_normalization=first + 'attn.q_norm.weight' in names)


def hint_disagreements(arch: dict, hints: dict) -> list[str]:
  """Where the file's own statements (config.json) disagree with its tensors
  (the tensors are what gets converted)."""
  stated = dict(hints)
  if 'mlp_hidden' in stated:
    stated['mlp_ratio'] = stated.pop('mlp_hidden') / arch['embed_dim']
  return [f'{k}: the tensors say {arch[k]}, {hints["from"]} says {stated[k]}' for k in ARCH_KEYS
          if k in stated and not _same(arch[k], stated[k])]


def _same(a, b) -> bool:
  return abs(a - b) <= 1e-9 if isinstance(a, float) or isinstance(b, float) else a == b


def check_against_config(arch: dict, bb, skip=()) -> None:
  wrong = [f'{k}: file has {arch[k]}, config says {bb[k]}' for k in ARCH_KEYS
           if k in bb and k not in skip and not _same(arch[k], bb[k])]
  if wrong:
    raise_problems(wrong, 'the file does not match the config', ConversionError)


def variant_name(arch: dict, src: str, segmentor: bool = False) -> str:
  """'224' / '448_v1_5' etc. by file name, else by shape ('448' for depth 45).
  A segmentor's grid is its crop grid, so only its depth tells the variant."""
  generic_448 = '448 (v1_0, v1_2, v1_5 or v2_5)'
  custom = f"custom (width {arch['embed_dim']}, depth {arch['depth']})"
  if segmentor:
    if arch['embed_dim'] != 3200:
      return custom
    return {VARIANTS['224'][0]: '224', VARIANTS['448_v1_0'][0]: generic_448}.get(
        arch['depth'], custom)
  for name, (depth, size, filename) in VARIANTS.items():
    if os.path.basename(src) == filename and (depth, size) == (arch['depth'], arch['pretrain_size']):
      return name
  for name, (depth, size, _) in VARIANTS.items():
    if (depth, size) == (arch['depth'], arch['pretrain_size']) and arch['embed_dim'] == 3200:
      return name if name == '224' else generic_448
  return custom


def expected_shapes(arch: dict, num_heads: int) -> dict:
  """Our backbone's flat parameter shapes at the file's own grid and patch."""
  model = InternViT(embed_dim=arch['embed_dim'], depth=arch['depth'], num_heads=num_heads,
                    mlp_ratio=arch['mlp_ratio'], patch_size=arch['patch_size'],
                    img_size=arch['pretrain_size'], qkv_bias=arch['qkv_bias'],
                    qk_normalization=arch['qk_normalization'], attention='xla')
  size = arch['pretrain_size']
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, size, size, 3))))
  return {k: tuple(v.shape) for k, v in flatten(shapes['params']).items()}


def check_keys(source, arch: dict, ours: dict, prefix: str, found) -> list[str]:
  """Missing or mis-shaped backbone tensors are an error (one message, every
  problem); returns the names in `found` the backbone does not use. `ours` is
  `expected_shapes(...)`."""
  expected = {}
  for path, key, transform, _ in name_map.backbone_rows(arch['depth'], prefix):
    if path in ours:  # e.g. no qkv bias rows for a model without it
      shape = ours[path][1:] if path.startswith('blocks/') else ours[path]
      expected[key] = transform.torch_shape(shape)
  raise_problems(
      key_problems(expected, {k: source.shape(k) for k in found}, unexpected=False,
                   describe=source.describe),
      'the tensors do not fit an InternViT', ConversionError)
  return sorted(set(found) - set(expected))


def build_tree(source, arch: dict, ours: dict, *, img_size: int, patch_size: int,
               prefix: str = '', pretrained: bool = True):
  """Our backbone tree (`ours`: `expected_shapes(...)`): small tensors as numpy,
  stacked block parameters as LazyStacks that read, transpose and release one
  block at a time.

  A pretrained file is resized as the original does when it loads one
  (InternViT6B.init_weights): pos_embed to img_size // patch_size and the patch
  kernel to patch_size x patch_size, bicubic on the file's own tensors, rounded
  to their dtype. A segmentor's pos_embed is already at its crop grid; another
  grid is resized in float32 (not something the original does)."""
  grid = img_size // patch_size
  flat = {}
  for path, key, transform in name_map.BACKBONE_TOP:
    value = source.read(prefix + key)
    if key == 'pos_embed' and value.shape[1] != 1 + grid * grid:
      value = (torch_bicubic.resize_pos_embed(value, grid) if pretrained
               else resize_pos_embed(value.astype(np.float32), (grid, grid)))
    if key == 'patch_embed.proj.weight' and value.shape[-1] != patch_size:
      value = torch_bicubic.resize_patch_kernel(value, patch_size)
    flat[path] = np.array(transform.apply(value))  # a copy: the source may be released
    source.release(prefix + key)
  for path, key, transform in name_map.BACKBONE_BLOCK:
    if 'blocks/' + path not in ours:
      continue
    keys = [f'{prefix}blocks.{i}.{key}' for i in range(arch['depth'])]
    flat['blocks/' + path] = lazy_stack.from_source(source, keys, transform)
  return unflatten(flat)
