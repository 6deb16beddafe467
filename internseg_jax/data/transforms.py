"""Image transforms with mmcv 1.x / mmseg 0.27 semantics (docs/reference.md, "Data").

Images are numpy uint8 (H, W, 3) in RGB. Every resize is OpenCV bilinear on the
uint8 image and rounds back to uint8, as mmcv does: resizing in float, or going
to the final size in one step, gives different pixels and measurably different
predictions. Sizes follow mmcv's conventions: `(w, h)` in `rescale_size`, but
`(h, w)` in `test_size`, like numpy shapes.

Test pipeline of the seed (configs/_base_/datasets/ade20k_504x504*.py):
  short_side  SETR_Resize(keep_ratio, crop_size=504, setr_multi_scale=True):
              short side -> max(min(scale), 504); the full-data configs.
  fit         Resize(keep_ratio): as large as fits in (2016, 504) by the mmcv
              rule; the few-shot 1/2 ... 1/16 configs.
then ResizeToMultiple(size_divisor=14), then Normalize.
"""
import math
from typing import Sequence

import cv2
import numpy as np

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
# mmseg's Normalize casts mean and std to float32 before mmcv.imnormalize.
_MEAN32 = np.asarray(MEAN, np.float32)
_STD32 = np.asarray(STD, np.float32)

TEST_MODES = ('short_side', 'fit')


def _check_image(img) -> None:
  if not isinstance(img, np.ndarray):
    raise ValueError(f'expected a numpy uint8 (H, W, 3) image, got {type(img).__name__}')
  if img.dtype != np.uint8:
    raise ValueError(f'expected a uint8 image, got dtype {img.dtype}; resizes must run '
                     'on uint8 to match mmcv')
  if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] < 1 or img.shape[1] < 1:
    raise ValueError(f'expected an (H, W, 3) image, got shape {img.shape}')


def _check_size(w: int, h: int, what: str) -> None:
  if w < 1 or h < 1:
    raise ValueError(f'{what} gives an empty image ({w}x{h}); the image is too elongated')


def _cv2_resize(img: np.ndarray, w: int, h: int, interpolation: int) -> np.ndarray:
  # cv2 rejects negative strides (e.g. np.flip views).
  return cv2.resize(np.ascontiguousarray(img), (w, h), interpolation=interpolation)


# ----------------------------------------------------------------------------
# Output sizes: pure functions of the input size.
# ----------------------------------------------------------------------------


def rescale_size(w: int, h: int, scale: Sequence[float]) -> tuple[int, int]:
  """mmcv.rescale_size: the keep-ratio size that fits within `scale`.

  Args:
    w: input width.
    h: input height.
    scale: (long_max, short_max); the order does not matter, the larger entry
      bounds the long side.

  Returns:
    (new_w, new_h) = int(x * factor + 0.5) with
    factor = min(long_max / max(h, w), short_max / min(h, w)).
  """
  if w < 1 or h < 1:
    raise ValueError(f'image size must be positive, got w={w}, h={h}')
  if len(scale) != 2 or min(scale) <= 0:
    raise ValueError(f'scale must be two positive numbers, got {scale}')
  factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
  return int(w * factor + 0.5), int(h * factor + 0.5)


def short_side_size(w: int, h: int, short: float) -> tuple[int, int]:
  """Keep-ratio size whose short side is `short`, as SETR_Resize computes it.

  SETR_Resize (setr_multi_scale=True) builds the per-image scale
  (short * long / short_side, short) in floats and hands it to the mmcv rule.
  For short = 504 and sides up to 3000 this equals int(x * short / min(h, w) + 0.5).
  """
  if w < 1 or h < 1:
    raise ValueError(f'image size must be positive, got w={w}, h={h}')
  if short <= 0:
    raise ValueError(f'short must be positive, got {short}')
  scale = (short * h / w, short) if h > w else (short, short * w / h)
  return rescale_size(w, h, scale)


def multiple_size(w: int, h: int, divisor: int = 14) -> tuple[int, int]:
  """mmcv.imresize_to_multiple(scale_factor=1): each side up to a multiple (ceil)."""
  if divisor < 1:
    raise ValueError(f'divisor must be positive, got {divisor}')
  return math.ceil(w / divisor) * divisor, math.ceil(h / divisor) * divisor


def ratio_scale(scale: Sequence[int], ratio: float) -> tuple[int, int]:
  """MultiScaleFlipAug's img_scale for one of its img_ratios: int(x * ratio)."""
  if ratio <= 0:
    raise ValueError(f'ratio must be positive, got {ratio}')
  return int(scale[0] * ratio), int(scale[1] * ratio)


def _first_size(w, h, resize, scale, ratio, crop_size):
  """Size after the keep-ratio step of the test pipeline."""
  if resize not in TEST_MODES:
    raise ValueError(f'resize must be one of {TEST_MODES}, got {resize!r}')
  scale = ratio_scale(scale, ratio)
  if resize == 'fit':
    size = rescale_size(w, h, scale)
  else:
    # SETR_Resize never lets the short side drop below the crop size, so the
    # ratios < 1 of multi-scale testing all land on 504.
    size = short_side_size(w, h, max(min(scale), crop_size))
  _check_size(*size, f'resize={resize!r}, scale={scale}')
  return size


def test_size(h: int, w: int, resize: str = 'short_side', scale: Sequence[int] = (2016, 504),
              divisor: int = 14, ratio: float = 1.0, crop_size: int = 504) -> tuple[int, int]:
  """(H', W') that `test_transform` produces for an (h, w) image, without pixels."""
  new_w, new_h = _first_size(w, h, resize, scale, ratio, crop_size)
  if divisor:
    new_w, new_h = multiple_size(new_w, new_h, divisor)
  return new_h, new_w


# ----------------------------------------------------------------------------
# Pixel transforms.
# ----------------------------------------------------------------------------


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
  """mmseg's `reduce_zero_label`: 0 -> 255, k -> k-1, and 255 stays 255 (int64)."""
  label = np.asarray(label).astype(np.int64)
  zero = label == 0
  label = label - 1
  label[zero] = 255
  label[label == 254] = 255  # what was 255 (ignore) before the shift
  return label


def normalize(img: np.ndarray) -> np.ndarray:
  """(img - MEAN) / STD in float32, bit-identical to mmcv.imnormalize."""
  _check_image(img)
  return (img.astype(np.float32) - _MEAN32) / _STD32


def keep_ratio_resize(img: np.ndarray, scale: Sequence[float],
                      interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
  """mmcv.imrescale: keep-ratio resize to fit within scale = (long_max, short_max)."""
  _check_image(img)
  h, w = img.shape[:2]
  new_w, new_h = rescale_size(w, h, scale)
  _check_size(new_w, new_h, f'scale {tuple(scale)}')
  return _cv2_resize(img, new_w, new_h, interpolation)


def test_transform(img: np.ndarray, resize: str = 'short_side',
                   scale: Sequence[int] = (2016, 504), divisor: int = 14,
                   ratio: float = 1.0, crop_size: int = 504) -> np.ndarray:
  """The seed's test pipeline: keep-ratio resize, resize to a multiple, normalize.

  Args:
    img: uint8 (H, W, 3) RGB image.
    resize: 'short_side' (short side -> max(int(scale[1] * ratio), crop_size))
      or 'fit' (within (int(scale[0] * ratio), int(scale[1] * ratio))).
    scale: the config's img_scale, (long, short).
    divisor: ResizeToMultiple's size_divisor (the patch size; 0: no such step).
    ratio: one of MultiScaleFlipAug's img_ratios (1.0 without TTA).
    crop_size: SETR_Resize's lower bound on the short side ('short_side' only;
      0 disables it).

  Returns:
    float32 (H', W', 3) normalized image, (H', W') = test_size(H, W, ...).
  """
  _check_image(img)
  h, w = img.shape[:2]
  first_w, first_h = _first_size(w, h, resize, scale, ratio, crop_size)
  img = _cv2_resize(img, first_w, first_h, cv2.INTER_LINEAR)
  if divisor:
    img = _cv2_resize(img, *multiple_size(first_w, first_h, divisor), cv2.INTER_LINEAR)
  return normalize(img)


# Keep pytest from collecting these when a test module imports them by name.
test_size.__test__ = False
test_transform.__test__ = False



# ----------------------------------------------------------------------------
# Training transforms.
#
# The seed's train pipeline (configs/_base_/datasets/ade20k_504x504.py):
#   Resize(img_scale=(2016, 504), ratio_range=(0.5, 2.0))
#   RandomCrop(crop_size=(504, 504), cat_max_ratio=0.75)
#   RandomFlip(prob=0.5)
#   PhotoMetricDistortion()
#   Normalize(mean, std, to_rgb=True)
#   Pad(size=(504, 504), pad_val=0, seg_pad_val=255)
# Pad runs after Normalize, so padded image pixels are 0 in normalized units
# (the mean colour), not black. mmseg loads BGR and turns it into RGB only in
# Normalize; every step before is channel-order agnostic except the HSV round
# trips, which use the RGB conversions here (RGB2HSV on RGB == BGR2HSV on BGR).
# All randomness comes from the caller's np.random.Generator; the draws
# mirror mmseg's sequence of np.random calls one for one.
# ----------------------------------------------------------------------------


def _check_rng(rng) -> None:
  if not isinstance(rng, np.random.Generator):
    raise ValueError(f'rng must be a numpy.random.Generator, got {type(rng).__name__}')


def _check_label(label, img: np.ndarray) -> None:
  if not isinstance(label, np.ndarray):
    raise ValueError(f'expected a numpy uint8 (H, W) label, got {type(label).__name__}')
  if label.dtype != np.uint8:
    raise ValueError(f'expected a uint8 label, got dtype {label.dtype}')
  if label.ndim != 2:
    raise ValueError(f'expected an (H, W) label, got shape {label.shape}')
  if label.shape != img.shape[:2]:
    raise ValueError(f'label shape {label.shape} does not match image shape {img.shape[:2]}')


def _check_pair(image, label) -> None:
  _check_image(image)
  _check_label(label, image)


def _pair(size, what: str) -> tuple[int, int]:
  """An int or (h, w) size as a pair of positive ints."""
  if isinstance(size, (int, np.integer)):
    size = (size, size)
  if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
    raise ValueError(f'{what} must be a positive int or an (h, w) pair of them, got {size}')
  return int(size[0]), int(size[1])


def random_resize(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                  scale: Sequence[int] = (2016, 504),
                  ratio_range: Sequence[float] = (0.5, 2.0)) -> tuple[np.ndarray, np.ndarray]:
  """mmseg Resize(img_scale=scale, ratio_range=ratio_range, keep_ratio=True).

  r ~ U(ratio_range); the target scale is (int(scale[0] * r), int(scale[1] * r))
  and the image is rescaled to fit in it by the mmcv rule (`rescale_size`).

  Args:
    image: uint8 (H, W, 3) RGB image.
    label: uint8 (H, W) label map.
    rng: source of the ratio.
    scale: the config's img_scale, (long, short).
    ratio_range: (min_ratio, max_ratio).

  Returns:
    (image, label) at the new size; the image resized bilinearly in uint8, the
    label with nearest neighbour.
  """
  _check_pair(image, label)
  _check_rng(rng)
  lo, hi = ratio_range
  if not 0 < lo <= hi:
    raise ValueError(f'ratio_range must be 0 < min <= max, got {tuple(ratio_range)}')
  ratio = rng.random() * (hi - lo) + lo
  target = ratio_scale(scale, ratio)
  h, w = image.shape[:2]
  new_w, new_h = rescale_size(w, h, target)
  _check_size(new_w, new_h, f'scale {target}')
  return (_cv2_resize(image, new_w, new_h, cv2.INTER_LINEAR),
          _cv2_resize(label, new_w, new_h, cv2.INTER_NEAREST))


def _crop_bbox(h: int, w: int, crop_h: int, crop_w: int,
               rng: np.random.Generator) -> tuple[int, int]:
  """RandomCrop.get_crop_bbox: the top-left corner, uniform over the valid range."""
  y = int(rng.integers(0, max(h - crop_h, 0) + 1))
  x = int(rng.integers(0, max(w - crop_w, 0) + 1))
  return y, x


def _crop_ok(label: np.ndarray, cat_max_ratio: float, ignore_index: int) -> bool:
  """mmseg's test `len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < cat_max_ratio`,
  cnt being the pixel counts of the non-ignored classes present in the crop."""
  # bincount instead of np.unique: no sort, same counts.
  cnt = np.bincount(label.ravel(), minlength=256)
  if 0 <= ignore_index < cnt.size:
    cnt[ignore_index] = 0
  cnt = cnt[cnt > 0]
  return len(cnt) > 1 and cnt.max() / cnt.sum() < cat_max_ratio


def random_crop(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                crop=504, cat_max_ratio: float = 0.75,
                ignore_index: int = 255) -> tuple[np.ndarray, np.ndarray]:
  """mmseg RandomCrop(crop_size=crop, cat_max_ratio=cat_max_ratio).

  Sides shorter than the crop are kept whole (Pad fills them up later). With
  cat_max_ratio < 1 a crop is redrawn, up to 10 times, while it fails
  `_crop_ok`; as in mmseg, the box drawn after the tenth failure is used
  unchecked.

  Args:
    image: uint8 (H, W, 3) image.
    label: uint8 (H, W) label map.
    rng: source of the crop positions.
    crop: int or (h, w) crop size.
    cat_max_ratio: largest share one class may have of the crop's labelled
      pixels; 1 (or more) disables the retries.
    ignore_index: label value left out of the class counts.

  Returns:
    (image, label) views of the inputs, (min(H, h), min(W, w)) in size.
  """
  _check_pair(image, label)
  _check_rng(rng)
  crop_h, crop_w = _pair(crop, 'crop')
  h, w = label.shape
  y, x = _crop_bbox(h, w, crop_h, crop_w, rng)
  if cat_max_ratio < 1:
    for _ in range(10):
      if _crop_ok(label[y:y + crop_h, x:x + crop_w], cat_max_ratio, ignore_index):
        break
      y, x = _crop_bbox(h, w, crop_h, crop_w, rng)
  return image[y:y + crop_h, x:x + crop_w], label[y:y + crop_h, x:x + crop_w]


def random_flip(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                prob: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
  """mmseg RandomFlip(prob, direction='horizontal'): flip when rng.random() < prob.

  Returns the inputs themselves when not flipping, else new contiguous arrays.
  """
  _check_pair(image, label)
  _check_rng(rng)
  if not 0 <= prob <= 1:
    raise ValueError(f'prob must be in [0, 1], got {prob}')
  if rng.random() < prob:
    return cv2.flip(image, 1), cv2.flip(label, 1)
  return image, label


_ARANGE32 = np.arange(256, dtype=np.float32)
_IDENTITY_LUT = np.arange(256, dtype=np.uint8)


def _convert_lut(alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
  """PhotoMetricDistortion.convert as a 256-entry table.

  convert is `clip(img.astype(float32) * alpha + beta, 0, 255).astype(uint8)`,
  a function of the pixel value alone, so a table lookup is bit-identical.
  alpha and beta must be Python floats so the arithmetic stays in float32.
  """
  return np.clip(_ARANGE32 * alpha + beta, 0, 255).astype(np.uint8)


def _hsv_channel_lut(image: np.ndarray, channel: int, lut: np.ndarray) -> np.ndarray:
  """RGB -> HSV, one channel through `lut`, back to RGB (one mmseg HSV step)."""
  tables = [_IDENTITY_LUT] * 3
  tables[channel] = lut
  hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
  hsv = cv2.LUT(hsv, np.stack(tables, axis=-1)[:, None, :])
  return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator,
                           brightness_delta: int = 32,
                           contrast_range: Sequence[float] = (0.5, 1.5),
                           saturation_range: Sequence[float] = (0.5, 1.5),
                           hue_delta: int = 18) -> np.ndarray:
  """mmseg PhotoMetricDistortion on a uint8 RGB image.

  In order, each step with probability 1/2:
    brightness  + U(-brightness_delta, brightness_delta)
    contrast    * U(contrast_range), here if mode == 1 (mode ~ {0, 1})
    saturation  S * U(saturation_range), in its own RGB->HSV->RGB round trip
    hue         H + randint(-hue_delta, hue_delta) mod 180 (high end
                exclusive, as numpy's randint), in its own round trip
    contrast    here if mode == 0
  Every change is computed in float32, clipped to [0, 255] and truncated back
  to uint8 (PhotoMetricDistortion.convert), or wraps around for the hue. HSV
  is OpenCV's 8-bit HSV (H in [0, 180)).

  Returns:
    uint8 (H, W, 3); the input itself when no step fires.
  """
  _check_image(image)
  _check_rng(rng)
  c_lo, c_hi = contrast_range
  s_lo, s_hi = saturation_range

  def contrast(img):
    if rng.integers(2):
      return cv2.LUT(img, _convert_lut(alpha=float(rng.uniform(c_lo, c_hi))))
    return img

  if rng.integers(2):
    beta = float(rng.uniform(-brightness_delta, brightness_delta))
    image = cv2.LUT(image, _convert_lut(beta=beta))
  mode = rng.integers(2)
  if mode == 1:
    image = contrast(image)
  if rng.integers(2):
    alpha = float(rng.uniform(s_lo, s_hi))
    image = _hsv_channel_lut(image, 1, _convert_lut(alpha=alpha))
  if rng.integers(2):
    delta = int(rng.integers(-hue_delta, hue_delta)) if hue_delta > 0 else 0
    hue_lut = ((np.arange(256) + delta) % 180).astype(np.uint8)
    image = _hsv_channel_lut(image, 0, hue_lut)
  if mode == 0:
    image = contrast(image)
  return image


def pad(image: np.ndarray, label: np.ndarray, size=504, pad_val: float = 0,
        seg_pad_val: int = 255) -> tuple[np.ndarray, np.ndarray]:
  """mmseg Pad(size=size): fill up to `size` at the bottom and right.

  Args:
    image: (H, W, C) image, uint8 or (after `normalize`) float32.
    label: uint8 (H, W) label map.
    size: int or (h, w); at least the image size.
    pad_val: value of the added image pixels.
    seg_pad_val: value of the added label pixels.

  Returns:
    (image, label) of spatial size `size`; the inputs themselves if they
    already have it.
  """
  if not isinstance(image, np.ndarray) or image.ndim != 3:
    raise ValueError(f'expected an (H, W, C) numpy image, got '
                     f'{getattr(image, "shape", type(image).__name__)}')
  _check_label(label, image)
  size_h, size_w = _pair(size, 'size')
  h, w = label.shape
  if h > size_h or w > size_w:
    raise ValueError(f'cannot pad a {h}x{w} image to the smaller size {size_h}x{size_w}')
  if (h, w) == (size_h, size_w):
    return image, label
  out_img = np.full((size_h, size_w, image.shape[2]), pad_val, image.dtype)
  out_img[:h, :w] = image
  out_label = np.full((size_h, size_w), seg_pad_val, np.uint8)
  out_label[:h, :w] = label
  return out_img, out_label


# normalize() of every uint8 value per channel, so that a cv2.LUT normalizes in
# one pass, bit-identical to normalize().
_NORMALIZE_LUT = normalize(np.repeat(_IDENTITY_LUT[None, :, None], 3, axis=2))


def train_transform(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                    crop_size=504, scale: Sequence[int] = (2016, 504),
                    ratio_range: Sequence[float] = (0.5, 2.0), cat_max_ratio: float = 0.75,
                    flip_prob: float = 0.5,
                    photometric: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """The seed's train pipeline: resize, crop, flip, photometric, normalize, pad.

  Args:
    image: uint8 (H, W, 3) RGB image.
    label: uint8 (H, W) label map, 255 = ignore (after reduce_zero_label).
    rng: the only source of randomness.
    crop_size: int or (h, w); the output size.
    scale: Resize's img_scale, (long, short).
    ratio_range: Resize's ratio_range.
    cat_max_ratio: RandomCrop's cat_max_ratio (ignore index 255).
    flip_prob: RandomFlip's prob.
    photometric: whether to apply PhotoMetricDistortion.

  Returns:
    (float32 (h, w, 3) normalized image, padded with 0;
     uint8 (h, w) label, padded with 255), both C-contiguous.
  """
  _check_pair(image, label)
  _check_rng(rng)
  image, label = random_resize(image, label, rng, scale, ratio_range)
  image, label = random_crop(image, label, rng, crop_size, cat_max_ratio)
  image, label = random_flip(image, label, rng, flip_prob)
  if photometric:
    image = photometric_distortion(image, rng)
  image = cv2.LUT(image, _NORMALIZE_LUT)
  image, label = pad(image, label, crop_size, 0, 255)
  return image, np.ascontiguousarray(label)
