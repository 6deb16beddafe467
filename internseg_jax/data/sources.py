"""Random-access sources of (image, label) records.

Each record: {'image': uint8 (H, W, 3) RGB, 'label': uint8 (H, W), 'name': str},
labels already `reduce_zero_label`-ed for ADE20K (0 -> 255 ignore, k -> k - 1).
Sources have `__len__`, `__getitem__` (as grain's RandomAccessDataSource) and
`names`. ADEFolder reads the ADEChallengeData2016 folder, TfdsSource the TFDS
dataset internseg_jax.data.prepare builds (same records, same order);
SkippingSource replaces bad records; make_source picks by `data.source`.
"""
import glob
import io
import json
import logging
import os
import re

import cv2
import numpy as np
from PIL import Image

from internseg_jax.data.transforms import reduce_zero_label
from internseg_jax.errors import DataError  # re-exported: sources.DataError is public

IMAGE_EXTS = ('.jpg', '.jpeg', '.png')
SPLITS = ('training', 'validation')


def decode_image(data: bytes | np.ndarray, where: str) -> np.ndarray:
  """Encoded image bytes -> uint8 RGB; `where` names the file in errors.

  As mmseg's LoadImageFromFile (mmcv.imfrombytes, flag 'color', backend cv2):
  cv2.IMREAD_COLOR, which applies the EXIF orientation and gives 3 channels
  for grey or RGBA files too; then BGR -> RGB (mmseg's Normalize to_rgb).
  """
  data = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data
  image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
  if image is None:
    raise DataError(f'{where}: not a readable image (corrupt or empty file)')
  return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def decode_label(data: bytes | np.ndarray, where: str, num_classes: int,
                 shape=None) -> np.ndarray:
  """Encoded PNG bytes -> raw single-channel label map, validated.

  As mmseg's LoadAnnotations (mmcv.imfrombytes, flag 'unchanged', backend
  pillow): the stored values, without EXIF rotation, and for a palette PNG the
  palette indices (OpenCV would expand them to colours). mmseg then casts to
  uint8 silently; here anything but an 8-bit single-channel map is refused.
  """
  data = data.tobytes() if isinstance(data, np.ndarray) else data
  try:
    with Image.open(io.BytesIO(data)) as image:
      label = np.array(image)
  except Exception as e:  # pylint: disable=broad-except  (PIL raises OSError, SyntaxError, ...)
    raise DataError(f'{where}: not a readable label map (corrupt or empty file: '
                    f'{type(e).__name__})') from None
  if label.ndim != 2 or label.dtype != np.uint8:
    raise DataError(
        f'{where}: label maps must be single-channel 8-bit PNGs, got shape {label.shape} '
        f'{label.dtype} (RGB instance masks such as TFDS scene_parse150 are not the '
        '150-class ADEChallengeData2016 maps)')
  if shape is not None and label.shape != tuple(shape):
    raise DataError(f'{where}: label is {label.shape[1]}x{label.shape[0]} but the image is '
                    f'{shape[1]}x{shape[0]}')
  bad = np.unique(label[(label > num_classes) & (label != 255)])
  if bad.size:
    raise DataError(f'{where}: label values {bad[:10].tolist()} outside 0..{num_classes} and 255')
  return label


def read_image(path: str) -> np.ndarray:
  """uint8 RGB image; a clear error for missing or corrupt files."""
  if not os.path.isfile(path):
    raise DataError(f'{path}: image file not found')
  return decode_image(np.fromfile(path, np.uint8), path)


def read_label(path: str, num_classes: int, shape=None) -> np.ndarray:
  """Raw single-channel label map with values in 0..num_classes (or 255)."""
  if not os.path.isfile(path):
    raise DataError(f'{path}: label file not found')
  return decode_label(np.fromfile(path, np.uint8), path, num_classes, shape)


def pair_files(image_files, label_files):
  """Pairs images and labels by file stem, as ADEFolder does.

  Returns (names sorted, {name: image file}, {name: label file}, unlabeled names).
  """
  images = {os.path.splitext(f)[0]: f for f in image_files if f.lower().endswith(IMAGE_EXTS)}
  labels = {os.path.splitext(f)[0]: f for f in label_files if f.endswith('.png')}
  return sorted(images), images, labels, sorted(set(images) - set(labels))


class ADEFolder:
  """The ADEChallengeData2016 layout: images/SPLIT/*.jpg and annotations/SPLIT/*.png,
  paired by file name.

  With `require_labels=False` an image without a label is kept and reading it
  raises DataError (for SkippingSource); by default the constructor refuses.
  """

  def __init__(self, root: str, split: str = 'validation', num_classes: int = 150,
               reduce_zero_label: bool = True, require_labels: bool = True):
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
    names, images, labels, unlabeled = pair_files(os.listdir(image_dir), os.listdir(label_dir))
    if not images:
      raise DataError(f'{image_dir} holds no images')
    if unlabeled and require_labels:
      raise DataError(f'{len(unlabeled)} image(s) in {image_dir} have no label in {label_dir}: '
                      f'{unlabeled[:5]}')
    self.names = names
    self.image_paths = [os.path.join(image_dir, images[n]) for n in names]
    # Without `require_labels`, a missing label fails when its record is read.
    self.label_paths = [os.path.join(label_dir, labels.get(n, n + '.png')) for n in names]
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


# The TFDS dataset that `python -m internseg_jax.data.prepare` (or `tfds build`)
# writes with internseg_jax/data/tfds_ade20k.py: DATA_DIR/ade20k_scene_parsing/VERSION/.
TFDS_NAME = 'ade20k_scene_parsing'
TFDS_SPLITS = {'training': 'train', 'validation': 'validation'}  # ours -> TFDS's names
_VERSION = re.compile(r'^(\d+)\.(\d+)\.(\d+)$')


def default_tfds_data_dir() -> str:
  """$TFDS_DATA_DIR, else ~/tensorflow_datasets: where tfds itself looks."""
  return os.environ.get('TFDS_DATA_DIR') or os.path.expanduser('~/tensorflow_datasets')


def find_tfds_dataset(root: str) -> str:
  """The version folder of the built ade20k_scene_parsing dataset under `root`.

  `root` is a TFDS data dir (holding ade20k_scene_parsing/VERSION/) or one
  version folder; of several versions the highest is taken. tfds's own
  `incomplete.*` folders (an interrupted build) are never taken.
  """
  if os.path.isfile(os.path.join(root, 'dataset_info.json')):
    return root
  base = os.path.join(root, TFDS_NAME)
  versions = [v for v in (os.listdir(base) if os.path.isdir(base) else ())
              if _VERSION.match(v) and os.path.isfile(os.path.join(base, v, 'dataset_info.json'))]
  if not versions:
    raise DataError(
        f'{root} holds no built {TFDS_NAME} dataset ({TFDS_NAME}/VERSION/dataset_info.json). '
        'Build it with `python -m internseg_jax.data.prepare --root=ADEChallengeData2016 '
        f'--out={root}` (or `tfds build`, see the README), or use data.source=folder for an '
        'ADEChallengeData2016 folder')
  newest = max(versions, key=lambda v: tuple(int(x) for x in _VERSION.match(v).groups()))
  return os.path.join(base, newest)


def _read_json(path: str, what: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f'{path}: unreadable {what} ({e}); build the dataset again') from None


class TfdsSource:
  """The TFDS ade20k_scene_parsing dataset (ArrayRecord files), read through
  tfds.builder_from_directory(...).as_data_source with the images left encoded.

  Gives the same records, in the same (sorted-name) order, as ADEFolder on the
  folder it was built from: the files hold the original JPEG and PNG bytes and
  are decoded here by decode_image / decode_label, as ADEFolder decodes them.
  Construction reads two small JSON files only (grain workers unpickle it; the
  tfds reader is opened on first use in each process, and never pickled).
  Needs no TensorFlow.
  """

  def __init__(self, root: str, split: str = 'validation', num_classes: int = 150,
               reduce_zero_label: bool = True):
    if split not in SPLITS:
      raise DataError(f'split must be one of {SPLITS}, got {split!r}')
    self.path = find_tfds_dataset(root)
    self.split = TFDS_SPLITS[split]
    info = _read_json(os.path.join(self.path, 'dataset_info.json'), 'dataset_info.json')
    if info.get('name') != TFDS_NAME:
      raise DataError(f'{self.path} holds the TFDS dataset {info.get("name")!r}, not {TFDS_NAME} '
                      '(build it with `python -m internseg_jax.data.prepare`)')
    if info.get('fileFormat') != 'array_record':
      raise DataError(f'{self.path} is stored as {info.get("fileFormat", "tfrecord")}; random '
                      'access needs array_record: build it again without --file_format')
    counts = {s['name']: sum(int(n) for n in s.get('shardLengths', ()))
              for s in info.get('splits', ())}
    metadata = _read_json(os.path.join(self.path, 'metadata.json'), 'metadata.json')
    names = metadata.get('file_names', {}).get(self.split)
    if self.split not in counts or names is None:
      raise DataError(f'{self.path} has no {self.split} split (splits: {sorted(counts)})')
    if len(names) != counts[self.split]:
      raise DataError(f'{self.path}: metadata.json lists {len(names)} {self.split} names, '
                      f'dataset_info.json {counts[self.split]} examples; build it again')
    self.names = list(names)
    self.num_classes = num_classes
    self.reduce_zero_label = reduce_zero_label
    self._records = None

  def _reader(self):
    if self._records is None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)
      skip = tfds.decode.SkipDecoding()  # our decoder reads the bytes, as for the folder
      records = tfds.builder_from_directory(self.path).as_data_source(
          self.split, decoders={'image': skip, 'annotation': skip})
      if len(records) != len(self.names):
        raise DataError(f'{self.path}: the {self.split} files hold {len(records)} examples, '
                        f'metadata.json lists {len(self.names)}; build it again')
      self._records = records
    return self._records

  def __len__(self):
    return len(self.names)

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not -len(self) <= index < len(self):
      raise IndexError(f'record {index} out of range for {len(self)} records')
    index %= len(self)
    name = self.names[index]
    where = f'{self.path} {self.split}[{index}] ({name})'
    records = self._reader()
    try:
      record = records[index]
    except Exception as e:  # the reader's errors (RuntimeError, proto errors) name no file
      raise DataError(f'{where}: unreadable record ({type(e).__name__}: {e})') from None
    file_name = record['file_name']
    file_name = file_name.decode() if isinstance(file_name, bytes) else str(file_name)
    if os.path.splitext(file_name)[0] != name:
      raise DataError(f'{where}: holds {file_name!r}, metadata.json lists another name')
    image = decode_image(record['image'], f'{where} {file_name}')
    label = decode_label(record['annotation'], f'{where} {name}.png', self.num_classes,
                         image.shape[:2])
    if self.reduce_zero_label:
      label = reduce_zero_label(label).astype(np.uint8)
    return {'image': image, 'label': label, 'name': name}

  def __getstate__(self):
    return {**self.__dict__, '_records': None}

  def __repr__(self):
    return f'TfdsSource({self.path} {self.split}, {len(self)} images)'


class SkippingSource:
  """Replaces records that raise DataError by the next valid one, and counts them.

  Deterministic: a bad index i always gives the first valid index after it
  (wrapping around), so every epoch and every worker sees the same data.
  `skipped` lists the names of bad records found in this process (grain workers
  each keep their own list); with `log_path` each one is also appended, as
  'name<TAB>reason', to that file, which all processes share.
  """

  def __init__(self, source, log_path: str | None = None):
    self.source = source
    self.log_path = log_path
    self.skipped: list[str] = []
    self._bad: dict[int, str] = {}

  @property
  def names(self):
    return self.source.names

  def __len__(self):
    return len(self.source)

  def _load(self, index: int):
    if index in self._bad:
      return None
    try:
      return self.source[index]
    except DataError as e:
      name = self.source.names[index]
      self._bad[index] = str(e)
      self.skipped.append(name)
      logging.warning('skipping bad record %s: %s', name, e)
      if self.log_path:
        with open(self.log_path, 'a') as f:
          f.write(f'{name}\t{" ".join(str(e).split())}\n')
      return None

  def __getitem__(self, index: int) -> dict:
    n, index = len(self), int(index)
    if not -n <= index < n:
      raise IndexError(f'record {index} out of range for {n} records')
    index %= n
    for step in range(n):
      record = self._load((index + step) % n)
      if record is not None:
        return record
    raise DataError(f'all {n} records of {self.source!r} are bad: {self.skipped[:5]}')

  def __getstate__(self):
    return {**self.__dict__, 'skipped': [], '_bad': {}}

  def __repr__(self):
    return f'SkippingSource({self.source!r}, {len(self.skipped)} skipped)'


def _is_scene_parse150_info(path: str) -> bool:
  try:
    with open(path) as f:
      return json.load(f).get('name') == 'scene_parse150'
  except (OSError, ValueError, AttributeError):
    return False


def check_not_scene_parse150(root: str | None, source: str = 'folder') -> None:
  """Refuses the TFDS scene_parse150 dataset, which is not the 150-class data.

  Recognised by data.source, by a path through a folder named scene_parse150, or by a
  dataset_info.json named scene_parse150 at `root` or up to two levels below
  (DATA_DIR/scene_parse150/VERSION/). Our own TFDS dataset is named
  ade20k_scene_parsing and passes.
  """
  why = None
  if source == 'scene_parse150':
    why = f'data.source={source!r}'
  elif root and 'scene_parse150' in os.path.abspath(root).lower().split(os.sep):
    why = f'data.root={root!r} is a TFDS scene_parse150 directory'
  elif root and os.path.isdir(root):
    infos = [os.path.join(root, 'dataset_info.json')]
    for depth in (1, 2):
      infos += sorted(glob.glob(os.path.join(root, *['*'] * depth, 'dataset_info.json')))
    for info in infos:
      if _is_scene_parse150_info(info):
        why = f'{info} describes the TFDS scene_parse150 dataset'
        break
  if why:
    raise DataError(
        f'{why}: TFDS scene_parse150 holds the ADE20K 2017 instance masks (RGB, 100 instance '
        'categories), not the 150-class ADEChallengeData2016 label maps this model is trained '
        'and evaluated on. Use the ADEChallengeData2016 folder (data.source=folder) or its '
        f'TFDS build {TFDS_NAME} (`python -m internseg_jax.data.prepare`, data.source=tfds).')


def make_source(data_config, split: str, log_dir: str | None = None):
  """The source `data.source` names, for `data.root`: 'folder' | 'tfds'.

  'tfds' reads the ade20k_scene_parsing dataset from the TFDS data dir
  `data.root` (default $TFDS_DATA_DIR, else ~/tensorflow_datasets). With
  `data.skip_bad`, wrapped in SkippingSource (logging skips to
  log_dir/skipped_{split}.tsv when log_dir is given). Few-shot subsets are
  applied by the caller (internseg_jax.data.subsets), outside the skipping.
  """
  source, root = data_config.source, data_config.root
  if source == 'tfds' and not root:
    root = default_tfds_data_dir()
  check_not_scene_parse150(root, source)
  if source == 'array_record':
    raise DataError(
        "data.source='array_record' (the earlier packed format) is replaced by data.source='tfds': "
        '`python -m internseg_jax.data.prepare --root=ADEChallengeData2016 --out=TFDS_DATA_DIR` '
        'builds it, then data.root=TFDS_DATA_DIR')
  if not root:
    raise DataError('data.root is not set: give the ADEChallengeData2016 folder '
                    '(data.source=folder) or a TFDS data dir (data.source=tfds)')
  kwargs = dict(num_classes=data_config.num_classes,
                reduce_zero_label=data_config.reduce_zero_label)
  skip_bad = bool(data_config.skip_bad)
  if source == 'folder':
    out = ADEFolder(root, split, require_labels=not skip_bad, **kwargs)
  elif source == 'tfds':
    out = TfdsSource(root, split, **kwargs)
  else:
    raise DataError(f"data.source must be 'folder' or 'tfds', got {source!r}")
  if skip_bad:
    out = SkippingSource(out, os.path.join(log_dir, f'skipped_{split}.tsv') if log_dir else None)
  return out
