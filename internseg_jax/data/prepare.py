"""Packs ADEChallengeData2016 into ArrayRecord files for fast random access.

  python -m internseg_jax.data.prepare --root=ADEChallengeData2016 --out=DIR
  python -m internseg_jax.data.prepare --zip=ADEChallengeData2016.zip --out=DIR

Writes, per split, DIR/{split}.array_record with one record per example (the
original encoded JPEG and PNG bytes and the name, see sources.encode_record),
in sorted-name order as ADEFolder, and DIR/{split}.json with the count, the
names and the file's SHA-256. Read it with sources.ArrayRecordSource
(data.source=array_record, data.root=DIR).

Every example is decoded and its label validated (single channel, the image's
size, values 0..num_classes or 255). A bad one stops preparation with the file
named, or with --skip_bad is left out and listed (json 'skipped'). Files are
written under temporary names and renamed only once every split is done, so a
failure leaves no new final file behind.
"""
import argparse
import concurrent.futures
import json
import os
import sys
import zipfile

from array_record.python import array_record_module
import tqdm

from internseg_jax.data import sources
from internseg_jax.data.sources import DataError

_CHUNK = 64  # examples read ahead and validated in parallel


class _FolderReader:
  """Files of an ADEChallengeData2016 folder."""

  def __init__(self, root: str):
    self.root = root

  def listdir(self, sub: str) -> list[str]:
    path = os.path.join(self.root, sub)
    if not os.path.isdir(path):
      raise DataError(
          f'{path} is not a folder. Expected the ADEChallengeData2016 layout: '
          'ROOT/images/{training,validation}/*.jpg and '
          'ROOT/annotations/{training,validation}/*.png')
    return os.listdir(path)

  def where(self, sub: str, name: str) -> str:
    return os.path.join(self.root, sub, name)

  def read(self, sub: str, name: str) -> bytes:
    with open(self.where(sub, name), 'rb') as f:
      return f.read()


class _ZipReader:
  """Files of the official ADEChallengeData2016.zip (any top folder)."""

  def __init__(self, path: str):
    self.path = path
    self.zip = zipfile.ZipFile(path)
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
          f'{path}: expected one ADEChallengeData2016 tree (images/{{training,validation}}, '
          f'annotations/{{training,validation}}) in the zip, found {len(prefixes)}')
    self.prefix = prefixes.pop()

  def listdir(self, sub: str) -> list[str]:
    if self.prefix + sub not in self.dirs:
      raise DataError(f'{self.path}: no {self.prefix + sub}/ in the zip (ADEChallengeData2016 '
                      'layout: images/{training,validation}, annotations/{training,validation})')
    return list(self.dirs[self.prefix + sub])

  def where(self, sub: str, name: str) -> str:
    return f'{self.path}:{self.prefix}{sub}/{name}'

  def read(self, sub: str, name: str) -> bytes:
    return self.zip.read(self.dirs[self.prefix + sub][name])


def _encode_checked(item, num_classes: int):
  """Decodes and validates one example: its encoded record, or the DataError."""
  name, image, label, image_where, label_where = item
  try:
    if isinstance(image, DataError):
      raise image
    if isinstance(label, DataError):
      raise label
    shape = sources.decode_image(image, image_where).shape[:2]
    sources.decode_label(label, label_where, num_classes, shape)
  except DataError as e:
    return e
  return sources.encode_record(name, image, label, os.path.basename(image_where),
                               os.path.basename(label_where))


def _read(reader, sub: str, file: str | None, missing: str):
  if file is None:
    return DataError(missing)
  try:
    return reader.read(sub, file)
  except OSError as e:
    return DataError(f'{reader.where(sub, file)}: {e}')


def _write_split(reader, split: str, path: str, num_classes: int, skip_bad: bool,
                 workers: int, progress: bool) -> dict:
  """Writes one split's records to `path`; returns its index (without checksum)."""
  image_sub, label_sub = f'images/{split}', f'annotations/{split}'
  names, images, labels, _ = sources.pair_files(reader.listdir(image_sub),
                                                reader.listdir(label_sub))
  if not names:
    raise DataError(f'{reader.where(image_sub, "")} holds no images')
  kept, skipped = [], []
  writer = array_record_module.ArrayRecordWriter(path, 'group_size:1')
  try:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool, \
         tqdm.tqdm(total=len(names), desc=split, unit='img', disable=not progress) as bar:
      for start in range(0, len(names), _CHUNK):
        chunk = []
        for name in names[start:start + _CHUNK]:
          image_where = reader.where(image_sub, images[name])
          label_file = labels.get(name)
          label_where = reader.where(label_sub, label_file or name + '.png')
          chunk.append((name, _read(reader, image_sub, images[name], ''),
                        _read(reader, label_sub, label_file,
                              f'{image_where}: no label {label_where}'),
                        image_where, label_where))
        results = pool.map(lambda item: _encode_checked(item, num_classes), chunk)
        for (name, *_), result in zip(chunk, results):
          if isinstance(result, DataError):
            if not skip_bad:
              raise DataError(f'{result} (prepare --skip_bad leaves such examples out)')
            skipped.append({'name': name, 'error': str(result)})
          else:
            writer.write(result)
            kept.append(name)
        bar.update(len(chunk))
  finally:
    writer.close()
  if not kept:
    raise DataError(f'{reader.where(image_sub, "")}: every example is bad')
  return {'format': sources.RECORD_FORMAT, 'split': split, 'count': len(kept),
          'file': f'{split}.array_record', 'num_classes': num_classes,
          'names': kept, 'skipped': skipped}


def prepare(out: str, root: str | None = None, zip_path: str | None = None,
            splits=sources.SPLITS, num_classes: int = 150, skip_bad: bool = False,
            workers: int = 8, progress: bool = True) -> dict[str, dict]:
  """Writes out/{split}.array_record and .json for each split; returns the indexes."""
  if (root is None) == (zip_path is None):
    raise DataError('give exactly one of the ADEChallengeData2016 folder (root) or its zip')
  sources.check_not_scene_parse150(root or zip_path)
  for split in splits:
    if split not in sources.SPLITS:
      raise DataError(f'split must be one of {sources.SPLITS}, got {split!r}')
  reader = _ZipReader(zip_path) if zip_path else _FolderReader(root)
  os.makedirs(out, exist_ok=True)
  tag = f'.tmp-{os.getpid()}'
  finals, indexes = {}, {}
  try:
    for split in splits:
      record, index_path = (os.path.join(out, f'{split}.{ext}') for ext in ('array_record', 'json'))
      finals[record + tag] = record
      index = _write_split(reader, split, record + tag, num_classes, skip_bad, workers, progress)
      index.update(source=os.path.abspath(root or zip_path),
                   sha256=sources.file_sha256(record + tag),
                   bytes=os.path.getsize(record + tag))
      finals[index_path + tag] = index_path
      with open(index_path + tag, 'w') as f:
        json.dump(index, f, indent=1)
      indexes[split] = index
    # Old indexes go first, so that an interruption below leaves record files
    # without an index (refused when read) rather than a stale index.
    for final in finals.values():
      if final.endswith('.json') and os.path.exists(final):
        os.remove(final)
    for tmp, final in sorted(finals.items(), key=lambda kv: kv[1].endswith('.json')):
      os.replace(tmp, final)
  finally:
    for tmp in finals:
      if os.path.exists(tmp):
        os.remove(tmp)
  return indexes


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--root', help='the ADEChallengeData2016 folder')
  parser.add_argument('--zip', dest='zip_path', help='or the official ADEChallengeData2016.zip')
  parser.add_argument('--out', required=True, help='folder for {split}.array_record and .json')
  parser.add_argument('--splits', default=','.join(sources.SPLITS))
  parser.add_argument('--num_classes', type=int, default=150)
  parser.add_argument('--skip_bad', action='store_true',
                      help='leave out (and list) bad examples instead of stopping')
  parser.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1),
                      help='threads decoding and validating')
  args = parser.parse_args(argv)
  try:
    indexes = prepare(args.out, args.root, args.zip_path, args.splits.split(','),
                      args.num_classes, args.skip_bad, args.workers)
  except DataError as e:
    print(f'prepare: {e}', file=sys.stderr)
    return 1
  for split, index in indexes.items():
    print(f'{split}: {index["count"]} examples -> {os.path.join(args.out, index["file"])} '
          f'(sha256 {index["sha256"][:16]}…)')
    if index['skipped']:
      names = [s['name'] for s in index['skipped']]
      print(f'{split}: skipped {len(names)} bad example(s): {", ".join(names)}')
      for s in index['skipped']:
        print(f'  {s["error"]}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
