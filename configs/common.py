"""Shared pieces of every experiment config: the pretrained variants, the
recipes of the original configs, and the one base every config starts from.

Experiment files call `experiment_config(name, variant)` and override what
differs; they never copy it. Keys listed in docs/reference.md "Contract" are
used by users and acceptance checks: keep their names. Every key the code reads
is defined here, with a comment. Values that the original sets once and uses in
several places (the crop, the image scale, the class count) are one
`FieldReference` here, so setting any of their keys sets all of them.
"""
import ml_collections
from ml_collections import config_dict

from internseg_jax.errors import ConfigError

# Pretrained InternViT-6B files -> (depth, pretrain_size, file). Width 3200, 25 heads.
VARIANTS = {
    '224': (48, 224, 'intern_vit_6b_224px.pth'),
    '448_v1_0': (45, 448, 'intern_vit_6b_448px_v1_0.pth'),
    '448_v1_2': (45, 448, 'intern_vit_6b_448px_v1_2.pth'),
    '448_v1_5': (45, 448, 'intern_vit_6b_448px_v1_5.pth'),
    '448_v2_5': (45, 448, 'intern_vit_6b_448px_v2_5.pth'),
}

# The ADE20K recipes of the original configs (OpenGVLab/InternVL-MMDetSeg,
# mmsegmentation/configs/intern_vit_6b{,_448px_v1_0,_448px_v1_2,_448px_v1_5,_448px_v2_5}/
# {linear_probing,few_shot,head_tuning,full_tuning,vit_adapter}/*ade20k*.py; see
# docs/reference.md). Block indices are per pretrained family, as written in the
# files (not derived from the depth): the 448px files have 45 blocks.
RECIPES = {
    'linear_probing': dict(
        head='linear', freeze=True, drop_path=0.0, weight_decay=0.0, layer_decay=1.0,
        steps=80000, warmup=1500, aux_in_index=None, eval_resize='short_side',
        out_indices={'224': [44], '448': [44]}),
    'head_tuning': dict(
        head='uper', freeze=True, drop_path=0.0, weight_decay=0.05, layer_decay=1.0,
        steps=80000, warmup=1500, aux_in_index=1, eval_resize='short_side',
        out_indices={'224': [11, 23, 35, 47], '448': [11, 22, 33, 44]}),
    'full_tuning': dict(
        head='uper', freeze=False, drop_path=0.4, weight_decay=0.05, layer_decay=0.95,
        steps=80000, warmup=1500, aux_in_index=2, eval_resize='short_side',
        out_indices={'224': [11, 23, 35, 47], '448': [11, 22, 33, 44]}),
    # Few-shot exists only for the 224px weights in the original. The 1/1 run
    # tests like the others (SETR_Resize, short side 504); the 1/2 ... 1/16 runs
    # use mmseg's plain keep-ratio Resize into (2016, 504).
    **{f'fewshot_1of{n}': dict(
        head='linear', freeze=False, drop_path=0.4, weight_decay=0.05, layer_decay=0.95,
        steps=steps, warmup=warmup, aux_in_index=None, fraction=n,
        eval_resize='short_side' if n == 1 else 'fit', out_indices={'224': [47]})
       for n, steps, warmup in ((16, 5000, 100), (8, 10000, 200), (4, 20000, 400),
                                (2, 40000, 800), (1, 80000, 1500))},
    # ViT-Adapter around the frozen ViT (vit_adapter/upernet_intern_vit_adapter_6b_512_80k_
    # ade20k_bs16_lr4e-5.py): only the 224px weights, 512 crops (see `adapter` below).
    # Its out_indices are the last block of each interaction.
    'adapter_tuning': dict(
        head='uper', freeze=True, drop_path=0.0, weight_decay=0.05, layer_decay=0.95,
        steps=80000, warmup=1500, aux_in_index=2, eval_resize='short_side', adapter=True,
        out_indices={'224': [11, 23, 35, 47]}),
}

# The adapter of the original config (InternViTAdapter's arguments there, and the
# defaults of vit_adapter.py for those it does not set). Its ViT keeps its own
# layer scale (`model.backbone.init_values`); `injector_init_values` is the
# original's adapter `init_values` (the injector's gamma).
ADAPTER = dict(
    interaction_indexes=[[0, 11], [12, 23], [24, 35], [36, 47]],  # [first, last] ViT block of each
    conv_inplane=64,           # spatial prior module width (x1, x2, x4, x4 at 1/4 .. 1/32)
    n_points=4,                # deformable attention: sampling points per head and level
    deform_num_heads=25,       # deformable attention heads
    injector_init_values=0.0,  # injector gamma init (the original's adapter `init_values`)
    cffn_ratio=0.25,           # ConvFFN hidden width / C
    deform_ratio=0.25,         # deformable attention value width / C
)

# The reference's common settings (every config above): AdamW (0.9, 0.999, 1e-8),
# lr 4e-5, global batch 16 (8 GPUs x 2), poly decay with linear warmup (ratio
# 1e-6), evaluation and checkpoints every 1000 iterations (best kept, last 2 kept).
LR, BATCH, EVAL_EVERY, CHECKPOINT_EVERY, MAX_TO_KEEP = 4e-5, 16, 1000, 1000, 2


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
      raise ConfigError(f'unknown config argument {key!r}; known: {sorted(out.keys())}')
    kind = type(out[key])
    out[key] = value.lower() in ('1', 'true', 'yes') if kind is bool else kind(value)
  if 'variant' in out and out.variant not in VARIANTS:
    raise ConfigError(f'unknown variant {out.variant!r}; known: {sorted(VARIANTS)}')
  return out


def base_config(variant: str = '224') -> ml_collections.ConfigDict:
  """Every key an experiment can set, with the reference's common settings."""
  depth, pretrain_size, _ = VARIANTS[variant]
  # One value, several keys (see the module docstring).
  num_classes = config_dict.FieldReference(150)
  crop = config_dict.FieldReference(504)              # training crop = eval window = img_size
  scale = config_dict.FieldReference((2016, 504))     # mmseg img_scale (long, short), train and test
  c = ml_collections.ConfigDict()
  c.experiment = 'features'    # the recipe's name (RECIPES), shown in logs
  c.variant = variant          # the pretrained weights (VARIANTS)
  c.model = ml_collections.ConfigDict(dict(
      backbone=dict(
          embed_dim=3200, depth=depth, num_heads=25, mlp_ratio=4.0, patch_size=14,
          img_size=crop,                # the grid the position embedding is resized to
          pretrain_size=pretrain_size,  # the grid of the pretrained file (read by the converter)
          qkv_bias=False, qk_normalization=True,
          init_values=0.1,              # layer scale init (the files hold trained values)
          drop_path_rate=0.0,           # stochastic depth, rising linearly over the blocks
          out_indices=[depth - 1],      # blocks whose outputs the head reads
          with_fpn=False,               # the 4-scale pyramid neck (UperNet)
          freeze=True,                  # backbone not trained: no grads, no optimizer state
          attention='auto',   # 'auto' (cuDNN on GPU in 16-bit, else XLA) | 'xla' | 'cudnn'
          remat='full',       # per-block activation checkpointing: none | full | dots | everything
      ),
      decode_head=dict(
          type='linear',         # 'linear' (BatchNorm + 1x1 conv) | 'uper' (UperNet)
          channels=1536,         # UperNet width (unused by the linear head)
          num_classes=num_classes,
          dropout=0.0,           # before conv_seg: 0 for the linear head, 0.1 for UperNet
          pool_scales=(1, 2, 3, 6),  # UperNet PPM bins
          dtype='float32',       # the reference runs its heads in float32
      ),
      # None, or dict(channels, in_index (neck output it reads), loss_weight, dropout).
      auxiliary_head=None,
      # None, or the ViT-Adapter around the backbone (keys: ADAPTER above). Its four
      # maps (1/4 .. 1/32) go straight to the head: no pyramid neck (with_fpn False),
      # patch 16, and it runs at exactly img_size (eval windows of the crop size).
      adapter=None,
      dtype='bfloat16',          # backbone/neck compute; norms, softmax, heads, loss: float32
      param_dtype='float32',     # storage dtype of trained parameters
      # mmseg norm_eval: BatchNorm uses (and keeps) its running statistics in
      # training too. False in every original config.
      norm_eval=False,
  ))
  c.init = ml_collections.ConfigDict(dict(
      pretrained=config_dict.placeholder(str),   # converted backbone (convert.pth_to_orbax)
      checkpoint=config_dict.placeholder(str),   # converted or trained full model
  ))
  c.data = ml_collections.ConfigDict(dict(
      root=config_dict.placeholder(str),  # ADEChallengeData2016 folder, or a TFDS data dir
      source='folder',           # 'folder' | 'tfds' (python -m internseg_jax.data.prepare)
      num_classes=num_classes,
      class_names=config_dict.placeholder(tuple),  # None: the ADE20K names for 150 classes
      reduce_zero_label=True,    # ADE20K: label 0 ("other") is ignored, k -> k - 1
      fraction=1,                # few-shot: train on the first 1/fraction of the shuffled list
      subset_seed=0,             # few-shot: random.seed of the draw (a reference log's seed)
      # Training pipeline (mmseg): keep-ratio resize of `scale` * U(ratio_range),
      # random crop (cat_max_ratio), flip, photometric distortion, normalize, pad.
      crop_size=crop,
      scale=scale,
      ratio_range=(0.5, 2.0),
      cat_max_ratio=0.75,
      flip_prob=0.5,
      photometric=True,
      num_workers=2,             # grain worker processes (0: in the main process)
      prefetch=4,                # batches buffered per worker
      skip_bad=False,            # skip (and list) unreadable or invalid records instead of failing
      # Demo: dict(num_train, num_val, size_range, seed) generated into WORKDIR/data.
      synthetic=None,
  ))
  c.eval = ml_collections.ConfigDict(dict(
      mode='slide',              # 'slide' (windows) | 'whole' (the resized image at once)
      crop_size=crop, stride=322,
      scale=scale,
      resize='short_side',       # 'short_side' (SETR_Resize: short side -> crop) | 'fit' (within scale)
      size_divisor=14,           # ResizeToMultiple after the resize (0: none, as the adapter)
      flip=False, scales=(1.0,), # test-time augmentation: flip and scale ratios
      windows_per_device=2,      # windows in each forward, per device
      limit=config_dict.placeholder(int),  # evaluate only the first N images
  ))
  c.predict = ml_collections.ConfigDict(dict(
      input=config_dict.placeholder(str),  # an image or a folder of images
      alpha=0.5,                 # overlay opacity
      after_train=0,             # after training, overlays of this many val images
  ))
  c.train = ml_collections.ConfigDict(dict(
      batch_size=BATCH,          # global (8 GPUs x 2 in the reference)
      accumulate=1,              # micro-batches per optimizer step (batch_size / accumulate each)
      steps=80000,
      lr=LR, warmup_steps=1500, warmup_ratio=1e-6,   # poly (power 1) + mmcv linear warmup
      b1=0.9, b2=0.999, eps=1e-8,                    # AdamW moments (the reference's betas)
      weight_decay=0.05, layer_decay=1.0,
      grad_clip=config_dict.placeholder(float),      # None: no clipping (as the reference)
      frozen_dtype='bfloat16',   # storage of a frozen backbone (trained params: model.param_dtype)
      log_every=50,              # metrics.jsonl rows: means over this many steps
      checkpoint_every=CHECKPOINT_EVERY, max_to_keep=MAX_TO_KEEP,
      eval_every=EVAL_EVERY,     # 0: only the evaluation at the end; the best is kept in best/
      seed=0,                    # data order, augmentations, init of new parts, dropout
  ))
  c.mesh = ml_collections.ConfigDict(dict(
      data=-1,                   # pure data parallelism (params replicated)
      fsdp=1,                    # batch and params split; -1 = all remaining devices
  ))
  return c


def upernet(config: ml_collections.ConfigDict, aux_in_index: int) -> None:
  """UperNet head (1536 channels) on the pyramid neck, with the FCN auxiliary head."""
  config.model.backbone.with_fpn = True
  config.model.decode_head.update(dict(type='uper', channels=1536, dropout=0.1))
  config.model.auxiliary_head = ml_collections.ConfigDict(
      dict(channels=1536, in_index=aux_in_index, loss_weight=0.4, dropout=0.1))


def experiment_config(name: str, variant: str = '224') -> ml_collections.ConfigDict:
  """The base with the original's recipe `name` (RECIPES) for `variant`."""
  recipe = RECIPES[name]
  family = '224' if variant == '224' else '448'
  if family not in recipe['out_indices']:
    raise ConfigError(f'{name} has no {variant} config in the original (only '
                      f'{sorted(recipe["out_indices"])}); use the 224 variant')
  c = base_config(variant)
  c.experiment = name
  bb = c.model.backbone
  bb.out_indices = list(recipe['out_indices'][family])
  bb.freeze, bb.drop_path_rate = recipe['freeze'], recipe['drop_path']
  if recipe['head'] == 'uper':
    upernet(c, recipe['aux_in_index'])
  if recipe.get('adapter'):
    adapter(c)
  c.data.fraction = recipe.get('fraction', 1)
  c.eval.resize = recipe['eval_resize']
  c.train.update(dict(steps=recipe['steps'], warmup_steps=recipe['warmup'],
                      weight_decay=recipe['weight_decay'], layer_decay=recipe['layer_decay']))
  if not bb.freeze:
    # The trained backbone's float32 weights + AdamW state (~95 GiB) need FSDP:
    # shard them over all devices (see the memory plan in the README).
    c.mesh.update(dict(data=1, fsdp=-1))
  return c


def adapter(config: ml_collections.ConfigDict) -> None:
  """The ViT-Adapter recipe (configs/_base_/datasets/ade20k.py and the adapter
  config): 512 crops, train scale (2048, 512), slide 512 / 341, SETR_Resize
  without ResizeToMultiple, patch 16 (the 14x14 pretrained kernel is resized
  when the converter loads it), the adapter's maps straight into UperNet."""
  bb = config.model.backbone
  bb.patch_size, bb.with_fpn = 16, False
  config.data.crop_size = 512   # also model.backbone.img_size and eval.crop_size
  config.data.scale = (2048, 512)
  config.eval.update(dict(stride=341, size_divisor=0))
  config.model.adapter = ml_collections.ConfigDict(ADAPTER)
  bb.out_indices = [last for _, last in ADAPTER['interaction_indexes']]


def tiny_adapter(config: ml_collections.ConfigDict, crop: int = 64) -> None:
  """The adapter recipe at CPU size: width 64, 4 ViT heads, 8 blocks in 4
  interactions, 4 deformable heads, SPM width 16, crops of `crop` (a multiple of 32)."""
  tiny_model(config, crop=crop)
  bb, ad = config.model.backbone, config.model.adapter
  bb.num_heads, bb.depth, bb.pretrain_size = 4, 8, 56
  # No activation checkpointing at this size: remat makes XLA's CPU compile of
  # the train step about 3x slower (measured: 218 s vs 65 s on a busy machine).
  bb.remat = 'none'
  ad.interaction_indexes = [[0, 1], [2, 3], [4, 5], [6, 7]]
  ad.deform_num_heads, ad.conv_inplane = 4, 16
  bb.out_indices = [last for _, last in ad.interaction_indexes]


def tiny_backbone(config: ml_collections.ConfigDict) -> None:
  """Shrinks the backbone for CPU runs and tests (runlocal-style): 4 blocks of
  width 64; the head reads the blocks at the same relative places."""
  bb = config.model.backbone
  bb.embed_dim, bb.num_heads, bb.depth = 64, 2, 4
  bb.out_indices = [0, 1, 2, 3] if bb.with_fpn else [bb.depth - 1]


def tiny_model(config: ml_collections.ConfigDict, crop: int = 56) -> None:
  """A few-minute CPU version of an experiment: tiny backbone and heads, small
  crops and windows (the crop, window and img_size are one value)."""
  tiny_backbone(config)
  config.data.crop_size = crop
  config.data.scale = (4 * crop, crop)
  config.eval.stride = (crop * 2) // 3
  config.model.decode_head.channels = 32
  if config.model.auxiliary_head is not None:
    config.model.auxiliary_head.channels = 32
  config.model.dtype = 'float32'
