"""Modules from the `model` part of a config."""
import jax.numpy as jnp

from internseg_jax.models.intern_vit import InternViT

BACKBONE_KEYS = ('embed_dim', 'depth', 'num_heads', 'mlp_ratio', 'patch_size', 'img_size',
                 'qkv_bias', 'qk_normalization', 'init_values', 'drop_path_rate',
                 'out_indices', 'attention', 'remat')


def build_backbone(model_config) -> InternViT:
  bb = model_config.backbone
  kwargs = {k: bb[k] for k in BACKBONE_KEYS}
  kwargs['out_indices'] = tuple(kwargs['out_indices'])
  return InternViT(**kwargs, dtype=jnp.dtype(model_config.dtype),
                   param_dtype=jnp.dtype(model_config.param_dtype))
