"""Inference with MMSegmentation's test-time semantics, for one image or many.

Per image and test-time view (scale ratio x flip): the test pipeline
(`transforms.test_transform`), windows (`slide`, mmseg's grid) or the whole
view, the logits of each window (a logits function: normalized (B, h, w, 3) ->
(B, h, w, K), already upsampled to the window), summed over overlaps and
divided by the count; each view resized (bilinear, PyTorch semantics) to the
original size; with several views, the mean of their softmax probabilities
(mmseg `aug_test`).

`WindowRunner` packs the windows of many views into fixed-size batches (one
compiled shape in the common case: every window of a short-side-resized image
is crop x crop), split over all devices of the mesh. With several processes,
each brings its own images and all call the model in step: before each call
they agree (one small all-gather) on the window shape to run, and a process
with nothing of that shape contributes padding. Windows are summed in the same
order as one image at a time, so the result does not depend on the batching.
"""
import collections
import dataclasses
import functools
from typing import Any, Iterable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from internseg_jax import sharding
from internseg_jax.data import transforms
from internseg_jax.models.resize import resize_bilinear
from internseg_jax.models.segmentor import Segmentor


def slide_windows(height: int, width: int, crop: int, stride: int):
  """mmseg slide_inference windows (y1, y2, x1, x2): a grid of
  max(size - crop + stride - 1, 0) // stride + 1 per side, the last window flush
  with the border, windows clipped to images smaller than the crop."""
  def spans(size):
    count = max(size - crop + stride - 1, 0) // stride + 1
    out = []
    for i in range(count):
      end = min(i * stride + crop, size)
      out.append((max(end - crop, 0), end))
    return out
  return [(y1, y2, x1, x2) for y1, y2 in spans(height) for x1, x2 in spans(width)]


def view_windows(height: int, width: int, eval_config):
  if eval_config.mode == 'whole':
    return [(0, height, 0, width)]
  return slide_windows(height, width, eval_config.crop_size, eval_config.stride)


def make_views(image: np.ndarray, eval_config) -> list[tuple[np.ndarray, bool]]:
  """A uint8 (H, W, 3) RGB image -> its test-time views: (normalized float32
  image, flipped?) for each scale ratio and flip, in mmseg's order."""
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f'expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}')
  ev = eval_config
  views = []
  for ratio in ev.scales:
    x = transforms.test_transform(image, resize=ev.resize, scale=tuple(ev.scale),
                                  divisor=ev.size_divisor, ratio=ratio, crop_size=ev.crop_size)
    for flip in ((False, True) if ev.flip else (False,)):
      views.append((np.ascontiguousarray(x[:, ::-1]) if flip else x, flip))
  return views


def softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def merge_views(outputs: list[np.ndarray]) -> np.ndarray:
  """Views already at the original size -> logits (one view) or mean probabilities."""
  if len(outputs) == 1:
    return outputs[0]
  return np.mean([softmax(o) for o in outputs], axis=0).astype(np.float32)


@dataclasses.dataclass
class Item:
  """One image to run: its views, its original (H, W), and anything to hand back."""
  views: list            # [(normalized (h, w, 3) float32, flipped?)]
  size: tuple
  extra: Any = None


@dataclasses.dataclass
class _View:
  item: Item
  pixels: np.ndarray
  flip: bool
  windows: list
  sent: int = 0          # windows put into a batch
  received: int = 0      # windows whose logits were added
  sums: np.ndarray | None = None
  count: np.ndarray | None = None

  def shape(self):
    y1, y2, x1, x2 = self.windows[self.sent]
    return (y2 - y1, x2 - x1)

  def add(self, window, logits):
    if self.sums is None:
      h, w = self.pixels.shape[:2]
      self.sums = np.zeros((h, w, logits.shape[-1]), np.float32)
      self.count = np.zeros((h, w, 1), np.float32)
    y1, y2, x1, x2 = window
    self.sums[y1:y2, x1:x2] += logits
    self.count[y1:y2, x1:x2] += 1
    self.received += 1

  def result(self, size) -> np.ndarray:
    logits = self.sums / self.count
    if self.flip:
      logits = np.ascontiguousarray(logits[:, ::-1])
    return resize_bilinear(logits[None], size)[0]


class WindowRunner:
  """Runs `logits_fn` over the windows of a stream of Items.

  logits_fn: global (B, h, w, 3) float32 array (batch split over the mesh) ->
    (B, h, w, K) logits with the same batch sharding.
  windows_per_device: windows per device in each call; a process contributes
    windows_per_device x (its devices) windows per call.
  """

  def __init__(self, logits_fn, mesh, windows_per_device: int, eval_config):
    self.logits_fn = logits_fn
    self.mesh = mesh
    self.eval_config = eval_config
    local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    self.local_batch = windows_per_device * local
    self.global_batch = windows_per_device * mesh.devices.size
    self.sharding = NamedSharding(mesh, P(sharding.BATCH_AXES))
    self.multi = jax.process_count() > 1

  def _agree(self, mine):
    """The window shape every process runs next, or None when all are done."""
    if not self.multi:
      return mine
    wish = np.array([0, 0, 0] if mine is None else [1, *mine], np.int64)
    wishes = np.asarray(multihost_utils.process_allgather(wish))
    pending = [tuple(w[1:]) for w in wishes if w[0]]
    return min(pending) if pending else None

  def _call(self, crops: np.ndarray) -> np.ndarray:
    batch = jax.make_array_from_process_local_data(
        self.sharding, crops, (self.global_batch, *crops.shape[1:]))
    out = self.logits_fn(batch)
    if self.multi:
      out = multihost_utils.global_array_to_host_local_array(out, self.mesh, P(sharding.BATCH_AXES))
    return np.asarray(out)

  def run(self, items: Iterable[Item]) -> Iterator[tuple[Item, np.ndarray]]:
    """Yields (item, (H, W, K) float32 logits or mean probabilities) in order."""
    items = iter(items)
    queue: collections.deque[_View] = collections.deque()   # views with windows to send
    open_items: collections.deque = collections.deque()      # (item, its views), in order
    exhausted = False
    while True:
      while not exhausted and sum(len(v.windows) - v.sent for v in queue) < self.local_batch:
        item = next(items, None)
        if item is None:
          exhausted = True
          break
        views = [_View(item, pixels, flip, view_windows(*pixels.shape[:2], self.eval_config))
                 for pixels, flip in item.views]
        queue.extend(views)
        open_items.append((item, views))
      shape = self._agree(queue[0].shape() if queue else None)
      if shape is None:
        break
      batch, crops = [], np.zeros((self.local_batch, *shape, 3), np.float32)
      while queue and len(batch) < self.local_batch and queue[0].shape() == shape:
        view = queue[0]
        window = view.windows[view.sent]
        y1, y2, x1, x2 = window
        crops[len(batch)] = view.pixels[y1:y2, x1:x2]
        batch.append((view, window))
        view.sent += 1
        if view.sent == len(view.windows):
          queue.popleft()
      logits = self._call(crops)
      for (view, window), out in zip(batch, logits):
        view.add(window, out)
      while open_items and all(v.received == len(v.windows) for v in open_items[0][1]):
        item, views = open_items.popleft()
        yield item, merge_views([v.result(item.size) for v in views])


def segmentor_forward(module: Segmentor, mesh):
  """jit((variables, images) -> logits upsampled to the images), batch-sharded
  output; jitted once and reused with new variables (no recompilation)."""
  batch = sharding.batch_sharding(mesh)
  return jax.jit(functools.partial(module.apply, method=Segmentor.logits), out_shardings=batch)


def predict(logits_fn, mesh, image: np.ndarray, eval_config) -> np.ndarray:
  """One uint8 RGB image -> (H, W, K) float32 at its size (logits for one view,
  mean softmax probabilities for several)."""
  runner = WindowRunner(logits_fn, mesh, eval_config.windows_per_device, eval_config)
  item = Item(make_views(image, eval_config), image.shape[:2])
  (_, out), = list(runner.run([item]))
  return out
