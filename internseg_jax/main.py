r"""Entry point: train, evaluate or predict with one config.

  python -m internseg_jax.main --config=configs/NAME.py[:ARG] --workdir=DIR \
      [--mode=train|eval|predict] [--config.KEY=VALUE ...]

train:   trains (resuming from DIR/checkpoints), evaluates, keeps the best in DIR/best
eval:    mIoU on data.root's validation split -> DIR/eval_results.json
predict: predict.input (an image or a folder) -> DIR/predictions/*.png
Weights: init.checkpoint (a converter output, a checkpoint folder, a workdir or
its best/), else DIR's best, else DIR's newest checkpoint. Multi-host:
--coordinator_address, --num_processes, --process_id (on CPU also
JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo). Libraries' INFO logs are off unless
--verbosity=0 (absl) is given; warnings stay on.
"""
import os

from absl import app, flags, logging
import jax
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'config file[:arg]', lock_config=True)
flags.DEFINE_string('workdir', None, 'output folder (logs, checkpoints, results)')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict'], 'what to run')
flags.DEFINE_string('coordinator_address', None, 'multi-host: host:port of process 0')
flags.DEFINE_integer('num_processes', None, 'multi-host: number of processes')
flags.DEFINE_integer('process_id', None, 'multi-host: index of this process')
flags.mark_flags_as_required(['config', 'workdir'])


def weights_for(config, workdir: str) -> str:
  """init.checkpoint, else WORKDIR/best, else WORKDIR (its newest checkpoint)."""
  from internseg_jax import weights
  from internseg_jax.errors import WeightsError
  if config.init.checkpoint:
    return config.init.checkpoint
  for candidate in (os.path.join(workdir, 'best'), workdir):
    try:
      weights.find_params_dir(candidate)
      return candidate
    except WeightsError:
      pass
  raise WeightsError(f'nothing to {FLAGS.mode} with: set --config.init.checkpoint to a '
                     f'converted or trained checkpoint, or train into {workdir} first')


def run(config, workdir: str, mode: str) -> None:
  from internseg_jax import api, evaluate, metrics, predict, train
  from internseg_jax.data import sources
  from internseg_jax.data.ade20k_meta import class_names
  if mode == 'train':
    if train.train_and_evaluate(config, workdir) is None or not config.predict.after_train:
      return
  files = predict.list_inputs(config.predict.input) if mode == 'predict' else None
  model = api.init_model(config, weights_for(config, workdir))
  if mode == 'eval':
    dataset = sources.make_source(config.data, 'validation')
    result = evaluate.evaluate(model.batched_logits_fn, model.mesh, config, dataset, workdir,
                               limit=config.eval.limit)
    if jax.process_index() == 0:
      names = class_names(config.model.decode_head.num_classes, config.data.class_names)
      print(metrics.format_table(result, names))
      print(f"mIoU {result['mIoU']:.4f}  aAcc {result['aAcc']:.4f}  mAcc {result['mAcc']:.4f}"
            f"  -> {os.path.join(workdir, 'eval_results.json')}")
    return
  out = os.path.join(workdir, 'predictions')
  if mode == 'train':  # overlays of the first validation images
    written = predict.predict_validation(model, config.predict.after_train, out)
  else:
    written = predict.predict_files(model, files, out)
  if jax.process_index() == 0:
    print(f'wrote {len(written)} overlay(s) to {out}')


def main(argv):
  del argv
  if not FLAGS['verbosity'].present:  # a quiet console: our lines and progress bars
    logging.set_verbosity(logging.WARNING)
  if FLAGS.coordinator_address or FLAGS.num_processes:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    jax.distributed.initialize()  # reads the coordinator and ranks from SLURM's variables
  from internseg_jax.config import validate  # after jax.distributed
  from internseg_jax.errors import InternSegError
  try:
    config = validate(FLAGS.config)
    if jax.process_index() == 0:
      os.makedirs(FLAGS.workdir, exist_ok=True)
    run(config, FLAGS.workdir, FLAGS.mode)
  except InternSegError as e:  # bad input: one clear message; anything else is a bug
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  app.run(main)
