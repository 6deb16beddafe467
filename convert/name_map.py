"""Declarative map from the reference's PyTorch keys to our parameter tree.

Each row: (our path, PyTorch key, transform). Block rows are relative to
`blocks/` on our side (stacked over depth) and to `blocks.{i}.` on theirs.
"""
import dataclasses
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


def backbone_rows(depth: int, prefix: str = ''):
  """Every (our path, torch key, transform, block index or None) of a backbone."""
  for path, key, t in BACKBONE_TOP:
    yield path, prefix + key, t, None
  for path, key, t in BACKBONE_BLOCK:
    for i in range(depth):
      yield 'blocks/' + path, f'{prefix}blocks.{i}.{key}', t, i
