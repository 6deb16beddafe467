"""Writes a 6B-parameter tree as an Orbax PyTree checkpoint without holding it.

Block parameters are `LazyStack`s: arrays of shape (depth, *slice) whose slices
are produced on demand (read from the source file, transposed, released). Saved
through Orbax's own PyTree handler with a type handler of ours that writes one
slice at a time, each slice its own chunk; the stored arrays are plain numpy
arrays, so the ordinary restore path (`internseg_jax.weights`) reads them.

Nothing is registered at import: the handler lives in a registry passed to the
converter's own `PyTreeCheckpointHandler`, so no other save in the process sees
it. Only public Orbax APIs are used (`orbax.checkpoint`, `.type_handlers`,
`.future`).
"""
import asyncio
import ctypes
import os
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

# Bytes of LazyStack slices being written at once, over all stacks of a save.
# Each slice in flight costs about three times its size (the mapped source pages,
# TensorStore's copy and the compressed chunk), so this bounds the writer's
# memory whatever the number of stacks or the depth. 96 MiB holds the largest
# slice of the 6B model (fc1/fc2, 82 MB in bf16) or qkv and proj together.
MAX_BYTES_IN_FLIGHT = 96 << 20


class LazyStack:
  """An array of shape (n, *slice_shape) whose slices are produced on demand.

  `get_slice(i)` returns slice i (any array-like of `slice_shape`);
  `on_written(i)` is called once slice i is on disk (e.g. to release the source
  pages). Saved like a numpy array and restored as one.
  """

  def __init__(self, n: int, slice_shape, dtype, get_slice: Callable[[int], np.ndarray],
               on_written: Callable[[int], None] | None = None):
    self.shape = (n, *slice_shape)
    self.dtype = np.dtype(dtype)
    self.get_slice = get_slice
    self.on_written = on_written
    self.progress = None  # a tqdm-like bar, set by save_tree
    self.ndim = len(self.shape)
    self.size = int(np.prod(self.shape))
    self.nbytes = self.size * self.dtype.itemsize  # Orbax's memory accounting reads this

  def __repr__(self):
    return f'LazyStack(shape={self.shape}, dtype={self.dtype})'


def from_source(source, keys, transform) -> LazyStack:
  """The tensors `keys` of a TensorSource (convert/tensors.py), each through
  `transform` (a name_map transform), stacked on a new leading axis: each is
  read when its slice is written and released once it is on disk."""
  info = source.tensors[keys[0]]
  # The transform applied to a zero-size stand-in: the slice's shape, no data.
  slice_shape = transform.apply(np.broadcast_to(np.zeros((), info.dtype), info.shape)).shape
  return LazyStack(len(keys), tuple(slice_shape), info.dtype,
                   lambda i: transform.apply(source.read(keys[i])),
                   lambda i: source.release(keys[i]))


def is_lazy(x) -> bool:
  return isinstance(x, LazyStack)


def materialize(x):
  """A LazyStack read into one numpy array (small models, tests); other leaves as they are."""
  if not is_lazy(x):
    return x
  return np.stack([np.asarray(x.get_slice(i), x.dtype) for i in range(x.shape[0])])


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


class LazyStackHandler(ocp.type_handlers.NumpyHandler):
  """Writes LazyStacks slice by slice; they read back as np.ndarray.

  Inherits NumpyHandler's `typestr`, `metadata` and `deserialize`, so the
  stored array is indistinguishable from a numpy array saved by Orbax; only
  `serialize` (the public TypeHandler method) is ours. The stacks of one save
  are written concurrently, but only `max_bytes_in_flight` bytes of slices at a
  time, all stacks together, so memory does not grow with the depth.
  """

  def __init__(self, max_bytes_in_flight: int = MAX_BYTES_IN_FLIGHT):
    super().__init__(deepcopy_host_arrays=False)  # a LazyStack is never copied
    self.max_bytes_in_flight = max_bytes_in_flight

  async def serialize(self, values, infos, args=None):
    args = args or [ocp.type_handlers.SaveArgs()] * len(values)
    # Like NumpyHandler, the writing runs as a commit future (Orbax creates the
    # folders asynchronously and signals when they exist).
    return [ocp.future.CommitFutureAwaitingContractedSignals(
        self._write_stacks(values, infos, args), name='lazy_stack_writer')]

  async def _write_stacks(self, values, infos, args):
    budget = _ByteBudget(self.max_bytes_in_flight)
    writes = []
    for value, info, arg in zip(values, infos, args):
      await info.await_path_creation()
      # The spec Orbax itself builds for a numpy array of this shape, but with
      # one slice as the chunk (`local_shape`), so each slice is written alone.
      # (`get_json_tspec_write` is the public wrapper of that builder.)
      tspec = ocp.type_handlers.get_json_tspec_write(
          info, use_ocdbt=info.is_ocdbt_checkpoint, global_shape=value.shape,
          local_shape=(1, *value.shape[1:]), dtype=value.dtype,
          process_index=jax.process_index() if info.is_ocdbt_checkpoint else None, arg=arg)
      writes.append(self._write_slices(value, tspec, info.ts_context, budget))
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


def _registry(max_bytes_in_flight: int):
  """The default handlers plus ours, for this save only."""
  defaults = [(ty, ocp.type_handlers.get_type_handler(ty))
              for ty in ocp.type_handlers.supported_types()]
  return ocp.type_handlers.create_type_handler_registry(
      *defaults, (LazyStack, LazyStackHandler(max_bytes_in_flight)))


def save_tree(directory, tree, progress=None,
              max_bytes_in_flight: int = MAX_BYTES_IN_FLIGHT) -> None:
  """Saves `tree` (numpy arrays and LazyStacks) as an Orbax PyTree checkpoint
  in `directory` (which must not exist). `progress` (e.g. tqdm) gets a bar over
  the LazyStack slices. Not atomic by itself: callers write into a temporary
  folder (see `internseg_jax.files.atomic_folder`)."""
  stacks = [x for x in jax.tree.leaves(tree, is_leaf=is_lazy) if is_lazy(x)]
  bar = progress(total=sum(x.shape[0] for x in stacks), desc='writing', unit='slice') \
      if progress is not None and stacks else None
  for x in stacks:
    x.progress = bar
  handler = ocp.PyTreeCheckpointHandler(type_handler_registry=_registry(max_bytes_in_flight))
  try:
    with ocp.Checkpointer(handler) as ckptr:
      ckptr.save(os.path.abspath(os.fspath(directory)), args=ocp.args.PyTreeSave(tree))
  finally:
    if bar is not None:
      bar.close()
    for x in stacks:
      x.progress = None
