"""Builds the TFDS dataset ade20k_scene_parsing from ADEChallengeData2016, without TensorFlow.

  python -m internseg_jax.data.prepare --root=ADEChallengeData2016 --out=DATA_DIR
  python -m internseg_jax.data.prepare --zip=ADEChallengeData2016.zip --out=DATA_DIR

Writes DATA_DIR/ade20k_scene_parsing/1.0.0/ (tfds's layout: ArrayRecord files
ade20k_scene_parsing-{train,validation}.array_record-NNNNN-of-NNNNN,
dataset_info.json, features.json, metadata.json) with the builder of
internseg_jax/data/tfds_ade20k.py, through tfds's Python API (its `tfds build`
command needs TensorFlow). Read it with data.source=tfds, data.root=DATA_DIR,
or with tfds.builder_from_directory / tfds.data_source.

Every example is decoded and its label validated (single channel, the image's
size, values 0..150 or 255). A bad one stops the build with the file named, or
with --skip_bad is left out and listed (metadata.json 'skipped'). The dataset
is built in a temporary folder under DATA_DIR and moved into place only when
complete, so a failed or interrupted build leaves no dataset and keeps an
older one.
"""
import argparse
import os
import shutil
import sys
import tempfile

from internseg_jax.data import sources
from internseg_jax.errors import DataError


def prepare(out: str, root: str | None = None, zip_path: str | None = None,
            skip_bad: bool = False, workers: int = 8, overwrite: bool = False,
            progress: bool = True) -> dict:
  """Builds out/ade20k_scene_parsing/VERSION/; returns {'path', 'splits':
  {tfds split: {'count', 'skipped': [{'name', 'error'}]}}}."""
  if (root is None) == (zip_path is None):
    raise DataError('give exactly one of the ADEChallengeData2016 folder (root) or its zip')
  from internseg_jax.data import tfds_ade20k  # pylint: disable=g-import-not-at-top  (imports tfds)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tree = root or zip_path
  tfds_ade20k.open_tree(tree)  # refuses scene_parse150 and missing paths before any work
  version = str(tfds_ade20k.Ade20kSceneParsing.VERSION)
  final = os.path.join(out, sources.TFDS_NAME, version)
  if os.path.exists(final) and not overwrite:
    raise DataError(f'{final} exists already (pass --overwrite to build it again)')
  os.makedirs(out, exist_ok=True)
  staging = tempfile.mkdtemp(prefix='.prepare-', dir=out)
  try:
    builder = tfds_ade20k.Ade20kSceneParsing(
        data_dir=staging, source=os.path.abspath(tree), skip_bad=skip_bad, workers=workers)
    if not progress:
      tfds.disable_progress_bar()
    # tfds would leave empty downloads/ folders: they go with the staging folder.
    builder.download_and_prepare(download_dir=os.path.join(staging, 'downloads'))
    built = os.path.join(staging, sources.TFDS_NAME, version)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    old = None
    if os.path.exists(final):
      old = os.path.join(staging, 'old')
      os.replace(final, old)
    os.replace(built, final)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  metadata = builder.info.metadata
  return {'path': final,
          'splits': {split: {'count': len(names), 'skipped': metadata['skipped'][split]}
                     for split, names in metadata['file_names'].items()}}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--root', help='the ADEChallengeData2016 folder')
  parser.add_argument('--zip', dest='zip_path', help='or the official ADEChallengeData2016.zip')
  parser.add_argument('--out', required=True,
                      help='TFDS data dir: gets ade20k_scene_parsing/VERSION/ (data.root)')
  parser.add_argument('--skip_bad', action='store_true',
                      help='leave out (and list) bad examples instead of stopping')
  parser.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1),
                      help='threads decoding and validating')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace a dataset built before (only once the new one is complete)')
  args = parser.parse_args(argv)
  try:
    result = prepare(args.out, args.root, args.zip_path, args.skip_bad, args.workers,
                     args.overwrite)
  except DataError as e:
    print(f'prepare: {e}', file=sys.stderr)
    return 1
  print(f'{sources.TFDS_NAME} -> {result["path"]} (data.source=tfds data.root={args.out})')
  for split, info in result['splits'].items():
    print(f'{split}: {info["count"]} examples')
    if info['skipped']:
      names = [s['name'] for s in info['skipped']]
      print(f'{split}: skipped {len(names)} bad example(s): {", ".join(names)}')
      for s in info['skipped']:
        print(f'  {s["error"]}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
