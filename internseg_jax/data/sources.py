"""Random-access sources of (image, label) records.

Each record: {'image': uint8 (H, W, 3) RGB, 'label': uint8 (H, W), 'name': str},
labels already `reduce_zero_label`-ed for ADE20K (0 -> 255 ignore, k -> k - 1).
Sources have `__len__`, `__getitem__` (as grain's RandomAccessDataSource) and
`names`. ADEFolder reads the ADEChallengeData2016 folder, ArrayRecordSource the
files internseg_jax.data.prepare writes (same records, same order);
SkippingSource replaces bad records; make_source picks by `data.source`.
"""
import glob
import hashlib
import json
import logging
import os

import cv2
import msgpack
import numpy as np

from internseg_jax.data.transforms import reduce_zero_label

IMAGE_EXTS = ('.jpg', '.jpeg', '.png')
SPLITS = ('training', 'validation')


from internseg_jax.errors import DataError  # noqa: F401  (re-exported: the data errors' home)


def decode_image(data: bytes | np.ndarray, where: str) -> np.ndarray:
  """Encoded image bytes -> uint8 RGB; `where` names the file in errors."""
  data = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data
  image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
  if image is None:
    raise DataError(f'{where}: not a readable image (corrupt or empty file)')
  return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def decode_label(data: bytes | np.ndarray, where: str, num_classes: int,
                 shape=None) -> np.ndarray:
  """Encoded PNG bytes -> raw single-channel label map, validated."""
  data = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data
  label = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
  if label is None:
    raise DataError(f'{where}: not a readable label map (corrupt or empty file)')
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


# Prepared ArrayRecords (python -m internseg_jax.data.prepare): DIR/{split}.array_record
# holds one msgpack map per example with the original encoded files,
# {'name', 'image', 'label', 'image_file', 'label_file'}; DIR/{split}.json indexes it.
RECORD_FORMAT = 'internseg_jax.ade_records.v1'


def encode_record(name: str, image: bytes, label: bytes, image_file: str,
                  label_file: str) -> bytes:
  return msgpack.packb({'name': name, 'image': image, 'label': label,
                        'image_file': image_file, 'label_file': label_file}, use_bin_type=True)


def decode_record(data: bytes, where: str) -> dict:
  try:
    record = msgpack.unpackb(data, raw=False)
  except Exception as e:  # msgpack raises several unrelated types
    raise DataError(f'{where}: not a readable record ({type(e).__name__}: {e})') from None
  if not isinstance(record, dict) or not {'name', 'image', 'label'} <= set(record):
    raise DataError(f'{where}: not an {RECORD_FORMAT} record')
  return record


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


class ArrayRecordSource:
  """Records prepared by internseg_jax.data.prepare, read through grain.

  Gives the same records, in the same (sorted-name) order, as ADEFolder on the
  folder it was prepared from. Labels are validated again when read.
  """

  def __init__(self, root: str, split: str = 'validation', num_classes: int = 150,
               reduce_zero_label: bool = True, verify: bool = False):
    if split not in SPLITS:
      raise DataError(f'split must be one of {SPLITS}, got {split!r}')
    self.path = os.path.join(root, f'{split}.array_record')
    index_path = os.path.join(root, f'{split}.json')
    if not os.path.isfile(index_path) or not os.path.isfile(self.path):
      raise DataError(
          f'{root} holds no prepared {split} records ({split}.array_record and {split}.json). '
          'Prepare them with `python -m internseg_jax.data.prepare --root=ADEChallengeData2016 '
          f'--out={root}`, or use data.source=folder for an ADEChallengeData2016 folder')
    with open(index_path) as f:
      index = json.load(f)
    if index.get('format') != RECORD_FORMAT:
      raise DataError(f'{index_path}: format {index.get("format")!r}, expected {RECORD_FORMAT!r}')
    if verify and file_sha256(self.path) != index['sha256']:
      raise DataError(f'{self.path}: SHA-256 differs from {index_path} (corrupt or replaced)')
    import grain  # pylint: disable=g-import-not-at-top  (slow import, needed only here)
    self.names = list(index['names'])
    self._records = grain.sources.ArrayRecordDataSource(self.path)
    if len(self._records) != len(self.names) or index['count'] != len(self.names):
      raise DataError(f'{self.path} holds {len(self._records)} records but {index_path} lists '
                      f'{len(self.names)}; prepare it again')
    self.num_classes = num_classes
    self.reduce_zero_label = reduce_zero_label

  def __len__(self):
    return len(self.names)

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not -len(self) <= index < len(self):
      raise IndexError(f'record {index} out of range for {len(self)} records')
    index %= len(self)
    where = f'{self.path}[{index}] ({self.names[index]})'
    try:
      data = self._records[index]
    except Exception as e:  # the reader's errors are RuntimeErrors without the file
      raise DataError(f'{where}: unreadable record ({e})') from None
    record = decode_record(data, where)
    if record['name'] != self.names[index]:
      raise DataError(f'{where}: holds {record["name"]!r}, the index lists another name')
    image = decode_image(record['image'], f'{where} {record.get("image_file", "image")}')
    label = decode_label(record['label'], f'{where} {record.get("label_file", "label")}',
                         self.num_classes, image.shape[:2])
    if self.reduce_zero_label:
      label = reduce_zero_label(label).astype(np.uint8)
    return {'image': image, 'label': label, 'name': record['name']}

  def __repr__(self):
    return f'ArrayRecordSource({self.path}, {len(self)} images)'


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


def check_not_scene_parse150(root: str | None, source: str = 'folder') -> None:
  """Refuses the TFDS scene_parse150 dataset, which is not the 150-class data."""
  why = None
  if source in ('scene_parse150', 'tfds'):
    why = f'data.source={source!r}'
  elif root and 'scene_parse150' in os.path.abspath(root).lower():
    why = f'data.root={root!r} is a TFDS scene_parse150 directory'
  elif root and os.path.isdir(root):
    infos = [os.path.join(root, 'dataset_info.json')]
    for depth in (1, 2):  # DATASET/VERSION/ under a TFDS data_dir
      infos += glob.glob(os.path.join(root, *['*'] * depth, 'dataset_info.json'))
    for info in infos:
      try:
        with open(info) as f:
          text = f.read(1 << 20)
      except OSError:
        continue
      if 'scene_parse150' in text:
        why = f'{info} describes the TFDS scene_parse150 dataset'
        break
  if why:
    raise DataError(
        f'{why}: TFDS scene_parse150 holds the ADE20K 2017 instance masks (RGB, 100 instance '
        'categories), not the 150-class ADEChallengeData2016 label maps this model is trained '
        'and evaluated on. Use the ADEChallengeData2016 folder (data.source=folder) or its '
        'zip / folder prepared with `python -m internseg_jax.data.prepare` '
        '(data.source=array_record).')


def make_source(data_config, split: str, log_dir: str | None = None):
  """The source `data.source` names, for `data.root`: 'folder' | 'array_record'.

  With `data.skip_bad`, wrapped in SkippingSource (logging skips to
  log_dir/skipped_{split}.tsv when log_dir is given). Few-shot subsets are
  applied by the caller (internseg_jax.data.subsets), outside the skipping.
  """
  source, root = data_config.source, data_config.root
  check_not_scene_parse150(root, source)
  if not root:
    raise DataError('data.root is not set: give the ADEChallengeData2016 folder '
                    '(data.source=folder) or a prepared folder (data.source=array_record)')
  kwargs = dict(num_classes=data_config.num_classes,
                reduce_zero_label=data_config.reduce_zero_label)
  skip_bad = bool(data_config.get('skip_bad', False))
  if source == 'folder':
    out = ADEFolder(root, split, require_labels=not skip_bad, **kwargs)
  elif source == 'array_record':
    out = ArrayRecordSource(root, split, **kwargs)
  else:
    raise DataError(f"data.source must be 'folder' or 'array_record', got {source!r}")
  if skip_bad:
    out = SkippingSource(out, os.path.join(log_dir, f'skipped_{split}.tsv') if log_dir else None)
  return out
