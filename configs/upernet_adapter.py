r"""Adapter tuning: ViT-Adapter around a frozen InternViT-6B, UperNet (+ aux on map 2).
Published: 58.1 mIoU on ADE20K val (224px weights, 512 crops, slide 512/341). The
original released no checkpoint (a log only): train, or convert a checkpoint
trained with the original code (release or mmcv format):
  python -m convert.pth_to_orbax --src=pretrained/intern_vit_6b_224px.pth \
      --dst=converted/adapter_vit --config=configs/upernet_adapter.py
  python -m internseg_jax.main --config=configs/upernet_adapter.py --workdir=DIR \
      --config.init.pretrained=converted/adapter_vit --config.data.root=ADEChallengeData2016
ARG: `224` (the only variant the original has) and `tiny`: a CPU-sized adapter
(width 64, 8 blocks in 4 interactions, 64 px crops) trained on a generated
dataset (written into WORKDIR/data unless data.root is set), evaluated, with
overlays of the first validation images:
  python -m internseg_jax.main --config=configs/upernet_adapter.py:tiny --workdir=DIR
"""
import ml_collections

from configs import common
from internseg_jax.data import synthetic

TINY_CLASSES = 8


def get_config(arg=None):
  args = common.parse_arg(arg, variant='224', tiny=False)
  config = common.experiment_config('adapter_tuning', args.variant)
  if args.tiny:
    common.tiny_adapter(config)
    config.model.decode_head.num_classes = TINY_CLASSES
    config.data.synthetic = ml_collections.ConfigDict(dict(
        num_train=64, num_val=8, size_range=(64, 112), seed=0))
    config.data.num_workers = 0
    config.data.class_names = synthetic.class_names(TINY_CLASSES)
    config.train.update(dict(
        batch_size=8, steps=60, lr=1e-3, warmup_steps=10, weight_decay=0.01,
        log_every=10, checkpoint_every=20, eval_every=30))
    config.eval.windows_per_device = 2
    config.predict.after_train = 2  # overlays of the first validation images
  config.lock()
  return config
