"""mmseg 0.27 / mmcv 1.x training transforms, re-implemented from their sources
as a test reference: on BGR images, with mmseg's sequence of random calls
(np.random.* mapped onto a Generator by `_NpRandom`), np.unique for the crop
check, float32 `convert` and cv2 BGR<->HSV for the distortion, mmcv's
imnormalize (BGR -> RGB, cv2.subtract / cv2.multiply) and impad
(cv2.copyMakeBorder)."""
import cv2
import numpy as np

from internseg_jax.data import transforms as T


class _NpRandom:
  """numpy.random's legacy functions, as mmseg calls them, drawn from a Generator."""

  def __init__(self, rng):
    self.rng = rng

  def random_sample(self):
    return self.rng.random()

  def rand(self):
    return self.rng.random()

  def randint(self, low, high=None):
    if high is None:
      low, high = 0, low
    return int(self.rng.integers(low, high))

  def uniform(self, low, high):
    return float(self.rng.uniform(low, high))


def _mmcv_rescale_size(w, h, scale):
  factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
  return int(w * float(factor) + 0.5), int(h * float(factor) + 0.5)


def _ref_resize(results, np_random, img_scale=(2016, 504), ratio_range=(0.5, 2.0)):
  ratio = np_random.random_sample() * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
  scale = int(img_scale[0] * ratio), int(img_scale[1] * ratio)
  h, w = results['img'].shape[:2]
  size = _mmcv_rescale_size(w, h, scale)
  results['img'] = cv2.resize(results['img'], size, interpolation=cv2.INTER_LINEAR)
  results['seg'] = cv2.resize(results['seg'], size, interpolation=cv2.INTER_NEAREST)


def _ref_crop_bbox(img, crop_size, np_random):
  margin_h = max(img.shape[0] - crop_size[0], 0)
  margin_w = max(img.shape[1] - crop_size[1], 0)
  offset_h = np_random.randint(0, margin_h + 1)
  offset_w = np_random.randint(0, margin_w + 1)
  return offset_h, offset_h + crop_size[0], offset_w, offset_w + crop_size[1]


def _ref_crop(results, np_random, crop_size=(504, 504), cat_max_ratio=0.75, ignore_index=255):
  """Returns the number of boxes drawn."""
  img = results['img']
  bbox = _ref_crop_bbox(img, crop_size, np_random)
  draws = 1
  if cat_max_ratio < 1.:
    for _ in range(10):
      y1, y2, x1, x2 = bbox
      labels, cnt = np.unique(results['seg'][y1:y2, x1:x2], return_counts=True)
      cnt = cnt[labels != ignore_index]
      if len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < cat_max_ratio:
        break
      bbox = _ref_crop_bbox(img, crop_size, np_random)
      draws += 1
  y1, y2, x1, x2 = bbox
  results['img'] = img[y1:y2, x1:x2, ...]
  results['seg'] = results['seg'][y1:y2, x1:x2]
  return draws


def _ref_flip(results, np_random, prob=0.5):
  if np_random.rand() < prob:
    results['img'] = np.flip(results['img'], axis=1)
    results['seg'] = np.flip(results['seg'], axis=1).copy()


def _ref_convert(img, alpha=1, beta=0):
  img = img.astype(np.float32) * alpha + beta
  img = np.clip(img, 0, 255)
  return img.astype(np.uint8)


def _ref_photometric(img_bgr, np_random, brightness_delta=32, contrast_range=(0.5, 1.5),
                     saturation_range=(0.5, 1.5), hue_delta=18):
  """mmseg PhotoMetricDistortion.__call__ on a BGR image; also returns what fired."""
  fired = []
  img = np.ascontiguousarray(img_bgr)

  def contrast(img):
    if np_random.randint(2):
      fired.append('contrast')
      return _ref_convert(img, alpha=np_random.uniform(*contrast_range))
    return img

  if np_random.randint(2):
    fired.append('brightness')
    img = _ref_convert(img, beta=np_random.uniform(-brightness_delta, brightness_delta))
  mode = np_random.randint(2)
  if mode == 1:
    img = contrast(img)
  if np_random.randint(2):
    fired.append('saturation')
    img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    img[:, :, 1] = _ref_convert(img[:, :, 1], alpha=np_random.uniform(*saturation_range))
    img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
  if np_random.randint(2):
    fired.append('hue')
    img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    img[:, :, 0] = (img[:, :, 0].astype(int) + np_random.randint(-hue_delta, hue_delta)) % 180
    img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
  if mode == 0:
    img = contrast(img)
  return img, (mode, tuple(fired))


def _mmcv_imnormalize_bgr(img):
  img = img.copy().astype(np.float32)
  mean = np.float64(np.array(T.MEAN, np.float32).reshape(1, -1))
  stdinv = 1 / np.float64(np.array(T.STD, np.float32).reshape(1, -1))
  cv2.cvtColor(img, cv2.COLOR_BGR2RGB, img)
  cv2.subtract(img, mean, img)
  cv2.multiply(img, stdinv, img)
  return img


def _mmcv_impad(img, shape, pad_val):
  return cv2.copyMakeBorder(img, 0, shape[0] - img.shape[0], 0, shape[1] - img.shape[1],
                            cv2.BORDER_CONSTANT, value=pad_val)


def _ref_train(img_rgb, seg, rng, crop=504, photometric=True):
  """The InternVL ade20k_504x504 train pipeline after loading, as mmseg runs it."""
  np_random = _NpRandom(rng)
  results = {'img': img_rgb[..., ::-1].copy(), 'seg': seg}  # LoadImageFromFile gives BGR
  _ref_resize(results, np_random)
  draws = _ref_crop(results, np_random, (crop, crop))
  _ref_flip(results, np_random)
  if photometric:
    results['img'], _ = _ref_photometric(results['img'], np_random)
  img = _mmcv_imnormalize_bgr(results['img'])
  img = _mmcv_impad(img, (crop, crop), 0)
  seg = _mmcv_impad(np.ascontiguousarray(results['seg']), (crop, crop), 255)
  return img, seg, draws
