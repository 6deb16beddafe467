r"""Few-shot: a linear head on the last block, backbone tuned, on 1/16 ... 1/1 of the data.

Published mIoU (ADE20K val): 1of16 46.5, 1of8 50.0, 1of4 53.3, 1of2 55.8, 1of1 57.2.
The 1/2 ... 1/16 runs test with a keep-ratio resize into (2016, 504), 1/1 with
the short side at 504.

  python -m internseg_jax.main --config=configs/fewshot.py:1of4 --workdir=DIR --mode=eval \
      --config.init.checkpoint=converted/fewshot_1of4 --config.data.root=ADEChallengeData2016

ARG: the fraction (1of16 | 1of8 | 1of4 | 1of2 | 1of1), optionally the variant and
`tiny`, e.g. `configs/fewshot.py:1of8,448_v2_5` or `configs/fewshot.py:1of16,tiny`.
"""
from configs import common

FRACTIONS = {'1of16': 16, '1of8': 8, '1of4': 4, '1of2': 2, '1of1': 1}
SCHEDULES = {'1of16': (5000, 100), '1of8': (10000, 200), '1of4': (20000, 400),
             '1of2': (40000, 800), '1of1': (80000, 1500)}  # (steps, warmup)


def get_config(arg=None):
  words = (arg or '').split(',')
  fraction = next((w for w in words if w in FRACTIONS), '1of1')
  args = common.parse_arg(','.join(w for w in words if w not in FRACTIONS),
                          variant='224', tiny=False)
  config = common.base_config(args.variant)
  bb = config.model.backbone
  bb.out_indices, bb.freeze, bb.drop_path_rate = [bb.depth - 1], False, 0.4
  config.model.decode_head.update(dict(type='linear', dropout=0.0))
  config.eval.resize = 'short_side' if fraction == '1of1' else 'fit'
  config.data.fraction = FRACTIONS[fraction]
  steps, warmup = SCHEDULES[fraction]
  config.train.update(dict(steps=steps, warmup_steps=warmup, weight_decay=0.05, layer_decay=0.95))
  # The trained backbone's float32 weights + AdamW state (~95 GiB) need FSDP:
  # shard them over all devices (see the memory plan in the README).
  config.mesh.update(dict(data=1, fsdp=-1))
  if args.tiny:
    common.tiny_model(config)
  config.lock()
  return config
