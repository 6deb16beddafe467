"""colorize / overlay / legend / the prediction figure / PNG files / class names."""
import os

import cv2
import numpy as np
import pytest
from PIL import Image

from internseg_jax import predict, visualize
from internseg_jax.data import ade20k_meta, synthetic
from internseg_jax.data.ade20k_meta import CLASSES, PALETTE
from internseg_jax.errors import ConfigError


def test_colorize_uses_palette_and_the_ignore_colour():
  label = np.array([[0, 1, 149], [255, 7, -1]])
  out = visualize.colorize(label)
  assert out.shape == (2, 3, 3) and out.dtype == np.uint8
  for (y, x), c in np.ndenumerate(label):
    expected = PALETTE[c] if 0 <= c < 150 else visualize.IGNORE_COLOUR
    assert tuple(out[y, x]) == tuple(expected)
  custom = visualize.colorize(np.array([[0, 1, 2]]), palette=[(1, 2, 3), (4, 5, 6)])
  np.testing.assert_array_equal(custom[0], [[1, 2, 3], [4, 5, 6], visualize.IGNORE_COLOUR])


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


def test_legend_names_classes_largest_area_first():
  label = np.zeros((10, 10), np.int64)
  label[:, :3] = 1    # 30 %
  label[:, 3:4] = 2   # 10 %, class 0 keeps 60 %
  names = ('sky', 'tree ', 'road')
  assert [c for c, _ in visualize.present_classes(label, 3)] == [0, 1, 2]
  label = np.where(label == 0, 2, np.where(label == 2, 0, label))   # now class 2 is largest
  assert visualize.legend_entries(label, names, 3) == [
      (2, 'road 60.0%'), (1, 'tree 30.0%'), (0, 'sky 10.0%')]
  assert visualize.legend_entries(label, names, 3, max_items=1) == [
      (2, 'road 60.0%'), (None, '+2 more')]
  assert visualize.legend_entries(label, names[:2], 3)[0] == (2, 'class 2 60.0%')
  tiny = np.zeros((100, 100), np.int64)
  tiny[0, 0] = 1   # 0.01 % of the pixels
  assert visualize.legend_entries(tiny, names, 3)[1] == (1, 'tree <0.1%')
  row_h, pad, sw = 20, 4, 24
  img = visualize.legend(label, names, PALETTE[:3], row_height=row_h, pad=pad, swatch_width=sw)
  swatches = [tuple(img[pad + i * row_h + row_h // 2, pad + sw // 2]) for i in range(3)]
  assert swatches == [PALETTE[2], PALETTE[1], PALETTE[0]]


def test_display_scale():
  assert visualize.display_scale(150, 200) == 3      # short side 150 -> 450 >= 384
  assert visualize.display_scale(512, 683) == 1      # readable already
  assert visualize.display_scale(20, 1000) == 1      # 2x would exceed the width cap
  assert visualize.display_scale(100, 300) == 3      # 4x would make 1200 > 1024
  assert visualize.display_scale(1536, 2048) == pytest.approx(0.5)   # only too large shrinks


def test_small_images_are_enlarged_pixel_for_pixel_and_stay_aligned():
  rng = np.random.default_rng(3)
  image = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
  label = rng.integers(0, 5, size=(20, 30))
  label[0, 0] = 255
  fig = visualize.prediction_figure(image, label, alpha=0.4)
  k = 20   # ceil(384 / 20); 30 * 20 = 600 <= 1024
  top, width = visualize.CAPTION_HEIGHT, 30 * k
  big = lambda a: np.repeat(np.repeat(a, k, axis=0), k, axis=1)
  np.testing.assert_array_equal(fig[top:top + 20 * k, :width], big(image))
  over = fig[top:top + 20 * k, width + visualize.GAP:2 * width + visualize.GAP]
  # The enlarged overlay is the overlay of the enlarged image and labels: no shift.
  np.testing.assert_array_equal(over, visualize.overlay(big(image), big(label), 0.4))
  np.testing.assert_array_equal(over, big(visualize.overlay(image, label, 0.4)))
  assert fig.shape[0] == top + 20 * k and fig.shape[1] > 2 * width + 2 * visualize.GAP


def test_large_images_shrink_both_panels_alike():
  rng = np.random.default_rng(4)
  image = rng.integers(0, 256, size=(1200, 600, 3), dtype=np.uint8)
  label = np.zeros((1200, 600), np.int64)
  fig = visualize.prediction_figure(image, label, alpha=0.0)   # overlay == image
  h, w = 1024, 512
  top = visualize.CAPTION_HEIGHT
  assert fig.shape[0] == top + h
  np.testing.assert_array_equal(fig[top:, :w], fig[top:, w + visualize.GAP:2 * w + visualize.GAP])


def test_label_png_is_indexed_with_exact_values_and_the_palette(tmp_path):
  rng = np.random.default_rng(5)
  label = rng.integers(0, 150, size=(13, 17))
  label[0, :5] = 255   # ignore
  path = str(tmp_path / 'sub' / 'x_labels.png')
  visualize.save_label_png(path, label)
  with Image.open(path) as img:
    assert img.mode == 'P' and img.format == 'PNG'
    np.testing.assert_array_equal(np.asarray(img), label)
    table = np.asarray(img.getpalette(), np.uint8).reshape(-1, 3)
  np.testing.assert_array_equal(table[:150], PALETTE)
  assert (table[150:] == visualize.IGNORE_COLOUR).all()
  assert os.listdir(tmp_path / 'sub') == ['x_labels.png']   # no temporary file left
  with pytest.raises(ValueError, match='x_labels.png'):
    visualize.save_label_png(path, np.full((2, 2), 256))
  with Image.open(path) as img:   # the failed write left the file as it was
    np.testing.assert_array_equal(np.asarray(img), label)


def test_write_prediction_files(tmp_path):
  rng = np.random.default_rng(6)
  image = rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
  labels = rng.integers(0, 8, size=(40, 60))
  names = synthetic.class_names(8)
  path = predict.write_prediction(str(tmp_path), 'a', image, labels, names, alpha=0.5)
  assert path == str(tmp_path / 'a_overlay.png')
  with Image.open(tmp_path / 'a_labels.png') as img:
    assert img.mode == 'P'
    np.testing.assert_array_equal(np.asarray(img), labels)
  fig = cv2.imread(path)
  assert fig.shape[0] == visualize.CAPTION_HEIGHT + 40 * 10   # shown 10x: short side 400
  assert sorted(os.listdir(tmp_path)) == ['a_labels.png', 'a_overlay.png']


def test_class_names_one_home():
  assert ade20k_meta.class_names(150) == CLASSES
  assert ade20k_meta.class_names(3) == ('class 0', 'class 1', 'class 2')
  assert ade20k_meta.class_names(2, ['cat', 'dog']) == ('cat', 'dog')
  with pytest.raises(ConfigError, match='data.class_names'):
    ade20k_meta.class_names(3, ['cat', 'dog'])


def test_synthetic_classes_have_distinct_descriptive_names(tmp_path):
  names = synthetic.class_names(8)
  assert len(names) == 8 and len(set(names)) == 8
  assert all('stripes' in n for n in names)
  many = synthetic.class_names(150)
  assert len(set(many)) == 150   # repeats are numbered
  synthetic.write_ade_folder(str(tmp_path), num_train=1, num_val=1, num_classes=8,
                             size_range=(20, 24))
  assert (tmp_path / 'classes.txt').read_text().splitlines() == list(names)


def test_palette_for_keeps_ade_colours_and_separates_few_classes():
  np.testing.assert_array_equal(visualize.palette_for(150), PALETTE)
  more = visualize.palette_for(171)
  np.testing.assert_array_equal(more[:150], PALETTE)
  assert more.shape == (171, 3) and more.dtype == np.uint8
  few = visualize.palette_for(8).astype(np.int64)
  assert {tuple(c) for c in few} <= set(PALETTE) and len({tuple(c) for c in few}) == 8
  min_dist = lambda p: min(np.abs(a - b).sum() for i, a in enumerate(p) for b in p[i + 1:])
  # ADE's first eight include three greys ((120,120,120), (120,120,80), (140,140,140)).
  assert min_dist(np.asarray(PALETTE[:8])) < 50 < 100 < min_dist(few)   # L1 in RGB: 40 vs 112
