"""Seeded few-shot subsets of a training source (1/N of the examples).

The reference draws an unseeded random subset; here it is
`np.random.default_rng(seed).permutation(num_examples)[:num_examples // N]`,
sorted. For one seed and count the subsets are nested (the 1/16 subset is part
of the 1/8 one, and so on), as they are prefixes of one permutation. The chosen
names are written to WORKDIR/fewshot_1of{N}.txt, which a resumed run reads back
instead of drawing again, so the subset survives a change of machine or NumPy.
"""
import os
import re
import tempfile

import numpy as np

from internseg_jax.data.sources import DataError, SkippingSource

_HEADER = re.compile(r'#.*fraction=1/(\d+) seed=(-?\d+) count=(\d+) of (\d+)')


def fewshot_indices(num_examples: int, fraction: int, seed: int) -> np.ndarray:
  """Sorted indices of `num_examples // fraction` examples (all for fraction 1)."""
  if int(fraction) != fraction or fraction < 1:
    raise ValueError(f'fraction must be a positive integer (1/N of the data), got {fraction}')
  count = num_examples // int(fraction)
  if count < 1:
    raise ValueError(f'1/{fraction} of {num_examples} examples is empty')
  if fraction == 1:
    return np.arange(num_examples)
  return np.sort(np.random.default_rng(seed).permutation(num_examples)[:count])


def subset_path(workdir: str, fraction: int) -> str:
  return os.path.join(workdir, f'fewshot_1of{int(fraction)}.txt')


def write_subset(workdir: str, names, indices, fraction: int, seed: int) -> str:
  """Writes the names at `indices` (one per line, under a header comment) atomically.

  `names` are all the source's names; the file lists the chosen ones, without
  extension, in index order (mmseg's split-file format, plus the header).
  """
  os.makedirs(workdir, exist_ok=True)
  path = subset_path(workdir, fraction)
  lines = [f'# internseg_jax few-shot subset: fraction=1/{int(fraction)} seed={int(seed)} '
           f'count={len(indices)} of {len(names)}']
  lines += [names[int(i)] for i in indices]
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + '.', dir=workdir)
  try:
    with os.fdopen(fd, 'w') as f:
      f.write('\n'.join(lines) + '\n')
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


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
  """`source` itself for fraction 1, else its 1/fraction SubsetSource.

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
  indices = fewshot_indices(len(source), fraction, seed)
  if path and write:
    write_subset(workdir, source.names, indices, fraction, seed)
  return SubsetSource(source, indices)
