"""Colour label maps, blend them over images, draw a class legend, save PNGs.

Images are RGB uint8 throughout; only `save_png` converts to OpenCV's BGR.
Label values outside the palette (255 = ignore, negatives) are drawn black and
left out of overlays and legends.
"""
import os
import tempfile
from typing import Optional, Sequence

import cv2
import numpy as np

from internseg_jax.data.ade20k_meta import CLASSES, PALETTE

_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _palette_array(palette) -> np.ndarray:
  pal = np.asarray(palette, np.uint8)
  if pal.ndim != 2 or pal.shape[1] != 3:
    raise ValueError(f'palette must be (N, 3) RGB, got shape {pal.shape}')
  return pal


def _label_array(label) -> np.ndarray:
  label = np.asarray(label)
  if label.ndim != 2:
    raise ValueError(f'label must be (H, W), got shape {label.shape}')
  return label.astype(np.int64, copy=False)


def colorize(label, palette=PALETTE) -> np.ndarray:
  """(H, W) class ids -> (H, W, 3) uint8 RGB; ids outside the palette are black."""
  label = _label_array(label)
  pal = _palette_array(palette)
  out = np.zeros(label.shape + (3,), np.uint8)
  valid = (label >= 0) & (label < len(pal))
  out[valid] = pal[label[valid]]
  return out


def overlay(image, label, alpha: float = 0.5, palette=PALETTE) -> np.ndarray:
  """round((1 - alpha) * image + alpha * colour) where the label has a class.

  Pixels whose label is outside the palette (ignore) keep the image unchanged.
  """
  image = np.asarray(image)
  label = _label_array(label)
  if image.ndim != 3 or image.shape[2] != 3 or image.shape[:2] != label.shape:
    raise ValueError(f'image {image.shape} must be (H, W, 3) with label {label.shape}')
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f'alpha must be in [0, 1], got {alpha}')
  pal = _palette_array(palette)
  colour = colorize(label, pal).astype(np.float32)
  blend = (1.0 - alpha) * image.astype(np.float32) + alpha * colour
  blend = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
  valid = (label >= 0) & (label < len(pal))
  return np.where(valid[..., None], blend, image.astype(np.uint8))


def present_classes(label, num_classes: int = len(PALETTE)):
  """[(class id, share of labelled pixels)] for ids in 0..num_classes-1 found in
  `label`, most frequent first (ties: lower id first)."""
  label = _label_array(label).ravel()
  label = label[(label >= 0) & (label < num_classes)]
  if not label.size:
    return []
  counts = np.bincount(label, minlength=num_classes)
  ids = np.flatnonzero(counts)
  ids = ids[np.lexsort((ids, -counts[ids]))]
  return [(int(c), counts[c] / label.size) for c in ids]


def legend(label, class_names: Sequence[str] = CLASSES, palette=PALETTE,
           max_items: Optional[int] = None, row_height: int = 22,
           swatch_width: int = 30, pad: int = 6, font_scale: float = 0.5,
           min_width: int = 0) -> np.ndarray:
  """RGB uint8 legend of the classes in `label`: one row per class, most
  frequent first, a colour swatch then '<name> <share>%'.

  Row i spans y in [pad + i*row_height, pad + (i+1)*row_height); its swatch spans
  x in [pad, pad + swatch_width) and y 2 px inside the row. With `max_items`,
  further classes are summarised in a last '+N more' text row.
  """
  pal = _palette_array(palette)
  items = present_classes(label, len(pal))
  hidden = 0
  if max_items is not None and len(items) > max_items:
    hidden = len(items) - max_items
    items = items[:max(max_items, 0)]
  texts = []
  for c, share in items:
    name = str(class_names[c]).strip() if c < len(class_names) else str(c)
    texts.append(f'{name} {100.0 * share:.1f}%')
  if hidden:
    texts.append(f'+{hidden} more')
  if not texts:
    texts.append('(no classes)')
  text_x = pad + swatch_width + 8
  text_w = max(cv2.getTextSize(t, _FONT, font_scale, 1)[0][0] for t in texts)
  width = max(min_width, text_x + text_w + pad)
  height = 2 * pad + row_height * len(texts)
  img = np.full((height, width, 3), 255, np.uint8)
  for i, text in enumerate(texts):
    top = pad + i * row_height
    if i < len(items):
      colour = tuple(int(v) for v in pal[items[i][0]])
      cv2.rectangle(img, (pad, top + 2), (pad + swatch_width - 1, top + row_height - 3),
                    colour, thickness=cv2.FILLED)
    (_, th), _ = cv2.getTextSize(text, _FONT, font_scale, 1)
    baseline_y = top + (row_height + th) // 2
    cv2.putText(img, text, (text_x, baseline_y), _FONT, font_scale, _BLACK, 1, cv2.LINE_AA)
  return img


def _pad_bottom(img: np.ndarray, height: int) -> np.ndarray:
  if img.shape[0] >= height:
    return img
  fill = np.full((height - img.shape[0],) + img.shape[1:], 255, np.uint8)
  return np.concatenate([img, fill], axis=0)


def overlay_with_legend(image, label, alpha: float = 0.5,
                        class_names: Sequence[str] = CLASSES, palette=PALETTE,
                        **legend_kwargs) -> np.ndarray:
  """The overlay with the legend on its right, the shorter one padded white below.

  Unless `max_items` is given, the legend is cut (with a '+N more' row) to fit
  the image height, keeping at least one class.
  """
  over = overlay(image, label, alpha, palette)
  if 'max_items' not in legend_kwargs:
    row_h = legend_kwargs.get('row_height', 22)
    pad = legend_kwargs.get('pad', 6)
    rows = (over.shape[0] - 2 * pad) // row_h
    n = len(present_classes(label, len(_palette_array(palette))))
    legend_kwargs['max_items'] = n if n <= rows else max(rows - 1, 1)
  leg = legend(label, class_names, palette, **legend_kwargs)
  height = max(over.shape[0], leg.shape[0])
  return np.concatenate([_pad_bottom(over, height), _pad_bottom(leg, height)], axis=1)


def save_png(path: str, rgb) -> None:
  """Writes an RGB (H, W, 3) or single-channel (H, W) uint8 image as PNG, atomically
  (a temporary file in the same folder, then os.replace)."""
  arr = np.asarray(rgb)
  if arr.dtype != np.uint8:
    if not np.issubdtype(arr.dtype, np.integer) or (arr.size and (arr.min() < 0 or arr.max() > 255)):
      raise ValueError(f'save_png needs uint8 values, got {arr.dtype}')
    arr = arr.astype(np.uint8)
  if arr.ndim == 3 and arr.shape[2] == 3:
    arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
  elif arr.ndim != 2:
    raise ValueError(f'save_png needs (H, W, 3) RGB or (H, W), got shape {arr.shape}')
  ok, buf = cv2.imencode('.png', arr)
  if not ok:
    raise IOError(f'PNG encoding failed for {path}')
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp_', suffix='.png')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(buf.tobytes())
    os.chmod(tmp, 0o644)  # mkstemp makes it 0600
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
