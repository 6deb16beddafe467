"""Test-time transforms vs the mmcv/mmseg rules, re-implemented here from their sources."""
import cv2
import numpy as np
import pytest

from internseg_jax.data import transforms as T

RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # the seed's (commented-out) img_ratios
EDGE_SIZES = [(1, 1), (1, 3000), (3000, 1), (14, 14), (504, 504), (512, 683), (683, 512),
              (500, 2000), (2000, 500), (126, 3000), (375, 500), (333, 517)]


# Written after mmcv.image.geometric and mmseg/InternVL pipelines, step by step.
def _mmcv_rescale_size(old_size, scale):
  w, h = old_size
  factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
  return int(w * float(factor) + 0.5), int(h * float(factor) + 0.5)


def _setr_resize_size(h, w, scale, crop_size=(504, 504)):
  new_short = crop_size[0] if min(scale) < crop_size[0] else min(scale)
  if h > w:
    setr_scale = (new_short * h / w, new_short)
  else:
    setr_scale = (new_short, new_short * w / h)
  return _mmcv_rescale_size((w, h), setr_scale)


def _mmcv_to_multiple(size, divisor):
  return tuple(int(np.ceil(s / divisor)) * divisor for s in size)


def _reference_sizes(h, w, mode, ratio, img_scale=(2016, 504)):
  """(w, h) after the keep-ratio step and after ResizeToMultiple."""
  scale = (int(img_scale[0] * ratio), int(img_scale[1] * ratio))  # MultiScaleFlipAug
  if mode == 'fit':
    first = _mmcv_rescale_size((w, h), scale)
  else:
    first = _setr_resize_size(h, w, scale)
  return first, _mmcv_to_multiple(first, 14)


def _mmcv_imnormalize(img):
  img = img.copy().astype(np.float32)
  mean = np.float64(np.array(T.MEAN, np.float32).reshape(1, -1))
  stdinv = 1 / np.float64(np.array(T.STD, np.float32).reshape(1, -1))
  cv2.subtract(img, mean, img)
  cv2.multiply(img, stdinv, img)
  return img


def _random_image(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _direct_pipeline(img, mode, ratio=1.0):
  h, w = img.shape[:2]
  first, final = _reference_sizes(h, w, mode, ratio)
  img = cv2.resize(img, first, interpolation=cv2.INTER_LINEAR)
  img = cv2.resize(img, final, interpolation=cv2.INTER_LINEAR)
  return _mmcv_imnormalize(img)


def test_normalization_constants():
  assert T.MEAN == (123.675, 116.28, 103.53)
  assert T.STD == (58.395, 57.12, 57.375)
  every_value = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], 3, axis=2)
  got = T.normalize(every_value)
  assert got.dtype == np.float32 and got.shape == (256, 1, 3)
  np.testing.assert_array_equal(got, _mmcv_imnormalize(every_value))
  np.testing.assert_allclose(got[:, 0], (np.arange(256.)[:, None] - T.MEAN) / T.STD,
                             rtol=0, atol=1e-5)


@pytest.mark.parametrize('mode', T.TEST_MODES)
def test_sizes_match_mmcv_rules(mode):
  rng = np.random.default_rng(0)
  sizes = [tuple(s) for s in rng.integers(1, 3001, (200, 2))] + EDGE_SIZES
  checked = 0
  for i, (h, w) in enumerate(sizes):
    for ratio in (RATIOS if i % 4 == 0 else (RATIOS[i % len(RATIOS)],)):
      first, final = _reference_sizes(h, w, mode, ratio)
      if min(first) < 1:  # mmcv would crash in cv2.resize
        with pytest.raises(ValueError, match='elongated'):
          T.test_size(h, w, mode, ratio=ratio)
        continue
      got = T.test_size(h, w, mode, ratio=ratio)
      assert got == final[::-1], (h, w, mode, ratio)
      assert got[0] % 14 == 0 and got[1] % 14 == 0
      assert 0 <= got[0] - first[1] < 14 and 0 <= got[1] - first[0] < 14
      checked += 1
  assert checked > 300


def test_short_side_rule():
  for h, w in EDGE_SIZES[2:]:
    for ratio, short in ((0.5, 504), (1.0, 504), (1.25, 630), (1.75, 882)):
      first, _ = _reference_sizes(h, w, 'short_side', ratio)
      assert min(first) == short  # SETR_Resize: never below the crop size
      assert T.short_side_size(w, h, short) == first
      assert first == (int(w * short / min(h, w) + 0.5), int(h * short / min(h, w) + 0.5))
  # The 'fit' rule bounds the long side instead; it differs for elongated images.
  assert T.rescale_size(3000, 500, (2016, 504)) == (2016, 336)
  assert T.short_side_size(3000, 500, 504) == (3024, 504)
  assert T.rescale_size(500, 3000, (504, 2016)) == (336, 2016)  # scale order is free


def test_resize_to_multiple_rounds_up_and_keeps_multiples():
  assert T.multiple_size(28, 29) == (28, 42)
  assert T.multiple_size(1, 14) == (14, 14)
  assert T.test_size(29, 28, 'fit', scale=(29, 28), crop_size=0) == (42, 28)
  assert T.test_size(42, 28, 'fit', scale=(42, 28), crop_size=0) == (42, 28)
  # size_divisor 0 (the adapter's test pipeline): no ResizeToMultiple step.
  assert T.test_size(333, 517, divisor=0) == (504, 782)
  img = _random_image(333, 517)
  np.testing.assert_array_equal(
      T.test_transform(img, divisor=0),
      T.normalize(cv2.resize(img, (782, 504), interpolation=cv2.INTER_LINEAR)))


def test_keep_ratio_resizes():
  img = _random_image(333, 517)
  fit = T.keep_ratio_resize(img, (2016, 504))
  assert fit.dtype == np.uint8 and fit.shape == (504, 782, 3)
  np.testing.assert_array_equal(fit, cv2.resize(img, (782, 504), interpolation=cv2.INTER_LINEAR))
  nearest = T.keep_ratio_resize(img, (1000, 100), interpolation=cv2.INTER_NEAREST)
  np.testing.assert_array_equal(
      nearest, cv2.resize(img, (155, 100), interpolation=cv2.INTER_NEAREST))
  # Negative strides (a flipped view) are accepted.
  np.testing.assert_array_equal(T.keep_ratio_resize(img[:, ::-1], (2016, 504)),
                                T.keep_ratio_resize(np.ascontiguousarray(img[:, ::-1]),
                                                    (2016, 504)))


@pytest.mark.parametrize('mode', T.TEST_MODES)
@pytest.mark.parametrize('h,w,ratio', [(333, 517, 1.0), (512, 683, 1.0), (97, 1201, 1.0),
                                       (400, 300, 0.5), (250, 251, 1.25), (600, 450, 1.75)])
def test_transform_matches_direct_cv2(mode, h, w, ratio):
  img = _random_image(h, w, seed=h * w)
  got = T.test_transform(img, mode, ratio=ratio)
  want = _direct_pipeline(img, mode, ratio)
  assert got.dtype == np.float32
  assert got.shape[:2] == T.test_size(h, w, mode, ratio=ratio)
  np.testing.assert_array_equal(got, want)


def test_float_or_one_step_resize_differs():
  """Why both resizes run on uint8, one after the other: the alternatives change pixels."""
  img = _random_image(333, 517)
  first, final = _reference_sizes(333, 517, 'short_side', 1.0)
  assert first == (782, 504) and final == (784, 504)
  ours = T.test_transform(img)
  as_float = cv2.resize(img.astype(np.float32), first, interpolation=cv2.INTER_LINEAR)
  as_float = cv2.resize(as_float, final, interpolation=cv2.INTER_LINEAR)
  as_float = (as_float - np.float32(T.MEAN)) / np.float32(T.STD)
  one_step = T.normalize(cv2.resize(img, final, interpolation=cv2.INTER_LINEAR))
  for other in (as_float, one_step):
    assert other.shape == ours.shape
    assert np.mean(np.abs(other - ours) > 1e-3) > 0.05
    assert np.abs(other - ours).max() > 1 / 58.


@pytest.mark.parametrize('bad', [
    np.zeros((8, 8, 3), np.float32),
    np.zeros((8, 8, 3), np.int32),
    np.zeros((8, 8), np.uint8),
    np.zeros((8, 8, 4), np.uint8),
    np.zeros((8, 8, 1), np.uint8),
    np.zeros((0, 8, 3), np.uint8),
    [[[0, 0, 0]]],
])
def test_bad_images_raise(bad):
  for fn in (T.normalize, T.test_transform, lambda x: T.test_transform(x, 'fit'),
             lambda x: T.keep_ratio_resize(x, (2016, 504))):
    with pytest.raises(ValueError, match='uint8|image'):
      fn(bad)


def test_bad_arguments_raise():
  img = _random_image(10, 10)
  with pytest.raises(ValueError, match='resize must be'):
    T.test_transform(img, 'whole')
  with pytest.raises(ValueError, match='ratio'):
    T.test_size(10, 10, ratio=0)
  with pytest.raises(ValueError, match='elongated'):
    T.test_transform(_random_image(1, 3000), 'fit', ratio=0.5)
  with pytest.raises(ValueError, match='scale'):
    T.rescale_size(10, 10, (0, 504))
  with pytest.raises(ValueError, match='positive'):
    T.rescale_size(0, 10, (2016, 504))
