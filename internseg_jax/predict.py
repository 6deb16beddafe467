"""`--mode=predict`: label PNGs and colour overlays for an image or a folder."""
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
  """For (name, uint8 RGB image) pairs, writes NAME_labels.png (class indices)
  and NAME_overlay.png (ADE palette and a legend of the classes present);
  returns the overlay paths."""
  names = class_names(model.config.model.decode_head.num_classes, model.config.data.class_names)
  written = []
  for stem, image in tqdm(items, desc='predict', unit='img', total=total, disable=not write):
    labels = api.inference_model(model, image)
    if not write:
      continue
    visualize.save_png(os.path.join(out_dir, f'{stem}_labels.png'), labels.astype(np.uint8))
    overlay = visualize.overlay_with_legend(image, labels, alpha=alpha, class_names=names)
    written.append(os.path.join(out_dir, f'{stem}_overlay.png'))
    visualize.save_png(written[-1], overlay)
  logging.info('wrote %d predictions to %s', len(written), out_dir)
  return written
