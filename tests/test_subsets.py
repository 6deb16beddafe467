"""Few-shot subsets: the reference's draw (mmseg's sorted list, random.seed, random.shuffle),
written to the workdir and reread on resume."""
import os
import random
import shutil

import numpy as np
import pytest

from internseg_jax.data import sources, subsets, synthetic

# The ADEChallengeData2016 training files, as mmseg lists them (1-based numbering).
ADE_TRAIN_FILES = [f'ADE_train_{i:08d}.jpg' for i in range(1, 20211)]
# Computed once by reference_subset below (independent of internseg_jax): the first
# 1/16 images of a run whose log says "Set random seed to 1714052397", and of seed 0.
PINNED_SEED_1714052397 = ['ADE_train_00003045', 'ADE_train_00006199', 'ADE_train_00016899',
                          'ADE_train_00003874', 'ADE_train_00011491', 'ADE_train_00005955']
PINNED_SEED_0 = ['ADE_train_00001609', 'ADE_train_00006908', 'ADE_train_00018002',
                 'ADE_train_00003067', 'ADE_train_00003162', 'ADE_train_00001832']


def reference_subset(files, fraction, seed):
  """The reference's calls, written from its code: mmseg's CustomDataset.load_annotations
  sorts the image infos by file name; tools/train.py's set_random_seed(seed) calls
  random.seed(seed) (then seeds numpy and torch, which leaves `random` alone); InternVL's
  ADE20KDataset(max_image_num=20210 // N) calls random.shuffle(self.img_infos) and
  keeps the first max_image_num. Uses the global `random`, as the reference does."""
  img_infos = sorted((dict(filename=f, ann=dict(seg_map=f.replace('.jpg', '.png')))
                      for f in files), key=lambda x: x['filename'])
  state = random.getstate()
  try:
    random.seed(seed)
    random.shuffle(img_infos)
  finally:
    random.setstate(state)
  return [os.path.splitext(info['filename'])[0] for info in img_infos[:len(files) // fraction]]


class _Names:
  """A source with names only, in an arbitrary order (as a source may list them)."""

  def __init__(self, names):
    self.names = list(names)

  def __len__(self):
    return len(self.names)

  def __getitem__(self, i):
    return {'name': self.names[i]}


@pytest.mark.parametrize('fraction', [16, 8, 4, 2])
@pytest.mark.parametrize('seed', [0, 1714052397])
def test_fewshot_matches_reference_calls(fraction, seed):
  source = _Names(sorted(f[:-4] for f in ADE_TRAIN_FILES))
  subset = subsets.fewshot_source(source, fraction, seed)
  assert subset.names == reference_subset(ADE_TRAIN_FILES, fraction, seed)
  assert len(subset) == 20210 // fraction


def test_fewshot_pinned_prefixes():
  # Pinned, so a Python whose random.shuffle draws differently is noticed.
  source = _Names(f[:-4] for f in ADE_TRAIN_FILES)
  assert subsets.fewshot_source(source, 16, 1714052397).names[:6] == PINNED_SEED_1714052397
  assert subsets.fewshot_source(source, 16, 0).names[:6] == PINNED_SEED_0
  assert reference_subset(ADE_TRAIN_FILES, 16, 0)[:6] == PINNED_SEED_0
  # A small list: positions 7, 3, 2, 8, 5 of [0..9] for seed 42, by the same independent calls.
  small = [f'img{i}.jpg' for i in range(10)]
  assert reference_subset(small, 2, 42) == ['img7', 'img3', 'img2', 'img8', 'img5']
  assert subsets.fewshot_indices(10, 2, 42).tolist() == [7, 3, 2, 8, 5]


def test_fewshot_sorts_by_file_name_and_leaves_global_random_alone():
  # mmseg sorts by file name with '.jpg': 'a-b.jpg' < 'a.jpg', although stem 'a' < 'a-b'.
  files = ['a.jpg', 'a-b.jpg', 'c.jpg', 'b.jpg', 'a_c.jpg', 'd.jpg']
  source = _Names(sorted(f[:-4] for f in files))     # the sources' order: by stem
  random.seed(123)
  before = random.random()
  random.seed(123)
  subset = subsets.fewshot_source(source, 2, 7)
  assert random.random() == before
  assert subset.names == reference_subset(files, 2, 7)


@pytest.mark.parametrize('fraction', [16, 8, 4, 2, 1])
def test_fewshot_sizes_and_nesting(fraction):
  indices = subsets.fewshot_indices(20210, fraction, seed=0)
  assert len(indices) == 20210 // fraction == len(np.unique(indices))
  assert indices.min() >= 0 and indices.max() < 20210
  # Prefixes of one shuffle: 1/16 within 1/8 within 1/4 ... for one seed.
  if fraction > 1:
    np.testing.assert_array_equal(indices[:20210 // 16],
                                  subsets.fewshot_indices(20210, 16, seed=0))
  else:
    np.testing.assert_array_equal(indices, np.arange(20210))


def test_fewshot_seeded():
  a = subsets.fewshot_indices(20210, 8, seed=0)
  np.testing.assert_array_equal(a, subsets.fewshot_indices(20210, 8, seed=0))
  assert not np.array_equal(a, subsets.fewshot_indices(20210, 8, seed=1))
  for bad in ((20210, 0, 0), (20210, 2.5, 0), (20210, 8, 0.5), (3, 4, 0)):
    with pytest.raises(ValueError):
      subsets.fewshot_indices(*bad)


def test_write_subset_round_trip(tmp_path):
  names = [f'ADE_train_{i:08d}' for i in range(100)]
  indices = subsets.fewshot_indices(100, 4, seed=7)
  path = subsets.write_subset(str(tmp_path), names, indices, 4, 7)
  assert path == str(tmp_path / 'fewshot_1of4.txt')
  with open(path) as f:
    lines = f.read().splitlines()
  assert lines[0].startswith('#') and 'fraction=1/4 seed=7' in lines[0]
  read, meta = subsets.read_subset(path)
  assert read == [names[i] for i in indices]           # in the drawn order, not sorted
  assert meta == {'fraction': 4, 'seed': 7, 'count': 25, 'total': 100}
  assert os.listdir(tmp_path) == ['fewshot_1of4.txt']


def test_fewshot_source_reuses_written_list(tmp_path, monkeypatch):
  source = _Names(f'n{i:03d}' for i in range(64))
  assert subsets.fewshot_source(source, 1, 0, str(tmp_path)) is source
  subset = subsets.fewshot_source(source, 4, 3, str(tmp_path))
  assert len(subset) == 16 and [subset[i]['name'] for i in range(16)] == subset.names
  assert subsets.read_subset(str(tmp_path / 'fewshot_1of4.txt'))[0] == subset.names
  # A resumed run reads the list back, even if the draw would now differ.
  monkeypatch.setattr(subsets, 'fewshot_indices', lambda *a: np.arange(16))
  again = subsets.fewshot_source(source, 4, 3, str(tmp_path))
  assert again.names == subset.names
  with pytest.raises(sources.DataError, match='seed 3'):
    subsets.fewshot_source(source, 4, 5, str(tmp_path))


def _config(**kw):
  import ml_collections  # pylint: disable=g-import-not-at-top
  base = dict(root=None, source='folder', num_classes=150, reduce_zero_label=True, skip_bad=False)
  return ml_collections.ConfigDict({**base, **kw})


def test_fewshot_source_skips_within_subset(tmp_path):
  root = synthetic.write_ade_folder(str(tmp_path / 'ADEChallengeData2016'), 6, 1,
                                    size_range=(24, 32), seed=3)
  full = sources.make_source(_config(root=root, skip_bad=True), 'training')
  subset = subsets.fewshot_source(full, 2, 0, str(tmp_path / 'work'), write=False)
  assert isinstance(subset, sources.SkippingSource)
  assert isinstance(subset.source, subsets.SubsetSource) and len(subset) == 3
  assert not (tmp_path / 'work').exists()
  os.remove(os.path.join(root, 'images', 'training', subset.names[0] + '.jpg'))
  names = [subset[i]['name'] for i in range(len(subset))]
  assert set(names) <= set(subset.names[1:]) and subset.skipped == [subset.names[0]]
  shutil.rmtree(root)
