r"""Entry point: train, evaluate or predict with one config.

  python -m internseg_jax.main --config=configs/NAME.py[:ARG] --workdir=DIR \
      [--mode=train|eval|predict] [--config.KEY=VALUE ...]

train:   trains (resuming from DIR/checkpoints), evaluates at the end
eval:    mIoU on data.root's validation split -> DIR/eval_results.json
predict: predict.input (an image or a folder) -> DIR/predictions/*.png
Weights: init.checkpoint (a converter output or checkpoint folder), else the
newest checkpoint in DIR. Multi-host: --coordinator_address, --num_processes,
--process_id (on CPU also JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo).
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
  from internseg_jax import checkpoint
  if config.init.checkpoint:
    return config.init.checkpoint
  try:
    checkpoint.find_params_dir(workdir)
    return workdir
  except FileNotFoundError:
    raise app.UsageError(
        f'nothing to {FLAGS.mode} with: set --config.init.checkpoint to a converted or '
        f'trained checkpoint, or train into {workdir} first') from None


def main(argv):
  del argv
  if FLAGS.coordinator_address or FLAGS.num_processes:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    jax.distributed.initialize()  # reads the coordinator and ranks from SLURM's variables
  from internseg_jax import api, evaluate, predict, train  # after jax.distributed
  from internseg_jax.data import sources, synthetic
  from internseg_jax.data.sources import DataError
  config, workdir = FLAGS.config, FLAGS.workdir
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
  logging.info('mode %s, %d process(es), %d devices', FLAGS.mode, jax.process_count(),
               jax.device_count())
  try:
    if config.data.get('synthetic') and not config.data.root:
      config.data.root = synthetic.ensure_data(config.data, workdir)
    if FLAGS.mode == 'train':
      train.train_and_evaluate(config, workdir)
      if not config.predict.after_train:
        return
    elif FLAGS.mode == 'predict':
      files = predict.list_inputs(config.predict.input)
    model = api.init_model(config, weights_for(config, workdir))
    if FLAGS.mode == 'eval':
      dataset = sources.make_source(config.data, 'validation')
      result = evaluate.evaluate(model, dataset, workdir if jax.process_index() == 0 else None,
                                 limit=config.eval.limit)
      print(f"mIoU {result['mIoU']:.4f}  aAcc {result['aAcc']:.4f}  mAcc {result['mAcc']:.4f}"
            f"  -> {os.path.join(workdir, 'eval_results.json')}")
      return
    out, write = os.path.join(workdir, 'predictions'), jax.process_index() == 0
    if FLAGS.mode == 'train':  # overlays of the first validation images
      val = sources.make_source(config.data, 'validation')
      count = min(config.predict.after_train, len(val))
      items = ((val[i]['name'], val[i]['image']) for i in range(count))
      written = predict.predict_images(model, items, out, config.predict.alpha, write, count)
    else:
      written = predict.predict_files(model, files, out, config.predict.alpha, write)
    print(f'wrote {len(written)} overlay(s) to {out}')
  except (DataError, FileNotFoundError, ValueError) as e:
    raise app.UsageError(str(e)) from None
  except FloatingPointError as e:  # NaN: the message says what was kept
    logging.error('%s', e)
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  app.run(main)
