"""Training transforms vs mmseg 0.27 / mmcv 1.x rules, re-implemented here from their sources.

The references work as mmseg does: on BGR images, with mmseg's sequence of random
calls (np.random.* mapped onto a Generator by `_NpRandom`), np.unique for the
crop check, float32 `convert` and cv2 BGR<->HSV for the distortion, mmcv's
imnormalize (BGR -> RGB, cv2.subtract / cv2.multiply) and impad
(cv2.copyMakeBorder).
"""
import time

import cv2
import numpy as np
import pytest

from internseg_jax.data import transforms as T
from tests.reference.mmseg_transforms import (  # pylint: disable=unused-import
    _NpRandom, _mmcv_impad, _mmcv_imnormalize_bgr, _mmcv_rescale_size, _ref_convert, _ref_crop,
    _ref_crop_bbox, _ref_flip, _ref_photometric, _ref_resize, _ref_train)

ODD_SIZES = [(1, 1), (1, 300), (300, 1), (13, 17), (375, 500), (333, 517), (512, 683),
             (683, 512), (500, 2000), (2000, 500), (126, 3000), (504, 504), (97, 1001)]
ODD_RATIOS = (0.5, 0.5371, 0.75, 0.999, 1.0, 1.3333, 1.77, 2.0)


def _image(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _coord_image(h, w):
  """Channel 0 = row % 256, channel 1 = column % 256: a crop tells its offset."""
  img = np.zeros((h, w, 3), np.uint8)
  img[..., 0] = (np.arange(h) % 256)[:, None]
  img[..., 1] = (np.arange(w) % 256)[None, :]
  return img


def _blocky_label(h, w, seed=0, classes=150, block=48):
  """Piecewise-constant labels like real maps, with some 255 (ignore)."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, classes, (h // block + 1, w // block + 1)).astype(np.uint8)
  small[rng.random(small.shape) < 0.1] = 255
  return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


def _rng(seed):
  return np.random.default_rng(seed)


# ---------------------------------------------------------------------------
# Resize.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('h,w', ODD_SIZES)
def test_resize_matches_mmcv_rule(h, w):
  img = _image(h, w)
  label = _image(h, w, 1)[..., 0]
  for ratio in ODD_RATIOS:
    scale = (int(2016 * ratio), int(504 * ratio))
    size = _mmcv_rescale_size(w, h, scale)
    if min(size) < 1:
      with pytest.raises(ValueError, match='too elongated'):
        T.random_resize(img, label, _rng(0), ratio_range=(ratio, ratio))
      continue
    got_img, got_label = T.random_resize(img, label, _rng(0), ratio_range=(ratio, ratio))
    assert got_img.shape == (size[1], size[0], 3) and got_label.shape == (size[1], size[0])
    np.testing.assert_array_equal(got_img, cv2.resize(img, size, interpolation=cv2.INTER_LINEAR))
    np.testing.assert_array_equal(got_label,
                                  cv2.resize(label, size, interpolation=cv2.INTER_NEAREST))


def test_resize_draws_ratio_like_mmseg():
  img, label = _image(512, 683), _blocky_label(512, 683)
  for seed in range(5):
    ratio = _rng(seed).random() * 1.5 + 0.5
    size = _mmcv_rescale_size(683, 512, (int(2016 * ratio), int(504 * ratio)))
    got_img, got_label = T.random_resize(img, label, _rng(seed))
    assert got_img.shape[1::-1] == size and got_label.shape[::-1] == size
  # Label values are only ever copied, never blended.
  assert set(np.unique(got_label)) <= set(np.unique(label))


def test_resize_ratios_cover_range():
  # Square 100x100 within (4 r * 100, r * 100): the new side is int(100 r).
  img, label = _image(100, 100), _blocky_label(100, 100)
  sides = np.array([T.random_resize(img, label, _rng(s), scale=(400, 100))[1].shape[0]
                    for s in range(2000)])
  assert sides.min() <= 51 and sides.max() >= 199
  assert 50 <= sides.min() and sides.max() <= 200
  hist = np.histogram(sides, bins=4, range=(50, 200))[0] / len(sides)
  np.testing.assert_allclose(hist, 0.25, atol=0.04)


# ---------------------------------------------------------------------------
# Crop.
# ---------------------------------------------------------------------------


def test_crop_positions_uniform_without_retries():
  img = _coord_image(600, 700)
  label = np.zeros((600, 700), np.uint8)
  ys, xs = [], []
  for seed in range(3000):
    out_img, out_label = T.random_crop(img, label, _rng(seed), 504, cat_max_ratio=1.0)
    assert out_img.shape == (504, 504, 3) and out_label.shape == (504, 504)
    y, x = int(out_img[0, 0, 0]), int(out_img[0, 0, 1])
    if seed < 20:
      np.testing.assert_array_equal(out_img, img[y:y + 504, x:x + 504])
    ys.append(y)
    xs.append(x)
  ys, xs = np.array(ys), np.array(xs)
  assert ys.min() == 0 and ys.max() == 96 and xs.min() == 0 and xs.max() == 196
  np.testing.assert_allclose(np.histogram(ys, 4, (0, 97))[0] / len(ys), 0.25, atol=0.04)
  np.testing.assert_allclose(np.histogram(xs, 4, (0, 197))[0] / len(xs), 0.25, atol=0.04)


def test_crop_keeps_short_sides_whole():
  img, label = _coord_image(300, 700), _blocky_label(300, 700)
  out_img, out_label = T.random_crop(img, label, _rng(3), (504, 400), cat_max_ratio=1.0)
  assert out_img.shape == (300, 400, 3) and out_label.shape == (300, 400)
  assert out_img[0, 0, 0] == 0
  out_img, _ = T.random_crop(img[:10, :20], label[:10, :20], _rng(3), 504)
  np.testing.assert_array_equal(out_img, img[:10, :20])


def _crop_x(img, label, seed, **kw):
  out_img, _ = T.random_crop(img, label, _rng(seed), 504, **kw)
  return int(out_img[0, 0, 1])


def _ref_crop_x(img, label, seed, **kw):
  results = {'img': img, 'seg': label}
  draws = _ref_crop(results, _NpRandom(_rng(seed)), **kw)
  return int(results['img'][0, 0, 1]), draws


def test_crop_retry_rule_matches_mmseg():
  # Class 2 in the bottom-right quarter: only crops reaching far enough into
  # it pass, so most seeds need several draws.
  img = _coord_image(1000, 1000)
  label = np.ones((1000, 1000), np.uint8)
  label[500:, 500:] = 2
  draws = []
  for seed in range(150):
    results = {'img': img, 'seg': label}
    draws.append(_ref_crop(results, _NpRandom(_rng(seed))))
    out_img, out_label = T.random_crop(img, label, _rng(seed))
    np.testing.assert_array_equal(out_img, results['img'])
    np.testing.assert_array_equal(out_label, results['seg'])
  draws = np.array(draws)
  assert (draws > 1).mean() > 0.5 and (draws > 3).any() and (draws == 1).any()


def test_crop_ratio_condition_is_strict():
  # A 504x505 image has two crops. x=0: class 1 in 378 of 504 columns, exactly
  # 0.75, which fails `< 0.75`; x=1: 377 columns, which passes.
  img = _coord_image(504, 505)
  label = np.full((504, 505), 2, np.uint8)
  label[:, :378] = 1
  xs = [_crop_x(img, label, s) for s in range(200)]
  for seed in range(200):
    assert xs[seed] == _ref_crop_x(img, label, seed)[0]
  # x=0 only when all 11 draws give 0 (p = 2**-11).
  assert sum(xs) >= 198


def test_crop_ratio_ignores_ignore_index():
  # x=0: classes 1/2/255 on 300/100/104 columns, 300/400 = 0.75 fails;
  # x=1: 299/100/105 passes. Counting 255 would make both pass.
  img = _coord_image(504, 505)
  label = np.full((504, 505), 255, np.uint8)
  label[:, :300] = 1
  label[:, 300:400] = 2
  xs = [_crop_x(img, label, s) for s in range(200)]
  assert sum(xs) >= 198
  for seed in range(50):
    assert xs[seed] == _ref_crop_x(img, label, seed)[0]


@pytest.mark.parametrize('case', ['one_class', 'one_class_and_ignore', 'all_ignore'])
def test_crop_falls_back_to_eleventh_draw(case):
  img = _coord_image(700, 750)
  label = np.full((700, 750), {'one_class': 7, 'one_class_and_ignore': 7,
                               'all_ignore': 255}[case], np.uint8)
  if case == 'one_class_and_ignore':
    label[::2] = 255
  for seed in range(20):
    rng = _rng(seed)
    boxes = [(int(rng.integers(0, 197)), int(rng.integers(0, 247))) for _ in range(11)]
    out_img, _ = T.random_crop(img, label, _rng(seed))
    assert (int(out_img[0, 0, 0]), int(out_img[0, 0, 1])) == boxes[-1]
    assert _ref_crop_x(img, label, seed) == (boxes[-1][1], 11)


def test_crop_class_zero_counts():
  # 0 is a real class after reduce_zero_label; only 255 is left out.
  img = _coord_image(504, 505)
  label = np.zeros((504, 505), np.uint8)
  label[:, 300:400] = 2
  label[:, 400:] = 255
  assert sum(_crop_x(img, label, s) for s in range(100)) >= 98


# ---------------------------------------------------------------------------
# Flip.
# ---------------------------------------------------------------------------


def test_flip_frequency_and_pixels():
  img, label = _image(6, 9), _blocky_label(6, 9, block=2)
  flips = 0
  for seed in range(4000):
    out_img, out_label = T.random_flip(img, label, _rng(seed))
    flipped = not np.array_equal(out_img, img)
    if flipped:
      np.testing.assert_array_equal(out_img, img[:, ::-1])
      np.testing.assert_array_equal(out_label, label[:, ::-1])
    else:
      assert out_img is img and out_label is label
    assert flipped == (_rng(seed).random() < 0.5)
    flips += flipped
  assert abs(flips / 4000 - 0.5) < 0.03
  assert not any(not np.array_equal(T.random_flip(img, label, _rng(s), 0.0)[0], img)
                 for s in range(50))
  assert all(np.array_equal(T.random_flip(img, label, _rng(s), 1.0)[0], img[:, ::-1])
             for s in range(50))


def test_flip_of_a_crop_view():
  img, label = _image(50, 60), _blocky_label(50, 60, block=5)
  out_img, out_label = T.random_flip(img[5:40, 7:50], label[5:40, 7:50], _rng(0), 1.0)
  np.testing.assert_array_equal(out_img, img[5:40, 7:50][:, ::-1])
  np.testing.assert_array_equal(out_label, label[5:40, 7:50][:, ::-1])


# ---------------------------------------------------------------------------
# Photometric distortion.
# ---------------------------------------------------------------------------


def test_photometric_matches_mmseg_on_bgr():
  seen = set()
  for seed in range(400):
    img = _image(23, 31, seed)
    if seed % 7 == 0:  # saturated extremes, to exercise the clipping
      img[::2] = np.where(img[::2] > 127, 255, 0).astype(np.uint8)
    want_bgr, fired = _ref_photometric(img[..., ::-1], _NpRandom(_rng(seed)))
    got = T.photometric_distortion(img, _rng(seed))
    assert got.dtype == np.uint8 and got.shape == img.shape
    np.testing.assert_array_equal(got, want_bgr[..., ::-1], err_msg=f'seed {seed} {fired}')
    seen.add(fired)
  # All 2 modes x 16 on/off patterns of the four steps.
  assert len(seen) == 32


def _only(step):
  """Keyword arguments that make every other step an identity."""
  kw = dict(brightness_delta=0, contrast_range=(1, 1), saturation_range=(1, 1), hue_delta=0)
  del kw[step]
  return kw


def test_brightness_shifts_and_clips():
  gray = np.full((8, 8, 3), 128, np.uint8)
  shifts = []
  for seed in range(400):
    out = T.photometric_distortion(gray, _rng(seed), **_only('brightness_delta'))
    assert (out == out[0, 0, 0]).all()  # HSV round trips keep grey exact
    shifts.append(int(out[0, 0, 0]) - 128)
  shifts = np.array(shifts)
  assert abs((shifts == 0).mean() - 0.5) < 0.1
  assert shifts.min() >= -32 and shifts.max() <= 31 and shifts.min() < -25 and shifts.max() > 25
  bright = np.full((8, 8, 3), 250, np.uint8)
  outs = np.array([T.photometric_distortion(bright, _rng(s), **_only('brightness_delta'))[0, 0, 0]
                   for s in range(200)])
  assert outs.min() >= 250 - 32 and (outs == 255).sum() > 20  # clipped, not wrapped


def test_contrast_scales_differences():
  img = np.full((8, 8, 3), 100, np.uint8)
  img[4:] = 150
  factors = []
  for seed in range(400):
    out = T.photometric_distortion(img, _rng(seed), **_only('contrast_range')).astype(int)
    factors.append((out[4:] - out[:4]).mean() / 50)
    # A pure gain, no offset: the 100 : 150 ratio survives up to truncation.
    assert (np.abs(out[4, 4] - 1.5 * out[0, 0]) <= 1.5).all()
  factors = np.array(factors)
  assert factors.min() >= 0.48 and factors.max() <= 1.52
  assert (factors < 0.7).any() and (factors > 1.3).any() and abs((factors == 1).mean() - 0.5) < 0.1


def _hsv(img):
  return cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(int)


def test_saturation_scales_s_and_keeps_hue():
  img = np.full((8, 8, 3), (200, 120, 80), np.uint8)
  img[4:] = 90  # grey stays grey
  h0, s0, v0 = _hsv(img)[0, 0]
  ratios = []
  for seed in range(300):
    out = T.photometric_distortion(img, _rng(seed), **_only('saturation_range'))
    np.testing.assert_array_equal(out[4:], img[4:])
    h, s, v = _hsv(out)[0, 0]
    assert abs(h - h0) <= 2 and abs(v - v0) <= 1
    ratios.append(s / s0)
  ratios = np.array(ratios)
  assert ratios.min() > 0.48 and ratios.max() < 1.52
  assert (ratios < 0.7).any() and (ratios > 1.3).any()


def test_hue_rotates_by_at_most_18():
  red = np.zeros((4, 4, 3), np.uint8)
  red[..., 0] = 255
  hues = []
  for seed in range(400):
    out = T.photometric_distortion(red, _rng(seed), **_only('hue_delta'))
    h, s, v = _hsv(out)[0, 0]
    assert s == 255 and v == 255
    hues.append((h + 90) % 180 - 90)  # signed shift from red (H = 0)
  hues = np.array(hues)
  assert hues.min() >= -18 and hues.max() <= 17  # numpy randint: high end exclusive
  assert (hues < -10).any() and (hues > 10).any()


def test_photometric_keeps_input_and_views():
  img = _image(40, 50)
  keep = img.copy()
  view = img[3:30, 4:44]
  for seed in range(20):
    out = T.photometric_distortion(view, _rng(seed))
    want, _ = _ref_photometric(np.ascontiguousarray(view[..., ::-1]), _NpRandom(_rng(seed)))
    np.testing.assert_array_equal(out, want[..., ::-1])
  np.testing.assert_array_equal(img, keep)


# ---------------------------------------------------------------------------
# Pad, full pipeline.
# ---------------------------------------------------------------------------


def test_pad_values_and_placement():
  img, label = _image(300, 200), _blocky_label(300, 200)
  out_img, out_label = T.pad(img, label, 504)
  np.testing.assert_array_equal(out_img, _mmcv_impad(img, (504, 504), 0))
  np.testing.assert_array_equal(out_label, _mmcv_impad(label, (504, 504), 255))
  assert (out_img[300:] == 0).all() and (out_label[:, 200:] == 255).all()
  f_img = T.normalize(img)
  out_f, _ = T.pad(f_img, label, (310, 220))
  assert out_f.dtype == np.float32
  np.testing.assert_array_equal(out_f, _mmcv_impad(f_img, (310, 220), 0))
  same_img, same_label = T.pad(img, label, (300, 200))
  assert same_img is img and same_label is label
  with pytest.raises(ValueError, match='smaller'):
    T.pad(img, label, 250)


CASES = [  # (h, w, label kind)
    (512, 683, 'blocky'), (683, 512, 'blocky'), (375, 500, 'blocky'), (333, 517, 'quarter'),
    (97, 1001, 'blocky'), (1200, 1600, 'quarter'), (256, 256, 'one_class')]


def _label(kind, h, w, seed):
  if kind == 'blocky':
    return _blocky_label(h, w, seed)
  label = np.full((h, w), 4, np.uint8)
  if kind == 'quarter':
    label[h // 2:, w // 2:] = 9
    label[:10] = 255
  return label


@pytest.mark.parametrize('h,w,kind', CASES)
def test_train_transform_matches_mmseg_pipeline(h, w, kind):
  for seed in range(6):
    img, label = _image(h, w, seed), _label(kind, h, w, seed)
    want_img, want_label, _ = _ref_train(img, label, _rng(seed))
    got_img, got_label = T.train_transform(img, label, _rng(seed))
    assert got_img.dtype == np.float32 and got_img.shape == (504, 504, 3)
    assert got_label.dtype == np.uint8 and got_label.shape == (504, 504)
    assert got_img.flags.c_contiguous and got_label.flags.c_contiguous
    np.testing.assert_array_equal(got_img, want_img)
    np.testing.assert_array_equal(got_label, want_label)


def test_train_transform_normalizes_then_pads_with_zero():
  # ratio 0.5: (1008, 252) rescales 300x400 to 252x336, smaller than the crop.
  img, label = _image(300, 400), _blocky_label(300, 400)
  out_img, out_label = T.train_transform(img, label, _rng(0), ratio_range=(0.5, 0.5),
                                         flip_prob=0.0, photometric=False)
  small = cv2.resize(img, (336, 252), interpolation=cv2.INTER_LINEAR)
  want = (small.astype(np.float64) - np.array(T.MEAN)) / np.array(T.STD)
  np.testing.assert_allclose(out_img[:252, :336], want, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(out_img[:252, :336], _mmcv_imnormalize_bgr(small[..., ::-1]))
  assert (out_img[252:] == 0).all() and (out_img[:, 336:] == 0).all()
  assert (out_label[252:] == 255).all() and (out_label[:, 336:] == 255).all()
  np.testing.assert_array_equal(out_label[:252, :336],
                                cv2.resize(label, (336, 252), interpolation=cv2.INTER_NEAREST))


def test_train_transform_is_deterministic():
  img, label = _image(512, 683), _blocky_label(512, 683)
  keep_img, keep_label = img.copy(), label.copy()
  a = T.train_transform(img, label, _rng(123))
  b = T.train_transform(img, label, _rng(123))
  c = T.train_transform(img, label, _rng(124))
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])
  np.testing.assert_array_equal(img, keep_img)  # inputs untouched
  np.testing.assert_array_equal(label, keep_label)


def test_bad_inputs_raise():
  img, label = _image(20, 30), _blocky_label(20, 30, block=4)
  rng = _rng(0)
  bad = [
      (img.astype(np.float32), label, 'uint8 image'),
      (img[..., :2], label, r'\(H, W, 3\)'),
      (img, label.astype(np.int32), 'uint8 label'),
      (img, label[None], r'\(H, W\) label'),
      (img, label[:, :29], 'does not match'),
      ([[0]], label, 'numpy uint8'),
  ]
  for bad_img, bad_label, msg in bad:
    with pytest.raises(ValueError, match=msg):
      T.train_transform(bad_img, bad_label, rng)
    with pytest.raises(ValueError, match=msg):
      T.random_crop(bad_img, bad_label, rng)
  with pytest.raises(ValueError, match='Generator'):
    T.train_transform(img, label, np.random.RandomState(0))
  with pytest.raises(ValueError, match='Generator'):
    T.photometric_distortion(img, 0)
  with pytest.raises(ValueError, match='ratio_range'):
    T.random_resize(img, label, rng, ratio_range=(2.0, 0.5))
  with pytest.raises(ValueError, match='crop'):
    T.random_crop(img, label, rng, crop=(0, 5))
  with pytest.raises(ValueError, match='prob'):
    T.random_flip(img, label, rng, prob=1.5)


def test_throughput_smoke():
  # JPEG-like input: smooth content, 683x512, realistic labels; single thread.
  img = cv2.GaussianBlur(_image(512, 683), (0, 0), 3)
  label = _blocky_label(512, 683)
  threads = cv2.getNumThreads()
  cv2.setNumThreads(1)
  try:
    T.train_transform(img, label, _rng(0))
    n, start = 60, time.perf_counter()
    for seed in range(n):
      T.train_transform(img, label, _rng(seed))
    rate = n / (time.perf_counter() - start)
  finally:
    cv2.setNumThreads(threads)
  print(f'\ntrain_transform: {rate:.1f} images/s on one thread (683x512 -> 504x504)')
