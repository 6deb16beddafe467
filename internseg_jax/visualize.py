"""What a person looks at after predicting: colour label maps, overlays, a
legend of class names, the figure image | overlay | legend, and the PNG files.

Images are RGB uint8 throughout; only `save_png` converts to OpenCV's BGR.
Label values outside the palette (255 = ignore, negatives) are drawn in
`IGNORE_COLOUR` and left out of overlays and legends.
"""
import functools
import io
import math
from typing import Optional, Sequence

import cv2
import numpy as np
from PIL import Image

from internseg_jax import files
from internseg_jax.data.ade20k_meta import CLASSES, PALETTE

# Ignore / out-of-range labels. Black is far from every ADE colour (the darkest
# is (80, 50, 50)) and is Cityscapes' colour for 'void'.
IGNORE_COLOUR = (0, 0, 0)
_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)
_FONT = cv2.FONT_HERSHEY_SIMPLEX

# Figure layout (pixels): a caption strip above the panels, white gaps between them.
CAPTION_HEIGHT = 30
GAP = 10


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


@functools.lru_cache(maxsize=None)
def _distinct_ade_order() -> tuple:
  """ADE palette indices, each the colour farthest (CIE Lab) from those before
  it, starting at the most saturated: any prefix is a set of well-separated
  colours. (ADE's own first entries are three greys, useless for 8 classes.)"""
  pal = np.asarray(PALETTE, np.float32)[None] / 255.0
  lab = cv2.cvtColor(pal, cv2.COLOR_RGB2Lab)[0].astype(np.float64)
  order = [int(np.argmax(np.hypot(lab[:, 1], lab[:, 2])))]
  dist = np.sum((lab - lab[order[0]]) ** 2, axis=1)
  for _ in range(len(PALETTE) - 1):
    dist[order] = -1.0
    order.append(int(np.argmax(dist)))
    dist = np.minimum(dist, np.sum((lab - lab[order[-1]]) ** 2, axis=1))
  return tuple(order)


def palette_for(num_classes: int) -> np.ndarray:
  """(num_classes, 3) uint8 colours for a dataset: ADE20K's own palette for 150
  classes (then fixed pseudo-random colours beyond 150); for fewer classes,
  that many well-separated ADE colours (`_distinct_ade_order`)."""
  ade = np.asarray(PALETTE, np.uint8)
  if num_classes < len(ade):
    return ade[list(_distinct_ade_order()[:num_classes])]
  extra = num_classes - len(ade)
  rng = np.random.default_rng(0)
  return np.concatenate([ade, rng.integers(0, 256, size=(extra, 3)).astype(np.uint8)])


def colorize(label, palette=PALETTE) -> np.ndarray:
  """(H, W) class ids -> (H, W, 3) uint8 RGB; ids outside the palette get IGNORE_COLOUR."""
  label = _label_array(label)
  pal = _palette_array(palette)
  out = np.empty(label.shape + (3,), np.uint8)
  out[...] = IGNORE_COLOUR
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


def _name(class_names: Sequence[str], c: int) -> str:
  return str(class_names[c]).strip() if c < len(class_names) else f'class {c}'


def _percent(share: float) -> str:
  return '<0.1%' if share < 0.0005 else f'{100.0 * share:.1f}%'   # not a misleading 0.0%


def legend_entries(label, class_names: Sequence[str], num_colours: int,
                   max_items: Optional[int] = None) -> list:
  """[(class id, '<name> <share>%')] for the classes in `label`, largest area
  first; beyond `max_items`, one (None, '+N more') entry. Names are stripped
  (mmseg's 'bed '); a class without a name is 'class N'."""
  items = present_classes(label, num_colours)
  hidden = 0
  if max_items is not None and len(items) > max_items:
    hidden = len(items) - max_items
    items = items[:max(max_items, 0)]
  entries = [(c, f'{_name(class_names, c)} {_percent(share)}') for c, share in items]
  if hidden:
    entries.append((None, f'+{hidden} more'))
  return entries


def legend(label, class_names: Sequence[str] = CLASSES, palette=PALETTE,
           max_items: Optional[int] = None, row_height: int = 22,
           swatch_width: int = 30, pad: int = 6, font_scale: float = 0.5,
           min_width: int = 0) -> np.ndarray:
  """RGB uint8 legend of the classes in `label`: one row per class, largest
  area first, a colour swatch then '<name> <share>%'.

  Row i spans y in [pad + i*row_height, pad + (i+1)*row_height); its swatch spans
  x in [pad, pad + swatch_width) and y 2 px inside the row. With `max_items`,
  further classes are summarised in a last '+N more' text row.
  """
  pal = _palette_array(palette)
  entries = legend_entries(label, class_names, len(pal), max_items)
  if not entries:
    entries = [(None, '(no classes)')]
  texts = [text for _, text in entries]
  text_x = pad + swatch_width + 8
  text_w = max(cv2.getTextSize(t, _FONT, font_scale, 1)[0][0] for t in texts)
  width = max(min_width, text_x + text_w + pad)
  height = 2 * pad + row_height * len(texts)
  img = np.full((height, width, 3), 255, np.uint8)
  for i, (c, text) in enumerate(entries):
    top = pad + i * row_height
    if c is not None:
      colour = tuple(int(v) for v in pal[c])
      cv2.rectangle(img, (pad, top + 2), (pad + swatch_width - 1, top + row_height - 3),
                    colour, thickness=cv2.FILLED)
    (_, th), _ = cv2.getTextSize(text, _FONT, font_scale, 1)
    baseline_y = top + (row_height + th) // 2
    cv2.putText(img, text, (text_x, baseline_y), _FONT, font_scale, _BLACK, 1, cv2.LINE_AA)
  return img


def _fitting_items(label, num_colours: int, height: int, row_height: int, pad: int) -> int:
  """How many class rows fit in `height` (a '+N more' row taking one when cut)."""
  rows = (height - 2 * pad) // row_height
  n = len(present_classes(label, num_colours))
  return n if n <= rows else max(rows - 1, 1)


def _pad_bottom(img: np.ndarray, height: int) -> np.ndarray:
  if img.shape[0] >= height:
    return img
  fill = np.full((height - img.shape[0],) + img.shape[1:], 255, np.uint8)
  return np.concatenate([img, fill], axis=0)


def overlay_with_legend(image, label, alpha: float = 0.5,
                        class_names: Sequence[str] = CLASSES, palette=PALETTE,
                        **legend_kwargs) -> np.ndarray:
  """The overlay at its own size with the legend on its right, the shorter one
  padded white below (see `prediction_figure` for the figure a person reads).

  Unless `max_items` is given, the legend is cut (with a '+N more' row) to fit
  the image height, keeping at least one class.
  """
  over = overlay(image, label, alpha, palette)
  if 'max_items' not in legend_kwargs:
    legend_kwargs['max_items'] = _fitting_items(
        label, len(_palette_array(palette)), over.shape[0],
        legend_kwargs.get('row_height', 22), legend_kwargs.get('pad', 6))
  leg = legend(label, class_names, palette, **legend_kwargs)
  height = max(over.shape[0], leg.shape[0])
  return np.concatenate([_pad_bottom(over, height), _pad_bottom(leg, height)], axis=1)


def display_scale(height: int, width: int, min_short_side: int = 384,
                  max_side: int = 1024) -> float:
  """The factor that shows an image at a readable size: an integer >= 1 that
  brings the short side to at least `min_short_side` (so upscaling is exact
  pixel replication), but no further than keeps the long side within
  `max_side`; below 1 only when the long side alone exceeds `max_side`."""
  long_side, short_side = max(height, width), min(height, width)
  if long_side > max_side:
    return max_side / long_side
  up = max(1, math.ceil(min_short_side / max(short_side, 1)))
  return float(max(1, min(up, max_side // long_side)))


def resize_for_display(img: np.ndarray, scale: float) -> np.ndarray:
  """Integer upscales repeat each pixel (nearest neighbour: a 150 px label map
  keeps its hard class edges instead of being smoothed); downscales average
  (cv2.INTER_AREA); 1 returns `img`."""
  if scale == 1:
    return img
  if scale > 1 and float(scale).is_integer():
    k = int(scale)
    return np.repeat(np.repeat(img, k, axis=0), k, axis=1)
  h, w = img.shape[:2]
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST
  return cv2.resize(img, size, interpolation=interp)


def _caption(text: str, width: int, font_scale: float = 0.6) -> np.ndarray:
  strip = np.full((CAPTION_HEIGHT, width, 3), 255, np.uint8)
  (_, th), _ = cv2.getTextSize(text, _FONT, font_scale, 1)
  cv2.putText(strip, text, (4, (CAPTION_HEIGHT + th) // 2), _FONT, font_scale, _BLACK, 1,
              cv2.LINE_AA)
  return strip


def prediction_figure(image, label, class_names: Sequence[str] = CLASSES, palette=PALETTE,
                      alpha: float = 0.5, min_short_side: int = 384,
                      max_side: int = 1024) -> np.ndarray:
  """RGB uint8 figure: the image | the overlay of `label` | a legend of the
  classes present (name and share of pixels, largest first, '+N more' when
  they do not fit), each under a caption.

  Both panels are scaled by `display_scale` (nearest-neighbour repeats for
  small images), so they stay pixel-aligned with each other; the panels start
  at y = CAPTION_HEIGHT, x = 0 and x = panel width + GAP.
  """
  image = np.asarray(image, np.uint8)
  over = overlay(image, label, alpha, palette)
  scale = display_scale(*over.shape[:2], min_short_side=min_short_side, max_side=max_side)
  panels = [resize_for_display(image, scale), resize_for_display(over, scale)]
  height, width = panels[0].shape[:2]
  row_height = 24
  leg = legend(label, class_names, palette, row_height=row_height, font_scale=0.55,
               min_width=260, max_items=_fitting_items(label, len(_palette_array(palette)),
                                                       height, row_height, 6))
  height = max(height, leg.shape[0])
  gap = np.full((height + CAPTION_HEIGHT, GAP, 3), 255, np.uint8)
  columns = []
  for text, panel in (('image', panels[0]), (f'prediction (overlay, alpha {alpha:g})', panels[1]),
                      ('classes by area', leg)):
    column = np.concatenate([_caption(text, panel.shape[1]), _pad_bottom(panel, height)], axis=0)
    columns += [column, gap]
  return np.concatenate(columns[:-1], axis=1)


def save_png(path: str, rgb) -> None:
  """Writes an RGB (H, W, 3) or single-channel (H, W) uint8 image as PNG,
  atomically (a reader never sees half a file; a crash leaves the old one)."""
  arr = np.asarray(rgb)
  if arr.dtype != np.uint8:
    out_of_range = arr.size and (arr.min() < 0 or arr.max() > 255)
    if not np.issubdtype(arr.dtype, np.integer) or out_of_range:
      raise ValueError(f'save_png needs uint8 values, got {arr.dtype}')
    arr = arr.astype(np.uint8)
  if arr.ndim == 3 and arr.shape[2] == 3:
    arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
  elif arr.ndim != 2:
    raise ValueError(f'save_png needs (H, W, 3) RGB or (H, W), got shape {arr.shape}')
  ok, buf = cv2.imencode('.png', arr)
  if not ok:
    raise IOError(f'PNG encoding failed for {path}')
  files.atomic_write(path, buf.tobytes())


def save_label_png(path: str, label, palette=PALETTE) -> None:
  """Writes class indices as an indexed ('P' mode) PNG, atomically: the pixel
  values are exactly `label` (read them with PIL.Image.open, np.asarray), and
  the PNG's palette maps them to `palette`'s colours (entries beyond it get
  IGNORE_COLOUR), so an image viewer shows colours instead of near-black grey.

  OpenCV cannot write a palette and cv2.imread expands one to BGR, hence Pillow.
  """
  label = _label_array(label)
  if label.size and (label.min() < 0 or label.max() > 255):
    raise ValueError(f'{path}: label values {label.min()}..{label.max()} do not fit an 8-bit '
                     'indexed PNG (0..255)')
  pal = _palette_array(palette)[:256]
  table = np.empty((256, 3), np.uint8)
  table[...] = IGNORE_COLOUR
  table[:len(pal)] = pal
  img = Image.fromarray(label.astype(np.uint8))   # mode 'L' ...
  img.putpalette(table.tobytes())                 # ... becomes 'P', values unchanged
  buf = io.BytesIO()
  img.save(buf, format='PNG')
  files.atomic_write(path, buf.getvalue())
