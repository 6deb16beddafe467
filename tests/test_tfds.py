"""The TFDS dataset ade20k_scene_parsing: built by prepare (tfds's Python API) and read by
TfdsSource, without TensorFlow; the same examples in the same order as the folder."""
import importlib.util
import io
import json
import os
import pickle
import shutil
import sys
import zipfile

import cv2
import ml_collections
import numpy as np
import pytest
from PIL import Image

from internseg_jax.data import pipeline, prepare, sources, synthetic
from internseg_jax.data.ade20k_meta import CLASSES

NUM_TRAIN, NUM_VAL = 6, 4
VERSION_DIR = os.path.join('ade20k_scene_parsing', '1.0.0')


def _label_path(root, split='training', i=1):
  return os.path.join(root, 'annotations', split, f'ADE_{split[:5]}_{i:08d}.png')


def _image_path(root, split='training', i=1):
  return os.path.join(root, 'images', split, f'ADE_{split[:5]}_{i:08d}.jpg')


def _odd_files(root):
  """An EXIF-rotated JPEG and a palette label PNG, which decoders treat differently."""
  path = _image_path(root, 'training', 2)
  image = np.asarray(Image.open(path))
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
  Image.fromarray(image).save(path, 'JPEG', quality=95, exif=exif.tobytes())
  label = np.asarray(Image.open(_label_path(root, 'training', 2)))
  palette = Image.fromarray(np.ascontiguousarray(np.rot90(label, -1)), mode='P')
  palette.putpalette([(7 * i) % 256 for i in range(768)])
  palette.save(_label_path(root, 'training', 2))


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('ade') / 'ADEChallengeData2016')
  synthetic.write_ade_folder(root, NUM_TRAIN, NUM_VAL, size_range=(24, 40), seed=3)
  _odd_files(root)
  return root


@pytest.fixture(scope='module')
def built(folder, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('tfds'))
  assert prepare.main([f'--root={folder}', f'--out={out}', '--workers=2']) == 0
  return out


def _config(**kw):
  base = dict(root=None, source='tfds', num_classes=150, reduce_zero_label=True, skip_bad=False)
  return ml_collections.ConfigDict({**base, **kw})


def _assert_same(a, b):
  assert len(a) == len(b) and a.names == b.names
  for i in range(len(a)):
    ra, rb = a[i], b[i]
    assert ra['name'] == rb['name'] == a.names[i]
    for key in ('image', 'label'):
      assert ra[key].dtype == rb[key].dtype == np.uint8
      np.testing.assert_array_equal(ra[key], rb[key])


def test_no_tensorflow_to_build_or_read(built):
  assert importlib.util.find_spec('tensorflow') is None
  sources.TfdsSource(built, 'training')[0]
  assert 'tensorflow' not in sys.modules


@pytest.mark.parametrize('split', sources.SPLITS)
def test_tfds_matches_folder(folder, built, split):
  records = sources.make_source(_config(root=built), split)
  assert isinstance(records, sources.TfdsSource)
  _assert_same(sources.ADEFolder(folder, split), records)
  assert len(records) == (NUM_TRAIN if split == 'training' else NUM_VAL)
  raw = sources.TfdsSource(built, split, reduce_zero_label=False)[0]['label']
  np.testing.assert_array_equal(np.where(raw == 0, 255, raw - 1), records[0]['label'])
  if split == 'training':  # the EXIF-rotated image, and the palette label as indices
    assert records[2]['image'].shape[:2] == records[2]['label'].shape
    assert records[2]['image'].shape[:2] == cv2.imread(_image_path(folder, split, 2)).shape[:2]
  clone = pickle.loads(pickle.dumps(records))
  assert clone._records is None and len(pickle.dumps(records)) < 4096
  np.testing.assert_array_equal(clone[1]['image'], records[1]['image'])


def test_built_dataset_as_tfds_sees_it(folder, built):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  path = os.path.join(built, VERSION_DIR)
  builder = tfds.builder_from_directory(path)
  info = builder.info
  assert (info.name, str(info.version), info.file_format.value) == (
      'ade20k_scene_parsing', '1.0.0', 'array_record')
  assert info.disable_shuffling
  assert {s: info.splits[s].num_examples for s in info.splits} == {
      'train': NUM_TRAIN, 'validation': NUM_VAL}
  assert isinstance(info.features['image'], tfds.features.Image)
  assert info.features['image'].encoding_format == 'jpeg'
  assert info.features['annotation'].names == ['other'] + [c.strip() for c in CLASSES]
  assert info.metadata['class_names'] == list(CLASSES)          # exact, with mmseg's 'bed '
  assert info.metadata['file_names']['train'] == [f'ADE_train_{i:08d}' for i in range(NUM_TRAIN)]
  assert info.metadata['skipped'] == {'train': [], 'validation': []}
  assert sorted(f for f in os.listdir(path) if '.array_record-' in f) == [
      'ade20k_scene_parsing-train.array_record-00000-of-00001',
      'ade20k_scene_parsing-validation.array_record-00000-of-00001']
  assert sorted(os.listdir(built)) == ['ade20k_scene_parsing']  # nothing else left behind
  # The stored bytes are the files', unchanged, in file order.
  skip = tfds.decode.SkipDecoding()
  records = builder.as_data_source('train', decoders={'image': skip, 'annotation': skip})
  for i in range(NUM_TRAIN):
    record = records[i]
    assert record['file_name'].decode() == f'ADE_train_{i:08d}.jpg'
    with open(_image_path(folder, 'training', i), 'rb') as f:
      assert record['image'] == f.read()
    with open(_label_path(folder, 'training', i), 'rb') as f:
      assert record['annotation'] == f.read()


def test_grain_pipeline_same_batches_as_folder(folder, built):
  kwargs = dict(global_batch_size=4, seed=0, transform=pipeline.default_transform(crop_size=32),
                with_metadata=True, process_index=0, process_count=1)
  with pipeline.train_loader(sources.ADEFolder(folder, 'training'), **kwargs) as it:
    want = [next(it) for _ in range(3)]
  # One spawned grain worker: it unpickles the source and opens tfds itself.
  with pipeline.train_loader(sources.TfdsSource(built, 'training'), num_workers=1, prefetch=1,
                             **kwargs) as it:
    got = [next(it) for _ in range(3)]
  for a, b in zip(want, got):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_prepare_from_zip_and_manual_dir_match_folder(folder, built, tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from internseg_jax.data import tfds_ade20k  # pylint: disable=g-import-not-at-top
  manual = tmp_path / 'manual'
  manual.mkdir()
  zip_path = str(manual / 'ADEChallengeData2016.zip')
  with zipfile.ZipFile(zip_path, 'w') as z:
    for dirpath, _, files in os.walk(folder):
      for f in files:
        full = os.path.join(dirpath, f)
        z.write(full, os.path.relpath(full, os.path.dirname(folder)))
    z.writestr('__MACOSX/ADEChallengeData2016/images/training/._ADE_train_00000000.jpg', b'x')
    z.writestr('ADEChallengeData2016/objectInfo150.txt', 'Idx\tRatio')
  out = str(tmp_path / 'from_zip')
  prepare.prepare(out, zip_path=zip_path, progress=False)
  # What `tfds build --manual_dir` does: the builder finds the zip in the manual dir.
  data_dir = str(tmp_path / 'from_manual_dir')
  tfds_ade20k.Ade20kSceneParsing(data_dir=data_dir).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  for split in sources.SPLITS:
    _assert_same(sources.TfdsSource(built, split), sources.TfdsSource(out, split))
    _assert_same(sources.TfdsSource(built, split), sources.TfdsSource(data_dir, split))
  with pytest.raises(sources.DataError, match='array_record only'):
    tfds_ade20k.Ade20kSceneParsing(data_dir=data_dir, file_format='tfrecord')
  with pytest.raises(sources.DataError, match='holds neither ADEChallengeData2016/ nor'):
    tfds_ade20k.find_in_manual_dir(str(tmp_path))


def _copy(folder, tmp_path):
  return shutil.copytree(folder, str(tmp_path / 'ADEChallengeData2016'))


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
  _bad_label(kind, _label_path(root, 'validation', 1))
  out = str(tmp_path / 'out')
  with pytest.raises(sources.DataError, match='ADE_valid_00000001.png: .*' + message):
    prepare.prepare(out, root, progress=False)
  assert prepare.main([f'--root={root}', f'--out={out}']) == 1
  assert 'ADE_valid_00000001.png' in capsys.readouterr().err
  assert os.listdir(out) == []  # neither split, nor tfds's temporary folders


def test_prepare_skip_bad_reports(folder, tmp_path, capsys):
  root = _copy(folder, tmp_path)
  _bad_label('rgb', _label_path(root, i=1))
  os.remove(_label_path(root, 'validation', 2))
  with open(_image_path(root, 'training', 4), 'wb') as f:
    f.write(b'\xff\xd8 truncated')
  out = str(tmp_path / 'out')
  assert prepare.main([f'--root={root}', f'--out={out}', '--skip_bad']) == 0
  stdout = capsys.readouterr().out
  assert 'train: skipped 2 bad example(s): ADE_train_00000001, ADE_train_00000004' in stdout
  assert 'validation: skipped 1 bad example(s): ADE_valid_00000002' in stdout
  train = sources.TfdsSource(out, 'training')
  assert len(train) == NUM_TRAIN - 2
  assert {'ADE_train_00000001', 'ADE_train_00000004'}.isdisjoint(train.names)
  folder_source = sources.ADEFolder(root, 'training')
  for i, name in enumerate(train.names):
    want = folder_source[folder_source.names.index(name)]
    np.testing.assert_array_equal(train[i]['image'], want['image'])
    np.testing.assert_array_equal(train[i]['label'], want['label'])
  with open(os.path.join(out, VERSION_DIR, 'metadata.json')) as f:
    skipped = json.load(f)['skipped']
  assert [s['name'] for s in skipped['validation']] == ['ADE_valid_00000002']
  assert 'no label' in skipped['validation'][0]['error']


def test_prepare_keeps_old_dataset(folder, built, tmp_path, capsys):
  out = shutil.copytree(built, str(tmp_path / 'out'))
  root = _copy(folder, tmp_path)
  with pytest.raises(sources.DataError, match='exists already .*--overwrite'):
    prepare.prepare(out, root, progress=False)
  _bad_label('rgb', _label_path(root, 'validation', 1))
  with pytest.raises(sources.DataError, match='ADE_valid_00000001.png'):
    prepare.prepare(out, root, overwrite=True, progress=False)
  assert sorted(os.listdir(out)) == ['ade20k_scene_parsing']
  _assert_same(sources.TfdsSource(built, 'validation'), sources.TfdsSource(out, 'validation'))
  # --overwrite with good data replaces it.
  os.remove(_image_path(root, 'validation', 1))
  os.remove(_label_path(root, 'validation', 1))
  assert prepare.main([f'--root={root}', f'--out={out}', '--overwrite']) == 0
  assert 'ADE_valid_00000001' not in sources.TfdsSource(out, 'validation').names
  assert sorted(os.listdir(out)) == ['ade20k_scene_parsing']


def test_bad_records_in_the_files_named_or_skipped(folder, tmp_path, monkeypatch):
  from internseg_jax.data import tfds_ade20k  # pylint: disable=g-import-not-at-top
  root = _copy(folder, tmp_path)
  _bad_label('out of range', _label_path(root, 'training', 1))
  with open(_image_path(root, 'training', 3), 'wb') as f:
    f.write(b'\xff\xd8 truncated')
  # Files written by another tool (here: the builder with its checks off).
  monkeypatch.setattr(tfds_ade20k, '_check', lambda item, num_classes: None)
  out = str(tmp_path / 'out')
  prepare.prepare(out, root, progress=False)
  source = sources.TfdsSource(out, 'training')
  for i, message in ((1, r'ADE_train_00000001.png: label values \[151\]'),
                     (3, 'ADE_train_00000003.jpg: not a readable image')):
    with pytest.raises(sources.DataError, match=rf'1.0.0 train\[{i}\] \(ADE_train_0000000{i}\)'
                                                rf'.*{message}'):
      source[i]
  skipping = sources.make_source(_config(root=out, skip_bad=True), 'training', str(tmp_path))
  names = [skipping[i]['name'] for i in range(len(skipping))]
  assert names == ['ADE_train_00000000', 'ADE_train_00000002', 'ADE_train_00000002',
                   'ADE_train_00000004', 'ADE_train_00000004', 'ADE_train_00000005']
  with open(tmp_path / 'skipped_training.tsv') as f:
    assert [line.split('\t')[0] for line in f] == ['ADE_train_00000001', 'ADE_train_00000003']
  with pytest.raises(IndexError):
    source[NUM_TRAIN]


def test_tfds_source_errors(built, tmp_path):
  with pytest.raises(sources.DataError, match='holds no built ade20k_scene_parsing.*prepare'):
    sources.TfdsSource(str(tmp_path), 'training')
  out = shutil.copytree(built, str(tmp_path / 'out'))
  path = os.path.join(out, VERSION_DIR)
  # The version folder itself is accepted too; interrupted builds are not taken.
  os.makedirs(os.path.join(out, 'ade20k_scene_parsing', 'incomplete.ABC_1.0.1'))
  assert sources.TfdsSource(path, 'validation').path == sources.TfdsSource(out, 'validation').path
  with open(os.path.join(path, 'metadata.json')) as f:
    metadata = json.load(f)
  metadata['file_names']['train'] = metadata['file_names']['train'][:-1]
  with open(os.path.join(path, 'metadata.json'), 'w') as f:
    json.dump(metadata, f)
  with pytest.raises(sources.DataError, match='lists 5 train names, dataset_info.json 6'):
    sources.TfdsSource(out, 'training')
  with open(os.path.join(path, 'metadata.json'), 'w') as f:
    f.write('{not json')
  with pytest.raises(sources.DataError, match='metadata.json: unreadable'):
    sources.TfdsSource(out, 'training')
  with open(os.path.join(path, 'dataset_info.json')) as f:
    info = json.load(f)
  with open(os.path.join(path, 'dataset_info.json'), 'w') as f:
    json.dump({**info, 'name': 'other_dataset'}, f)
  with pytest.raises(sources.DataError, match="dataset 'other_dataset', not ade20k_scene_parsing"):
    sources.TfdsSource(out, 'training')
