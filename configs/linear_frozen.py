r"""Linear probing: frozen InternViT-6B, BatchNorm + 1x1 conv on block 44.

Published: 47.2 mIoU on ADE20K val (224px weights, 504 crops, slide 504/322).
Block 44 of 48 for the 224px weights, the last (44) of 45 for the 448px ones.

  python -m internseg_jax.main --config=configs/linear_frozen.py --workdir=DIR --mode=eval \
      --config.init.checkpoint=converted/linear_probing --config.data.root=ADEChallengeData2016

ARG: the pretrained variant (224 | 448_v1_0 | 448_v1_2 | 448_v1_5 | 448_v2_5), and
`tiny` for a small CPU model, e.g. `configs/linear_frozen.py:224,tiny`.
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, variant='224', tiny=False)
  config = common.experiment_config('linear_probing', args.variant)
  if args.tiny:
    common.tiny_model(config)
  config.lock()  # a misspelt key is an error, here and in --config.KEY=VALUE overrides
  return config
