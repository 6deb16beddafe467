"""Declarative map from the reference's PyTorch keys to our parameter tree.

Each row: (our path, PyTorch key, transform). Block rows are relative to
`blocks/` on our side (stacked over depth) and to `blocks.{i}.` on theirs.
"""
import dataclasses
import re
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Transform:
  name: str
  apply: Callable[[np.ndarray], np.ndarray]          # torch layout -> ours (a view)
  torch_shape: Callable[[tuple], tuple]              # our shape -> the torch shape


SAME = Transform('same', lambda w: w, lambda s: tuple(s))
# nn.Linear weight (out, in) -> Dense kernel (in, out).
LINEAR = Transform('linear', lambda w: w.T, lambda s: tuple(s)[::-1])
# nn.Conv2d weight (out, in, kh, kw) -> Conv kernel (kh, kw, in, out).
CONV = Transform('conv', lambda w: w.transpose(2, 3, 1, 0),
                 lambda s: (s[3], s[2], s[0], s[1]))

BACKBONE_TOP = (
    ('cls_token', 'cls_token', SAME),
    ('pos_embed', 'pos_embed', SAME),  # its grid is resized to the target img_size
    ('patch_embed/kernel', 'patch_embed.proj.weight', CONV),
    ('patch_embed/bias', 'patch_embed.proj.bias', SAME),
)

BACKBONE_BLOCK = (
    ('norm1/scale', 'norm1.weight', SAME),
    ('attn/qkv/kernel', 'attn.qkv.weight', LINEAR),
    ('attn/qkv/bias', 'attn.qkv.bias', SAME),          # only with qkv_bias
    ('attn/q_norm/scale', 'attn.q_norm.weight', SAME),  # only with qk_normalization
    ('attn/k_norm/scale', 'attn.k_norm.weight', SAME),
    ('attn/proj/kernel', 'attn.proj.weight', LINEAR),
    ('attn/proj/bias', 'attn.proj.bias', SAME),
    ('ls1/gamma', 'ls1.gamma', SAME),
    ('norm2/scale', 'norm2.weight', SAME),
    ('mlp/fc1/kernel', 'mlp.fc1.weight', LINEAR),
    ('mlp/fc1/bias', 'mlp.fc1.bias', SAME),
    ('mlp/fc2/kernel', 'mlp.fc2.weight', LINEAR),
    ('mlp/fc2/bias', 'mlp.fc2.bias', SAME),
    ('ls2/gamma', 'ls2.gamma', SAME),
)


# Hugging Face InternVisionModel names (InternVL's modeling_intern_vit.py) -> the
# .pth names above. The shapes are the same: class_embedding (1, 1, C),
# position_embedding (1, 1 + g*g, C), patch_embedding Conv2d (C, 3, p, p), and
# ls1/ls2 plain (C,) parameters where the .pth has ls1.gamma/ls2.gamma.
HF_TOP = {
    'embeddings.class_embedding': 'cls_token',
    'embeddings.position_embedding': 'pos_embed',
    'embeddings.patch_embedding.weight': 'patch_embed.proj.weight',
    'embeddings.patch_embedding.bias': 'patch_embed.proj.bias',
}
HF_BLOCK_LEAVES = {'ls1': 'ls1.gamma', 'ls2': 'ls2.gamma'}  # the rest keep their names


def hf_to_pth(name: str) -> str | None:
  """An InternVisionModel tensor name -> the .pth name; None if it is not one."""
  if name in HF_TOP:
    return HF_TOP[name]
  m = re.fullmatch(r'encoder\.layers\.(\d+)\.(.+)', name)
  if m:
    return f'blocks.{m.group(1)}.{HF_BLOCK_LEAVES.get(m.group(2), m.group(2))}'
  return None


def pth_to_hf(name: str) -> str:
  """The inverse of `hf_to_pth` (for messages about tensors a file lacks)."""
  for theirs, ours in HF_TOP.items():
    if name == ours:
      return theirs
  m = re.fullmatch(r'blocks\.(\d+)\.(.+)', name)
  if not m:
    return name
  leaf = {v: k for k, v in HF_BLOCK_LEAVES.items()}.get(m.group(2), m.group(2))
  return f'encoder.layers.{m.group(1)}.{leaf}'


def backbone_rows(depth: int, prefix: str = ''):
  """Every (our path, torch key, transform, block index or None) of a backbone."""
  for path, key, t in BACKBONE_TOP:
    yield path, prefix + key, t, None
  for path, key, t in BACKBONE_BLOCK:
    for i in range(depth):
      yield 'blocks/' + path, f'{prefix}blocks.{i}.{key}', t, i


# Released mmseg segmentors: the pyramid neck lives under `backbone.` in PyTorch.
# ConvTranspose2d weight (in, out, kh, kw) -> our kernel (kh, kw, in, out).
CONV_TRANSPOSE = Transform('conv_transpose', lambda w: w.transpose(2, 3, 0, 1),
                           lambda s: (s[2], s[3], s[0], s[1]))

NECK = (
    ('params/neck/up1_0/kernel', 'backbone.up1.0.weight', CONV_TRANSPOSE),
    ('params/neck/up1_0/bias', 'backbone.up1.0.bias', SAME),
    ('params/neck/up1_1/scale', 'backbone.up1.1.weight', SAME),
    ('params/neck/up1_1/bias', 'backbone.up1.1.bias', SAME),
    ('params/neck/up1_3/kernel', 'backbone.up1.3.weight', CONV_TRANSPOSE),
    ('params/neck/up1_3/bias', 'backbone.up1.3.bias', SAME),
    ('params/neck/up2_0/kernel', 'backbone.up2.0.weight', CONV_TRANSPOSE),
    ('params/neck/up2_0/bias', 'backbone.up2.0.bias', SAME),
)

# Head tensors: (torch leaf, our collection, our leaf, transform). A torch module
# path such as `decode_head.psp_modules.2.1` becomes `decode_head/psp_modules_2`,
# `decode_head.lateral_convs.0` becomes `decode_head/lateral_convs_0`.
HEAD_LEAVES = (
    ('conv.weight', 'params', 'conv/kernel', CONV),
    ('bn.weight', 'params', 'bn/scale', SAME),
    ('bn.bias', 'params', 'bn/bias', SAME),
    ('bn.running_mean', 'batch_stats', 'bn/mean', SAME),
    ('bn.running_var', 'batch_stats', 'bn/var', SAME),
    ('norm.weight', 'params', 'norm/scale', SAME),
    ('norm.bias', 'params', 'norm/bias', SAME),
    ('norm.running_mean', 'batch_stats', 'norm/mean', SAME),
    ('norm.running_var', 'batch_stats', 'norm/var', SAME),
    ('conv_seg.weight', 'params', 'conv_seg/kernel', CONV),
    ('conv_seg.bias', 'params', 'conv_seg/bias', SAME),
)
# BatchNorm step counters: accepted, not needed (our momentum is fixed).
DROPPED_LEAVES = ('bn.num_batches_tracked', 'norm.num_batches_tracked')


def head_path(key: str):
  """A `decode_head.`/`auxiliary_head.` key -> (our path, transform), None for a
  dropped counter; KeyError for a key the map does not know."""
  head, _, rest = key.partition('.')
  for leaf in DROPPED_LEAVES:
    if rest == leaf or rest.endswith('.' + leaf):
      return None
  for leaf, collection, ours, transform in HEAD_LEAVES:
    if rest == leaf or rest.endswith('.' + leaf):
      module = rest[:-len(leaf)].rstrip('.')
      module = re.sub(r'psp_modules\.(\d+)\.1$', r'psp_modules_\1', module)
      module = re.sub(r'\.(\d+)', r'_\1', module).replace('.', '/')
      return '/'.join(filter(None, (collection, head, module, ours))), transform
  raise KeyError(key)


def head_key(path: str) -> str:
  """The inverse of `head_path`: our path -> the mmseg key (for messages)."""
  collection, head, *rest = path.split('/')
  for leaf, coll, ours, _ in HEAD_LEAVES:
    if coll == collection and '/'.join(rest).endswith(ours):
      module = '/'.join(rest)[:-len(ours)].rstrip('/')
      module = re.sub(r'psp_modules_(\d+)', r'psp_modules.\1.1', module)
      module = re.sub(r'_(\d+)', r'.\1', module).replace('/', '.')
      return '.'.join(filter(None, (head, module, leaf)))
  return path


# ViT-Adapter backbone (InternVL-MMDetSeg `InternViTAdapter`), mmseg keys under
# `backbone.`. Rows are relative to our `params/backbone/` and to `backbone.`;
# the ViT blocks reuse BACKBONE_BLOCK. The adapter has no cls token (the
# original sets it to None, so its state dict has none); a pretrained InternViT
# file's `cls_token` is read by nobody.
ADAPTER_TOP = (
    ('pos_embed', 'pos_embed', SAME),  # (1, 1 + g*g, C) at img_size // 16, cls slot unused
    ('patch_embed/kernel', 'patch_embed.proj.weight', CONV),
    ('patch_embed/bias', 'patch_embed.proj.bias', SAME),
    ('level_embed', 'level_embed', SAME),
    ('up/kernel', 'up.weight', CONV_TRANSPOSE),
    ('up/bias', 'up.bias', SAME),
) + tuple((f'norm{k}/{ours}', f'norm{k}.{theirs}', SAME)
          for k in range(1, 5) for ours, theirs in (('scale', 'weight'), ('bias', 'bias')))
ADAPTER_DROPPED = ('cls_token',)


def _norm_rows(ours: str, theirs: str):
  return ((f'{ours}/scale', f'{theirs}.weight', SAME), (f'{ours}/bias', f'{theirs}.bias', SAME))


# SPM: stem.{0,3,6} convs and stem.{1,4,7} channels-first LayerNorms; conv{2,3,4}.0
# conv, .1 LayerNorm; fc1..fc4 1x1 convs with bias.
ADAPTER_SPM = tuple(
    row for conv, norm in (('stem_0', 'stem_1'), ('stem_3', 'stem_4'), ('stem_6', 'stem_7'),
                           ('conv2_0', 'conv2_1'), ('conv3_0', 'conv3_1'), ('conv4_0', 'conv4_1'))
    for row in ((f'spm/{conv}/kernel', 'spm.' + conv.replace('_', '.') + '.weight', CONV),)
    + _norm_rows(f'spm/{norm}', 'spm.' + norm.replace('_', '.'))
) + tuple(row for k in range(1, 5) for row in (
    (f'spm/fc{k}/kernel', f'spm.fc{k}.weight', CONV), (f'spm/fc{k}/bias', f'spm.fc{k}.bias', SAME)))

DEFORM_ATTN = tuple(
    row for name in ('sampling_offsets', 'attention_weights', 'value_proj', 'output_proj')
    for row in ((f'attn/{name}/kernel', f'attn.{name}.weight', LINEAR),
                (f'attn/{name}/bias', f'attn.{name}.bias', SAME)))

ADAPTER_INJECTOR = (_norm_rows('query_norm', 'query_norm') + _norm_rows('feat_norm', 'feat_norm')
                    + (('gamma', 'gamma', SAME),) + DEFORM_ATTN)

ADAPTER_EXTRACTOR = (
    _norm_rows('query_norm', 'query_norm') + _norm_rows('feat_norm', 'feat_norm')
    + _norm_rows('ffn_norm', 'ffn_norm') + DEFORM_ATTN + (
        ('ffn/fc1/kernel', 'ffn.fc1.weight', LINEAR),
        ('ffn/fc1/bias', 'ffn.fc1.bias', SAME),
        # Depth-wise Conv2d weight (C, 1, 3, 3) -> (3, 3, 1, C), as any conv.
        ('ffn/dwconv/kernel', 'ffn.dwconv.dwconv.weight', CONV),
        ('ffn/dwconv/bias', 'ffn.dwconv.dwconv.bias', SAME),
        ('ffn/fc2/kernel', 'ffn.fc2.weight', LINEAR),
        ('ffn/fc2/bias', 'ffn.fc2.bias', SAME),
    ))


def adapter_rows(depth: int, num_interactions: int, prefix: str = 'backbone.'):
  """Every (our path, torch key, transform, block index or None) of an adapter
  backbone; the last interaction has the two extra extractors."""
  for path, key, t in ADAPTER_TOP + ADAPTER_SPM:
    yield path, prefix + key, t, None
  for path, key, t in BACKBONE_BLOCK:
    for i in range(depth):
      yield 'blocks/' + path, f'{prefix}blocks.{i}.{key}', t, i
  for i in range(num_interactions):
    ours, theirs = f'interactions_{i}/', f'{prefix}interactions.{i}.'
    modules = [('injector', 'injector', ADAPTER_INJECTOR), ('extractor', 'extractor', ADAPTER_EXTRACTOR)]
    if i == num_interactions - 1:
      modules += [(f'extra_extractors_{j}', f'extra_extractors.{j}', ADAPTER_EXTRACTOR)
                  for j in range(2)]
    for our_module, their_module, rows in modules:
      for path, key, t in rows:
        yield f'{ours}{our_module}/{path}', f'{theirs}{their_module}.{key}', t, None
