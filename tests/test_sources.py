"""The folder source, decoding as mmseg decodes, bad records, make_source and the
scene_parse150 refusal (the TFDS source: tests/test_tfds.py; subsets: test_subsets.py)."""
import io
import os
import pickle
import shutil

import cv2
import ml_collections
import numpy as np
import pytest
from PIL import Image

from internseg_jax import errors
from internseg_jax.data import sources, synthetic

NUM_TRAIN, NUM_VAL = 6, 4


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('ade') / 'ADEChallengeData2016')
  return synthetic.write_ade_folder(root, NUM_TRAIN, NUM_VAL, size_range=(24, 40), seed=3)


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


def _bad_label(kind, path):
  label = cv2.imread(path, cv2.IMREAD_UNCHANGED)
  if kind == 'mis-sized':
    label = label[:-3]
  elif kind == 'out of range':
    label[0, 0] = 151
  else:
    label = np.stack([label] * 3, -1)
  cv2.imwrite(path, label)


def test_data_error_is_the_projects(folder):
  assert sources.DataError is errors.DataError
  with pytest.raises(errors.InternSegError):
    sources.ADEFolder(folder + '_missing')


def _jpeg_with_orientation(image_rgb, orientation):
  exif = Image.Exif()
  exif[0x0112] = orientation  # EXIF Orientation
  buf = io.BytesIO()
  Image.fromarray(image_rgb).save(buf, 'JPEG', quality=95, exif=exif.tobytes())
  return buf.getvalue()


def test_decode_image_applies_exif_orientation_as_mmcv():
  # mmcv.imfrombytes(flag='color') is cv2.imdecode(IMREAD_COLOR), which turns
  # the pixels by the EXIF orientation; 6 = rotate 90 degrees clockwise.
  image = np.zeros((20, 40, 3), np.uint8)
  image[:5, :10] = (250, 20, 20)
  data = _jpeg_with_orientation(image, 6)
  unturned = cv2.imdecode(np.frombuffer(data, np.uint8),
                          cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
  decoded = sources.decode_image(data, 'x.jpg')
  assert decoded.shape == (40, 20, 3) and decoded.dtype == np.uint8
  np.testing.assert_array_equal(decoded, np.rot90(unturned[..., ::-1], -1))
  assert decoded[:10, -5:, 0].mean() > 200      # the red corner went top-left -> top-right
  grey = cv2.imencode('.png', image[..., 0])[1].tobytes()
  assert sources.decode_image(grey, 'g.png').shape == (20, 40, 3)
  with pytest.raises(sources.DataError, match='x.jpg: not a readable image'):
    sources.decode_image(data[:30], 'x.jpg')


def test_decode_label_as_mmseg_loads_annotations():
  rng = np.random.default_rng(0)
  label = rng.integers(0, 151, (12, 9), dtype=np.uint8)
  label[0, 0] = 255
  png = cv2.imencode('.png', label)[1].tobytes()
  np.testing.assert_array_equal(sources.decode_label(png, 'l.png', 150), label)
  # mmseg decodes labels with pillow ('unchanged'): a palette PNG gives its indices,
  # whatever colours the palette holds (OpenCV would give those colours).
  palette_image = Image.fromarray(label, mode='P')
  palette_image.putpalette(list(rng.integers(0, 256, 768, dtype=np.uint8)))
  buf = io.BytesIO()
  palette_image.save(buf, 'PNG')
  np.testing.assert_array_equal(sources.decode_label(buf.getvalue(), 'p.png', 150), label)
  for bad, message in ((cv2.imencode('.png', np.stack([label] * 3, -1))[1].tobytes(),
                        'single-channel 8-bit'),
                       (cv2.imencode('.png', label.astype(np.uint16))[1].tobytes(), 'uint16'),
                       (png[:40], 'not a readable label map'), (b'', 'not a readable label map')):
    with pytest.raises(sources.DataError, match='l.png: .*' + message):
      sources.decode_label(bad, 'l.png', 150)
  label[1, 1] = 200
  with pytest.raises(sources.DataError, match=r'values \[200\] outside 0..150 and 255'):
    sources.decode_label(cv2.imencode('.png', label)[1].tobytes(), 'l.png', 150)
  with pytest.raises(sources.DataError, match='label is 9x12 but the image is 9x11'):
    sources.decode_label(png, 'l.png', 150, (11, 9))
  assert sources.decode_label(png, 'l.png', 150, (12, 9)).shape == (12, 9)


def test_make_source(folder, tmp_path, monkeypatch):
  assert isinstance(sources.make_source(_config(root=folder), 'training'), sources.ADEFolder)
  skipping = sources.make_source(_config(root=folder, skip_bad=True), 'training', str(tmp_path))
  assert isinstance(skipping, sources.SkippingSource)
  assert skipping.log_path == str(tmp_path / 'skipped_training.tsv')
  with pytest.raises(sources.DataError, match="'folder' or 'tfds'"):
    sources.make_source(_config(root=folder, source='tfrecord'), 'training')
  with pytest.raises(sources.DataError, match='data.root is not set'):
    sources.make_source(_config(), 'training')
  with pytest.raises(sources.DataError, match="replaced by data.source='tfds'.*prepare"):
    sources.make_source(_config(root=folder, source='array_record'), 'training')
  # data.source=tfds without a root looks where tfds looks: $TFDS_DATA_DIR.
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tfds_home'))
  with pytest.raises(sources.DataError, match=f'{tmp_path}/tfds_home holds no built '
                                              'ade20k_scene_parsing dataset'):
    sources.make_source(_config(source='tfds'), 'training')


def test_refuses_scene_parse150(tmp_path):
  tfds_dir = tmp_path / 'tensorflow_datasets'
  (tfds_dir / 'scene_parse150' / '1.0.0').mkdir(parents=True)
  (tfds_dir / 'scene_parse150' / '1.0.0' / 'dataset_info.json').write_text(
      '{"name": "scene_parse150"}')
  renamed = tmp_path / 'ade'
  renamed.mkdir()
  (renamed / 'dataset_info.json').write_text('{"name": "scene_parse150", "version": "1.0.0"}')
  configs = [_config(root=str(tmp_path), source='scene_parse150'),
             _config(root=str(tfds_dir)), _config(root=str(tfds_dir), source='tfds'),
             _config(root=str(tfds_dir / 'scene_parse150' / '1.0.0'), source='tfds'),
             _config(root=str(renamed), source='tfds')]
  for config in configs:
    with pytest.raises(sources.DataError) as e:
      sources.make_source(config, 'training')
    for part in ('instance masks', '100 instance', '150-class ADEChallengeData2016',
                 'python -m internseg_jax.data.prepare', 'data.source=tfds'):
      assert part in str(e.value)
  # A dataset that only mentions scene_parse150 (as ours may in its text) is not refused.
  ours = tmp_path / 'ours'
  ours.mkdir()
  (ours / 'dataset_info.json').write_text(
      '{"name": "ade20k_scene_parsing", "description": "not scene_parse150"}')
  sources.check_not_scene_parse150(str(ours), 'tfds')


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


