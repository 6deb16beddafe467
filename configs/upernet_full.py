r"""Full tuning: InternViT-6B trained (drop path 0.4, layer decay 0.95), UperNet (+ aux on map 2).

Published: 58.9 mIoU on ADE20K val (224px weights, 504 crops, slide 504/322).

  python -m internseg_jax.main --config=configs/upernet_full.py --workdir=DIR --mode=eval \
      --config.init.checkpoint=converted/full_tuning --config.data.root=ADEChallengeData2016

ARG: the pretrained variant and `tiny`, e.g. `configs/upernet_full.py:448_v2_5`.
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, variant='224', tiny=False)
  config = common.base_config(args.variant)
  bb = config.model.backbone
  bb.freeze, bb.drop_path_rate = False, 0.4
  common.upernet(config, aux_in_index=2)
  config.train.update(dict(weight_decay=0.05, layer_decay=0.95))
  # The trained backbone's float32 weights + AdamW state (~95 GiB) need FSDP:
  # shard them over all devices (see the memory plan in the README).
  config.mesh.update(dict(data=1, fsdp=-1))
  if args.tiny:
    common.tiny_model(config)
  config.lock()
  return config
