"""Parameter checkpoints on Orbax: atomic save, strict sharded restore, and a
slice-by-slice writer so a 6B model can be written without holding it in memory.

A "checkpoint folder" holds `params/` (an Orbax PyTree checkpoint of the model's
parameter tree) and optionally `info.json`. It may also be a training workdir,
whose newest `checkpoints/<step>/` is used.
"""
import asyncio
import ctypes
import json
import os
import re
import shutil
import time
from typing import Any, Callable

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.serialization import ocdbt_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
from orbax.checkpoint._src.serialization import type_handlers
import tensorstore as ts

PARAMS = 'params'
INFO = 'info.json'


class LazyStack:
  """An array of shape (n, *slice_shape) whose slices are produced on demand.

  Saved through Orbax like a numpy array (and restored as one), but written one
  slice at a time, each slice its own chunk, so only one slice is ever in memory.
  """

  def __init__(self, n: int, slice_shape, dtype, get_slice: Callable[[int], np.ndarray],
               on_written: Callable[[int], None] | None = None):
    self.shape = (n, *slice_shape)
    self.dtype = np.dtype(dtype)
    self.get_slice = get_slice
    self.on_written = on_written
    self.progress = None  # a tqdm bar, set by save_params
    self.ndim = len(self.shape)
    self.size = int(np.prod(self.shape))

  def __repr__(self):
    return f'LazyStack(shape={self.shape}, dtype={self.dtype})'


# Bytes of LazyStack slices being written at once, over all stacks of a save.
# Each slice in flight costs about three times its size (the mapped source pages,
# TensorStore's copy and the compressed chunk), so this bounds the writer's
# memory whatever the number of stacks or the depth. 96 MiB holds the largest
# slice of the 6B model (fc1/fc2, 82 MB in bf16) or qkv and proj together.
MAX_BYTES_IN_FLIGHT = 96 << 20


_malloc_trim = None


def _trim_heap() -> None:
  """Returns freed heap memory to the OS (glibc only; a no-op elsewhere).

  TensorStore copies and compresses each slice on its own threads; glibc keeps
  what those threads free in per-thread arenas, so without this the resident
  memory creeps up by several slice sizes over a long save.
  """
  global _malloc_trim
  if _malloc_trim is None:
    try:
      _malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
      _malloc_trim = False
  if _malloc_trim:
    _malloc_trim(0)


class _ByteBudget:
  """An async counting limit on bytes in flight; one item larger than the whole
  budget is let through alone."""

  def __init__(self, limit: int):
    self.limit, self.used = limit, 0
    self.failed = False  # set by the first writer that fails
    self.cond = asyncio.Condition()

  async def acquire(self, n: int):
    async with self.cond:
      await self.cond.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
      self.used += n

  async def release(self, n: int):
    async with self.cond:
      self.used -= n
      self.cond.notify_all()


class LazyStackHandler(type_handlers.NumpyHandler):
  """Writes a LazyStack slice by slice; the result reads back as an np.ndarray.

  The stacks of one save are written concurrently, but only `max_bytes_in_flight`
  bytes of slices at a time (all stacks together), so memory does not grow with
  the number of stacks or the model's depth.
  """

  def __init__(self, max_bytes_in_flight: int | None = None):
    super().__init__()
    self._deepcopy_host_arrays = False  # (newer Orbax) a LazyStack is never copied
    self.max_bytes_in_flight = max_bytes_in_flight

  async def _background_serialize(self, values, infos, args=None):
    budget = _ByteBudget(self.max_bytes_in_flight or MAX_BYTES_IN_FLIGHT)
    writes = []
    for value, info, arg in zip(values, infos, args):
      await info.await_path_creation()
      spec = ts_utils.build_array_write_spec(
          info=info, arg=arg, global_shape=value.shape, local_shape=(1, *value.shape[1:]),
          dtype=value.dtype, use_ocdbt=info.is_ocdbt_checkpoint,
          process_index=ocdbt_utils.get_process_index_for_subdir(
              use_ocdbt=info.is_ocdbt_checkpoint))
      writes.append(self._write_slices(value, spec.json, info.ts_context, budget))
    # On a failure the other stacks start no new slice, but the slices already
    # being written are awaited (cancelling would leave TensorStore writing into
    # the folder after the error surfaced), so the caller can remove the folder.
    results = await asyncio.gather(*writes, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
      raise errors[0]

  async def _write_slices(self, value: LazyStack, tspec, context, budget: _ByteBudget):
    store = await ts.open(ts.Spec(tspec), create=True, open=True, context=context)
    nbytes = value.dtype.itemsize * int(np.prod(value.shape[1:]))
    for i in range(value.shape[0]):
      await budget.acquire(nbytes)
      try:
        if budget.failed:
          return
        piece = np.asarray(value.get_slice(i), dtype=value.dtype)
        if piece.shape != value.shape[1:]:
          raise ValueError(f'slice {i} has shape {piece.shape}, expected {value.shape[1:]}')
        await store[i].write(piece)
        del piece
        if value.on_written is not None:
          value.on_written(i)
      except BaseException:
        budget.failed = True
        raise
      finally:
        await budget.release(nbytes)
      _trim_heap()
      if value.progress is not None:
        value.progress.update(1)


def _register():
  # LazyStack deliberately shares np.ndarray's typestr so it restores as one;
  # silence the registry's warning about exactly that.
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    ocp.type_handlers.register_type_handler(LazyStack, LazyStackHandler(), override=True)
  finally:
    logging.set_verbosity(verbosity)


_register()


def _is_leaf(x):
  return isinstance(x, LazyStack)


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


def save_params(directory, params, info: dict | None = None, progress=None) -> None:
  """Writes `directory/params` (and `directory/info.json`) atomically.

  Everything is written into a temporary sibling folder that is renamed to
  `directory` only when complete, so an interrupted save leaves nothing that
  looks like a checkpoint. Leaves may be jax arrays, numpy arrays or LazyStacks;
  `progress` (e.g. tqdm) gets a bar over the LazyStack slices.
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
  stacks = [x for x in jax.tree.leaves(params, is_leaf=_is_leaf) if _is_leaf(x)]
  bar = progress(total=sum(x.shape[0] for x in stacks), desc='writing', unit='slice') \
      if progress is not None and stacks else None
  for x in stacks:
    x.progress = bar
  try:
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
      ckptr.save(tmp / PARAMS, args=ocp.args.PyTreeSave(params))
    if info is not None and lead:
      (tmp / INFO).write_text(json.dumps(info, indent=2, sort_keys=True))
  except BaseException:  # a failed save leaves nothing behind (a killed one: only tmp)
    if lead:
      _remove_settled(tmp)
    raise
  finally:
    if bar is not None:
      bar.close()
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
