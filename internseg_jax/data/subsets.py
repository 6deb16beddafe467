"""Few-shot subsets of a training source (1/N of the examples), drawn as the reference draws them.

In the reference (InternVL segmentation, configs ade20k_504x504_1of{N}.py:
`max_image_num=20210 // N`), mmseg lists images/training/*.jpg sorted by file
name (CustomDataset.load_annotations); tools/train.py has just called
`set_random_seed(seed)`, whose first call is `random.seed(seed)`, with the run's
seed (`--seed`, else drawn at random; printed in the training log as "Set random
seed to S"); nothing consumes Python's `random` between that and the dataset
(the model is built and initialised with torch's generator); then its
ADE20KDataset calls `random.shuffle(self.img_infos)` and keeps the first
20210 // N. `fewshot_indices(n, N, seed)` makes exactly those two calls on the
list positions, so data.subset_seed=S with the full 20,210-image training list
selects the images of a released run whose log shows seed S, in the same order.
For one seed the subsets are nested (1/16 within 1/8 ...): prefixes of one shuffle.

The chosen names are written to WORKDIR/fewshot_1of{N}.txt (in that order), which
a resumed run reads back instead of drawing again, so the subset survives a
change of machine or Python.
"""
import os
import random
import re

import numpy as np

from internseg_jax import files
from internseg_jax.data.sources import DataError, SkippingSource

_HEADER = re.compile(r'#.*fraction=1/(\d+) seed=(-?\d+) count=(\d+) of (\d+)')
IMAGE_SUFFIX = '.jpg'  # mmseg's ADE20KDataset: img_suffix='.jpg', sorted by file name


def fewshot_indices(num_examples: int, fraction: int, seed: int) -> np.ndarray:
  """Positions in the file-name-sorted list of the `num_examples // fraction`
  examples the reference keeps, in its (shuffled) order; all, in order, for 1.

  `random.Random(seed).shuffle` is `random.seed(seed); random.shuffle(...)` on a
  generator of its own: the same draws (the module functions are methods of one
  hidden Random instance), without resetting the process's global `random`.
  random.shuffle permutes positions only, so shuffling the positions gives the
  permutation the reference applied to its list of image infos.
  """
  if int(fraction) != fraction or fraction < 1:
    raise ValueError(f'fraction must be a positive integer (1/N of the data), got {fraction}')
  if int(seed) != seed:
    raise ValueError(f'seed must be an integer (random.seed of the reference), got {seed!r}')
  count = num_examples // int(fraction)
  if count < 1:
    raise ValueError(f'1/{fraction} of {num_examples} examples is empty')
  if fraction == 1:
    return np.arange(num_examples)
  positions = list(range(num_examples))
  random.Random(int(seed)).shuffle(positions)
  return np.asarray(positions[:count], np.int64)


def mmseg_order(names) -> list[int]:
  """Indices of `names` (file stems) sorted as mmseg sorts the files: by
  file name with its '.jpg' (for ADE's fixed-width names the same as by stem)."""
  return sorted(range(len(names)), key=lambda i: names[i] + IMAGE_SUFFIX)


def subset_path(workdir: str, fraction: int) -> str:
  return os.path.join(workdir, f'fewshot_1of{int(fraction)}.txt')


def write_subset(workdir: str, names, indices, fraction: int, seed: int) -> str:
  """Writes the names at `indices` (one per line, under a header comment) atomically.

  `names` are all the source's names; the file lists the chosen ones, without
  extension, in the order of `indices` (the reference's dataset order; mmseg's
  split-file format, plus the header).
  """
  os.makedirs(workdir, exist_ok=True)
  path = subset_path(workdir, fraction)
  lines = [f'# internseg_jax few-shot subset: fraction=1/{int(fraction)} seed={int(seed)} '
           f'count={len(indices)} of {len(names)} '
           '(sorted by file name, then random.seed(seed); random.shuffle; first count)']
  lines += [names[int(i)] for i in indices]
  return files.atomic_write(path, '\n'.join(lines) + '\n')


def read_subset(path: str) -> tuple[list[str], dict]:
  """(names, {'fraction', 'seed', 'count', 'total'}) of a written subset."""
  with open(path) as f:
    lines = f.read().splitlines()
  header = _HEADER.match(lines[0]) if lines else None
  if not header:
    raise DataError(f'{path}: not a few-shot subset file (no header comment)')
  meta = dict(zip(('fraction', 'seed', 'count', 'total'), map(int, header.groups())))
  names = [line.strip() for line in lines[1:] if line.strip() and not line.startswith('#')]
  if len(names) != meta['count']:
    raise DataError(f'{path}: lists {len(names)} names, its header says {meta["count"]}')
  return names, meta


class SubsetSource:
  """The records of `source` at `indices`, in that order."""

  def __init__(self, source, indices):
    self.source = source
    self.indices = np.asarray(indices, np.int64)
    self.names = [source.names[int(i)] for i in self.indices]

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, index: int) -> dict:
    return self.source[int(self.indices[index])]

  def __repr__(self):
    return f'SubsetSource({self.source!r}, {len(self)} of {len(self.source)})'


def fewshot_source(source, fraction: int, seed: int, workdir: str | None = None,
                   write: bool = True):
  """`source` itself for fraction 1, else its 1/fraction SubsetSource, drawn
  as the reference draws it (see the module docstring) from `source.names`.

  With a workdir, the subset is read from fewshot_1of{N}.txt when present (it
  must have been drawn with the same seed from a source of the same size) and
  otherwise drawn and, if `write` (process 0 only), written there. A
  SkippingSource is applied outside the subset, so that a bad record is
  replaced by another one of the subset.
  """
  if fraction == 1:
    return source
  if isinstance(source, SkippingSource):
    return SkippingSource(fewshot_source(source.source, fraction, seed, workdir, write),
                          source.log_path)
  path = subset_path(workdir, fraction) if workdir else None
  if path and os.path.exists(path):
    names, meta = read_subset(path)
    if (meta['seed'], meta['total']) != (seed, len(source)):
      raise DataError(
          f'{path} was drawn with seed {meta["seed"]} from {meta["total"]} examples, but this '
          f'run has data.subset_seed={seed} and {len(source)} examples; use another workdir '
          'or remove the file to draw again')
    position = {name: i for i, name in enumerate(source.names)}
    missing = [n for n in names if n not in position]
    if missing:
      raise DataError(f'{path} lists {len(missing)} name(s) not in {source!r}: {missing[:5]}')
    return SubsetSource(source, [position[n] for n in names])
  order = mmseg_order(source.names)
  indices = [order[i] for i in fewshot_indices(len(source), fraction, seed)]
  if path and write:
    write_subset(workdir, source.names, indices, fraction, seed)
  return SubsetSource(source, indices)
