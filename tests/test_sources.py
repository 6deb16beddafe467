"""Folder and ArrayRecord sources, prepare, bad records and few-shot subsets."""
import hashlib
import json
import os
import pickle
import shutil
import zipfile

import cv2
import ml_collections
import numpy as np
import pytest
from array_record.python import array_record_module

from internseg_jax.data import prepare, sources, subsets, synthetic

NUM_TRAIN, NUM_VAL = 6, 4
PINNED_1OF16_SEED0 = [22, 47, 86, 118, 127]  # fewshot_indices(20210, 16, 0)[:5]


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('ade') / 'ADEChallengeData2016')
  return synthetic.write_ade_folder(root, NUM_TRAIN, NUM_VAL, size_range=(24, 40), seed=3)


@pytest.fixture(scope='module')
def prepared(folder, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('records'))
  assert prepare.main([f'--root={folder}', f'--out={out}', '--workers=2']) == 0
  return out


def _copy(folder, tmp_path):
  return shutil.copytree(folder, str(tmp_path / 'ADEChallengeData2016'))


def _label_path(root, split='training', i=1):
  return os.path.join(root, 'annotations', split, f'ADE_{split[:5]}_{i:08d}.png')


def _assert_same(a, b):
  assert len(a) == len(b) and a.names == b.names
  for i in range(len(a)):
    ra, rb = a[i], b[i]
    assert ra['name'] == rb['name']
    for key in ('image', 'label'):
      assert ra[key].dtype == rb[key].dtype == np.uint8
      np.testing.assert_array_equal(ra[key], rb[key])


def _config(**kw):
  base = dict(root=None, source='folder', num_classes=150, reduce_zero_label=True, skip_bad=False)
  return ml_collections.ConfigDict({**base, **kw})


@pytest.mark.parametrize('split', sources.SPLITS)
def test_array_record_matches_folder(folder, prepared, split):
  records = sources.ArrayRecordSource(prepared, split, verify=True)
  _assert_same(sources.ADEFolder(folder, split), records)
  with open(os.path.join(prepared, f'{split}.json')) as f:
    index = json.load(f)
  assert index['count'] == len(records) == (NUM_TRAIN if split == 'training' else NUM_VAL)
  assert index['skipped'] == []
  with open(os.path.join(prepared, f'{split}.array_record'), 'rb') as f:
    assert hashlib.sha256(f.read()).hexdigest() == index['sha256']
  raw = sources.ArrayRecordSource(prepared, split, reduce_zero_label=False)[0]['label']
  np.testing.assert_array_equal(np.where(raw == 0, 255, raw - 1), records[0]['label'])


def test_prepare_from_zip_matches_folder(folder, prepared, tmp_path):
  zip_path = str(tmp_path / 'ADEChallengeData2016.zip')
  with zipfile.ZipFile(zip_path, 'w') as z:
    for dirpath, _, files in os.walk(folder):
      for f in files:
        full = os.path.join(dirpath, f)
        z.write(full, os.path.relpath(full, os.path.dirname(folder)))
    z.writestr('__MACOSX/ADEChallengeData2016/images/training/._ADE_train_00000000.jpg', b'x')
    z.writestr('ADEChallengeData2016/objectInfo150.txt', 'Idx\tRatio')
  out = str(tmp_path / 'from_zip')
  prepare.prepare(out, zip_path=zip_path, progress=False)
  for split in sources.SPLITS:
    _assert_same(sources.ArrayRecordSource(prepared, split),
                 sources.ArrayRecordSource(out, split, verify=True))


def _bad_label(kind, path):
  label = cv2.imread(path, cv2.IMREAD_UNCHANGED)
  if kind == 'mis-sized':
    label = label[:-3]
  elif kind == 'out of range':
    label[0, 0] = 151
  else:
    label = np.stack([label] * 3, -1)
  cv2.imwrite(path, label)


@pytest.mark.parametrize('kind,message', [('mis-sized', 'label is .* but the image is'),
                                          ('out of range', r'values \[151\] outside 0..150'),
                                          ('rgb', 'single-channel')])
def test_prepare_refuses_bad_labels(folder, tmp_path, capsys, kind, message):
  root = _copy(folder, tmp_path)
  _bad_label(kind, _label_path(root))
  out = str(tmp_path / 'out')
  with pytest.raises(sources.DataError, match='ADE_train_00000001.png: .*' + message):
    prepare.prepare(out, root, splits=['training'], progress=False)
  assert prepare.main([f'--root={root}', f'--out={out}']) == 1
  assert 'ADE_train_00000001.png' in capsys.readouterr().err
  assert not os.path.exists(os.path.join(out, 'training.array_record'))


def test_prepare_skip_bad_reports(folder, tmp_path, capsys):
  root = _copy(folder, tmp_path)
  _bad_label('rgb', _label_path(root, i=1))
  os.remove(_label_path(root, 'validation', 2))
  with open(os.path.join(root, 'images', 'training', 'ADE_train_00000004.jpg'), 'wb') as f:
    f.write(b'\xff\xd8 truncated')
  out = str(tmp_path / 'out')
  assert prepare.main([f'--root={root}', f'--out={out}', '--skip_bad']) == 0
  stdout = capsys.readouterr().out
  assert 'training: skipped 2 bad example(s): ADE_train_00000001, ADE_train_00000004' in stdout
  assert 'validation: skipped 1 bad example(s): ADE_valid_00000002' in stdout
  train = sources.ArrayRecordSource(out, 'training')
  assert len(train) == NUM_TRAIN - 2
  assert {'ADE_train_00000001', 'ADE_train_00000004'}.isdisjoint(train.names)
  with open(os.path.join(out, 'validation.json')) as f:
    skipped = json.load(f)['skipped']
  assert [s['name'] for s in skipped] == ['ADE_valid_00000002']
  assert 'no label' in skipped[0]['error']


def test_prepare_is_atomic(folder, tmp_path, monkeypatch):
  root = _copy(folder, tmp_path)
  _bad_label('out of range', _label_path(root, 'validation', 0))
  out = str(tmp_path / 'out')
  # Training is written fine, validation fails: no split may appear.
  with pytest.raises(sources.DataError, match='ADE_valid_00000000.png'):
    prepare.prepare(out, root, progress=False)
  assert os.listdir(out) == []
  # A failure after the record file is complete (here: its checksum) neither.
  monkeypatch.setattr(sources, 'file_sha256', lambda path: 1 / 0)
  with pytest.raises(ZeroDivisionError):
    prepare.prepare(out, root, splits=['training'], progress=False)
  assert os.listdir(out) == []


def test_prepare_keeps_old_files_on_failure(folder, prepared, tmp_path):
  out = shutil.copytree(prepared, str(tmp_path / 'out'))
  root = _copy(folder, tmp_path)
  _bad_label('rgb', _label_path(root, 'validation', 1))
  with pytest.raises(sources.DataError):
    prepare.prepare(out, root, progress=False)
  assert sorted(os.listdir(out)) == sorted(os.listdir(prepared))
  sources.ArrayRecordSource(out, 'training', verify=True)


def test_array_record_source_errors(prepared, tmp_path):
  with pytest.raises(sources.DataError, match='internseg_jax.data.prepare'):
    sources.ArrayRecordSource(str(tmp_path), 'training')
  out = shutil.copytree(prepared, str(tmp_path / 'out'))
  with open(os.path.join(out, 'training.json')) as f:
    index = json.load(f)
  index['names'], index['count'] = index['names'][:-1], index['count'] - 1
  with open(os.path.join(out, 'training.json'), 'w') as f:
    json.dump(index, f)
  with pytest.raises(sources.DataError, match='prepare it again'):
    sources.ArrayRecordSource(out, 'training')
  shutil.copy(os.path.join(out, 'validation.array_record'),
              os.path.join(out, 'training.array_record'))
  with pytest.raises(sources.DataError, match='SHA-256'):
    sources.ArrayRecordSource(out, 'training', verify=True)


def test_make_source(folder, prepared, tmp_path):
  assert isinstance(sources.make_source(_config(root=folder), 'training'), sources.ADEFolder)
  records = sources.make_source(_config(root=prepared, source='array_record'), 'validation')
  assert isinstance(records, sources.ArrayRecordSource) and len(records) == NUM_VAL
  skipping = sources.make_source(_config(root=folder, skip_bad=True), 'training', str(tmp_path))
  assert isinstance(skipping, sources.SkippingSource)
  assert skipping.log_path == str(tmp_path / 'skipped_training.tsv')
  with pytest.raises(sources.DataError, match="'folder' or 'array_record'"):
    sources.make_source(_config(root=folder, source='tfrecord'), 'training')
  with pytest.raises(sources.DataError, match='data.root is not set'):
    sources.make_source(_config(), 'training')


def test_refuses_scene_parse150(tmp_path):
  tfds_dir = tmp_path / 'tensorflow_datasets'
  (tfds_dir / 'scene_parse150' / '1.0.0').mkdir(parents=True)
  (tfds_dir / 'scene_parse150' / '1.0.0' / 'dataset_info.json').write_text(
      '{"name": "scene_parse150"}')
  renamed = tmp_path / 'ade'
  renamed.mkdir()
  (renamed / 'dataset_info.json').write_text('{"name": "scene_parse150"}')
  configs = [_config(root=str(tmp_path), source='scene_parse150'), _config(root=str(tfds_dir)),
             _config(root=str(tfds_dir / 'scene_parse150' / '1.0.0')),
             _config(root=str(renamed), source='array_record')]
  for config in configs:
    with pytest.raises(sources.DataError) as e:
      sources.make_source(config, 'training')
    for part in ('instance masks', '100 instance', '150-class ADEChallengeData2016',
                 'python -m internseg_jax.data.prepare'):
      assert part in str(e.value)
  with pytest.raises(sources.DataError, match='instance masks'):
    prepare.prepare(str(tmp_path / 'out'), str(tfds_dir / 'scene_parse150'), progress=False)


def _all(source):
  return [source[i] for i in range(len(source))]


def test_skip_bad_folder(folder, tmp_path):
  root = _copy(folder, tmp_path)
  with open(os.path.join(root, 'images', 'training', 'ADE_train_00000002.jpg'), 'wb') as f:
    f.write(b'not a jpeg')
  os.remove(_label_path(root, i=3))
  _bad_label('out of range', _label_path(root, i=5))  # the last: replaced by wrapping around
  bad = {'ADE_train_00000002', 'ADE_train_00000003', 'ADE_train_00000005'}
  with pytest.raises(sources.DataError, match='ADE_train_00000003'):
    sources.ADEFolder(root, 'training')  # unlabeled images are refused up front by default
  plain = sources.ADEFolder(root, 'training', require_labels=False)
  with pytest.raises(sources.DataError, match='ADE_train_00000002.jpg: not a readable image'):
    plain[2]
  log = str(tmp_path / 'skipped.tsv')
  skipping = sources.make_source(_config(root=root, skip_bad=True), 'training', str(tmp_path))
  skipping.log_path = log
  names = [r['name'] for r in _all(skipping)]
  assert len(names) == NUM_TRAIN and not bad & set(names)
  assert names == ['ADE_train_00000000', 'ADE_train_00000001', 'ADE_train_00000004',
                   'ADE_train_00000004', 'ADE_train_00000004', 'ADE_train_00000000']
  assert sorted(skipping.skipped) == sorted(bad)
  assert [r['name'] for r in _all(skipping)] == names  # deterministic, counted once
  assert len(skipping.skipped) == 3
  with open(log) as f:
    assert sorted(line.split('\t')[0] for line in f) == sorted(bad)
  clone = pickle.loads(pickle.dumps(skipping))
  assert clone.skipped == [] and [r['name'] for r in _all(clone)] == names


def _write_records(out, split, records, num_classes=150):
  path = os.path.join(out, f'{split}.array_record')
  writer = array_record_module.ArrayRecordWriter(path, 'group_size:1')
  for r in records:
    writer.write(r)
  writer.close()
  names = [f'rec{i}' for i in range(len(records))]
  with open(os.path.join(out, f'{split}.json'), 'w') as f:
    json.dump({'format': sources.RECORD_FORMAT, 'count': len(records), 'names': names,
               'sha256': sources.file_sha256(path)}, f)


def test_skip_bad_array_record(tmp_path):
  image = np.full((8, 10, 3), 120, np.uint8)
  label = np.ones((8, 10), np.uint8)
  jpg, png = (cv2.imencode(ext, x)[1].tobytes() for ext, x in (('.jpg', image), ('.png', label)))
  bad_png = cv2.imencode('.png', np.full((8, 10), 200, np.uint8))[1].tobytes()

  def rec(i, image_bytes=jpg, label_bytes=png):
    return sources.encode_record(f'rec{i}', image_bytes, label_bytes, 'a.jpg', 'a.png')

  records = [rec(0), rec(1, image_bytes=jpg[:20]), rec(2, label_bytes=bad_png), b'\xc1junk',
             rec(4)]
  _write_records(str(tmp_path), 'training', records)
  source = sources.ArrayRecordSource(str(tmp_path), 'training')
  for i, message in ((1, 'not a readable image'), (2, r'values \[200\]'),
                     (3, 'not a readable record')):
    with pytest.raises(sources.DataError, match=rf'training.array_record\[{i}\] \(rec{i}\).*'
                                                + message):
      source[i]
  skipping = sources.SkippingSource(pickle.loads(pickle.dumps(source)))
  assert [r['name'] for r in _all(skipping)] == ['rec0', 'rec4', 'rec4', 'rec4', 'rec4']
  assert skipping.skipped == ['rec1', 'rec2', 'rec3']
  np.testing.assert_array_equal(skipping[0]['label'], label - 1)
  with pytest.raises(IndexError):
    skipping[5]
  _write_records(str(tmp_path), 'validation', [records[1], records[3]])
  with pytest.raises(sources.DataError, match='all 2 records'):
    sources.SkippingSource(sources.ArrayRecordSource(str(tmp_path), 'validation'))[0]


@pytest.mark.parametrize('fraction', [16, 8, 4, 2, 1])
def test_fewshot_sizes(fraction):
  indices = subsets.fewshot_indices(20210, fraction, seed=0)
  assert len(indices) == 20210 // fraction == len(np.unique(indices))
  assert np.all(np.diff(indices) > 0) and indices[0] >= 0 and indices[-1] < 20210


def test_fewshot_seeded_and_nested():
  a = subsets.fewshot_indices(20210, 8, seed=0)
  np.testing.assert_array_equal(a, subsets.fewshot_indices(20210, 8, seed=0))
  assert not np.array_equal(a, subsets.fewshot_indices(20210, 8, seed=1))
  # Prefixes of one permutation: 1/16 within 1/8 within 1/4 ... for one seed.
  previous = set()
  for fraction in (16, 8, 4, 2, 1):
    current = set(subsets.fewshot_indices(20210, fraction, seed=0).tolist())
    assert previous <= current
    previous = current
  # Pinned, so a NumPy that draws differently is noticed (the written list is
  # what a resumed run uses, see test_fewshot_source_reuses_written_list).
  assert subsets.fewshot_indices(20210, 16, seed=0)[:5].tolist() == PINNED_1OF16_SEED0
  with pytest.raises(ValueError):
    subsets.fewshot_indices(20210, 0, seed=0)


def test_write_subset_round_trip(tmp_path):
  names = [f'ADE_train_{i:08d}' for i in range(100)]
  indices = subsets.fewshot_indices(100, 4, seed=7)
  path = subsets.write_subset(str(tmp_path), names, indices, 4, 7)
  assert path == str(tmp_path / 'fewshot_1of4.txt')
  with open(path) as f:
    lines = f.read().splitlines()
  assert lines[0].startswith('#') and 'fraction=1/4 seed=7' in lines[0]
  read, meta = subsets.read_subset(path)
  assert read == [names[i] for i in indices]
  assert meta == {'fraction': 4, 'seed': 7, 'count': 25, 'total': 100}
  assert os.listdir(tmp_path) == ['fewshot_1of4.txt']


class _Names:
  def __init__(self, n):
    self.names = [f'n{i:03d}' for i in range(n)]

  def __len__(self):
    return len(self.names)

  def __getitem__(self, i):
    return {'name': self.names[i]}


def test_fewshot_source_reuses_written_list(tmp_path, monkeypatch):
  source = _Names(64)
  assert subsets.fewshot_source(source, 1, 0, str(tmp_path)) is source
  subset = subsets.fewshot_source(source, 4, 3, str(tmp_path))
  assert len(subset) == 16 and [subset[i]['name'] for i in range(16)] == subset.names
  # A resumed run reads the list back, even if the draw would now differ.
  monkeypatch.setattr(subsets, 'fewshot_indices', lambda *a: np.arange(16))
  again = subsets.fewshot_source(source, 4, 3, str(tmp_path))
  assert again.names == subset.names
  with pytest.raises(sources.DataError, match='seed 3'):
    subsets.fewshot_source(source, 4, 5, str(tmp_path))


def test_fewshot_source_skips_within_subset(folder, tmp_path):
  root = _copy(folder, tmp_path)
  full = sources.make_source(_config(root=root, skip_bad=True), 'training')
  subset = subsets.fewshot_source(full, 2, 0, str(tmp_path / 'work'), write=False)
  assert isinstance(subset, sources.SkippingSource)
  assert isinstance(subset.source, subsets.SubsetSource) and len(subset) == NUM_TRAIN // 2
  assert not (tmp_path / 'work').exists()
  os.remove(os.path.join(root, 'images', 'training', subset.names[0] + '.jpg'))
  names = [r['name'] for r in _all(subset)]
  assert set(names) <= set(subset.names[1:]) and subset.skipped == [subset.names[0]]
