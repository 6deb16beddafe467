r"""Head tuning: frozen InternViT-6B, UperNet (+ auxiliary FCN on map 1) on blocks 11/23/35/47.

Published: 54.9 mIoU on ADE20K val (224px weights, 504 crops, slide 504/322).

  python -m internseg_jax.main --config=configs/upernet_frozen.py --workdir=DIR --mode=eval \
      --config.init.checkpoint=converted/head_tuning --config.data.root=ADEChallengeData2016

ARG: the pretrained variant and `tiny`, e.g. `configs/upernet_frozen.py:224,tiny`.
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, variant='224', tiny=False)
  config = common.base_config(args.variant)
  config.model.backbone.freeze = True
  common.upernet(config, aux_in_index=1)
  config.train.update(dict(weight_decay=0.05, layer_decay=1.0))
  if args.tiny:
    common.tiny_model(config)
  config.lock()
  return config
