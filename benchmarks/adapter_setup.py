"""The adapter experiment for the benchmarks, built directly from InternViTAdapter.

Adapter tuning (docs/reference.md "Adapter"): InternViT-6B-Adapter (frozen ViT
blocks, trained spatial prior module, injectors and extractors), UperNet 1536 +
auxiliary FCN on map 2, 512 crops, patch 16, layer decay 0.95, weight decay 0.05.

The configs and `internseg_jax.models.build` do not build the adapter yet (a
config `configs/upernet_adapter.py` with `model.adapter` keys is being added
separately), so `adapter_config` derives the experiment from the full-tuning
config, and `install(config)` makes the project's own machinery build the
adapter segmentor for it: `FreezePolicy.segmentor` (what `trainer.Trainer` and
`api.init_model` call) and `weights.module_inits` (the per-module initialisers
behind abstract / random variables). Everything else (the freeze split, which
treats `backbone/{blocks,patch_embed,pos_embed}` as the frozen ViT, the
optimizer, the sharded step, gradient accumulation) is the real code. Once the
config exists, the benchmarks should load it instead and drop `install`.
"""
import contextlib

import jax.numpy as jnp

from internseg_jax import api, freeze, weights
from internseg_jax.models.adapter import InternViTAdapter
from internseg_jax.models.build import build_segmentor

INTERACTIONS_48 = ((0, 11), (12, 23), (24, 35), (36, 47))


def adapter_config(tiny: bool = False, crop: int = 512):
  """The adapter-tuning config (224 weights' 48 blocks, 512 crops); `tiny`: 4
  blocks of width 64 at `crop` 64 for CPU smoke runs."""
  config = api.load_config('configs/upernet_full.py' + (':tiny' if tiny else ''))
  config.experiment = 'adapter_tuning'
  bb = config.model.backbone
  bb.freeze, bb.drop_path_rate, bb.patch_size = True, 0.0, 16
  bb.with_fpn = False                      # the adapter makes the four maps itself
  config.data.crop_size = 64 if tiny else crop   # also img_size and the eval window
  config.data.scale = (4 * config.data.crop_size, config.data.crop_size)
  config.eval.size_divisor = 0
  config.model.auxiliary_head.in_index = 2
  config.train.layer_decay = 0.95
  config.mesh.update(dict(data=-1, fsdp=1))
  return config


def interactions(depth: int):
  """The reference's four interactions for 48 blocks; one block each when tiny."""
  if depth == 48:
    return INTERACTIONS_48
  step = depth // 4
  return tuple((i * step, (i + 1) * step - 1) for i in range(4))


def adapter_backbone(config, training: bool = False) -> InternViTAdapter:
  bb = config.model.backbone
  policy = freeze.FreezePolicy.from_config(config)
  attention, _ = policy.attention_choice(training)  # frozen ViT: no token padding
  return InternViTAdapter(
      embed_dim=bb.embed_dim, depth=bb.depth, num_heads=bb.num_heads, mlp_ratio=bb.mlp_ratio,
      patch_size=16, img_size=bb.img_size, qkv_bias=bb.qkv_bias,
      qk_normalization=bb.qk_normalization, init_values=bb.init_values,
      drop_path_rate=bb.drop_path_rate, conv_inplane=8 if bb.embed_dim < 256 else 64,
      deform_num_heads=bb.num_heads, interaction_indexes=interactions(bb.depth),
      attention=attention, remat=bb.remat, dtype=jnp.dtype(config.model.dtype),
      param_dtype=jnp.dtype(config.model.param_dtype))


def adapter_segmentor(config, training: bool = False):
  """Segmentor(InternViTAdapter, UperNet, no neck, aux FCN on map 2)."""
  seg = build_segmentor(config.model)
  return seg.clone(backbone=adapter_backbone(config, training), neck=None)


def _module_inits(segmentor) -> dict:
  bb = segmentor.backbone
  c = bb.embed_dim
  maps = [jnp.zeros((1, 2, 2, c))] * 4
  inits = {'backbone': lambda rng: bb.init(rng, jnp.zeros((1, bb.img_size, bb.img_size, 3))),
           'decode_head': lambda rng: segmentor.decode_head.init(rng, maps)}
  if segmentor.auxiliary_head is not None:
    inits['auxiliary_head'] = lambda rng: segmentor.auxiliary_head.init(rng, maps[0])
  return inits


@contextlib.contextmanager
def install(config):
  """Within the block, the project builds the adapter segmentor for any config
  (see the module docstring)."""
  original_segmentor = freeze.FreezePolicy.segmentor
  original_inits = weights.module_inits
  freeze.FreezePolicy.segmentor = (
      lambda self, model_config, training=False: adapter_segmentor(config, training))
  weights.module_inits = _module_inits
  try:
    yield
  finally:
    freeze.FreezePolicy.segmentor = original_segmentor
    weights.module_inits = original_inits
