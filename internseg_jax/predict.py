"""`--mode=predict`: label PNGs and figures (image | overlay | legend) for an
image or a folder."""
import os

import numpy as np
from absl import logging
from tqdm import tqdm

import jax

from internseg_jax import api, visualize
from internseg_jax.data import sources
from internseg_jax.data.ade20k_meta import class_names
from internseg_jax.data.sources import IMAGE_EXTS, read_image
from internseg_jax.errors import DataError


def list_inputs(path: str) -> list[str]:
  if path is None:
    raise DataError('set --config.predict.input to an image or a folder of images')
  if os.path.isdir(path):
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if f.lower().endswith(IMAGE_EXTS))
    if not files:
      raise DataError(f'{path} holds no .jpg/.png images')
    return files
  if not os.path.isfile(path):
    raise DataError(f'predict.input {path} is neither an image nor a folder')
  return [path]


def predict_files(model: api.Model, files, out_dir: str) -> list[str]:
  """Predictions for image files (see `predict_images`); process 0 writes."""
  items = ((os.path.splitext(os.path.basename(p))[0], read_image(p)) for p in files)
  return predict_images(model, items, out_dir, model.config.predict.alpha,
                        jax.process_index() == 0, total=len(files))


def predict_validation(model: api.Model, count: int, out_dir: str) -> list[str]:
  """Predictions for the first `count` validation images of `model.config.data`."""
  val = sources.make_source(model.config.data, 'validation')
  count = min(count, len(val))
  items = ((val[i]['name'], val[i]['image']) for i in range(count))
  return predict_images(model, items, out_dir, model.config.predict.alpha,
                        jax.process_index() == 0, total=count)


def predict_images(model: api.Model, items, out_dir: str, alpha: float = 0.5,
                   write: bool = True, total: int | None = None) -> list[str]:
  """For (name, uint8 RGB image) pairs, writes NAME_labels.png and
  NAME_overlay.png (see `write_prediction`); returns the overlay paths.
  Every process predicts (the model may span hosts); only `write` ones save."""
  num_classes = model.config.model.decode_head.num_classes
  names = class_names(num_classes, model.config.data.class_names)
  palette = visualize.palette_for(num_classes)
  written = []
  for stem, image in tqdm(items, desc='predict', unit='img', total=total, disable=not write):
    labels = api.inference_model(model, image)
    if write:
      written.append(write_prediction(out_dir, stem, image, labels, names, alpha, palette))
  logging.info('wrote %d predictions to %s', len(written), out_dir)
  return written


def write_prediction(out_dir: str, stem: str, image, labels, names, alpha: float = 0.5,
                     palette=None) -> str:
  """Writes OUT_DIR/STEM_labels.png (the exact class indices, as an indexed PNG
  whose palette shows the class colours) and OUT_DIR/STEM_overlay.png (the
  image | the overlay | the legend with `names`, by area; small images shown
  enlarged); returns the overlay's path."""
  labels = np.asarray(labels)
  palette = visualize.palette_for(len(names)) if palette is None else palette
  visualize.save_label_png(os.path.join(out_dir, f'{stem}_labels.png'), labels, palette)
  path = os.path.join(out_dir, f'{stem}_overlay.png')
  visualize.save_png(path, visualize.prediction_figure(image, labels, names, palette, alpha))
  return path
