"""mIoU over a dataset: data-parallel over the whole mesh and every process.

Each process takes every P-th image (P = process count); grain decodes and
test-transforms them ahead of the device (worker processes, or threads with
`num_workers=0`); `inference.WindowRunner` batches the windows of many images
over the mesh; only per-class areas are kept (streaming), and the areas of all
processes are summed at the end. The result equals a one-image-at-a-time loop.
"""
import json
import os
import time

import grain
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
import jax
from tqdm import tqdm

from internseg_jax import files, inference, metrics
from internseg_jax.data.ade20k_meta import class_names


class _Prepare:
  """Record index -> an inference.Item (runs in grain workers; picklable)."""

  def __init__(self, dataset, eval_config):
    self.dataset = dataset
    self.eval_config = eval_config

  def __call__(self, index):
    record = self.dataset[int(index)]
    image = record['image']
    return inference.Item(inference.make_views(image, self.eval_config), image.shape[:2],
                          extra=record['label'])


def _items(dataset, indices, eval_config, num_workers: int):
  ds = grain.MapDataset.source(list(indices)).map(_Prepare(dataset, eval_config))
  if num_workers > 0:
    from internseg_jax.data import pipeline  # worker setup shared with training
    return pipeline.worker_iter(ds, num_workers)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))


def evaluate(logits_fn, mesh, config, dataset, workdir: str | None = None,
             limit: int | None = None, num_workers: int | None = None) -> dict:
  """mIoU over a source of {'image', 'label'} records (labels already reduced).

  logits_fn: see inference.WindowRunner. Images are prepared by
  `num_workers` grain worker processes (default `data.num_workers`; 0: threads).
  Writes eval_results.json to `workdir` (process 0). Every process returns the
  same result."""
  num_workers = config.data.num_workers if num_workers is None else num_workers
  ev, num_classes = config.eval, config.model.decode_head.num_classes
  n = len(dataset) if limit is None else min(limit, len(dataset))
  mine = range(jax.process_index(), n, jax.process_count())
  runner = inference.WindowRunner(logits_fn, mesh, ev.windows_per_device, ev)
  acc = metrics.IoUAccumulator(num_classes)
  start = time.time()
  items = _items(dataset, mine, ev, num_workers)
  with tqdm(total=n, desc='eval', unit='img', leave=False,
            disable=jax.process_index() != 0) as bar:
    for item, out in runner.run(items):
      acc.update(np.argmax(out, axis=-1), item.extra)
      bar.update(jax.process_count())  # the others advance at about the same pace
  if jax.process_count() > 1:
    areas = np.stack(acc.areas()).astype(np.int64)
    total = np.asarray(multihost_utils.process_allgather(areas)).sum(0)
    acc = metrics.IoUAccumulator(num_classes)
    acc.add_areas(*total, num_images=n)
  result = acc.result()
  names = class_names(num_classes, config.data.class_names)
  logging.info('evaluated %d images in %.1f s\n%s', n, time.time() - start,
               metrics.format_table(result, names))
  if workdir is not None and jax.process_index() == 0:
    write_results(workdir, result, names, n)
  return result


def write_results(workdir: str, result: dict, names, num_images: int) -> str:
  """eval_results.json: mIoU, aAcc, mAcc (fractions) and per-class IoU/Acc by name."""
  to_float = lambda x: None if np.isnan(x) else float(x)
  out = dict(mIoU=to_float(result['mIoU']), aAcc=to_float(result['aAcc']),
             mAcc=to_float(result['mAcc']), num_images=num_images,
             IoU={n: to_float(v) for n, v in zip(names, result['IoU'])},
             Acc={n: to_float(v) for n, v in zip(names, result['Acc'])})
  return files.atomic_write(os.path.join(workdir, 'eval_results.json'), json.dumps(out, indent=2))
