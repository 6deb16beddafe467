"""Inference with MMSegmentation's test-time semantics, and dataset evaluation.

Per image: the config's test pipeline (keep-ratio resize, resize to a multiple
of 14, normalize) for each scale ratio and flip; sliding-window or whole-image
logits at that size; bilinear resize to the original size; with several
augmentations the softmax probabilities are averaged (mmseg `aug_test`).
"""
import json
import os
import time

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from internseg_jax import metrics
from internseg_jax.data import transforms
from internseg_jax.data.ade20k_meta import class_names
from internseg_jax.models.resize import resize_bilinear


def slide_windows(height: int, width: int, crop: int, stride: int):
  """mmseg slide_inference windows (y1, y2, x1, x2): a grid of
  max(size - crop + stride - 1, 0) // stride + 1 per side, the last window flush
  with the border, windows clipped to images smaller than the crop."""
  def starts(size):
    count = max(size - crop + stride - 1, 0) // stride + 1
    spans = []
    for i in range(count):
      end = min(i * stride + crop, size)
      spans.append((max(end - crop, 0), end))
    return spans
  return [(y1, y2, x1, x2) for y1, y2 in starts(height) for x1, x2 in starts(width)]


def _run_batches(model, crops: np.ndarray, batch_size: int) -> np.ndarray:
  """Logits of equally sized normalized crops, `batch_size` at a time (the last
  batch padded so one compiled shape serves them all)."""
  from internseg_jax.api import compute_logits  # api imports this module lazily too
  outs = []
  for start in range(0, len(crops), batch_size):
    chunk = crops[start:start + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
    outs.append(np.asarray(jax.device_get(compute_logits(model, chunk)))[:batch_size - pad])
  return np.concatenate(outs)


def image_logits(model, image: np.ndarray) -> np.ndarray:
  """(H, W, 3) normalized image -> (H, W, K) logits by the config's eval.mode."""
  ev = model.config.eval
  h, w = image.shape[:2]
  batch = ev.get('batch_size', 1)
  if ev.mode == 'whole':
    return _run_batches(model, image[None], 1)[0]
  if ev.mode != 'slide':
    raise ValueError(f"eval.mode must be 'slide' or 'whole', got {ev.mode!r}")
  windows = slide_windows(h, w, ev.crop_size, ev.stride)
  sums = np.zeros((h, w, model.config.model.decode_head.num_classes), np.float32)
  count = np.zeros((h, w, 1), np.float32)
  by_shape = {}
  for win in windows:  # windows of one size share a compiled forward
    by_shape.setdefault((win[1] - win[0], win[3] - win[2]), []).append(win)
  for group in by_shape.values():
    crops = np.stack([image[y1:y2, x1:x2] for y1, y2, x1, x2 in group])
    for (y1, y2, x1, x2), logits in zip(group, _run_batches(model, crops, batch)):
      sums[y1:y2, x1:x2] += logits
      count[y1:y2, x1:x2] += 1
  return sums / count


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def predict_logits(model, image: np.ndarray) -> np.ndarray:
  """(H, W, 3) uint8 RGB -> (H, W, K) float32 at the original size: logits for
  one augmentation, mean softmax probabilities for several."""
  ev = model.config.eval
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f'expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}')
  size = image.shape[:2]
  scales = tuple(ev.get('scales', (1.0,)))
  flips = (False, True) if ev.get('flip', False) else (False,)
  outputs = []
  for ratio in scales:
    x = transforms.test_transform(image, resize=ev.resize, scale=tuple(ev.scale),
                                  divisor=model.config.model.backbone.patch_size, ratio=ratio,
                                  crop_size=ev.crop_size)
    for flip in flips:
      logits = image_logits(model, x[:, ::-1] if flip else x)
      logits = logits[:, ::-1] if flip else logits
      outputs.append(resize_bilinear(np.ascontiguousarray(logits)[None], size)[0])
  if len(outputs) == 1:
    return outputs[0]
  return np.mean([_softmax(o) for o in outputs], axis=0).astype(np.float32)


def evaluate(model, dataset, workdir: str | None = None, limit: int | None = None) -> dict:
  """mIoU over a source of {'image', 'label'} records (labels already reduced),
  streaming: only per-class areas are kept. Writes eval_results.json to workdir."""
  num_classes = model.config.model.decode_head.num_classes
  acc = metrics.IoUAccumulator(num_classes)
  n = len(dataset) if limit is None else min(limit, len(dataset))
  start = time.time()
  for i in tqdm(range(n), desc='eval', unit='img'):
    record = dataset[i]
    pred = np.argmax(predict_logits(model, record['image']), axis=-1)
    acc.update(pred, record['label'])
  result = acc.result()
  names = class_names(num_classes, model.config.data.get('class_names'))
  logging.info('evaluated %d images in %.1f s\n%s', n, time.time() - start,
               metrics.format_table(result, names))
  if workdir is not None:
    write_results(workdir, result, names, n)
  return result


def write_results(workdir: str, result: dict, names, num_images: int) -> str:
  """eval_results.json: mIoU, aAcc, mAcc (fractions) and per-class IoU/Acc by name."""
  to_float = lambda x: None if np.isnan(x) else float(x)
  out = dict(mIoU=to_float(result['mIoU']), aAcc=to_float(result['aAcc']),
             mAcc=to_float(result['mAcc']), num_images=num_images,
             IoU={n: to_float(v) for n, v in zip(names, result['IoU'])},
             Acc={n: to_float(v) for n, v in zip(names, result['Acc'])})
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'eval_results.json')
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(out, f, indent=2)
  os.replace(tmp, path)
  return path
