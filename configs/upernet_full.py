r"""Full tuning: InternViT-6B trained (drop path 0.4, layer decay 0.95), UperNet (+ aux on map 2).

Published: 58.9 mIoU on ADE20K val (224px weights, 504 crops, slide 504/322).
Blocks 11/23/35/47 for the 224px weights, 11/22/33/44 for the 448px ones.

  python -m internseg_jax.main --config=configs/upernet_full.py --workdir=DIR --mode=eval \
      --config.init.checkpoint=converted/full_tuning --config.data.root=ADEChallengeData2016

ARG: the pretrained variant and `tiny`, e.g. `configs/upernet_full.py:448_v2_5`.
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, variant='224', tiny=False)
  config = common.experiment_config('full_tuning', args.variant)
  if args.tiny:
    common.tiny_model(config)
  config.lock()
  return config
