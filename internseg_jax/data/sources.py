"""Random-access sources of (image, label) records.

Each record: {'image': uint8 (H, W, 3) RGB, 'label': uint8 (H, W), 'name': str},
labels already `reduce_zero_label`-ed for ADE20K (0 -> 255 ignore, k -> k - 1).
Sources have `__len__` and `__getitem__`, as grain's RandomAccessDataSource.
"""
import os

import cv2
import numpy as np

from internseg_jax.metrics import reduce_zero_label

IMAGE_EXTS = ('.jpg', '.jpeg', '.png')
SPLITS = ('training', 'validation')


class DataError(ValueError):
  """A dataset folder or file that cannot be used; the message names it."""


def read_image(path: str) -> np.ndarray:
  """uint8 RGB image; a clear error for missing or corrupt files."""
  data = np.fromfile(path, np.uint8) if os.path.isfile(path) else None
  if data is None:
    raise DataError(f'{path}: image file not found')
  image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
  if image is None:
    raise DataError(f'{path}: not a readable image (corrupt or empty file)')
  return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_label(path: str, num_classes: int, shape=None) -> np.ndarray:
  """Raw single-channel label map with values in 0..num_classes (or 255)."""
  data = np.fromfile(path, np.uint8) if os.path.isfile(path) else None
  if data is None:
    raise DataError(f'{path}: label file not found')
  label = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
  if label is None:
    raise DataError(f'{path}: not a readable label map (corrupt or empty file)')
  if label.ndim != 2 or label.dtype != np.uint8:
    raise DataError(
        f'{path}: label maps must be single-channel 8-bit PNGs, got shape {label.shape} '
        f'{label.dtype} (RGB instance masks such as TFDS scene_parse150 are not the '
        '150-class ADEChallengeData2016 maps)')
  if shape is not None and label.shape != tuple(shape):
    raise DataError(f'{path}: label is {label.shape[1]}x{label.shape[0]} but the image is '
                    f'{shape[1]}x{shape[0]}')
  bad = np.unique(label[(label > num_classes) & (label != 255)])
  if bad.size:
    raise DataError(f'{path}: label values {bad[:10].tolist()} outside 0..{num_classes} and 255')
  return label


class ADEFolder:
  """The ADEChallengeData2016 layout: images/SPLIT/*.jpg and annotations/SPLIT/*.png,
  paired by file name."""

  def __init__(self, root: str, split: str = 'validation', num_classes: int = 150,
               reduce_zero_label: bool = True):
    if split not in SPLITS:
      raise DataError(f'split must be one of {SPLITS}, got {split!r}')
    image_dir = os.path.join(root, 'images', split)
    label_dir = os.path.join(root, 'annotations', split)
    for d in (root, image_dir, label_dir):
      if not os.path.isdir(d):
        raise DataError(
            f'{d} is not a folder. Expected the ADEChallengeData2016 layout: '
            f'ROOT/images/{{training,validation}}/*.jpg and '
            f'ROOT/annotations/{{training,validation}}/*.png (data.root={root!r})')
    images = {os.path.splitext(f)[0]: f for f in os.listdir(image_dir)
              if f.lower().endswith(IMAGE_EXTS)}
    labels = {os.path.splitext(f)[0]: f for f in os.listdir(label_dir) if f.endswith('.png')}
    if not images:
      raise DataError(f'{image_dir} holds no images')
    unlabeled = sorted(set(images) - set(labels))
    if unlabeled:
      raise DataError(f'{len(unlabeled)} image(s) in {image_dir} have no label in {label_dir}: '
                      f'{unlabeled[:5]}')
    self.names = sorted(images)
    self.image_paths = [os.path.join(image_dir, images[n]) for n in self.names]
    self.label_paths = [os.path.join(label_dir, labels[n]) for n in self.names]
    self.num_classes = num_classes
    self.reduce_zero_label = reduce_zero_label

  def __len__(self):
    return len(self.names)

  def __getitem__(self, index: int) -> dict:
    image = read_image(self.image_paths[index])
    label = read_label(self.label_paths[index], self.num_classes, image.shape[:2])
    if self.reduce_zero_label:
      label = reduce_zero_label(label).astype(np.uint8)
    return {'image': image, 'label': label, 'name': self.names[index]}

  def __repr__(self):
    return f'ADEFolder({len(self)} images)'
