"""`--mode=predict`: label PNGs and colour overlays for an image or a folder."""
import os

import numpy as np
from absl import logging
from tqdm import tqdm

from internseg_jax import api, visualize
from internseg_jax.data.ade20k_meta import CLASSES
from internseg_jax.data.sources import IMAGE_EXTS, DataError, read_image


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


def class_names(num_classes: int):
  return CLASSES if num_classes == len(CLASSES) else tuple(str(i) for i in range(num_classes))


def predict_files(model: api.Model, files, out_dir: str, alpha: float = 0.5,
                  write: bool = True) -> list[str]:
  """Predictions for image files (see `predict_images`)."""
  items = ((os.path.splitext(os.path.basename(p))[0], read_image(p)) for p in files)
  return predict_images(model, items, out_dir, alpha, write, total=len(files))


def predict_images(model: api.Model, items, out_dir: str, alpha: float = 0.5,
                   write: bool = True, total: int | None = None) -> list[str]:
  """For (name, uint8 RGB image) pairs, writes NAME_labels.png (class indices)
  and NAME_overlay.png (ADE palette and a legend of the classes present);
  returns the overlay paths."""
  names = class_names(model.config.model.decode_head.num_classes)
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
