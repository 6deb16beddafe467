"""Generated ADE-format data that a small model can learn (demo and tests).

Each image is a textured background class with a few shapes of other classes;
every class has its own colour and stripe texture, so colour and texture
identify the class locally. Written in the ADEChallengeData2016 layout with raw
labels (0 = other, 1..num_classes), as the real data, plus ROOT/classes.txt with
the classes' names (`class_names`: what each looks like, e.g. 'violet stripes').

  python -m internseg_jax.data.synthetic --root=/tmp/ade_synth --train=64 --val=16
"""
import os

import cv2
import numpy as np

from internseg_jax import files


def _class_style(num_classes: int, seed: int = 1234):
  rng = np.random.default_rng(seed)
  colours = rng.integers(30, 226, size=(num_classes + 1, 3))
  periods = rng.integers(3, 12, size=num_classes + 1)
  return colours, periods


# Named colours for `class_names`, compared in CIE Lab so the nearest name is the
# one a person would pick (RGB distance calls dull purples grey).
_COLOUR_NAMES = (
    ('red', (200, 30, 30)), ('dark red', (120, 20, 20)), ('orange', (230, 130, 30)),
    ('brown', (130, 80, 40)), ('yellow', (225, 210, 40)), ('olive', (128, 128, 30)),
    ('beige', (210, 200, 160)), ('lime', (150, 220, 50)), ('green', (60, 160, 50)),
    ('dark green', (30, 80, 40)), ('teal', (30, 130, 130)), ('cyan', (60, 210, 220)),
    ('sky blue', (100, 180, 230)), ('blue', (40, 70, 210)), ('navy', (30, 35, 110)),
    ('violet', (120, 70, 210)), ('purple', (120, 60, 140)), ('magenta', (175, 60, 175)),
    ('pink', (225, 90, 150)), ('white', (225, 225, 225)), ('light grey', (170, 170, 170)),
    ('grey', (120, 120, 120)), ('dark grey', (60, 60, 60)))


def _nearest_colour_name(rgb) -> str:
  names, refs = zip(*_COLOUR_NAMES)
  rgb = np.asarray([rgb, *refs], np.float32)[None] / 255.0
  lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab)[0]
  return names[int(np.argmin(np.sum((lab[1:] - lab[0]) ** 2, axis=-1)))]


def class_names(num_classes: int) -> tuple:
  """What the generated classes look like, e.g. 'violet stripes', 'pink wide
  stripes'; index i is class i after reduce_zero_label (raw label i + 1).
  Repeated names get ' 2', ' 3', ... so each name picks out one class."""
  colours, periods = _class_style(num_classes)
  names, seen = [], {}
  for colour, period in zip(colours[1:], periods[1:]):
    # The image shows the colour at 75-100 % brightness (the stripes): name the middle.
    texture = 'fine stripes' if period <= 4 else 'stripes' if period <= 8 else 'wide stripes'
    name = f'{_nearest_colour_name(colour * 0.875)} {texture}'
    seen[name] = seen.get(name, 0) + 1
    names.append(name if seen[name] == 1 else f'{name} {seen[name]}')
  return tuple(names)


def make_example(rng, num_classes: int, height: int, width: int, max_shapes: int = 4):
  """(image uint8 RGB, raw label uint8) with labels in 0..num_classes."""
  colours, periods = _class_style(num_classes)
  label = np.full((height, width), rng.integers(1, num_classes + 1), np.uint8)
  for _ in range(rng.integers(1, max_shapes + 1)):
    cls = int(rng.integers(0, num_classes + 1))  # 0: an "other" region (ignored)
    cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
    size = int(rng.integers(min(height, width) // 8 + 1, min(height, width) // 2 + 2))
    if rng.random() < 0.5:
      cv2.circle(label, (cx, cy), size // 2, cls, -1)
    else:
      cv2.rectangle(label, (cx - size // 2, cy - size // 3), (cx + size // 2, cy + size // 3),
                    cls, -1)
  yy, xx = np.mgrid[0:height, 0:width]
  stripes = ((xx + yy) // periods[label]) % 2  # per-class texture
  image = colours[label] * (0.75 + 0.25 * stripes[..., None])
  image = image + rng.normal(0, 6, image.shape)
  return np.clip(image, 0, 255).astype(np.uint8), label


def write_ade_folder(root: str, num_train: int = 64, num_val: int = 16, num_classes: int = 150,
                     size_range=(96, 160), seed: int = 0) -> str:
  """Writes ROOT/images/{training,validation}/*.jpg, annotations/…/*.png and
  classes.txt (one name per line, class 0 first) for a person browsing it."""
  rng = np.random.default_rng(seed)
  files.atomic_write(os.path.join(root, 'classes.txt'),
                     ''.join(f'{name}\n' for name in class_names(num_classes)))
  for split, count in (('training', num_train), ('validation', num_val)):
    image_dir = os.path.join(root, 'images', split)
    label_dir = os.path.join(root, 'annotations', split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(label_dir, exist_ok=True)
    for i in range(count):
      h, w = (int(x) for x in rng.integers(size_range[0], size_range[1] + 1, size=2))
      image, label = make_example(rng, num_classes, h, w)
      name = f'ADE_{split[:5]}_{i:08d}'
      cv2.imwrite(os.path.join(image_dir, name + '.jpg'), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                  [cv2.IMWRITE_JPEG_QUALITY, 95])
      cv2.imwrite(os.path.join(label_dir, name + '.png'), label)
  return root


def ensure_data(data_config, workdir: str) -> str:
  """For configs with `data.synthetic` and no `data.root`: generates the
  dataset once into WORKDIR/data (reused on resume) and returns its root."""
  if data_config.root:
    return data_config.root
  spec = data_config.synthetic
  if not spec:
    raise ValueError('data.root is not set: point it at an ADEChallengeData2016 folder')
  root = os.path.join(workdir, 'data')
  done = os.path.join(root, '.complete')
  if not os.path.exists(done):
    write_ade_folder(root, spec.num_train, spec.num_val, data_config.num_classes,
                     tuple(spec.size_range), spec.seed)
    open(done, 'w').close()
  return root


if __name__ == '__main__':
  import argparse
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--root', required=True)
  parser.add_argument('--train', type=int, default=64)
  parser.add_argument('--val', type=int, default=16)
  parser.add_argument('--num_classes', type=int, default=150)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  write_ade_folder(args.root, args.train, args.val, args.num_classes, seed=args.seed)
  print(f'wrote {args.train} training and {args.val} validation images to {args.root}')
