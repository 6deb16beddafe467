r"""Converts InternViT-6B weights into an Orbax checkpoint folder.

  python -m convert.pth_to_orbax --src=FILE_OR_FOLDER --dst=DIR \
      [--config=configs/NAME.py[:ARG] --config.KEY=VALUE ...] [--strict]

SRC: a `.pth` (pretrained backbone, plain or `{'module': ...}`; or a released
mmseg segmentor, mmcv `{'meta', 'state_dict', 'optimizer'}` or
`{'module': ...}`, InternViT-Adapter segmentors included: those need the
config, e.g. `--config=configs/upernet_adapter.py`), a Hugging Face
`.safetensors` file, a sharded Hugging Face folder (via
`model.safetensors.index.json`), or an InternVL-Chat folder (only
`vision_model.*` is read). The architecture comes from the tensors (and
`config.json`); heads, img_size and patch_size from the config when given.
A pretrained backbone converted with an adapter config becomes the adapter's
ViT: patch kernel resized 14 -> 16, pos_embed to img_size // 16, cls token
dropped (the adapter's own layers and the heads start random).
Tensors are read one at a time and written one block slice at a time, so peak
memory stays far below the file size. Keys the model does not use are listed
as a warning and in info.json (`--strict`: an error); missing or mis-shaped
keys are an error. The output appears only when complete:

  DST/params/    Orbax PyTree checkpoint of the variables: {'params': {'backbone': ...}, ...}
  DST/info.json  source files and their SHA-256, detected variant and architecture
"""
import datetime
import json
import os
import shutil
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from convert import adapter, backbone, lazy_stack, segmentor, tensors
from internseg_jax import files
from internseg_jax.errors import ConversionError, InternSegError
from internseg_jax.weights import unflatten
from internseg_jax.weights import raise_problems

PARAMS = 'params'
INFO = 'info.json'


def build_variables(source, config=None, strict: bool = False):
  """A TensorSource -> (our variables tree with LazyStack block parameters,
  a description of what was found, the unexpected tensor names)."""
  names = list(source.tensors)
  kind = 'segmentor' if segmentor.is_segmentor(names) else 'backbone'
  for_adapter = config is not None and config.model.get('adapter') is not None
  if kind == 'segmentor' and adapter.is_adapter(names):
    tree, found, unused = adapter.segmentor_variables(source, config)
    return tree, found, _unused(source, unused, strict)
  if kind == 'segmentor' and for_adapter:
    raise ConversionError('an InternViT segmentor without an adapter (no backbone.spm.*, '
                          'backbone.interactions.*), but the config has model.adapter: convert '
                          "it with the config it was trained with (e.g. configs/upernet_full.py)")
  prefix = 'backbone.' if kind == 'segmentor' else ''
  arch = backbone.detect(source, prefix)
  disagree = backbone.hint_disagreements(arch, source.hints)
  if disagree:
    logging.warning('%s: config.json disagrees with the tensors; converting what the tensors '
                    'hold:\n  %s', source.path, '\n  '.join(disagree))
  bb = config.model.backbone if config is not None else None
  pretrained = kind == 'backbone'
  if bb is not None:
    # A segmentor's pos_embed is at the crop grid, not the pretrain one; a
    # pretrained file's patch kernel is resized to the config's patch size.
    skip = ('pretrain_size',) if not pretrained else ('patch_size',)
    backbone.check_against_config(arch, bb, skip=skip)
  num_heads = _num_heads(arch, bb, source.hints)
  img_size = bb.img_size if bb is not None else arch['pretrain_size']
  patch_size = bb.patch_size if bb is not None else arch['patch_size']
  if img_size % patch_size:
    raise ConversionError(f'img_size {img_size} is not a multiple of the patch size {patch_size}')

  ours = backbone.expected_shapes(arch, num_heads)
  own = segmentor.backbone_names(names) if kind == 'segmentor' else names
  unused = backbone.check_keys(source, arch, ours, prefix, own)
  if kind == 'segmentor':  # names under no known prefix are unused too
    unused += sorted(k for k in names if not k.startswith(('backbone.',) + segmentor.HEAD_PREFIXES))
  # The adapter has no cls token: the original loads the pretrained one and then
  # sets it to None. Listed as unused, never an error (not even with --strict).
  dropped = [k for k in adapter.DROPPED if for_adapter and k in names]
  _unused(source, unused, strict)

  tree = {'params': {'backbone': backbone.build_tree(
      source, arch, ours, img_size=img_size, patch_size=patch_size, prefix=prefix,
      pretrained=pretrained)}}
  for key in dropped:
    del tree['params']['backbone'][key]
  found = dict(kind=kind, backbone=dict(arch, num_heads=num_heads, img_size=img_size,
                                        patch_size=patch_size))
  if disagree:
    found['config_json_disagrees'] = disagree
  if for_adapter:  # the ViT of an adapter; the adapter's own layers start random
    found['for_adapter'] = True
    found['dropped_keys'] = dropped
  if pretrained and patch_size != arch['patch_size']:
    found['resized_patch_kernel'] = [arch['patch_size'], patch_size]
  if kind == 'segmentor':
    heads = segmentor.detect_heads(source)
    model = segmentor.model_config(arch, heads, num_heads, img_size, config)
    for collection, modules in unflatten(segmentor.heads_variables(source, model)).items():
      tree.setdefault(collection, {}).update(modules)
    found['heads'] = heads
  return tree, found, [source.describe(k) for k in unused + dropped]


def _unused(source, unused: list[str], strict: bool) -> list[str]:
  """Names the model does not use: an error with --strict; else returned as the
  file names them (for the warning and info.json)."""
  if unused and strict:
    raise_problems([f'unexpected: {source.describe(k)} {source.shape(k)}' for k in unused],
                   'tensors the model does not use (--strict)', ConversionError)
  return [source.describe(k) for k in unused]


def _num_heads(arch: dict, bb, hints: dict) -> int:
  """The config's head count, else config.json's, else width / 128 (InternViT-6B)."""
  stated = hints.get('num_heads')
  if bb is not None:
    if stated is not None and stated != bb.num_heads:
      raise ConversionError(f"{hints['from']} says num_attention_heads {stated}, "
                            f'the config says num_heads {bb.num_heads}')
    return bb.num_heads
  return stated if stated is not None else max(1, arch['embed_dim'] // 128)


def _remove_late(path: str, settle_s: float = 0.25, timeout_s: float = 30.0) -> None:
  """Removes a temporary folder that writes abandoned on an error may still be
  touching (TensorStore finishes them on its own threads): again until it has
  stayed gone for `settle_s`."""
  deadline = time.monotonic() + timeout_s
  while True:
    shutil.rmtree(path, ignore_errors=True)
    time.sleep(settle_s)
    if not os.path.exists(path) or time.monotonic() > deadline:
      return


def write_output(dst: str, tree, info: dict) -> None:
  """DST/params (Orbax PyTree) and DST/info.json, atomically: written in a
  temporary sibling folder that is renamed to DST only when complete."""
  tmp = None
  try:
    with files.atomic_folder(dst) as tmp:
      lazy_stack.save_tree(os.path.join(tmp, PARAMS), tree, progress=tqdm)
      with open(os.path.join(tmp, INFO), 'w') as f:
        f.write(json.dumps(info, indent=2, sort_keys=True))
  except BaseException:
    if tmp is not None:
      _remove_late(tmp)
    raise


def open_source(path: str) -> tensors.TensorSource:
  """A `.pth` file, a `.safetensors` file, or a Hugging Face folder (sharded via
  its index, or an InternVL-Chat folder of which only `vision_model.*` is read)."""
  if not os.path.exists(path):
    raise ConversionError(f'{path}: no such file or folder')
  if os.path.isdir(path) or tensors.looks_like_safetensors(path):
    from convert import safetensors_io  # no torch needed on this path
    return safetensors_io.open_safetensors(path)
  from convert import torch_io
  return torch_io.PthSource(path)


def convert(src: str, dst: str, config=None, strict: bool = False) -> dict:
  """Converts `src` into the folder `dst`; returns the info written next to it."""
  try:
    if os.path.exists(dst):
      raise ConversionError(f'{dst} already exists; remove it or choose another --dst')
    with open_source(src) as source:
      tree, found, unused = build_variables(source, config, strict)
      if unused:
        logging.warning('%s: %d tensor(s) the model does not use, ignored as the original '
                        'does (strict=False; --strict makes this an error):\n  %s',
                        src, len(unused), '\n  '.join(unused))
      logging.info('computing the SHA-256 of %d file(s)', len(source.files))
      digests = [dict(path=os.path.abspath(f), sha256=tensors.file_sha256(f),
                      bytes=os.path.getsize(f)) for f in source.files]
      info = dict(found, source=os.path.abspath(src), files=digests, unexpected_keys=unused,
                  variant=backbone.variant_name(found['backbone'], src,
                                                found['kind'] == 'segmentor'),
                  converted_at=datetime.datetime.now().isoformat(), **source.meta)
      if len(digests) == 1:
        info['sha256'] = digests[0]['sha256']
      logging.info('converting %s (%s %s) -> %s', src, info['variant'], info['kind'], dst)
      write_output(dst, tree, info)
  except ConversionError as e:
    message = str(e)
    if not message.startswith((src, dst, os.path.abspath(src))):
      raise ConversionError(f'{src}: {message}') from None
    raise
  return info


FLAGS = flags.FLAGS
flags.DEFINE_string('src', None, '.pth, .safetensors, or a Hugging Face folder', required=True)
flags.DEFINE_string('dst', None, 'output folder (must not exist)', required=True)
flags.DEFINE_bool('strict', False, 'tensors the model does not use are an error')
config_flags.DEFINE_config_file('config', None, 'optional config for heads, img_size, patch_size',
                                lock_config=True)


def main(argv):
  del argv
  try:
    info = convert(FLAGS.src, FLAGS.dst, FLAGS.config, strict=FLAGS.strict)
  except InternSegError as e:  # bad input: one line (plus listed keys), no usage text
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f"wrote {FLAGS.dst}: {info['variant']} {info['kind']}, "
        f"{info['backbone']['depth']} blocks, width {info['backbone']['embed_dim']}, "
        f"img_size {info['backbone']['img_size']}")


if __name__ == '__main__':
  app.run(main)
