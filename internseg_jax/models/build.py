"""Modules from the `model` part of a config."""
import jax.numpy as jnp

from internseg_jax.models.heads import FCNHead, LinearHead, PyramidNeck, UPerHead
from internseg_jax.models.intern_vit import InternViT
from internseg_jax.models.segmentor import Segmentor

BACKBONE_KEYS = ('embed_dim', 'depth', 'num_heads', 'mlp_ratio', 'patch_size', 'img_size',
                 'qkv_bias', 'qk_normalization', 'init_values', 'drop_path_rate',
                 'out_indices', 'remat')


def build_backbone(model_config, attention: str | None = None, pad_tokens_to: int = 0,
                   sliced_scan: bool = False) -> InternViT:
  """`attention` overrides model.backbone.attention; the other two are set by
  internseg_jax.freeze (they depend on whether the blocks are trained)."""
  bb = model_config.backbone
  kwargs = {k: bb[k] for k in BACKBONE_KEYS}
  kwargs['out_indices'] = tuple(kwargs['out_indices'])
  return InternViT(**kwargs, attention=attention or bb.attention, pad_tokens_to=pad_tokens_to,
                   sliced_scan=sliced_scan, dtype=jnp.dtype(model_config.dtype),
                   param_dtype=jnp.dtype(model_config.param_dtype))


def build_segmentor(model_config, **backbone_kwargs) -> Segmentor:
  head = model_config.decode_head
  head_dtype = jnp.dtype(head.dtype)
  norm_eval = model_config.norm_eval
  if head.type == 'linear':
    decode = LinearHead(head.num_classes, head.dropout, head_dtype, norm_eval)
  elif head.type == 'uper':
    decode = UPerHead(head.channels, head.num_classes, tuple(head.pool_scales), head.dropout,
                      head_dtype, norm_eval)
  else:
    raise ValueError(f"model.decode_head.type must be 'linear' or 'uper', got {head.type!r}")
  aux_config = model_config.auxiliary_head
  aux = None if aux_config is None else FCNHead(
      aux_config.channels, head.num_classes, aux_config.dropout, head_dtype, norm_eval)
  neck = PyramidNeck(jnp.dtype(model_config.dtype), jnp.dtype(model_config.param_dtype)) \
      if model_config.backbone.with_fpn else None
  return Segmentor(build_backbone(model_config, **backbone_kwargs), decode, neck, aux,
                   aux_in_index=aux_config.in_index if aux_config is not None else 0)


def module_inits(segmentor: Segmentor) -> dict:
  """Per top-level module: rng -> its variables ({'params': ..., maybe
  'batch_stats': ...}), each from small dummy inputs of the right width, so one
  module can be initialised without building the others."""
  bb = segmentor.backbone
  p, c = bb.patch_size, bb.embed_dim
  maps = [jnp.zeros((1, 2, 2, c))] * len(bb.out_indices)
  inits = {'backbone': lambda rng: bb.init(rng, jnp.zeros((1, p, p, 3)))}
  if segmentor.neck is not None:
    inits['neck'] = lambda rng: segmentor.neck.init(rng, maps)
    maps = [jnp.zeros((1, 2, 2, c))] * 4
  inits['decode_head'] = lambda rng: segmentor.decode_head.init(rng, maps)
  if segmentor.auxiliary_head is not None:
    inits['auxiliary_head'] = lambda rng: segmentor.auxiliary_head.init(rng, maps[0])
  return inits
