"""`--mode=eval` and `--mode=predict` end to end on a generated ADE-format folder,
and clear errors for bad data."""
import json
import os
import socket
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from convert import pth_to_orbax
from internseg_jax import api, metrics
from internseg_jax.data import sources, synthetic
from tests import seg_fixtures as fx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = [
    '--config=configs/upernet_frozen.py:tiny',
    f'--config.model.backbone.embed_dim={fx.WIDTH}',
    f'--config.model.decode_head.channels={fx.CHANNELS}',
    f'--config.model.auxiliary_head.channels={fx.CHANNELS}',
    f'--config.model.decode_head.num_classes={fx.CLASSES}',
    f'--config.data.num_classes={fx.CLASSES}',
    '--config.model.backbone.attention=xla',
    '--config.eval.stride=42',
]


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('eval')
  data = synthetic.write_ade_folder(str(tmp / 'ade'), num_train=2, num_val=6,
                                    num_classes=fx.CLASSES, size_range=(40, 90), seed=1)
  torch_model = fx.torch_segmentor('uper', seed=5, aux_in_index=1)
  src = fx.save_mmseg(torch_model, tmp / 'seg.pth')
  pth_to_orbax.convert(str(src), str(tmp / 'converted'), fx.tiny_config('uper', aux_in_index=1))
  return tmp, data


def run_main(*args):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8 '
             '--xla_backend_optimization_level=0')  # as in-process
  return subprocess.run([sys.executable, '-m', 'internseg_jax.main', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_eval_mode_writes_results_and_table(setup):
  tmp, data = setup
  workdir = tmp / 'wd_eval'
  result = run_main(*OVERRIDES, f'--workdir={workdir}', '--mode=eval',
                    f'--config.init.checkpoint={tmp / "converted"}', f'--config.data.root={data}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'mIoU' in result.stdout
  assert 'Summary' in result.stdout  # the per-class table
  out = json.loads((workdir / 'eval_results.json').read_text())
  assert set(out) >= {'mIoU', 'aAcc', 'mAcc', 'IoU'} and len(out['IoU']) == fx.CLASSES
  assert 0 <= out['aAcc'] <= 1 and out['num_images'] == 6

  # The same numbers as running inference_model image by image and mean_iou.
  config = fx.tiny_config('uper', aux_in_index=1)
  model = api.init_model(config, str(tmp / 'converted'))
  dataset = sources.ADEFolder(data, 'validation', fx.CLASSES)
  preds = [api.inference_model(model, dataset[i]['image']) for i in range(len(dataset))]
  want = metrics.mean_iou(preds, [dataset[i]['label'] for i in range(len(dataset))], fx.CLASSES)
  np.testing.assert_allclose(out['mIoU'], want['mIoU'], rtol=1e-9)
  np.testing.assert_allclose(out['aAcc'], want['aAcc'], rtol=1e-9)


def test_eval_with_two_processes_equals_one(setup):
  """Each of 2 processes (x 4 devices) evaluates its share of the images on the
  sharded model; the summed areas give exactly the 1-process result."""
  tmp, data = setup
  args = [*OVERRIDES, '--mode=eval', f'--config.init.checkpoint={tmp / "converted"}',
          f'--config.data.root={data}']
  one = tmp / 'wd_one'
  result = run_main(*args, f'--workdir={one}')
  assert result.returncode == 0, result.stderr[-3000:]
  two = tmp / 'wd_two'
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4 '
             '--xla_backend_optimization_level=0', JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo')
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'internseg_jax.main', *args, f'--workdir={two}',
       f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
  want = json.loads((one / 'eval_results.json').read_text())
  got = json.loads((two / 'eval_results.json').read_text())
  assert got['num_images'] == want['num_images'] == 6
  for key in ('mIoU', 'aAcc', 'mAcc'):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-9)
  assert got['IoU'] == want['IoU']


def test_predict_mode_writes_labels_and_overlays(setup):
  tmp, data = setup
  workdir = tmp / 'wd_predict'
  folder = os.path.join(data, 'images', 'validation')
  result = run_main(*OVERRIDES, f'--workdir={workdir}', '--mode=predict',
                    f'--config.init.checkpoint={tmp / "converted"}',
                    f'--config.predict.input={folder}')
  assert result.returncode == 0, result.stderr[-3000:]
  written = sorted(os.listdir(workdir / 'predictions'))
  assert len(written) == 12 and sum(n.endswith('_overlay.png') for n in written) == 6
  name = sorted(os.listdir(folder))[0][:-4]
  # An indexed PNG: Pillow reads the class indices (cv2.imread would expand the palette).
  with Image.open(workdir / 'predictions' / f'{name}_labels.png') as img:
    assert img.mode == 'P'
    labels = np.asarray(img)
  image = cv2.imread(os.path.join(folder, name + '.jpg'))
  assert labels.shape == image.shape[:2] and labels.max() < fx.CLASSES
  overlay = cv2.imread(str(workdir / 'predictions' / f'{name}_overlay.png'))
  assert overlay.shape[0] >= image.shape[0] and overlay.shape[1] > image.shape[1]  # + legend


def test_eval_without_weights_or_data_fails_clearly(setup, tmp_path):
  tmp, data = setup
  result = run_main(*OVERRIDES, f'--workdir={tmp_path / "wd"}', '--mode=eval',
                    f'--config.data.root={data}')
  assert result.returncode != 0 and 'init.checkpoint' in result.stderr
  result = run_main(*OVERRIDES, f'--workdir={tmp_path / "wd"}', '--mode=eval',
                    f'--config.init.checkpoint={tmp / "converted"}',
                    f'--config.data.root={tmp_path / "nope"}')
  assert result.returncode != 0 and 'ADEChallengeData2016 layout' in result.stderr


@pytest.fixture
def folder(tmp_path):
  return synthetic.write_ade_folder(str(tmp_path / 'ade'), 0, 3, num_classes=150, seed=2)


def _label_path(root, i=0):
  d = os.path.join(root, 'annotations', 'validation')
  return os.path.join(d, sorted(os.listdir(d))[i])


def test_missing_folder_is_a_clear_error(tmp_path):
  with pytest.raises(sources.DataError, match='ADEChallengeData2016 layout'):
    sources.ADEFolder(str(tmp_path / 'missing'))


def test_image_without_label_is_named(folder):
  os.remove(_label_path(folder, 1))
  with pytest.raises(sources.DataError, match='have no label.*ADE_valid_00000001'):
    sources.ADEFolder(folder)


def test_label_of_the_wrong_size_is_named(folder):
  path = _label_path(folder)
  cv2.imwrite(path, np.zeros((7, 9), np.uint8))
  with pytest.raises(sources.DataError, match='label is 9x7 but the image is'):
    sources.ADEFolder(folder)[0]


def test_label_values_out_of_range_are_named(folder):
  path = _label_path(folder)
  label = cv2.imread(path, cv2.IMREAD_UNCHANGED)
  label[0, 0] = 151
  cv2.imwrite(path, label)
  with pytest.raises(sources.DataError, match=r'values \[151\] outside 0..150'):
    sources.ADEFolder(folder)[0]


def test_rgb_label_maps_are_refused(folder):
  path = _label_path(folder)
  label = cv2.imread(path, cv2.IMREAD_UNCHANGED)
  cv2.imwrite(path, np.stack([label] * 3, -1))
  with pytest.raises(sources.DataError, match='single-channel'):
    sources.ADEFolder(folder)[0]


def test_corrupt_image_is_named(folder):
  d = os.path.join(folder, 'images', 'validation')
  path = os.path.join(d, sorted(os.listdir(d))[0])
  with open(path, 'wb') as f:
    f.write(b'not a jpeg')
  with pytest.raises(sources.DataError, match='not a readable image'):
    sources.ADEFolder(folder)[0]


def test_records_are_reduced_labels(folder):
  record = sources.ADEFolder(folder)[0]
  raw = cv2.imread(_label_path(folder), cv2.IMREAD_UNCHANGED)
  assert record['image'].dtype == np.uint8 and record['image'].shape[:2] == raw.shape
  np.testing.assert_array_equal(record['label'][raw == 0], 255)
  np.testing.assert_array_equal(record['label'][raw > 0], raw[raw > 0] - 1)
