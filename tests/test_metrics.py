"""mean_iou / IoUAccumulator against an independent numpy reference and hand-computed cases."""
import math

import numpy as np
import pytest

from internseg_jax import metrics
from internseg_jax.data import transforms
from internseg_jax.data import ade20k_meta


def reference(preds, labels, num_classes, ignore_index=255, reduce_zero=False):
  """Straightforward per-class boolean-mask computation, summed over images."""
  inter = np.zeros(num_classes)
  union = np.zeros(num_classes)
  area_label = np.zeros(num_classes)
  for pred, label in zip(preds, labels):
    label = label.astype(np.int64)
    if reduce_zero:
      label = np.where((label == 0) | (label == 255), 255, label - 1)
    valid = label != ignore_index
    for c in range(num_classes):
      p = (pred == c) & valid
      g = (label == c) & valid
      inter[c] += np.sum(p & g)
      union[c] += np.sum(p | g)
      area_label[c] += np.sum(g)
  iou = np.array([i / u if u else np.nan for i, u in zip(inter, union)])
  acc = np.array([i / a if a else np.nan for i, a in zip(inter, area_label)])
  return {'IoU': iou, 'Acc': acc, 'aAcc': inter.sum() / area_label.sum(),
          'mIoU': np.nanmean(iou), 'mAcc': np.nanmean(acc)}


def random_case(rng, num_images=5, num_classes=7, max_label=None):
  """Class 5 never appears; class 6 is only predicted, never labelled."""
  max_label = num_classes - 1 if max_label is None else max_label
  preds, labels = [], []
  for _ in range(num_images):
    h, w = rng.integers(5, 40, size=2)
    label = rng.integers(0, max_label, size=(h, w))   # excludes max_label (6)
    label[label == 5] = 4
    label[rng.random((h, w)) < 0.2] = 255
    pred = np.where(rng.random((h, w)) < 0.6, label, rng.integers(0, num_classes, size=(h, w)))
    pred[pred == 255] = 0
    pred[pred == 5] = 6
    preds.append(pred.astype(np.int32))
    labels.append(label.astype(np.uint8))
  return preds, labels


def assert_same(result, expected):
  for key in ('IoU', 'Acc'):
    assert result[key].dtype == np.float64
    np.testing.assert_array_equal(np.isnan(result[key]), np.isnan(expected[key]))
    np.testing.assert_allclose(result[key], expected[key], rtol=1e-12, equal_nan=True)
  for key in ('aAcc', 'mIoU', 'mAcc'):
    assert result[key] == pytest.approx(expected[key], rel=1e-12, nan_ok=True)


def test_ade20k_meta_lengths():
  assert ade20k_meta.NUM_CLASSES == 150
  assert len(ade20k_meta.CLASSES) == 150 and len(set(ade20k_meta.CLASSES)) == 150
  assert len(ade20k_meta.PALETTE) == 150
  assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in ade20k_meta.PALETTE)
  assert ade20k_meta.CLASSES[:5] == ('wall', 'building', 'sky', 'floor', 'tree')
  assert ade20k_meta.CLASSES[-1] == 'flag'
  assert ade20k_meta.PALETTE[0] == (120, 120, 120)
  assert ade20k_meta.PALETTE[-1] == (92, 0, 255)


def test_random_matches_reference_with_nan_classes():
  preds, labels = random_case(np.random.default_rng(0))
  result = metrics.mean_iou(preds, labels, num_classes=7)
  expected = reference(preds, labels, 7)
  assert_same(result, expected)
  assert math.isnan(result['IoU'][5]) and math.isnan(result['Acc'][5])
  assert result['IoU'][6] == 0.0 and math.isnan(result['Acc'][6])
  assert np.isnan(result['IoU']).sum() == 1


def test_random_reduce_zero_label_matches_reference():
  rng = np.random.default_rng(1)
  preds, raw = [], []
  for _ in range(4):
    label = rng.integers(0, 7, size=(17, 23))           # 0 = background, 1..6 classes
    label[rng.random(label.shape) < 0.1] = 255
    raw.append(label.astype(np.uint8))
    preds.append(rng.integers(0, 6, size=label.shape))
  result = metrics.mean_iou(preds, raw, num_classes=6, reduce_zero_label=True)
  assert_same(result, reference(preds, raw, 6, reduce_zero=True))


def test_reduce_zero_label_mapping():
  label = np.array([[0, 1, 2, 150, 255]], np.uint8)
  np.testing.assert_array_equal(transforms.reduce_zero_label(label), [[255, 0, 1, 149, 255]])


def test_hand_computed_example():
  # 5 valid pixels (one ignored). class 0: I=1, U=2, label 2; class 1: I=2, U=4,
  # label 2; class 2: I=0, U=1, label 1; class 3: absent everywhere.
  label = np.array([[0, 0, 1], [1, 2, 255]])
  pred = np.array([[0, 1, 1], [1, 1, 0]])
  r = metrics.mean_iou([pred], [label], num_classes=4)
  np.testing.assert_allclose(r['IoU'][:3], [0.5, 0.5, 0.0])
  np.testing.assert_allclose(r['Acc'][:3], [0.5, 1.0, 0.0])
  assert math.isnan(r['IoU'][3]) and math.isnan(r['Acc'][3])
  assert r['aAcc'] == pytest.approx(3 / 5)
  assert r['mIoU'] == pytest.approx(1 / 3)
  assert r['mAcc'] == pytest.approx(1 / 2)


def test_hand_computed_predicted_only_class():
  r = metrics.mean_iou([np.array([[0, 2]])], [np.array([[0, 0]])], num_classes=3)
  np.testing.assert_allclose(r['IoU'], [0.5, np.nan, 0.0])
  np.testing.assert_allclose(r['Acc'], [0.5, np.nan, np.nan])
  assert r['aAcc'] == pytest.approx(0.5)
  assert r['mIoU'] == pytest.approx(0.25)
  assert r['mAcc'] == pytest.approx(0.5)


def test_areas_summed_over_images_not_averaged():
  # Image 1: class 0 perfect on 1 pixel; image 2: class 0 wrong on 3 pixels.
  preds = [np.array([[0]]), np.array([[1, 1, 1]])]
  labels = [np.array([[0]]), np.array([[0, 0, 0]])]
  r = metrics.mean_iou(preds, labels, num_classes=2)
  assert r['IoU'][0] == pytest.approx(1 / 4)   # per-image average would give 0.5
  assert r['aAcc'] == pytest.approx(1 / 4)


def test_streaming_merge_equals_one_shot():
  preds, labels = random_case(np.random.default_rng(2), num_images=6)
  one_shot = metrics.mean_iou(preds, labels, num_classes=7)
  parts = []
  for idx in ([0, 3], [1, 4, 5], [2]):
    acc = metrics.IoUAccumulator(7)
    for i in idx:
      acc.update(preds[i], labels[i])
    parts.append(acc)
  merged = parts[0].merge(parts[1]).merge(parts[2])
  assert merged.num_images == 6
  assert_same(merged.result(), one_shot)


def test_add_areas_from_stacked_sum():
  preds, labels = random_case(np.random.default_rng(3), num_images=4)
  one = metrics.IoUAccumulator(7)
  for p, l in zip(preds, labels):
    one.update(p, l)
  per_host = []
  for half in (slice(0, 2), slice(2, 4)):
    acc = metrics.IoUAccumulator(7)
    for p, l in zip(preds[half], labels[half]):
      acc.update(p, l)
    per_host.append(np.stack(acc.areas()))
  total = metrics.IoUAccumulator(7)
  total.add_areas(*sum(per_host))
  for a, b in zip(total.areas(), one.areas()):
    assert a.dtype == np.int64
    np.testing.assert_array_equal(a, b)
  assert_same(total.result(), one.result())


def test_errors():
  good = np.zeros((2, 3), np.int64)
  with pytest.raises(ValueError, match='image 1'):
    metrics.mean_iou([good, good], [good, np.zeros((3, 2))], num_classes=2)
  with pytest.raises(ValueError, match='outside'):
    metrics.mean_iou([good], [np.full((2, 3), 2)], num_classes=2)
  with pytest.raises(ValueError, match='outside'):
    metrics.mean_iou([good], [np.full((2, 3), -1)], num_classes=2)
  with pytest.raises(ValueError, match='prediction values'):
    metrics.mean_iou([np.full((2, 3), 5)], [good], num_classes=2)
  with pytest.raises(ValueError):
    metrics.mean_iou([good], [], num_classes=2)
  with pytest.raises(ValueError):
    metrics.IoUAccumulator(3).merge(metrics.IoUAccumulator(4))
  # 255 is ignored, not out of range; with reduce_zero_label 0 becomes ignored too.
  r = metrics.mean_iou([good], [np.full((2, 3), 255)], num_classes=2)
  assert math.isnan(r['mIoU']) and math.isnan(r['aAcc'])
  r = metrics.mean_iou([good], [np.array([[0, 1, 2], [0, 0, 255]])], num_classes=2,
                       reduce_zero_label=True)
  np.testing.assert_allclose(r['IoU'], [0.5, 0.0])  # labels -> [[255, 0, 1], [255]*3]


def test_format_table():
  preds, labels = random_case(np.random.default_rng(4), num_classes=7)
  r = metrics.mean_iou(preds, labels, num_classes=7)
  text = metrics.format_table(r, class_names=[f'c{i}' for i in range(7)])
  assert '| c0 ' in text and 'nan' in text
  assert f'{100 * r["IoU"][0]:.2f}' in text and f'{100 * r["Acc"][1]:.2f}' in text
  summary = text.split('Summary:')[1]
  for key in ('aAcc', 'mIoU', 'mAcc'):
    assert key in summary and f'{100 * r[key]:.2f}' in summary
  full = metrics.format_table(metrics.mean_iou([np.zeros((2, 2))], [np.zeros((2, 2))], 150))
  assert '| wall ' in full and '| flag ' in full and '100.00' in full
  with pytest.raises(ValueError):
    metrics.format_table(r, class_names=['a'])
