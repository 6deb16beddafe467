"""Sliding-window and whole-image inference, test-time augmentation, and the
inference API, against plain numpy references of mmseg's rules."""
import numpy as np
import pytest
import torch

from internseg_jax import api, evaluate
from internseg_jax.data import transforms
from tests import seg_fixtures as fx


def reference_windows(h, w, crop, stride):
  """mmseg slide_inference's loop, written out."""
  h_grids = max(h - crop + stride - 1, 0) // stride + 1
  w_grids = max(w - crop + stride - 1, 0) // stride + 1
  out = []
  for hi in range(h_grids):
    for wi in range(w_grids):
      y1, x1 = hi * stride, wi * stride
      y2, x2 = min(y1 + crop, h), min(x1 + crop, w)
      y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
      out.append((y1, y2, x1, x2))
  return out


@pytest.mark.parametrize('h,w', [(504, 504), (504, 826), (826, 504), (644, 966), (700, 1001),
                                 (504, 505), (300, 400), (504, 300), (1500, 2016)])
def test_slide_windows_match_mmseg(h, w):
  windows = evaluate.slide_windows(h, w, 504, 322)
  assert windows == reference_windows(h, w, 504, 322)
  cover = np.zeros((h, w), int)
  for y1, y2, x1, x2 in windows:
    assert y2 - y1 == min(504, h) and x2 - x1 == min(504, w)
    cover[y1:y2, x1:x2] += 1
  assert cover.min() >= 1


class FakeModel:
  """Stands in for api.Model in `image_logits`: logits are a fixed function of
  each crop's pixels and its size, so wrong placement or averaging shows."""

  def __init__(self, mode, crop=56, stride=42, classes=3):
    import ml_collections
    self.config = ml_collections.ConfigDict(dict(
        eval=dict(mode=mode, crop_size=crop, stride=stride, batch_size=2, flip=False,
                  scales=(1.0,), resize='short_side', scale=(224, crop)),
        model=dict(decode_head=dict(num_classes=classes), backbone=dict(patch_size=14))))


def fake_logits(crops):
  h, w = crops.shape[1:3]
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  return np.stack([crops[..., 0] * 1.0, crops[..., 1] + yy / h, crops[..., 2] * xx / w], -1)


@pytest.fixture
def fake_forward(monkeypatch):
  monkeypatch.setattr(evaluate, '_run_batches', lambda model, crops, batch: fake_logits(crops))


@pytest.mark.parametrize('h,w', [(56, 56), (56, 98), (70, 140), (42, 56), (28, 28)])
def test_slide_logits_average_overlapping_windows(fake_forward, h, w):
  image = np.random.default_rng(0).normal(size=(h, w, 3)).astype(np.float32)
  sums, count = np.zeros((h, w, 3)), np.zeros((h, w, 1))
  for y1, y2, x1, x2 in reference_windows(h, w, 56, 42):
    sums[y1:y2, x1:x2] += fake_logits(image[None, y1:y2, x1:x2])[0]
    count[y1:y2, x1:x2] += 1
  got = evaluate.image_logits(FakeModel('slide'), image)
  np.testing.assert_allclose(got, sums / count, rtol=1e-6, atol=1e-6)


def test_whole_mode_runs_once_on_the_full_image(fake_forward):
  image = np.random.default_rng(1).normal(size=(70, 140, 3)).astype(np.float32)
  np.testing.assert_array_equal(evaluate.image_logits(FakeModel('whole'), image),
                                fake_logits(image[None])[0])


def test_predict_logits_resizes_back_and_averages_augmentations(fake_forward):
  model = FakeModel('slide')
  image = np.random.default_rng(2).integers(0, 256, size=(45, 61, 3)).astype(np.uint8)
  x = transforms.test_transform(image, 'short_side', (224, 56), 14, 1.0, 56)
  single = evaluate.predict_logits(model, image)
  want = torch.nn.functional.interpolate(
      torch.from_numpy(evaluate.image_logits(model, x)).permute(2, 0, 1)[None].double(),
      size=(45, 61), mode='bilinear', align_corners=False)[0].permute(1, 2, 0).numpy()
  assert single.shape == (45, 61, 3)
  np.testing.assert_allclose(single, want, rtol=1e-5, atol=1e-5)

  model.config.eval.flip = True
  model.config.eval.scales = (1.0, 1.5)
  augmented = evaluate.predict_logits(model, image)
  parts = []
  for ratio in (1.0, 1.5):
    x = transforms.test_transform(image, 'short_side', (224, 56), 14, ratio, 56)
    for flip in (False, True):
      logits = evaluate.image_logits(model, x[:, ::-1] if flip else x)
      logits = np.ascontiguousarray(logits[:, ::-1] if flip else logits)
      parts.append(evaluate._softmax(evaluate.resize_bilinear(logits[None], (45, 61))[0]))
  np.testing.assert_allclose(augmented, np.mean(parts, 0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(augmented.sum(-1), 1.0, rtol=1e-5)


def test_inference_model_slide_matches_the_reference_segmentor():
  """A real (tiny) segmentor: inference_model's slide inference equals the
  reference segmentor run window by window as mmseg does, at the original size."""
  torch_model = fx.torch_segmentor('uper', seed=11)
  from tests.convert_helpers import state_dict_to_variables
  config = fx.tiny_config('uper')
  variables = state_dict_to_variables(torch_model.state_dict(), config)
  model = api.init_model(config)
  model.variables = variables
  image = np.random.default_rng(3).integers(0, 256, size=(50, 90, 3)).astype(np.uint8)
  labels, logits = api.inference_model(model, image, return_logits=True)

  x = transforms.test_transform(image, 'short_side', config.eval.scale, 14, 1.0, config.eval.crop_size)
  h, w = x.shape[:2]
  sums, count = np.zeros((h, w, fx.CLASSES)), np.zeros((h, w, 1))
  for y1, y2, x1, x2 in reference_windows(h, w, config.eval.crop_size, config.eval.stride):
    sums[y1:y2, x1:x2] += fx.torch_logits(torch_model, x[None, y1:y2, x1:x2])[0]
    count[y1:y2, x1:x2] += 1
  want = torch.nn.functional.interpolate(
      torch.from_numpy(sums / count).permute(2, 0, 1)[None], size=(50, 90), mode='bilinear',
      align_corners=False)[0].permute(1, 2, 0).numpy()
  assert logits.shape == (50, 90, fx.CLASSES) and labels.shape == (50, 90)
  assert labels.dtype == np.int32
  assert fx.rel_l2(logits, want) <= 1e-5
  assert (labels == want.argmax(-1)).mean() > 0.999


def test_inference_model_rejects_bad_images():
  model = FakeModel('slide')
  with pytest.raises(ValueError, match='uint8 RGB'):
    evaluate.predict_logits(model, np.zeros((10, 10), np.uint8))
  with pytest.raises(ValueError, match='uint8 RGB'):
    evaluate.predict_logits(model, np.zeros((10, 10, 3), np.float32))
