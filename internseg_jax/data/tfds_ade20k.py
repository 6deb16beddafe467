"""TFDS builder of ADE20K SceneParsing (ADEChallengeData2016): `ade20k_scene_parsing`.

The 150-class label maps of the MIT Scene Parsing benchmark, which mmseg's
ADE20KDataset reads. Not TFDS's `scene_parse150`, which holds the 2017
instance masks. Built from ADEChallengeData2016/ or ADEChallengeData2016.zip in
the manual dir, without TensorFlow:

  python -m internseg_jax.data.prepare --root=ADEChallengeData2016 --out=DATA_DIR
  # or, where TensorFlow is installed (tfds's command line imports it):
  tfds build ade20k_scene_parsing --imports=internseg_jax.data.tfds_ade20k \\
      --manual_dir=DIR_WITH_ADEChallengeData2016 --data_dir=DATA_DIR

Each example stores the original encoded files, never re-encoded ('image' the
JPEG, 'annotation' the PNG, 'file_name' the image's file name), in sorted-name
order (`disable_shuffling`), in ArrayRecord files (random access for grain).
Every example is decoded and validated while building (as
sources.decode_image / decode_label will read it), so a corrupt file stops the
build with its name, or with `skip_bad` is left out and listed in the
metadata. metadata.json also holds the 150 class names (mmseg's order, index =
label after reduce_zero_label) and each split's file names, so a reader knows
the names without reading the records.
"""
import concurrent.futures
import os
import zipfile

import tensorflow_datasets as tfds

from internseg_jax.data import sources
from internseg_jax.data.ade20k_meta import CLASSES
from internseg_jax.errors import DataError

TREE = 'ADEChallengeData2016'
_CHUNK = 64  # examples read ahead and validated in parallel

_DESCRIPTION = """\
ADE20K SceneParsing (ADEChallengeData2016): 20,210 training and 2,000
validation images with 150-class semantic label maps (0 = other, 1..150 the
classes of objectInfo150), the data of the MIT Scene Parsing benchmark and of
mmsegmentation's ADE20KDataset. The original JPEG and PNG files are stored
unchanged, in file-name order."""

_CITATION = """\
@inproceedings{zhou2017scene,
  title={Scene Parsing through ADE20K Dataset},
  author={Zhou, Bolei and Zhao, Hang and Puig, Xavier and Fidler, Sanja and Barriuso, Adela
          and Torralba, Antonio},
  booktitle={CVPR},
  year={2017}
}"""


class FolderTree:
  """Files of an ADEChallengeData2016 folder."""

  by_path = True  # tfds's Image feature stores a file's bytes given its path

  def __init__(self, root: str):
    self.root = root

  def listdir(self, sub: str) -> list[str]:
    path = os.path.join(self.root, sub)
    if not os.path.isdir(path):
      raise DataError(
          f'{path} is not a folder. Expected the {TREE} layout: '
          'ROOT/images/{training,validation}/*.jpg and '
          'ROOT/annotations/{training,validation}/*.png')
    return os.listdir(path)

  def where(self, sub: str, name: str) -> str:
    return os.path.join(self.root, sub, name)

  def read(self, sub: str, name: str) -> bytes:
    with open(self.where(sub, name), 'rb') as f:
      return f.read()


class ZipTree:
  """Files of the official ADEChallengeData2016.zip (any top folder)."""

  by_path = False  # a zip member has no path tfds can open: its bytes are stored

  def __init__(self, path: str):
    self.path = path
    try:
      self.zip = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
      raise DataError(f'{path}: not a readable zip ({e})') from None
    self.dirs: dict[str, dict[str, str]] = {}
    for info in self.zip.infolist():
      parts = info.filename.split('/')
      # Archives made on macOS carry resource forks that look like images.
      if info.is_dir() or '__MACOSX' in parts or parts[-1].startswith('._'):
        continue
      self.dirs.setdefault('/'.join(parts[:-1]), {})[parts[-1]] = info.filename
    prefixes = {d[:-len(s)] for d in self.dirs for s in ('images/training', 'images/validation')
                if d == s or d.endswith('/' + s)}
    if len(prefixes) != 1:
      raise DataError(
          f'{path}: expected one {TREE} tree (images/{{training,validation}}, '
          f'annotations/{{training,validation}}) in the zip, found {len(prefixes)}')
    self.prefix = prefixes.pop()

  def listdir(self, sub: str) -> list[str]:
    if self.prefix + sub not in self.dirs:
      raise DataError(f'{self.path}: no {self.prefix + sub}/ in the zip ({TREE} layout: '
                      'images/{training,validation}, annotations/{training,validation})')
    return list(self.dirs[self.prefix + sub])

  def where(self, sub: str, name: str) -> str:
    return f'{self.path}:{self.prefix}{sub}/{name}'

  def read(self, sub: str, name: str) -> bytes:
    return self.zip.read(self.dirs[self.prefix + sub][name])


def open_tree(path: str):
  """A FolderTree or ZipTree for an ADEChallengeData2016 folder or zip."""
  sources.check_not_scene_parse150(path)
  if os.path.isdir(path):
    return FolderTree(path)
  if os.path.isfile(path):
    return ZipTree(path)
  raise DataError(f'{path}: no such folder or zip (expected {TREE}/ or {TREE}.zip)')


def find_in_manual_dir(manual_dir: str) -> str:
  """The tree in tfds's manual dir: the dir itself, DIR/ADEChallengeData2016/ or
  DIR/ADEChallengeData2016.zip (the folder first when both are there)."""
  for path in (manual_dir, os.path.join(manual_dir, TREE)):
    if os.path.isdir(os.path.join(path, 'images', 'training')):
      return path
  path = os.path.join(manual_dir, TREE + '.zip')
  if os.path.isfile(path):
    return path
  raise DataError(f'{manual_dir} holds neither {TREE}/ nor {TREE}.zip. '
                  + Ade20kSceneParsing.MANUAL_DOWNLOAD_INSTRUCTIONS)


def _read(tree, sub: str, file: str | None, missing: str):
  if file is None:
    return DataError(missing)
  try:
    return tree.read(sub, file)
  except OSError as e:
    return DataError(f'{tree.where(sub, file)}: {e}')


def _check(item, num_classes: int) -> DataError | None:
  """Decodes and validates one example as the sources will; the error or None."""
  image, label, image_where, label_where = item
  try:
    for data in (image, label):
      if isinstance(data, DataError):
        raise data
    shape = sources.decode_image(image, image_where).shape[:2]
    sources.decode_label(label, label_where, num_classes, shape)
  except DataError as e:
    return e
  return None


class Ade20kSceneParsing(tfds.core.GeneratorBasedBuilder):
  """ADE20K SceneParsing, 150 classes, original files, file order."""

  name = sources.TFDS_NAME
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Original JPEG/PNG bytes of ADEChallengeData2016, sorted by file '
                            'name; class and file names in metadata.json.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'Download {TREE}.zip (http://data.csail.mit.edu/places/ADEchallenge/{TREE}.zip) into '
      f'the manual dir, or unpack it there ({TREE}/images/training/*.jpg, '
      f'{TREE}/annotations/training/*.png, ...).')

  def __init__(self, *, source: str | None = None, skip_bad: bool = False, workers: int = 8,
               file_format=None, **kwargs):
    """`source`: the ADEChallengeData2016 folder or zip (default: found in the
    manual dir); `skip_bad`: leave out (and list) bad examples instead of
    stopping; `workers`: threads decoding and validating."""
    file_format = getattr(file_format, 'value', file_format) or 'array_record'
    if file_format != 'array_record':
      # TfdsSource needs random access; tfrecord files are read in sequence only.
      raise DataError(f'{sources.TFDS_NAME} is written as array_record only, got '
                      f'file_format={file_format!r}')
    self._source, self._skip_bad, self._workers = source, skip_bad, max(1, workers)
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
            # Raw values: 0 = other (ignored after reduce_zero_label), k = class k.
            # (tfds strips names, so mmseg's 'bed ' is 'bed' here; metadata keeps it.)
            'annotation': tfds.features.LabeledImage(
                labels=['other'] + [name.strip() for name in CLASSES],
                shape=(None, None, 1), encoding_format='png'),
            'file_name': tfds.features.Text(),
        }),
        homepage='http://sceneparsing.csail.mit.edu/',
        citation=_CITATION,
        disable_shuffling=True,  # the file order, as mmseg's sorted list and ADEFolder
        metadata=tfds.core.MetadataDict(class_names=list(CLASSES), file_names={}, skipped={}),
    )

  def _split_generators(self, dl_manager):
    tree = open_tree(self._source or find_in_manual_dir(os.fspath(dl_manager.manual_dir)))
    return {tfds_split: self._generate_examples(tree, split)
            for split, tfds_split in sources.TFDS_SPLITS.items()}

  def _generate_examples(self, tree, split: str):
    """(key, example) in sorted-name order, each one validated first.

    The kept names are recorded in the metadata as they are yielded: tfds
    writes metadata.json after every split is generated.
    """
    tfds_split = sources.TFDS_SPLITS[split]
    kept = self.info.metadata['file_names'][tfds_split] = []
    skipped = self.info.metadata['skipped'][tfds_split] = []
    image_sub, label_sub = f'images/{split}', f'annotations/{split}'
    names, images, labels, _ = sources.pair_files(tree.listdir(image_sub),
                                                  tree.listdir(label_sub))
    if not names:
      raise DataError(f'{tree.where(image_sub, "")} holds no images')
    num_classes = len(CLASSES)
    with concurrent.futures.ThreadPoolExecutor(self._workers) as pool:
      for start in range(0, len(names), _CHUNK):
        chunk = []
        for name in names[start:start + _CHUNK]:
          image_where = tree.where(image_sub, images[name])
          label_where = tree.where(label_sub, labels.get(name, name + '.png'))
          chunk.append((name, (_read(tree, image_sub, images[name], ''),
                               _read(tree, label_sub, labels.get(name),
                                     f'{image_where}: no label {label_where}'),
                               image_where, label_where)))
        errors = pool.map(lambda item: _check(item[1], num_classes), chunk)
        for (name, (image, label, image_where, label_where)), error in zip(chunk, errors):
          if error is not None:
            if not self._skip_bad:
              raise DataError(f'{error} (prepare --skip_bad leaves such examples out)')
            skipped.append({'name': name, 'error': str(error)})
            continue
          kept.append(name)
          # Stored as they are (tfds reads a path's bytes; it decodes nothing).
          yield name, {'image': image_where if tree.by_path else image,
                       'annotation': label_where if tree.by_path else label,
                       'file_name': images[name]}
    if not kept:
      raise DataError(f'{tree.where(image_sub, "")}: every example is bad')
