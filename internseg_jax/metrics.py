"""Semantic segmentation metrics with mmseg v0.27 semantics (mIoU, aAcc, mAcc).

Per-class intersection, union, predicted area and label area are summed over the
whole split (not averaged per image), then IoU = I/U and Acc = I/label_area, NaN
where the denominator is 0; mIoU and mAcc are nanmeans, aAcc = sum(I)/sum(label_area).
`mean_iou` is the one-shot form of `IoUAccumulator`, which streams one image at a
time and can be merged across processes (sum the int64 areas, e.g. with an
all-reduce, then `add_areas`).
"""
import math
import warnings
from typing import Optional, Sequence

import numpy as np

from internseg_jax.data.ade20k_meta import class_names as default_names
from internseg_jax.data.transforms import reduce_zero_label


class IoUAccumulator:
  """Streaming per-class areas; `result()` gives the same dict as `mean_iou`."""

  def __init__(self, num_classes: int, ignore_index: int = 255,
               reduce_zero_label: bool = False):
    if num_classes < 1:
      raise ValueError(f'num_classes must be positive, got {num_classes}')
    self.num_classes = int(num_classes)
    self.ignore_index = ignore_index
    self.reduce_zero_label = reduce_zero_label
    self.reset()

  def reset(self) -> None:
    zeros = lambda: np.zeros(self.num_classes, np.int64)
    self.area_intersect = zeros()
    self.area_union = zeros()
    self.area_pred = zeros()
    self.area_label = zeros()
    self.num_images = 0

  def image_areas(self, pred, label):
    """The 4 per-class int64 area arrays of one image (the state is unchanged)."""
    pred = np.asarray(pred)
    label = np.asarray(label)
    if pred.shape != label.shape:
      raise ValueError(f'prediction shape {pred.shape} != label shape {label.shape}')
    if self.reduce_zero_label:
      label = reduce_zero_label(label)
    label = label.astype(np.int64, copy=False).ravel()
    pred = pred.astype(np.int64, copy=False).ravel()
    valid = label != self.ignore_index
    label = label[valid]
    pred = pred[valid]
    c = self.num_classes
    if label.size and (label.min() < 0 or label.max() >= c):
      bad = np.unique(label[(label < 0) | (label >= c)])[:10].tolist()
      raise ValueError(f'label values {bad} are outside 0..{c - 1} and are not '
                       f'ignore_index={self.ignore_index}')
    if pred.size and (pred.min() < 0 or pred.max() >= c):
      bad = np.unique(pred[(pred < 0) | (pred >= c)])[:10].tolist()
      raise ValueError(f'prediction values {bad} are outside 0..{c - 1}')
    area_intersect = np.bincount(label[pred == label], minlength=c)
    area_pred = np.bincount(pred, minlength=c)
    area_label = np.bincount(label, minlength=c)
    area_union = area_pred + area_label - area_intersect
    return (area_intersect.astype(np.int64), area_union.astype(np.int64),
            area_pred.astype(np.int64), area_label.astype(np.int64))

  def update(self, pred, label) -> None:
    """Adds one (H, W) prediction and its (H, W) label map."""
    self.add_areas(*self.image_areas(pred, label), num_images=1)

  def add_areas(self, area_intersect, area_union, area_pred, area_label,
                num_images: int = 0) -> None:
    """Adds per-class areas computed elsewhere (another process, a device reduction)."""
    areas = [np.asarray(a) for a in (area_intersect, area_union, area_pred, area_label)]
    for a in areas:
      if a.shape != (self.num_classes,):
        raise ValueError(f'areas must have shape ({self.num_classes},), got {a.shape}')
    self.area_intersect += areas[0].astype(np.int64)
    self.area_union += areas[1].astype(np.int64)
    self.area_pred += areas[2].astype(np.int64)
    self.area_label += areas[3].astype(np.int64)
    self.num_images += int(num_images)

  def merge(self, other: 'IoUAccumulator') -> 'IoUAccumulator':
    """Adds another accumulator's areas into this one; returns self."""
    if other.num_classes != self.num_classes:
      raise ValueError(f'cannot merge {other.num_classes} classes into {self.num_classes}')
    self.add_areas(*other.areas(), num_images=other.num_images)
    return self

  def areas(self):
    """(intersect, union, pred_area, label_area), each an int64 (num_classes,) copy."""
    return (self.area_intersect.copy(), self.area_union.copy(),
            self.area_pred.copy(), self.area_label.copy())

  def result(self) -> dict:
    """{'aAcc', 'mIoU', 'mAcc': float, 'IoU', 'Acc': (num_classes,) float64}, 0..1."""
    inter = self.area_intersect.astype(np.float64)
    union = self.area_union.astype(np.float64)
    label = self.area_label.astype(np.float64)
    with np.errstate(divide='ignore', invalid='ignore'):
      iou = np.where(union > 0, inter / union, np.nan)
      acc = np.where(label > 0, inter / label, np.nan)
    total = label.sum()
    return {
        'aAcc': float(inter.sum() / total) if total > 0 else math.nan,
        'mIoU': _nanmean(iou),
        'mAcc': _nanmean(acc),
        'IoU': iou,
        'Acc': acc,
    }


def _nanmean(x: np.ndarray) -> float:
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', RuntimeWarning)  # all-NaN -> NaN, quietly
    return float(np.nanmean(x))


def mean_iou(preds: Sequence[np.ndarray], labels: Sequence[np.ndarray],
             num_classes: int, ignore_index: int = 255,
             reduce_zero_label: bool = False) -> dict:
  """mIoU / aAcc / mAcc over lists of (H, W) int prediction and label maps.

  Returns {'mIoU', 'aAcc', 'mAcc', 'IoU', 'Acc'} as float64 fractions in 0..1;
  IoU[c] is NaN where class c is neither predicted nor labelled, Acc[c] where it
  is not labelled. Raises ValueError on mismatched shapes or out-of-range labels.
  """
  if len(preds) != len(labels):
    raise ValueError(f'{len(preds)} predictions but {len(labels)} labels')
  acc = IoUAccumulator(num_classes, ignore_index, reduce_zero_label)
  for i, (pred, label) in enumerate(zip(preds, labels)):
    try:
      acc.update(pred, label)
    except ValueError as e:
      raise ValueError(f'image {i}: {e}') from None
  return acc.result()


def _pct(x: float) -> str:
  return 'nan' if math.isnan(x) else f'{100.0 * x:.2f}'


def format_table(result: dict, class_names: Optional[Sequence[str]] = None) -> str:
  """Per-class IoU / Acc table in %, then an aAcc / mIoU / mAcc summary (mmseg's eval log).

  class_names defaults to `ade20k_meta.class_names(num_classes)`.
  """
  iou = np.asarray(result['IoU'], np.float64)
  acc = np.asarray(result.get('Acc', np.full_like(iou, np.nan)), np.float64)
  if class_names is None:
    class_names = default_names(len(iou))
  if len(class_names) != len(iou):
    raise ValueError(f'{len(class_names)} class names for {len(iou)} classes')
  rows = [(str(n).strip(), _pct(i), _pct(a)) for n, i, a in zip(class_names, iou, acc)]
  lines = ['per class results:'] + _grid(('Class', 'IoU', 'Acc'), rows)
  summary = (_pct(result['aAcc']), _pct(result['mIoU']), _pct(result['mAcc']))
  lines += ['Summary:'] + _grid(('aAcc', 'mIoU', 'mAcc'), [summary])
  return '\n'.join(lines)


def _grid(header, rows):
  widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]
  rule = '+' + '+'.join('-' * (w + 2) for w in widths) + '+'
  fmt = lambda r: '| ' + ' | '.join(c.ljust(w) for c, w in zip(r, widths)) + ' |'
  return [rule, fmt(header), rule, *[fmt(r) for r in rows], rule]
