r"""Few-shot: a linear head on the last block, backbone tuned, on 1/16 ... 1/1 of the data.

Published mIoU (ADE20K val): 1of16 46.5, 1of8 50.0, 1of4 53.3, 1of2 55.8, 1of1 57.2.
The 1/2 ... 1/16 runs test with a keep-ratio resize into (2016, 504), 1/1 with
the short side at 504. The original has few-shot configs for the 224px weights only.
The subset is the original's: set `data.subset_seed` to the seed of the run's log.

  python -m internseg_jax.main --config=configs/fewshot.py:1of4 --workdir=DIR --mode=eval \
      --config.init.checkpoint=converted/fewshot_1of4 --config.data.root=ADEChallengeData2016

ARG: the fraction (1of16 | 1of8 | 1of4 | 1of2 | 1of1) and `tiny`, e.g.
`configs/fewshot.py:1of16,tiny`.
"""
from configs import common

FRACTIONS = ('1of16', '1of8', '1of4', '1of2', '1of1')


def get_config(arg=None):
  words = (arg or '').split(',')
  fraction = next((w for w in words if w in FRACTIONS), '1of1')
  args = common.parse_arg(','.join(w for w in words if w not in FRACTIONS),
                          variant='224', tiny=False)
  config = common.experiment_config(f'fewshot_{fraction}', args.variant)
  if args.tiny:
    common.tiny_model(config)
  config.lock()
  return config
