"""The training input pipeline: grain, sharded by process, checkpointable.

    it = train_loader(source, global_batch_size=16, seed=0, num_workers=2)
    batch = next(it)              # {'image': f32 (b, crop, crop, 3), 'label': i32 (b, crop, crop)}
    batch = to_global(batch, mesh)            # jax.Arrays split over ('data', 'fsdp')
    mngr.save(step, args=ocp.args.Composite(..., data=checkpoint_args_save(it)))
    mngr.restore(step, args=ocp.args.Composite(..., data=checkpoint_args_restore(it)))

b = global_batch_size // process_count.

The data order is one stream for the whole job, the same for any number of
processes and workers:

  stream[k] = record  perm_e(k mod n)  of epoch  e = k // n   (n = len(source))

where perm_e is grain's index shuffle of 0..n-1 seeded from (seed, e) (the
identity with shuffle=False). Global batch s is stream[s*G : (s+1)*G]
(G = global_batch_size); process p of P takes its b consecutive elements
stream[s*G + p*b : s*G + (p+1)*b]. So every epoch is split into disjoint
per-process parts that together cover the data exactly once (the parts are
redrawn each epoch, as with a DistributedSampler), and each process loads only
its own records. A batch may straddle two epochs when G does not divide n.

Randomness: the transform of stream element k gets
`example_rng(seed, record_index, epoch)` = np.random.default_rng([seed,
record_index, epoch]); nothing else is random. Whichever process, worker or
thread computes an element, and after any restart, it is the same.

State: the iterator's state is the stream position of the next batch it will
return (plus seed, record count and shuffle flag, checked on restore). Batches
prefetched but not yet returned do not count. Restoring rebuilds the grain
pipeline from that position, so a state saved with one number of workers (or
processes, or a different global batch size) restores with another.

Workers: `num_workers > 0` runs the pipeline in grain worker processes
(`IterDataset.mp_prefetch`). grain 0.2.x always starts them with the *spawn*
method (never fork), so they are safe to start after
`jax.distributed.initialize` (a process forked after it has been seen to hang
at exit) and they do not inherit the parent's JAX/GPU state. Spawned workers
unpickle the source and transform (cloudpickle) and import their modules:
those must be picklable and must not touch JAX at import time (importing grain
imports jax, but no backend is initialised; `_init_worker` additionally pins
JAX to the CPU in the workers as a guard). Spawn re-imports the main module,
so scripts need an `if __name__ == '__main__':` guard. Each worker limits
OpenCV to one thread. Workers hand batches over in /dev/shm (grain shared
memory; up to num_workers x prefetch batches at a time, 4 MB per 504x504
example: size /dev/shm accordingly in containers); this process copies each
batch out as it returns it. Close the iterator (`it.close()`, or `with`) when
done; iterators still open at exit are closed by an atexit hook.
"""
from __future__ import annotations

import atexit
import functools
import os
import weakref
from typing import Any, Callable, Optional

import numpy as np
from absl import logging

import grain  # imports jax, but initialises no backend

STATE_VERSION = 1
BATCH_AXES = ('data', 'fsdp')  # as internseg_jax.sharding.BATCH_AXES (not imported: it imports jax)

Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple]


def example_rng(seed: int, record_index: int, epoch: int) -> np.random.Generator:
  """The generator the transform gets for one record in one epoch."""
  return np.random.default_rng([int(seed), int(record_index), int(epoch)])


def _shuffle_seed(seed: int) -> int:
  """grain's shuffle seed (folded with the epoch by grain), decorrelated from `seed`
  so that seed s+1 does not replay the epoch-1 order of seed s."""
  return int(np.random.SeedSequence([int(seed), 0x73687566]).generate_state(1)[0])


def default_transform(crop_size=504, **kwargs) -> Transform:
  """transforms.train_transform with the given settings (a picklable partial)."""
  from internseg_jax.data import transforms  # pylint: disable=g-import-not-at-top
  return functools.partial(transforms.train_transform, crop_size=crop_size, **kwargs)


def config_transform(data_config) -> Transform:
  """transforms.train_transform with the `data` section of a config."""
  return default_transform(
      crop_size=data_config.crop_size, scale=tuple(data_config.scale),
      ratio_range=tuple(data_config.ratio_range), cat_max_ratio=data_config.cat_max_ratio,
      flip_prob=data_config.flip_prob, photometric=data_config.photometric)


class _LoadExample:
  """stream position, record index -> transformed example. Picklable; runs in workers."""

  def __init__(self, source, transform: Transform, seed: int, with_metadata: bool):
    self.source = source
    self.transform = transform
    self.seed = seed
    self.num_records = len(source)
    self.with_metadata = with_metadata

  def __call__(self, position: int, record_index) -> dict:
    record_index = int(record_index)
    epoch = int(position) // self.num_records
    record = self.source[record_index]
    image, label = self.transform(record['image'], record['label'],
                                  example_rng(self.seed, record_index, epoch))
    label = np.asarray(label)
    # uint8 labels travel as uint8 (a quarter of the bytes between processes);
    # TrainIterator casts the batch to int32.
    out = {'image': np.asarray(image, np.float32),
           'label': label if label.dtype == np.uint8 else label.astype(np.int32)}
    if out['image'].ndim != 3 or out['label'].shape != out['image'].shape[:2]:
      raise ValueError(f'transform gave image {out["image"].shape} and label '
                       f'{out["label"].shape}; expected (h, w, 3) and (h, w)')
    if self.with_metadata:
      out['index'] = np.int32(record_index)
      out['epoch'] = np.int32(epoch)
    return out


def _init_worker(worker_index: int, worker_count: int) -> None:
  """Runs first in each (spawned) grain worker: no GPU, one OpenCV thread."""
  del worker_index, worker_count
  os.environ['JAX_PLATFORMS'] = 'cpu'
  try:
    import jax  # pylint: disable=g-import-not-at-top  (already imported by grain)
    jax.config.update('jax_platforms', 'cpu')
  except Exception:  # pylint: disable=broad-except
    pass
  try:
    import cv2  # pylint: disable=g-import-not-at-top
    cv2.setNumThreads(1)
  except ImportError:
    pass


def _ensure_flags_parsed() -> None:
  """grain 0.2.18's mp_prefetch reads an absl flag; outside absl.app (tests,
  notebooks, scripts) the flags are unparsed and it raises
  UnparsedFlagAccessError (google/grain#1355). Mark them parsed (defaults)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def worker_iter(dataset: grain.MapDataset, num_workers: int, buffer: int = 2) -> grain.IterDataset:
  """The elements of `dataset`, in order, computed in grain worker processes
  (spawned, CPU-only, one OpenCV thread each; see the module docstring)."""
  _ensure_flags_parsed()
  return dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)) \
      .mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                per_worker_buffer_size=buffer),
                   worker_init_fn=_init_worker)


_LIVE = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
  """Stops worker processes of iterators never closed, while the interpreter
  is still whole (grain's own cleanup in __del__ fails during shutdown)."""
  for it in list(_LIVE):
    try:
      it.close()
    except Exception:  # pylint: disable=broad-except
      pass


class TrainIterator(grain.DatasetIterator):
  """Per-process training batches; checkpointable (get_state / set_state, and
  Orbax through grain.checkpoint via `checkpoint_args_save/restore`).

  The grain pipeline (and its worker processes) starts lazily on the first
  `next` or `start_prefetch`, so `set_state` right after construction costs
  nothing; on a running iterator it restarts the pipeline.
  """

  def __init__(self, source, *, global_batch_size: int, seed: int, transform: Transform,
               num_workers: int = 0, prefetch: int = 4, process_index: int = 0,
               process_count: int = 1, shuffle: bool = True, read_threads: int = 1,
               with_metadata: bool = False):
    super().__init__()
    self._source = source
    self._num_records = len(source)
    self.global_batch_size = global_batch_size
    self.batch_size = global_batch_size // process_count
    self.seed = seed
    self._transform = transform
    self.num_workers = num_workers
    self._prefetch = prefetch
    self.process_index = process_index
    self.process_count = process_count
    self._shuffle = shuffle
    self._read_threads = read_threads
    self._with_metadata = with_metadata
    self._position = 0      # stream position of the next batch returned
    self._inner = None
    _LIVE.add(self)

  # -- the grain pipeline ---------------------------------------------------

  def _dataset(self, position: int) -> grain.IterDataset:
    """The grain pipeline for this process, starting at stream `position`."""
    n = self._num_records
    records = grain.MapDataset.range(n)
    if self._shuffle:
      records = records.shuffle(seed=_shuffle_seed(self.seed))  # reshuffled per epoch
    stream = records.repeat()  # infinite; epoch e = positions [e*n, (e+1)*n)
    examples = stream.map_with_index(
        _LoadExample(self._source, self._transform, self.seed, self._with_metadata))
    # Batch before handing to workers so that batch composition does not depend
    # on the number of workers (mp_prefetch gives worker w batches w, w+W, ...).
    batches = examples[position:].batch(self.batch_size, drop_remainder=True)
    batches = batches[self.process_index::self.process_count]
    if self.num_workers > 0:
      ds = batches.to_iter_dataset(grain.ReadOptions(
          num_threads=self._read_threads, prefetch_buffer_size=self._read_threads))
      _ensure_flags_parsed()
      ds = ds.mp_prefetch(
          grain.MultiprocessingOptions(num_workers=self.num_workers,
                                       per_worker_buffer_size=max(1, self._prefetch)),
          worker_init_fn=_init_worker)
    else:
      threads = self._read_threads if self._prefetch > 0 else 0
      ds = batches.to_iter_dataset(grain.ReadOptions(
          num_threads=threads, prefetch_buffer_size=max(self._prefetch, threads)))
    return ds

  def _iterator(self):
    if self._inner is None:
      self._assert_not_closed()
      self._inner = iter(self._dataset(self._position))
    return self._inner

  # -- DatasetIterator --------------------------------------------------------

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator())
    self._position += self.global_batch_size
    # Worker outputs are grain SharedMemoryArrays: copy them into ordinary memory
    # so that the shared memory is released now (not when the caller drops the
    # batch, nor with warnings at interpreter exit). One memcpy per batch here.
    return {k: v.astype(np.int32) if k == 'label' else
            v if type(v) is np.ndarray else np.array(v) for k, v in batch.items()}

  @property
  def position(self) -> int:
    """Stream position (records of all processes) of the next batch."""
    return self._position

  @property
  def epoch(self) -> int:
    """The epoch the next batch starts in."""
    return self._position // self._num_records

  def get_state(self) -> dict[str, Any]:
    return {
        'version': STATE_VERSION,
        'position': int(self._position),
        'seed': int(self.seed),
        'num_records': int(self._num_records),
        'shuffle': bool(self._shuffle),
        'global_batch_size': int(self.global_batch_size),
    }

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get('version') != STATE_VERSION:
      raise ValueError(f'data iterator state version {state.get("version")!r} is not '
                       f'{STATE_VERSION}: {state}')
    mine = self.get_state()
    for key in ('seed', 'num_records', 'shuffle'):
      if state[key] != mine[key]:
        raise ValueError(
            f'cannot resume the data order: the checkpoint has {key}={state[key]!r} but this '
            f'pipeline has {key}={mine[key]!r} (same seed, dataset and shuffle are needed to '
            'continue the same stream)')
    position = int(state['position'])
    if position < 0:
      raise ValueError(f'negative stream position in {state}')
    if state['global_batch_size'] != self.global_batch_size:
      logging.warning('data: resuming a stream saved with global batch %d with global batch %d '
                      '(continuing at record position %d)', state['global_batch_size'],
                      self.global_batch_size, position)
    if self._inner is not None:
      self._inner.close()
      self._inner = None
    self._position = position

  def start_prefetch(self) -> None:
    self._iterator().start_prefetch()

  def close(self) -> None:
    if self._inner is not None:
      self._inner.close()
      self._inner = None
    super().close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __repr__(self):
    return (f'TrainIterator({self._num_records} records, global batch {self.global_batch_size}, '
            f'process {self.process_index}/{self.process_count}, {self.num_workers} workers, '
            f'position {self._position})')


def train_loader(source, *, global_batch_size: int, seed: int,
                 transform: Optional[Transform] = None, num_workers: int = 0,
                 prefetch: int = 4, process_index: Optional[int] = None,
                 process_count: Optional[int] = None, shuffle: bool = True,
                 read_threads: int = 1, with_metadata: bool = False) -> TrainIterator:
  """An endless, checkpointable iterator of this process's training batches.

  Args:
    source: random-access records {'image': uint8 (H, W, 3), 'label': uint8 (H, W), ...}
      with __len__/__getitem__ (ADEFolder, ArrayRecordSource, a subset...); picklable
      when num_workers > 0.
    global_batch_size: batch over all processes; divisible by process_count.
    seed: non-negative int; fixes the order and every random draw.
    transform: (image, label, rng) -> (float32 (h, w, 3), uint8/int (h, w)); the
      default is transforms.train_transform at 504 (see `config_transform`).
      Module-level functions or functools.partial of them: spawned workers
      unpickle it.
    num_workers: grain worker processes (0: compute in this process, in
      `read_threads` background threads).
    prefetch: batches buffered per worker (or in this process when num_workers=0).
    process_index, process_count: this process's place (default: jax.process_index()
      and jax.process_count()).
    shuffle: reshuffle every epoch; False gives records in order, epoch after epoch.
    read_threads: threads computing batches in each worker (or in this process).
    with_metadata: also return 'index' (record indices) and 'epoch' (int32 (b,)).

  Returns:
    TrainIterator yielding {'image': float32 (b, h, w, 3), 'label': int32 (b, h, w)}
    with b = global_batch_size // process_count.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f'global batch size {global_batch_size} must be a positive multiple of '
                     f'the process count {process_count}')
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f'seed must be a non-negative int, got {seed!r}')
  if len(source) < 1:
    raise ValueError(f'{source!r} is empty')
  if num_workers < 0 or prefetch < 0 or read_threads < 1:
    raise ValueError(f'num_workers ({num_workers}) and prefetch ({prefetch}) must be >= 0, '
                     f'read_threads ({read_threads}) >= 1')
  if transform is None:
    transform = default_transform()
  return TrainIterator(source, global_batch_size=global_batch_size, seed=int(seed),
                       transform=transform, num_workers=num_workers, prefetch=prefetch,
                       process_index=process_index, process_count=process_count,
                       shuffle=shuffle, read_threads=read_threads, with_metadata=with_metadata)


def checkpoint_args_save(iterator: grain.DatasetIterator):
  """Orbax args saving the iterator state, for an item named 'data':
  `ocp.args.Composite(..., data=checkpoint_args_save(it))`. Each process writes
  its own process_<i>-of-<n>.json."""
  import grain.checkpoint  # pylint: disable=g-import-not-at-top  (imports orbax)
  return grain.checkpoint.CheckpointSave(iterator)


def checkpoint_args_restore(iterator: grain.DatasetIterator):
  """Orbax args restoring into `iterator` in place (it also starts prefetching)."""
  import grain.checkpoint  # pylint: disable=g-import-not-at-top
  return grain.checkpoint.CheckpointRestore(iterator)


def to_global(batch: dict, mesh, sharding=None) -> dict:
  """This process's numpy batch -> global jax.Arrays, batch axis split over
  ('data', 'fsdp') (or `sharding`, one NamedSharding for every entry). For a mesh
  over jax.devices() in order, the global batch is the processes' batches
  concatenated in process order."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  if sharding is None:
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
