"""Modules from the `model` part of a config."""
import jax.numpy as jnp

from internseg_jax.models.adapter import InternViTAdapter
from internseg_jax.models.heads import FCNHead, LinearHead, PyramidNeck, UPerHead
from internseg_jax.models.intern_vit import InternViT
from internseg_jax.models.segmentor import Segmentor

BACKBONE_KEYS = ('embed_dim', 'depth', 'num_heads', 'mlp_ratio', 'patch_size', 'img_size',
                 'qkv_bias', 'qk_normalization', 'init_values', 'drop_path_rate',
                 'out_indices', 'remat')
# model.adapter keys, passed to InternViTAdapter as they are.
ADAPTER_KEYS = ('conv_inplane', 'n_points', 'deform_num_heads', 'injector_init_values',
                'cffn_ratio', 'deform_ratio')


def build_backbone(model_config, attention: str | None = None, pad_tokens_to: int = 0,
                   trained_blocks: bool = False) -> InternViT | InternViTAdapter:
  """`attention` overrides model.backbone.attention; the other two are set by
  internseg_jax.freeze (they depend on whether the blocks are trained).
  With `model.adapter`: InternViTAdapter around the same ViT fields."""
  bb = model_config.backbone
  kwargs = {k: bb[k] for k in BACKBONE_KEYS}
  kwargs['out_indices'] = tuple(kwargs['out_indices'])
  common = dict(trained_blocks=trained_blocks, dtype=jnp.dtype(model_config.dtype),
                param_dtype=jnp.dtype(model_config.param_dtype))
  attention = attention or bb.attention
  adapter = model_config.get('adapter')
  if adapter is None:
    return InternViT(**kwargs, attention=attention, pad_tokens_to=pad_tokens_to, **common)
  del kwargs['out_indices']  # the adapter's maps follow its interactions
  tokens = (bb.img_size // bb.patch_size) ** 2  # no cls token
  if pad_tokens_to and tokens % pad_tokens_to:
    # The adapter does not pad its tokens (at 512 px there are 1024, a multiple of
    # cuDNN's 64); a trained ViT at another size falls back to XLA attention.
    attention = 'xla'
  return InternViTAdapter(
      **kwargs, **{k: adapter[k] for k in ADAPTER_KEYS}, attention=attention,
      interaction_indexes=tuple(tuple(int(i) for i in ix) for ix in adapter.interaction_indexes),
      **common)


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
  c = bb.embed_dim
  adapter = isinstance(bb, InternViTAdapter)
  # The adapter adds pos_embed without interpolation: it initialises only at
  # exactly img_size (shapes via jax.eval_shape cost nothing; under jit the
  # forward pass is dead code, so a random init computes only the parameters).
  # InternViT resizes pos_embed: one patch is enough.
  size = bb.img_size if adapter else bb.patch_size
  maps = [jnp.zeros((1, 2, 2, c))] * (4 if adapter else len(bb.out_indices))
  inits = {'backbone': lambda rng: bb.init(rng, jnp.zeros((1, size, size, 3)))}
  if segmentor.neck is not None:
    inits['neck'] = lambda rng: segmentor.neck.init(rng, maps)
    maps = [jnp.zeros((1, 2, 2, c))] * 4
  inits['decode_head'] = lambda rng: segmentor.decode_head.init(rng, maps)
  if segmentor.auxiliary_head is not None:
    inits['auxiliary_head'] = lambda rng: segmentor.auxiliary_head.init(rng, maps[0])
  return inits
