"""Image transforms with mmcv 1.x / mmseg 0.27 semantics (DESIGN.md A4).

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
  new_w, new_h = multiple_size(*_first_size(w, h, resize, scale, ratio, crop_size), divisor)
  return new_h, new_w


# ----------------------------------------------------------------------------
# Pixel transforms.
# ----------------------------------------------------------------------------


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


def resize_short_side(img: np.ndarray, short: float,
                      interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
  """Keep-ratio resize so that the short side becomes `short`, long side unbounded."""
  _check_image(img)
  h, w = img.shape[:2]
  new_w, new_h = short_side_size(w, h, short)
  _check_size(new_w, new_h, f'short side {short}')
  return _cv2_resize(img, new_w, new_h, interpolation)


def resize_fit(img: np.ndarray, scale: Sequence[float] = (2016, 504),
               interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
  """Keep-ratio resize to the largest size within scale = (long_max, short_max)."""
  return keep_ratio_resize(img, scale, interpolation)


def resize_to_multiple(img: np.ndarray, divisor: int = 14,
                       interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
  """mmseg ResizeToMultiple: stretch each side up to the next multiple of `divisor`.

  A side already a multiple is kept; cv2.resize to the same size is the identity.
  """
  _check_image(img)
  h, w = img.shape[:2]
  return _cv2_resize(img, *multiple_size(w, h, divisor), interpolation)


def test_transform(img: np.ndarray, resize: str = 'short_side',
                   scale: Sequence[int] = (2016, 504), divisor: int = 14,
                   ratio: float = 1.0, crop_size: int = 504) -> np.ndarray:
  """The seed's test pipeline: keep-ratio resize, resize to a multiple, normalize.

  Args:
    img: uint8 (H, W, 3) RGB image.
    resize: 'short_side' (short side -> max(int(scale[1] * ratio), crop_size))
      or 'fit' (within (int(scale[0] * ratio), int(scale[1] * ratio))).
    scale: the config's img_scale, (long, short).
    divisor: the patch size; both output sides are multiples of it.
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
  img = _cv2_resize(img, *multiple_size(first_w, first_h, divisor), cv2.INTER_LINEAR)
  return normalize(img)


# Keep pytest from collecting these when a test module imports them by name.
test_size.__test__ = False
test_transform.__test__ = False

