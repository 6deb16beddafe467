r"""Demo: a tiny InternViT + UperNet trained from scratch on generated data, on CPU.

No data and no weights needed: an ADE-format dataset of textured shapes (8
named classes) is generated into WORKDIR/data, the model trains for a few
minutes, is evaluated (WORKDIR/eval_results.json, the best in WORKDIR/best) and
writes overlays to WORKDIR/predictions/.

  python -m internseg_jax.main --config=configs/demo.py --workdir=/tmp/internseg_demo

ARG `short` (used by the tests): fewer steps and images.
"""
import ml_collections

from configs import common
from internseg_jax.data import synthetic

NUM_CLASSES = 8


def get_config(arg=None):
  args = common.parse_arg(arg, short=False)
  config = common.experiment_config('full_tuning', '224')
  config.experiment = 'demo'
  common.tiny_model(config, crop=112)
  bb = config.model.backbone
  bb.pretrain_size, bb.drop_path_rate = 112, 0.0
  config.model.decode_head.num_classes = NUM_CLASSES
  config.data.synthetic = ml_collections.ConfigDict(dict(
      num_train=64 if args.short else 400, num_val=8 if args.short else 50,
      size_range=(96, 160), seed=0))
  config.data.num_workers = 0
  config.data.class_names = synthetic.class_names(NUM_CLASSES)  # e.g. 'violet stripes'
  config.train.update(dict(
      batch_size=8, steps=30 if args.short else 600, lr=1e-3, warmup_steps=50,
      weight_decay=0.01, layer_decay=1.0, log_every=10 if args.short else 50,
      checkpoint_every=20 if args.short else 200, eval_every=0 if args.short else 200))
  config.eval.update(dict(stride=75, windows_per_device=4))
  config.predict.after_train = 4   # overlays of the first val images after training
  config.mesh.update(dict(data=-1, fsdp=1))
  config.lock()
  return config
