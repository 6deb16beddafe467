"""colorize / overlay / legend / save_png."""
import os

import cv2
import numpy as np
import pytest

from internseg_jax import visualize
from internseg_jax.data.ade20k_meta import CLASSES, PALETTE


def test_colorize_uses_palette_and_black_for_ignore():
  label = np.array([[0, 1, 149], [255, 7, -1]])
  out = visualize.colorize(label)
  assert out.shape == (2, 3, 3) and out.dtype == np.uint8
  for (y, x), c in np.ndenumerate(label):
    expected = PALETTE[c] if 0 <= c < 150 else (0, 0, 0)
    assert tuple(out[y, x]) == tuple(expected)
  custom = visualize.colorize(np.array([[0, 1, 2]]), palette=[(1, 2, 3), (4, 5, 6)])
  np.testing.assert_array_equal(custom[0], [[1, 2, 3], [4, 5, 6], [0, 0, 0]])


def test_overlay_blends_as_documented():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
  label = rng.integers(0, 150, size=(6, 5))
  label[0, :] = 255
  alpha = 0.3
  out = visualize.overlay(image, label, alpha=alpha)
  colour = np.asarray(PALETTE, np.float64)[np.clip(label, 0, 149)]
  expected = np.rint((1 - alpha) * image + alpha * colour).astype(np.uint8)
  expected[0, :] = image[0, :]   # ignored pixels keep the image
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, expected)
  np.testing.assert_array_equal(visualize.overlay(image, label, alpha=0.0), image)
  full = visualize.overlay(image, label, alpha=1.0)
  np.testing.assert_array_equal(full[1:], visualize.colorize(label)[1:])
  with pytest.raises(ValueError):
    visualize.overlay(image, label[:3])


def test_legend_lists_exactly_the_present_classes():
  label = np.full((10, 12), 255)
  label.flat[:50] = 5
  label.flat[50:80] = 2
  label.flat[80:100] = 100
  items = visualize.present_classes(label)
  assert [c for c, _ in items] == [5, 2, 100]
  np.testing.assert_allclose([s for _, s in items], [0.5, 0.3, 0.2])
  row_h, pad, sw = 20, 4, 24
  img = visualize.legend(label, row_height=row_h, pad=pad, swatch_width=sw)
  assert img.dtype == np.uint8 and img.shape[2] == 3
  assert img.shape[0] == 2 * pad + 3 * row_h
  swatches = [tuple(img[pad + i * row_h + row_h // 2, pad + sw // 2]) for i in range(3)]
  assert swatches == [PALETTE[5], PALETTE[2], PALETTE[100]]
  # Text is drawn right of the swatches, not beyond the image.
  assert (img[:, pad + sw + 1:] < 128).any()
  # max_items: two swatches then a text-only '+1 more' row.
  cut = visualize.legend(label, max_items=2, row_height=row_h, pad=pad, swatch_width=sw)
  assert cut.shape[0] == 2 * pad + 3 * row_h
  assert tuple(cut[pad + 2 * row_h + row_h // 2, pad + sw // 2]) == (255, 255, 255)
  empty = visualize.legend(np.full((4, 4), 255))
  assert empty.ndim == 3 and empty.shape[0] > 0


def test_overlay_with_legend_side_by_side():
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, size=(120, 30, 3), dtype=np.uint8)
  label = rng.integers(0, 4, size=(120, 30))
  out = visualize.overlay_with_legend(image, label, alpha=0.5)
  leg = visualize.legend(label)
  assert leg.shape[0] < 120
  assert out.shape == (120, 30 + leg.shape[1], 3)
  np.testing.assert_array_equal(out[:, :30], visualize.overlay(image, label, 0.5))
  np.testing.assert_array_equal(out[:leg.shape[0], 30:], leg)
  assert (out[leg.shape[0]:, 30:] == 255).all()   # legend padded white below
  # Too many classes for the height: cut to one class + '+N more' (2 rows, 56 px),
  # and then the shorter overlay is the one padded.
  out = visualize.overlay_with_legend(image[:40], label[:40])
  assert out.shape[0] == 56 and (out[40:, :30] == 255).all()
  tall = rng.integers(0, 150, size=(60, 60))
  out = visualize.overlay_with_legend(rng.integers(0, 256, (60, 60, 3), np.uint8), tall)
  assert out.shape[0] == 60


def test_save_png_round_trips_rgb(tmp_path):
  rng = np.random.default_rng(2)
  rgb = rng.integers(0, 256, size=(7, 9, 3), dtype=np.uint8)
  rgb[0, 0] = (255, 0, 0)   # pure red: would read back blue if the order were wrong
  path = str(tmp_path / 'sub' / 'x.png')
  visualize.save_png(path, rgb)
  back = cv2.cvtColor(cv2.imread(path, cv2.IMREAD_UNCHANGED), cv2.COLOR_BGR2RGB)
  np.testing.assert_array_equal(back, rgb)
  assert tuple(cv2.imread(path)[0, 0]) == (0, 0, 255)  # BGR on disk
  labels = rng.integers(0, 151, size=(5, 4)).astype(np.int32)
  visualize.save_png(path, labels)   # overwrite with a one-channel label map
  np.testing.assert_array_equal(cv2.imread(path, cv2.IMREAD_UNCHANGED), labels)
  assert os.listdir(tmp_path / 'sub') == ['x.png']   # no temporary file left
  with pytest.raises(ValueError):
    visualize.save_png(path, np.full((2, 2), 300))
