"""ViT-Adapter backbone tensors of an mmseg state dict -> our params tree.

Applies `name_map.adapter_rows` strictly (every missing, unexpected or
mis-shaped key in one ConversionError); the ViT blocks are stacked on a leading
depth axis. `cls_token` (in pretrained InternViT files, never in the
adapter's own state dict) is accepted and dropped.
"""
import jax
import numpy as np

from convert import name_map, torch_io
from internseg_jax.errors import ConversionError
from internseg_jax.models.adapter import InternViTAdapter
from internseg_jax.weights import flatten, key_problems, raise_problems, unflatten


def expected_params(model: InternViTAdapter) -> dict:
  """Flat 'path' -> ShapeDtypeStruct of the adapter's params at its img_size."""
  size = model.img_size
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, size, size, 3))))
  return flatten(shapes['params'])


def adapter_params(sd, model: InternViTAdapter, prefix: str = 'backbone.',
                   other_prefixes=('decode_head.', 'auxiliary_head.'), expected=None) -> dict:
  """Our nested numpy params of `model` from the `prefix` keys of `sd` (torch
  tensors); keys under `other_prefixes` are left to their own converters.
  `expected`: `expected_params(model)` when already at hand (it traces the model)."""
  expected = expected_params(model) if expected is None else expected
  rows = list(name_map.adapter_rows(model.depth, len(model.interaction_indexes), prefix))
  dropped = {prefix + key for key in name_map.ADAPTER_DROPPED}
  wanted = {}
  for path, key, transform, _ in rows:
    if path in expected:  # e.g. no qkv bias rows for a model without it
      shape = expected[path].shape
      wanted[key] = transform.torch_shape(shape[1:] if path.startswith('blocks/') else shape)
  found = {k: tuple(v.shape) for k, v in sd.items()
           if k not in dropped and (k.startswith(prefix) or not k.startswith(other_prefixes))}
  raise_problems(key_problems(wanted, found), 'the tensors do not fit the adapter',
                 ConversionError)
  flat, block_slices = {}, {}
  for path, key, transform, block in rows:
    if path not in expected:
      continue  # e.g. qkv bias rows for a model without it
    value = np.array(transform.apply(torch_io.to_numpy(sd[key])))
    if block is None:
      flat[path] = value
    else:
      block_slices.setdefault(path, []).append(value)
  flat.update({path: np.stack(slices) for path, slices in block_slices.items()})
  return unflatten(flat)
