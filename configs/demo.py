r"""Demo: a tiny InternViT + UperNet trained from scratch on generated data, on CPU.

No data and no weights needed: an ADE-format dataset of textured shapes (8
classes) is generated into WORKDIR/data, the model trains for a few minutes,
is evaluated (WORKDIR/eval_results.json) and writes overlays to
WORKDIR/predictions/.

  python -m internseg_jax.main --config=configs/demo.py --workdir=/tmp/internseg_demo

ARG `short` (used by the tests): fewer steps and images.
"""
import ml_collections

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, short=False)
  config = common.base_config('224')
  common.upernet(config, aux_in_index=2)
  common.tiny_model(config, crop=112)
  bb = config.model.backbone
  bb.freeze, bb.pretrain_size = False, 112
  config.model.decode_head.num_classes = 8
  d = config.data
  d.num_classes = 8
  d.synthetic = ml_collections.ConfigDict(dict(
      num_train=64 if args.short else 400, num_val=8 if args.short else 50,
      size_range=(96, 160), seed=0))
  d.crop_size, d.scale, d.num_workers = 112, (448, 112), 0
  config.train.update(dict(
      batch_size=8, steps=30 if args.short else 600, lr=1e-3, warmup_steps=50,
      weight_decay=0.01, layer_decay=1.0, log_every=10 if args.short else 50,
      checkpoint_every=20 if args.short else 200, eval_every=0))
  config.eval.update(dict(crop_size=112, stride=75, scale=(448, 112), batch_size=8))
  config.predict.after_train = 4   # overlays of the first val images after training
  config.mesh.data = -1
  config.lock()
  return config
