"""Python API (docs/reference.md, "Contract"): build a model, load weights, run it.

  model = init_model('configs/upernet_full.py:224', 'converted/upernet_full')
  labels = inference_model(model, image_uint8_rgb)          # (H, W) int32
  feats = extract_features(model, images)                   # [(B, H/14, W/14, C)]
  # (an adapter model: four maps at strides 4, 8, 16, 32)
  logits = compute_logits(model, images)                    # (B, H, W, K)

A thin facade over config, weights, freeze and inference; training does not use it.
"""
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from internseg_jax import evaluate, inference, sharding, weights
from internseg_jax.config import load_config, validate
from internseg_jax.freeze import FreezePolicy
from internseg_jax.models.segmentor import Segmentor

__all__ = ['Model', 'load_config', 'init_model', 'extract_features', 'compute_logits',
           'inference_model', 'evaluate_model']


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

  @property
  def replicated(self) -> NamedSharding:
    """Outputs gathered to every device, so every process can read them."""
    return NamedSharding(self.mesh, P())

  @functools.cached_property
  def features_fn(self):
    def features(variables, images):
      feats = self.module.apply(variables, images, method='backbone_features')
      return [f.astype(jnp.float32) for f in feats]
    return jax.jit(features, out_shardings=self.replicated)

  @functools.cached_property
  def logits_fn(self):
    """Normalized images -> decode-head logits upsampled to the input size."""
    return jax.jit(functools.partial(self.module.apply, method=Segmentor.logits),
                   out_shardings=self.replicated)

  @functools.cached_property
  def batched_logits_fn(self):
    """The same with batch-sharded output, for inference.WindowRunner."""
    forward = inference.segmentor_forward(self.module, self.mesh)
    return lambda images: forward(self.variables, images)


def init_model(config, checkpoint=None, mesh: Mesh | None = None) -> Model:
  """Builds the model of `config` with variables from `checkpoint` (a converter
  output, a training workdir, its best/ or one checkpoint folder), else from
  `config.init.checkpoint` / `config.init.pretrained`, else random. Heads (and
  the neck) missing from a backbone-only checkpoint are initialised randomly."""
  config = validate(load_config(config))
  mesh = mesh or sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  policy = FreezePolicy.from_config(config)
  module = policy.segmentor(config.model)
  checkpoint = checkpoint or config.init.checkpoint or config.init.pretrained
  # Stored in model.param_dtype: train.frozen_dtype is how training keeps a
  # frozen backbone; inference keeps the checkpoint's values exact.
  variables = weights.init_variables(module, mesh, checkpoint, config.train.seed)
  return Model(config, module, variables, mesh)


def _put_batch(model: Model, images):
  """Puts a batch (the same on every process) on the mesh: split over
  (data, fsdp) when it divides evenly, else replicated."""
  images = np.asarray(jax.device_get(images), np.float32)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'images must be (B, H, W, 3), got {images.shape}')
  n = model.mesh.devices.size
  spec = sharding.batch_sharding(model.mesh) if images.shape[0] % n == 0 else model.replicated
  return jax.make_array_from_callback(images.shape, spec, lambda index: images[index])


def extract_features(model: Model, images) -> list:
  """Normalized (B, H, W, 3) float32 images -> the backbone outputs at
  `out_indices`, each (B, H/p, W/p, C) float32 (p = patch_size), before any
  neck. An adapter model (`model.adapter`) gives its four maps, (B, H/4, W/4, C)
  ... (B, H/32, W/32, C) after its final norms, for images of exactly img_size."""
  return model.features_fn(model.variables, _put_batch(model, images))


def compute_logits(model: Model, images) -> jax.Array:
  """Normalized (B, H, W, 3) float32 images -> (B, H, W, num_classes) float32
  logits of the whole image, upsampled to the input size, before argmax."""
  return model.logits_fn(model.variables, _put_batch(model, images))


def inference_model(model: Model, image, return_logits: bool = False):
  """One (H, W, 3) uint8 RGB image through the config's test pipeline (resize,
  slide or whole, optional flip / multi-scale) -> (H, W) int32 labels at the
  original size, plus (H, W, num_classes) float32 logits when asked (with
  several test-time augmentations: the mean of their softmax probabilities).
  With several processes, call it with the same image on every process."""
  out = inference.predict(model.batched_logits_fn, model.mesh, np.asarray(image),
                          model.config.eval)
  labels = np.argmax(out, axis=-1).astype(np.int32)
  return (labels, out) if return_logits else labels


def evaluate_model(model: Model, dataset, workdir: str | None = None,
                   limit: int | None = None) -> dict:
  """mIoU / aAcc / mAcc / per-class IoU over a dataset of {'image', 'label'}
  records (e.g. internseg_jax.data.sources.ADEFolder), batched over the mesh;
  images are prepared in threads (no worker processes: safe in notebooks).
  Writes WORKDIR/eval_results.json when `workdir` is given."""
  return evaluate.evaluate(model.batched_logits_fn, model.mesh, model.config, dataset, workdir,
                           limit=limit, num_workers=0)
