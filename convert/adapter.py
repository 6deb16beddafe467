"""InternViT-Adapter checkpoints: the original's segmentor files -> our variables.

A model trained with the original code (InternVL-MMDetSeg `InternViTAdapter`,
saved as `{'module': state_dict}` by its release script or as an mmcv
checkpoint) holds `backbone.` tensors of the ViT (`patch_embed`, `pos_embed`
at the crop grid, `blocks.{i}`) and of the adapter (`spm.*`, `level_embed`,
`interactions.{i}.{injector,extractor,extra_extractors.{j}}.*`, `up.*`,
`norm1..4.*`), and the UperNet `decode_head.` / `auxiliary_head.` tensors.
The backbone is matched strictly against the rows of `name_map.adapter_rows`
(every missing, unexpected or mis-shaped key in one ConversionError); the ViT
blocks are stacked on a leading depth axis, one block at a time (LazyStack).
A `cls_token` (the original's adapter has none; pretrained InternViT files do)
is accepted and dropped.

The interaction indexes and the deformable attention's heads and points are
not in the tensors: adapter files convert with a config
(`--config=configs/upernet_adapter.py`), whose model is checked against them.
"""
import jax
import numpy as np

from convert import backbone, lazy_stack, name_map, segmentor
from convert.tensors import TensorInfo, TensorSource
from internseg_jax.errors import ConversionError
from internseg_jax.models.adapter import InternViTAdapter
from internseg_jax.models.build import build_backbone
from internseg_jax.weights import flatten, key_problems, raise_problems, unflatten

PREFIX = 'backbone.'
# Keys of the adapter's own layers; any of them makes a file an adapter file.
OWN_KEYS = ('spm.', 'interactions.', 'level_embed')
DROPPED = tuple(name_map.ADAPTER_DROPPED)   # ('cls_token',): accepted, not converted


def is_adapter(names, prefix: str = PREFIX) -> bool:
  return any(k.startswith(tuple(prefix + own for own in OWN_KEYS)) for k in names)


def expected_params(model: InternViTAdapter) -> dict:
  """Flat 'path' -> ShapeDtypeStruct of the adapter's params at its img_size
  (traced, nothing computed)."""
  size = model.img_size
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, size, size, 3))))
  return flatten(shapes['params'])


def _rows(model: InternViTAdapter, prefix: str, expected: dict):
  """adapter_rows of `model` that it has (no qkv bias rows for a model without it)."""
  return [row for row in name_map.adapter_rows(model.depth, len(model.interaction_indexes), prefix)
          if row[0] in expected]


def check_keys(source: TensorSource, rows, expected: dict, prefix: str,
               other_prefixes=()) -> list[str]:
  """Every missing, unexpected (under `prefix`) or mis-shaped key in one
  ConversionError. Returns the names under neither `prefix` nor
  `other_prefixes` (left to the caller: unused keys)."""
  want = {}
  for path, key, transform, block in rows:
    shape = expected[path].shape
    want[key] = transform.torch_shape(shape[1:] if block is not None else shape)
  dropped = {prefix + k for k in DROPPED}
  found = {k: source.shape(k) for k in source.tensors if k.startswith(prefix) and k not in dropped}
  raise_problems(key_problems(want, found, describe=source.describe),
                 'the adapter tensors do not fit the model', ConversionError)
  return sorted(k for k in source.tensors if not k.startswith((prefix, *other_prefixes)))


def build_tree(source: TensorSource, model: InternViTAdapter, expected: dict | None = None,
               prefix: str = PREFIX, other_prefixes=segmentor.HEAD_PREFIXES):
  """(our nested backbone tree, unused names). Small tensors as numpy copies;
  each stacked block parameter a LazyStack reading one block at a time."""
  expected = expected_params(model) if expected is None else expected
  rows = _rows(model, prefix, expected)
  unused = check_keys(source, rows, expected, prefix, other_prefixes)
  flat, blocks = {}, {}
  for path, key, transform, block in rows:
    if block is None:
      flat[path] = np.array(transform.apply(source.read(key)))  # a copy: the source may be released
      source.release(key)
    else:
      blocks.setdefault((path, transform), []).append(key)
  for (path, transform), keys in blocks.items():
    flat[path] = lazy_stack.from_source(source, keys, transform)
  return unflatten(flat), unused


def segmentor_variables(source: TensorSource, config):
  """An adapter segmentor file -> (variables tree, what was found, unused names)."""
  if config is None or config.model.get('adapter') is None:
    raise ConversionError(
        'an InternViT-Adapter checkpoint (backbone.spm.*, backbone.interactions.*): convert it '
        'with --config=configs/upernet_adapter.py (its interaction indexes and deformable '
        'attention heads are not in the tensors)')
  arch = backbone.detect(source, PREFIX)
  bb = config.model.backbone
  # The file's pos_embed is at its crop grid (img_size // 16), checked below as a shape.
  backbone.check_against_config(arch, bb, skip=('pretrain_size',))
  model = build_backbone(config.model, attention='xla')
  tree, unused = build_tree(source, model)
  tree = {'params': {'backbone': tree}}
  heads = segmentor.detect_heads(source)
  model_config = segmentor.model_config(arch, heads, bb.num_heads, bb.img_size, config)
  for collection, modules in unflatten(segmentor.heads_variables(source, model_config)).items():
    tree.setdefault(collection, {}).update(modules)
  found = dict(kind='segmentor', heads=heads,
               adapter=config.model.adapter.to_dict(),
               backbone=dict(arch, num_heads=bb.num_heads, img_size=bb.img_size,
                             patch_size=bb.patch_size))
  return tree, found, unused


# -- in-memory state dicts (tests, benchmarks) -----------------------------------

class _StateDict(TensorSource):
  """A dict of torch tensors as a TensorSource."""

  def __init__(self, state_dict):
    from convert.torch_io import numpy_dtype
    self.state_dict = state_dict
    super().__init__('<state dict>', {k: TensorInfo(tuple(v.shape), numpy_dtype(v.dtype))
                                      for k, v in state_dict.items()}, files=[], meta={})

  def read(self, name):
    from convert.torch_io import to_numpy
    return to_numpy(self.state_dict[name].detach().contiguous())


def adapter_params(sd, model: InternViTAdapter, prefix: str = PREFIX,
                   other_prefixes=segmentor.HEAD_PREFIXES, expected=None) -> dict:
  """Our nested numpy params of `model` from the `prefix` keys of the state dict
  `sd` (torch tensors), strictly; keys under `other_prefixes` are left to their
  own converters, any others are an error. `expected`: `expected_params(model)`
  when already at hand."""
  tree, unused = build_tree(_StateDict(sd), model, expected, prefix, other_prefixes)
  raise_problems([f'unexpected: {k} {tuple(sd[k].shape)}' for k in unused],
                 'tensors outside the adapter and its heads', ConversionError)
  return jax.tree.map(lazy_stack.materialize, tree, is_leaf=lazy_stack.is_lazy)
