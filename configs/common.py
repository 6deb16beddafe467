"""Shared pieces of every experiment config: the pretrained variants and the base.

Experiment files call `base_config(variant)` and override what differs; they never
copy it. Keys listed in DESIGN.md Part C3 are a contract: keep their names.
"""
import ml_collections
from ml_collections import config_dict

# Pretrained InternViT-6B files -> (depth, pretrain_size). Width 3200, 25 heads.
VARIANTS = {
    '224': (48, 224, 'intern_vit_6b_224px.pth'),
    '448_v1_0': (45, 448, 'intern_vit_6b_448px_v1_0.pth'),
    '448_v1_2': (45, 448, 'intern_vit_6b_448px_v1_2.pth'),
    '448_v1_5': (45, 448, 'intern_vit_6b_448px_v1_5.pth'),
    '448_v2_5': (45, 448, 'intern_vit_6b_448px_v2_5.pth'),
}


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'448_v2_5,tiny' or 'variant=224,tiny=1' -> ConfigDict over `defaults`.

  A bare word that is a variant name sets `variant`; any other bare word is a
  boolean flag set to True. Unknown keys are an error.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    if not value:
      key, value = ('variant', key) if key in VARIANTS else (key, 'True')
    if key not in out:
      raise ValueError(f'unknown config argument {key!r}; known: {sorted(out.keys())}')
    kind = type(out[key])
    out[key] = value.lower() in ('1', 'true', 'yes') if kind is bool else kind(value)
  if out.get('variant') is not None and out.variant not in VARIANTS:
    raise ValueError(f'unknown variant {out.variant!r}; known: {sorted(VARIANTS)}')
  return out


def backbone_config(variant: str = '224', img_size: int = 504) -> ml_collections.ConfigDict:
  depth, pretrain_size, _ = VARIANTS[variant]
  return ml_collections.ConfigDict(dict(
      embed_dim=3200, depth=depth, num_heads=25, mlp_ratio=4.0, patch_size=14,
      img_size=img_size, pretrain_size=pretrain_size, qkv_bias=False, qk_normalization=True,
      init_values=0.1, drop_path_rate=0.0, out_indices=[depth - 1], with_fpn=False,
      freeze=True,
      attention='auto',   # 'auto' (cuDNN on GPU in bf16, else XLA) | 'xla' | 'cudnn'
      remat='full',       # per-block activation checkpointing: none | full | dots | everything
  ))


def tiny_backbone(config: ml_collections.ConfigDict) -> None:
  """Shrinks the backbone for CPU runs and tests (runlocal-style)."""
  bb = config.model.backbone
  bb.embed_dim, bb.num_heads, bb.depth = 64, 2, 4
  bb.out_indices = [0, 1, 2, 3] if bb.with_fpn else [bb.depth - 1]


def tiny_model(config: ml_collections.ConfigDict, crop: int = 56) -> None:
  """A few-minute CPU version of an experiment: tiny backbone and heads, small
  crops and sliding windows."""
  tiny_backbone(config)
  config.model.backbone.img_size = crop
  config.model.decode_head.channels = 32
  if config.model.auxiliary_head is not None:
    config.model.auxiliary_head.channels = 32
  config.model.dtype = 'float32'
  config.eval.crop_size, config.eval.stride = crop, (crop * 2) // 3
  config.eval.scale = (4 * crop, crop)


def out_indices(depth: int, kind: str) -> list[int]:
  """The blocks a head reads: UperNet quartiles ([11, 23, 35, 47] for 48
  blocks), the linear probe four blocks before the end ([44]), or the last."""
  if kind == 'uper':
    return [depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1, depth - 1]
  return [depth - 4] if kind == 'linear_probe' else [depth - 1]


def upernet(config: ml_collections.ConfigDict, aux_in_index: int) -> None:
  """UperNet head (1536 channels) on the pyramid neck, with the FCN auxiliary head."""
  bb = config.model.backbone
  bb.with_fpn, bb.out_indices = True, out_indices(bb.depth, 'uper')
  config.model.decode_head.update(dict(type='uper', channels=1536, dropout=0.1))
  config.model.auxiliary_head = ml_collections.ConfigDict(
      dict(channels=1536, in_index=aux_in_index, loss_weight=0.4, dropout=0.1))


def base_config(variant: str = '224') -> ml_collections.ConfigDict:
  """Everything an experiment needs, with the reference's common settings."""
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.model = ml_collections.ConfigDict(dict(
      backbone=backbone_config(variant),
      decode_head=dict(
          type='linear',         # 'linear' (BatchNorm + 1x1 conv) | 'uper' (UperNet)
          channels=1536,         # UperNet width (unused by the linear head)
          num_classes=150,
          dropout=0.0,           # before conv_seg: 0 for the linear head, 0.1 for UperNet
          pool_scales=(1, 2, 3, 6),
          dtype='float32',       # the reference runs its heads in float32
      ),
      auxiliary_head=None,       # or dict(channels=1536, in_index=2, loss_weight=0.4)
      dtype='bfloat16',          # backbone/neck compute; norms, softmax, heads, loss: float32
      param_dtype='float32',     # storage dtype of the parameters
  ))
  c.init = ml_collections.ConfigDict(dict(
      pretrained=config_dict.placeholder(str),   # converted backbone (convert.pth_to_orbax)
      checkpoint=config_dict.placeholder(str),   # converted or trained full model
  ))
  c.data = ml_collections.ConfigDict(dict(
      root=config_dict.placeholder(str),  # ADEChallengeData2016 folder, or a TFDS data dir
      source='folder',           # 'folder' | 'tfds' (python -m internseg_jax.data.prepare)
      num_classes=150,
      reduce_zero_label=True,
      fraction=1,                # few-shot: train on a seeded 1/fraction subset
      subset_seed=0,             # random.seed of the draw; a reference log's 'Set random seed to S'
      # Training pipeline (mmseg): keep-ratio resize of (2016, 504) * U(0.5, 2),
      # random crop (cat_max_ratio), flip, photometric distortion, normalize, pad.
      crop_size=504,
      scale=(2016, 504),
      ratio_range=(0.5, 2.0),
      cat_max_ratio=0.75,
      flip_prob=0.5,
      photometric=True,
      num_workers=2,             # grain worker processes (0: in the main process)
      prefetch=4,                # batches buffered per worker
      skip_bad=False,            # skip (and count) unreadable or invalid records instead of failing
      synthetic=None,            # demo: dict(num_train, num_val, size_range, seed) generated into DIR/data
  ))
  c.eval = ml_collections.ConfigDict(dict(
      mode='slide', crop_size=504, stride=322,
      scale=(2016, 504),         # mmseg img_scale (long, short)
      resize='short_side',       # 'short_side' (short side -> 504) | 'fit' (within scale)
      flip=False, scales=(1.0,), # test-time augmentation: flip and scale ratios
      batch_size=2,              # windows per forward
      limit=config_dict.placeholder(int),  # evaluate only the first N images
  ))
  c.predict = ml_collections.ConfigDict(dict(
      input=config_dict.placeholder(str),  # an image or a folder of images
      alpha=0.5,                 # overlay opacity
      after_train=0,             # after training, overlays of this many val images
  ))
  c.train = ml_collections.ConfigDict(dict(
      batch_size=16,             # global (8 GPUs x 2 in the reference)
      steps=80000,
      lr=4e-5, warmup_steps=1500, warmup_ratio=1e-6,   # poly (power 1) + linear warmup
      weight_decay=0.05, layer_decay=1.0,              # AdamW (0.9, 0.999, 1e-8)
      grad_clip=config_dict.placeholder(float),
      frozen_dtype='bfloat16',   # storage of a frozen backbone (trainable params: param_dtype)
      log_every=50, checkpoint_every=1000, max_to_keep=2,
      eval_every=8000,           # 0: only the evaluation at the end
      seed=0,
  ))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.seed = 0
  return c
