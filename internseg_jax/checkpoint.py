"""Parameter checkpoints on Orbax: atomic save and strict sharded restore.
(The converter's slice-by-slice writer is convert/lazy_stack.py.)

A "checkpoint folder" holds `params/` (an Orbax PyTree checkpoint of the model's
parameter tree) and optionally `info.json`. It may also be a training workdir,
whose newest `checkpoints/<step>/` is used.
"""
import json
import os
import re
import shutil
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from etils import epath

PARAMS = 'params'
INFO = 'info.json'


def _remove_settled(path, settle_s: float = 0.25, timeout_s: float = 30.0) -> None:
  """Removes a folder that writes Orbax abandoned on an error may still be
  touching (TensorStore finishes them on its own threads): removes it again
  until it has stayed gone for `settle_s`."""
  deadline = time.monotonic() + timeout_s
  while True:
    shutil.rmtree(os.fspath(path), ignore_errors=True)
    time.sleep(settle_s)
    if not os.path.exists(path):
      return
    if time.monotonic() > deadline:
      logging.warning('could not remove the unfinished checkpoint %s', path)
      return


def save_params(directory, params, info: dict | None = None) -> None:
  """Writes `directory/params` (and `directory/info.json`) atomically.

  Everything is written into a temporary sibling folder that is renamed to
  `directory` only when complete, so an interrupted save leaves nothing that
  looks like a checkpoint. Leaves may be jax or numpy arrays.
  """
  directory = epath.Path(directory)
  if directory.exists():
    raise FileExistsError(f'{directory} already exists; remove it or choose another --dst')
  # With several processes (multi-host training) they all write into one folder,
  # so its name cannot depend on the process; process 0 manages the folder.
  multi = jax.process_count() > 1
  lead = jax.process_index() == 0
  suffix = 'incomplete' if multi else f'incomplete-{os.getpid()}'
  tmp = directory.parent / f'.{directory.name}.{suffix}'
  if lead:
    if tmp.exists():
      tmp.rmtree()
    tmp.mkdir(parents=True)
  if multi:
    multihost_utils.sync_global_devices(f'save_params:{directory}:start')
  try:
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
      ckptr.save(tmp / PARAMS, args=ocp.args.PyTreeSave(params))
    if info is not None and lead:
      (tmp / INFO).write_text(json.dumps(info, indent=2, sort_keys=True))
  except BaseException:  # a failed save leaves nothing behind (a killed one: only tmp)
    if lead:
      _remove_settled(tmp)
    raise
  if lead:
    if directory.exists():  # rename() would silently replace an empty folder
      raise FileExistsError(f'{directory} appeared while writing; the output is in {tmp}')
    tmp.rename(directory)
  if multi:
    multihost_utils.sync_global_devices(f'save_params:{directory}:done')


def find_params_dir(path) -> epath.Path:
  """A checkpoint folder, a converter output or a training workdir -> its params dir."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'checkpoint path {path} does not exist')
  if (path / PARAMS).is_dir():
    return path / PARAMS
  steps = path / 'checkpoints'
  if steps.is_dir():
    numbered = sorted((int(p.name), p) for p in steps.iterdir() if re.fullmatch(r'\d+', p.name))
    if numbered:
      return find_params_dir(numbered[-1][1])
  if (path / '_CHECKPOINT_METADATA').exists() or (path / '_METADATA').exists():
    return path
  raise FileNotFoundError(
      f'{path} holds no parameters: expected a converter output or checkpoint folder '
      f'(with {PARAMS}/) or a training workdir (with checkpoints/<step>/)')


def read_info(path) -> dict:
  """The converter's info.json next to a params dir, or {}."""
  info = find_params_dir(path).parent / INFO
  return json.loads(info.read_text()) if info.exists() else {}


def params_metadata(params_dir) -> Any:
  """The stored tree with ShapeDtypeStruct leaves (no data read)."""
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
    meta = ckptr.metadata(epath.Path(params_dir))
  tree = getattr(meta, 'item_metadata', meta)
  tree = getattr(tree, 'tree', tree)
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)


def restore_params(params_dir, target):
  """Restores a tree whose leaves are ShapeDtypeStructs with shardings; each array
  is read straight into its shards, cast to the target dtype."""
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
    return ckptr.restore(epath.Path(params_dir),
                         args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args))
