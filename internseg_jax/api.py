"""Python API (DESIGN.md Part C2): build a model, load weights, run it.

  model = init_model('configs/upernet_full.py:224', 'converted/upernet_full')
  labels = inference_model(model, image_uint8_rgb)          # (H, W) int32
  feats = extract_features(model, images)                   # [(B, H/14, W/14, C)]
  logits = compute_logits(model, images)                    # (B, H, W, K)
"""
import dataclasses
import functools
import importlib.util
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from internseg_jax import checkpoint, sharding
from internseg_jax.trees import flatten, unflatten
from internseg_jax.models.build import build_backbone, build_segmentor, module_inits
from internseg_jax.models.resize import resize_pos_embed
from internseg_jax.models.segmentor import Segmentor, upsample_logits

__all__ = ['Model', 'load_config', 'init_model', 'extract_features', 'compute_logits',
           'inference_model', 'build_backbone']


def load_config(config) -> ml_collections.ConfigDict:
  """A ConfigDict, or 'configs/NAME.py[:ARG]' -> get_config(ARG)."""
  if isinstance(config, ml_collections.ConfigDict):
    return config
  path, _, arg = str(config).partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path} not found')
  spec = importlib.util.spec_from_file_location(f'_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


@dataclasses.dataclass(eq=False)
class Model:
  """A built model: config, Flax segmentor, variables ({'params', 'batch_stats'}) and mesh."""
  config: ml_collections.ConfigDict
  module: Segmentor
  variables: Any
  mesh: Mesh

  @property
  def params(self):
    return self.variables['params']

  @functools.cached_property
  def features_fn(self):
    def features(variables, images):
      feats = self.module.apply(variables, images, method='backbone_features')
      return [f.astype(jnp.float32) for f in feats]
    return jax.jit(features, out_shardings=self.replicated)

  @functools.cached_property
  def logits_fn(self):
    """Normalized images -> decode-head logits upsampled to the input size."""
    def logits(variables, images):
      out = self.module.apply(variables, images)['logits']
      return upsample_logits(out, images.shape[1:3])
    return jax.jit(logits, out_shardings=self.replicated)

  @property
  def replicated(self) -> NamedSharding:
    """Outputs are gathered to every device, so every process can read them."""
    return NamedSharding(self.mesh, P())


def _merge(parts: dict) -> dict:
  """{module: {collection: tree}} -> {collection: {module: tree}}."""
  out = {}
  for name, variables in parts.items():
    for collection, tree in variables.items():
      out.setdefault(collection, {})[name] = tree
  return out


def abstract_variables(module: Segmentor, mesh: Mesh, only=None):
  """Shapes, dtypes and shardings of the variables, computed without any data."""
  inits = {k: f for k, f in module_inits(module).items() if only is None or k in only}
  shapes = _merge({k: jax.eval_shape(f, jax.random.key(0)) for k, f in inits.items()})
  shardings = sharding.param_shardings(shapes, mesh)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def random_variables(module: Segmentor, mesh: Mesh, seed: int = 0, only=None):
  """Random variables created directly in their shards (no host copy)."""
  inits = {k: f for k, f in module_inits(module).items() if only is None or k in only}
  target = abstract_variables(module, mesh, only)
  out_shardings = jax.tree.map(lambda t: t.sharding, target)

  def init(rng):
    keys = jax.random.split(rng, len(inits))
    return _merge({k: f(key) for (k, f), key in zip(sorted(inits.items()), keys)})
  return jax.jit(init, out_shardings=out_shardings)(jax.random.key(seed))


def _module_of(name):
  return name.split('/')[1]


def load_variables(path, target, required=('backbone',)):
  """Restores a checkpoint into the sharded `target` tree. Every top-level
  module present in the checkpoint must match exactly (missing, unexpected or
  mis-shaped entries are an error), except that a position embedding of another
  grid is resized (PyTorch bicubic). Modules absent from the checkpoint are
  returned as missing (an error if listed in `required`).
  Returns (flat dict of restored arrays, sorted missing module names)."""
  params_dir = checkpoint.find_params_dir(path)
  stored, wanted = flatten(checkpoint.params_metadata(params_dir)), flatten(target)
  present = {_module_of(k) for k in stored}
  missing_modules = sorted({_module_of(k) for k in wanted} - present)
  missing = sorted(k for k in set(wanted) - set(stored) if _module_of(k) in present)
  missing += [f'{m} (the whole module)' for m in missing_modules if m in required]
  unexpected = sorted(set(stored) - set(wanted))
  resized = [k for k in stored if k in wanted and k.endswith('pos_embed')
             and stored[k].shape != wanted[k].shape and stored[k].shape[-1] == wanted[k].shape[-1]]
  wrong = [f'{k}: stored {stored[k].shape}, model {wanted[k].shape}' for k in stored
           if k in wanted and k not in resized and stored[k].shape != wanted[k].shape]
  if missing or unexpected or wrong:
    lines = ([f'missing: {k}' for k in missing] + [f'unexpected: {k}' for k in unexpected]
             + [f'wrong shape: {w}' for w in wrong])
    raise ValueError(f'checkpoint {params_dir} does not fit the model:\n  ' + '\n  '.join(lines))

  def restore_target(name):
    t = wanted[name]
    if name in resized:  # read at its stored grid, replicated; resized below
      return jax.ShapeDtypeStruct(stored[name].shape, t.dtype,
                                  sharding=NamedSharding(t.sharding.mesh, P()))
    return t

  restored = flatten(checkpoint.restore_params(
      params_dir, unflatten({k: restore_target(k) for k in stored})))
  for name in resized:
    logging.info('resizing %s from %s to %s', name, stored[name].shape, wanted[name].shape)
    n = wanted[name].shape[1] - 1
    grid = (int(round(n ** 0.5)),) * 2
    restored[name] = jax.jit(lambda x: resize_pos_embed(x, grid),
                             out_shardings=wanted[name].sharding)(restored[name])
  return restored, missing_modules


def init_variables(module: Segmentor, mesh: Mesh, checkpoint=None, seed: int = 0,
                   dtype_of=None):
  """Variables of `module` from `checkpoint` (modules it lacks, e.g. the heads of
  a converted backbone, random), or all random; created in their shards.
  `dtype_of(path) -> dtype or None` overrides the storage dtype of parameters
  (e.g. a frozen backbone kept in bf16); restores cast while reading."""
  target = abstract_variables(module, mesh)
  if dtype_of is not None:
    target = unflatten({k: jax.ShapeDtypeStruct(t.shape, dtype_of(k) or t.dtype, sharding=t.sharding)
                      for k, t in flatten(target).items()})
  if checkpoint:
    restored, missing = load_variables(checkpoint, target)
    if missing:
      logging.warning('%s not in %s: randomly initialised', ', '.join(missing), checkpoint)
  else:
    logging.info('no checkpoint given: random parameters')
    restored, missing = {}, None
  if missing is None or missing:
    flat_target = flatten(target)
    fresh = flatten(random_variables(module, mesh, seed, only=missing))
    cast = jax.jit(lambda x: {k: v.astype(flat_target[k].dtype) for k, v in x.items()},
                   out_shardings={k: flat_target[k].sharding for k in fresh})
    restored.update(cast(fresh))
  return unflatten(restored)


def init_model(config, checkpoint=None, mesh: Mesh | None = None) -> Model:
  """Builds the model of `config` with variables from `checkpoint` (a converter
  output, a training workdir or one checkpoint folder), else from
  `config.init.checkpoint` / `config.init.pretrained`, else random. Heads (and
  the neck) missing from a backbone-only checkpoint are initialised randomly."""
  config = load_config(config)
  mesh = mesh or sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  module = build_segmentor(config.model)
  checkpoint = checkpoint or config.init.get('checkpoint') or config.init.get('pretrained')
  variables = init_variables(module, mesh, checkpoint, config.get('seed', 0))
  return Model(config, module, variables, mesh)


def _put_batch(model: Model, images):
  """Puts a batch (the same on every process) on the mesh: split over
  (data, fsdp) when it divides evenly, else replicated."""
  if isinstance(images, jax.Array):
    images = np.asarray(jax.device_get(images))
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'images must be (B, H, W, 3), got {images.shape}')
  n = model.mesh.shape['data'] * model.mesh.shape['fsdp']
  spec = sharding.batch_sharding(model.mesh) if images.shape[0] % n == 0 else model.replicated
  return jax.make_array_from_callback(images.shape, spec, lambda index: images[index])


def extract_features(model: Model, images) -> list:
  """Normalized (B, H, W, 3) float32 images -> the backbone outputs at
  `out_indices`, each (B, H/14, W/14, C) float32, before any neck."""
  return model.features_fn(model.variables, _put_batch(model, images))


def compute_logits(model: Model, images) -> jax.Array:
  """Normalized (B, H, W, 3) float32 images -> (B, H, W, num_classes) float32
  logits of the whole image, upsampled to the input size, before argmax."""
  return model.logits_fn(model.variables, _put_batch(model, images))


def inference_model(model: Model, image, return_logits: bool = False):
  """One (H, W, 3) uint8 RGB image through the config's test pipeline (resize,
  slide or whole, optional flip / multi-scale) -> (H, W) int32 labels at the
  original size, plus (H, W, num_classes) float32 logits when asked (with
  several test-time augmentations: the mean of their softmax probabilities)."""
  from internseg_jax import evaluate  # evaluate imports this module's Model
  logits = evaluate.predict_logits(model, image)
  labels = np.argmax(logits, axis=-1).astype(np.int32)
  return (labels, logits) if return_logits else labels
