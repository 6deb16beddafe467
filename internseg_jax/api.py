"""Python API (DESIGN.md Part C2): build a model, load weights, run it.

  model = init_model('configs/features.py:224', 'converted/intern_vit_6b_224px')
  feats = extract_features(model, images)   # list of (B, H/14, W/14, C)
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
from internseg_jax.models.build import build_backbone
from internseg_jax.models.intern_vit import InternViT
from internseg_jax.models.resize import resize_pos_embed


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
  """A built model: its config, Flax module, parameters ({'backbone': ...}) and mesh."""
  config: ml_collections.ConfigDict
  backbone: InternViT
  params: Any
  mesh: Mesh

  @functools.cached_property
  def _features_fn(self):
    def features(params, images):
      feats = self.backbone.apply({'params': params['backbone']}, images)
      return [f.astype(jnp.float32) for f in feats]
    return jax.jit(features)


def _init_fn(backbone: InternViT):
  p = backbone.patch_size  # a 1x1-patch input: init needs the shapes, not a real forward
  return lambda rng: {'backbone': backbone.init(rng, jnp.zeros((1, p, p, 3)))['params']}


def abstract_params(backbone: InternViT, mesh: Mesh):
  """Parameter shapes and dtypes with their shardings, computed without any data."""
  shapes = jax.eval_shape(_init_fn(backbone), jax.random.key(0))
  shardings = sharding.param_shardings(shapes, mesh)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def random_params(backbone: InternViT, mesh: Mesh, seed: int = 0):
  """Random parameters created directly in their shards (no host copy)."""
  target = abstract_params(backbone, mesh)
  out_shardings = jax.tree.map(lambda t: t.sharding, target)
  return jax.jit(_init_fn(backbone), out_shardings=out_shardings)(jax.random.key(seed))


def _flat(tree):
  return {sharding.path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load_params(path, target):
  """Restores a checkpoint into the sharded `target` tree, strictly: missing,
  unexpected or mis-shaped parameters are an error. A position embedding stored
  at another grid is resized (PyTorch bicubic) to the target's."""
  params_dir = checkpoint.find_params_dir(path)
  stored, wanted = _flat(checkpoint.params_metadata(params_dir)), _flat(target)
  missing = sorted(set(wanted) - set(stored))
  unexpected = sorted(set(stored) - set(wanted))
  resized = [k for k in stored if k in wanted and k.endswith('pos_embed')
             and stored[k].shape != wanted[k].shape and stored[k].shape[-1] == wanted[k].shape[-1]]
  wrong = [f'{k}: stored {stored[k].shape}, model {wanted[k].shape}' for k in stored
           if k in wanted and k not in resized and stored[k].shape != wanted[k].shape]
  if missing or unexpected or wrong:
    lines = ([f'missing: {k}' for k in missing] + [f'unexpected: {k}' for k in unexpected]
             + [f'wrong shape: {w}' for w in wrong])
    raise ValueError(f'checkpoint {params_dir} does not fit the model:\n  ' + '\n  '.join(lines))

  def restore_target(path, t):
    name = sharding.path_name(path)
    if name in resized:  # read at its stored grid, replicated; resized below
      return jax.ShapeDtypeStruct(stored[name].shape, t.dtype,
                                  sharding=NamedSharding(t.sharding.mesh, P()))
    return t

  params = checkpoint.restore_params(
      params_dir, jax.tree_util.tree_map_with_path(restore_target, target))
  for name in resized:
    logging.info('resizing %s from %s to %s', name, stored[name].shape, wanted[name].shape)
    n = wanted[name].shape[1] - 1
    grid = (int(round(n ** 0.5)),) * 2
    params = _replace(params, name, jax.jit(
        lambda x: resize_pos_embed(x, grid), out_shardings=wanted[name].sharding)(
            _get(params, name)))
  return params


def _get(tree, name):
  for k in name.split('/'):
    tree = tree[k]
  return tree


def _replace(tree, name, value):
  head, _, rest = name.partition('/')
  return {**tree, head: _replace(tree[head], rest, value) if rest else value}


def init_model(config, checkpoint=None, mesh: Mesh | None = None) -> Model:
  """Builds the model of `config` with parameters from `checkpoint` (a converter
  output, a training workdir or one checkpoint folder), else from
  `config.init.checkpoint`, else randomly initialised."""
  config = load_config(config)
  mesh = mesh or sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  backbone = build_backbone(config.model)
  checkpoint = checkpoint or config.init.get('checkpoint') or config.init.get('pretrained')
  if checkpoint:
    params = load_params(checkpoint, abstract_params(backbone, mesh))
  else:
    logging.info('no checkpoint given: random parameters')
    params = random_params(backbone, mesh, config.get('seed', 0))
  return Model(config, backbone, params, mesh)


def _put_batch(model: Model, images):
  """Puts a batch on the mesh: split over (data, fsdp) when it divides evenly."""
  images = jnp.asarray(images, jnp.float32)
  n = model.mesh.shape['data'] * model.mesh.shape['fsdp']
  spec = sharding.batch_sharding(model.mesh) if images.shape[0] % n == 0 else \
      NamedSharding(model.mesh, P())
  return jax.device_put(images, spec)


def extract_features(model: Model, images) -> list:
  """Normalized (B, H, W, 3) float32 images -> the backbone outputs at
  `out_indices`, each (B, H/14, W/14, C) float32, before any neck."""
  images = np.asarray(images) if not isinstance(images, jax.Array) else images
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'images must be (B, H, W, 3), got {images.shape}')
  return model._features_fn(model.params, _put_batch(model, images))
