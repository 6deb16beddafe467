"""The device mesh and the rule table that places parameters on it.

Mesh axes: `data` (pure data parallelism: params replicated) and `fsdp` (batch
split too, and params sharded, gathered layer by layer inside the scan).
"""
import re
from typing import Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


# Parameter path (joined with '/') -> spec. First match wins. Stacked block params
# carry a leading depth axis that is never sharded.
PARAM_RULES: Sequence[tuple[str, P]] = (
    (r'blocks/.*/kernel$', P(None, 'fsdp', None)),   # (depth, in, out): split `in`
    (r'blocks/', P()),                                # (depth, C) vectors: small
    (r'patch_embed/kernel$', P(None, None, None, 'fsdp')),
    (r'pos_embed$', P(None, None, 'fsdp')),
    (r'.*kernel$', P(*([None] * 3), 'fsdp')),         # conv kernels (kh, kw, in, out)
    (r'.*', P()),
)

BATCH_AXES = ('data', 'fsdp')


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  """A (data, fsdp) mesh over `devices` (default: all); -1 takes the remaining devices."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  n = devices.size
  if data == -1 and fsdp == -1:
    raise ValueError('at most one of mesh.data and mesh.fsdp can be -1')
  if data == -1:
    data = n // fsdp
  if fsdp == -1:
    fsdp = n // data
  if data * fsdp != n:
    raise ValueError(f'mesh data={data} x fsdp={fsdp} does not use all {n} devices')
  return Mesh(devices.reshape(data, fsdp), ('data', 'fsdp'))


def spec_for(name: str, shape: Sequence[int], mesh: Mesh) -> P:
  """The rule-table spec for one parameter, padded/trimmed to its rank; an axis
  that does not divide evenly over the mesh falls back to replication."""
  for pattern, spec in PARAM_RULES:
    if re.search(pattern, name):
      break
  spec = tuple(spec)[-len(shape):] if len(spec) > len(shape) else tuple(spec)
  spec = (None,) * (len(shape) - len(spec)) + spec
  out = []
  for dim, axis in zip(shape, spec):
    if axis is not None and dim % mesh.shape[axis]:
      logging.info('%s: dim %d not divisible by mesh axis %s; replicated', name, dim, axis)
      axis = None
    out.append(axis)
  return P(*out)


def param_shardings(abstract_params, mesh: Mesh):
  """A tree of NamedShardings for a tree of arrays or ShapeDtypeStructs."""
  name = lambda path: jax.tree_util.keystr(path, simple=True, separator='/')
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, spec_for(name(path), x.shape, mesh)), abstract_params)


def batch_sharding(mesh: Mesh, ndim: int = 4) -> NamedSharding:
  """Batch dimension split over both mesh axes."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))
