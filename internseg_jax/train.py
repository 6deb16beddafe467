"""Training: resume or start, the step loop, evaluation with the best kept.

`train_and_evaluate(config, workdir)` is what `--mode=train` runs:
- `resume_or_start`: the newest checkpoint in WORKDIR/checkpoints (variables,
  optimizer state, step, RNG, best mIoU so far, data iterator), else
  `init.checkpoint` / `init.pretrained` (never a resume), else random;
- `run_steps`: the jitted step; logs (means over `log_every` steps); a NaN stop;
  the checkpoint manager asked every step (its policy saves every
  `checkpoint_every` steps and at a preemption sync point: SIGTERM on a
  cluster), evaluation every `eval_every` steps;
- `evaluate_and_keep_best`: mIoU on the validation split, `best/` updated when it
  improves. Evaluation happens before the step's checkpoint, which records the
  best so far, so a resumed run neither repeats an evaluation nor loses its best.
"""
import signal
import threading

import jax
import jax.numpy as jnp
from absl import logging

from internseg_jax import evaluate, sharding, train_logging, weights
from internseg_jax.data import sources, subsets, synthetic
from internseg_jax.errors import ConfigError, NonFiniteError
from internseg_jax.models.intern_vit import forward_flops
from internseg_jax.trainer import TrainState, Trainer


class Preempted(Exception):
  """Raised after the checkpoint of a preempted run has been written."""


def make_loader(config, workdir: str):
  from internseg_jax.data import pipeline  # grain workers: only where data is loaded
  d = config.data
  source = sources.make_source(d, 'training', log_dir=workdir)
  if d.fraction > 1:  # the reference's subset; its file list written (and reread on resume)
    source = subsets.fewshot_source(source, d.fraction, d.subset_seed, workdir,
                                    write=jax.process_index() == 0)
  loader = pipeline.train_loader(
      source, global_batch_size=config.train.batch_size, seed=config.train.seed,
      transform=pipeline.config_transform(d), num_workers=d.num_workers, prefetch=d.prefetch,
      process_index=jax.process_index(), process_count=jax.process_count())
  return loader, len(source)


def _record(state: TrainState, best_miou: float, best_step: int) -> dict:
  """The checkpoint's `state` item: step, RNG and the best evaluation so far."""
  put = lambda x: jax.device_put(x, state.step.sharding)
  return {'step': state.step, 'rng': state.rng,
          'best_miou': put(jnp.asarray(best_miou, jnp.float32)),
          'best_step': put(jnp.asarray(best_step, jnp.int32))}


def resume_or_start(trainer: Trainer, ckpts: weights.TrainCheckpoints, loader):
  """(state, (best mIoU so far, its step))."""
  latest = ckpts.latest_step()
  if latest is None:
    init = trainer.config.init
    return trainer.initial_state(init.checkpoint or init.pretrained), (-1.0, -1)
  logging.info('resuming from checkpoints/%d', latest)
  abstract = trainer.abstract
  scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=trainer.replicated)
  variables, opt_state, record = ckpts.restore(
      latest, trainer.abstract_variables, abstract.opt_state,
      {'step': abstract.step, 'rng': abstract.rng, 'best_miou': scalar(jnp.float32),
       'best_step': scalar(jnp.int32)}, loader)
  state = trainer.from_variables(variables, opt_state, int(record['step']), record['rng'])
  return state, (float(record['best_miou']), int(record['best_step']))


def evaluate_and_keep_best(trainer: Trainer, state: TrainState, val, workdir: str | None,
                           best: tuple, ckpts) -> tuple[dict, tuple]:
  """Evaluates `state`; saves it to best/ when its mIoU beats `best` = (mIoU, step)."""
  variables = state.variables()
  result = evaluate.evaluate(lambda images: trainer.forward(variables, images), trainer.mesh,
                             trainer.config, val, workdir, limit=trainer.config.eval.limit)
  step, miou = int(state.step), float(result['mIoU'])
  if miou > best[0]:
    ckpts.save_best(step, variables, miou)
    best = (miou, step)
  return result, best


class _SigtermFlag:
  """Single-process runs: SIGTERM asks for a checkpoint at the next step, then
  a clean stop (with jax.distributed, JAX's preemption service does this and
  Orbax's PreemptionCheckpointingPolicy reacts to it)."""

  def __init__(self):
    self.raised = False
    self.previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self.previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def close(self):
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)


def run_steps(trainer: Trainer, state: TrainState, loader, ckpts, log, val, workdir: str,
              best: tuple):
  """Trains from state.step to train.steps; returns (state, best)."""
  from internseg_jax.data import pipeline
  t = trainer.config.train
  step_fn, iterator, unchecked = trainer.jit_step(), iter(loader), []
  sigterm = _SigtermFlag()
  try:
    for step in range(int(state.step), t.steps):
      batch = pipeline.to_global(next(iterator), trainer.mesh)
      state, metrics = step_fn(state, batch)
      done = step + 1
      log.add(done, metrics)
      unchecked.append(metrics['finite'])
      preempted = sigterm.raised or ckpts.reached_preemption(done)
      if done % t.log_every == 0 or done == t.steps or preempted:
        log.flush(done)  # on preemption too: the steps since the last row are kept
      else:
        log.tick(done)
      if done % t.checkpoint_every == 0 or done == t.steps or preempted:
        # Nothing non-finite is ever saved: the last good checkpoint stays.
        if not all(jax.device_get(unchecked)):
          ckpts.wait()
          raise NonFiniteError(
              f'non-finite loss or parameters by step {done}; stopped. The last good '
              f'checkpoint (step {ckpts.latest_step()}) is kept in {workdir}/checkpoints; '
              'lower train.lr or check the data before resuming.')
        unchecked = []
      if t.eval_every and done % t.eval_every == 0 and done != t.steps and not preempted:
        result, new_best = evaluate_and_keep_best(trainer, state, val, None, best, ckpts)
        log.eval_row(done, result, new_best != best)
        best = new_best
      ckpts.save(done, state.variables(), state.opt_state, _record(state, *best), loader,
                 force=done == t.steps or sigterm.raised)
      if preempted:
        ckpts.wait()
        raise Preempted(f'preempted: saved checkpoints/{done}; rerun the same command to resume')
  finally:
    sigterm.close()
  return state, best


def train_and_evaluate(config, workdir: str) -> dict | None:
  """Trains (resuming from WORKDIR/checkpoints if there are any), evaluates
  every `train.eval_every` steps and at the end, keeps the best in WORKDIR/best.
  Returns the final evaluation (None when preempted)."""
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  per_step = mesh.devices.size * config.train.accumulate
  if config.train.batch_size % per_step:
    raise ConfigError(
        f'train.batch_size={config.train.batch_size}: must be a multiple of the '
        f'{mesh.devices.size} devices x train.accumulate ({config.train.accumulate})')
  if config.data.synthetic is not None and not config.data.root:
    config.data.root = synthetic.ensure_data(config.data, workdir)
  trainer = Trainer(config, mesh)
  loader, num_images = make_loader(config, workdir)
  val = sources.make_source(config.data, 'validation')
  ckpts = weights.TrainCheckpoints(workdir, config.train.checkpoint_every,
                                   config.train.max_to_keep)
  state, best = resume_or_start(trainer, ckpts, loader)
  log = train_logging.Logger(workdir, total_steps=config.train.steps,
                             global_batch_size=config.train.batch_size,
                             flops_per_step=model_flops_per_device(config),
                             enabled=jax.process_index() == 0)
  log.start(int(state.step), describe(config, trainer, state, num_images))
  try:
    state, best = run_steps(trainer, state, loader, ckpts, log, val, workdir, best)
  except Preempted as e:
    log.close()
    ckpts.close()
    print(e)
    return None
  lead = workdir if jax.process_index() == 0 else None
  result, best = evaluate_and_keep_best(trainer, state, val, lead, best, ckpts)
  log.eval_row(config.train.steps, result, best[1] == config.train.steps)
  ckpts.wait()
  ckpts.close()
  loader.close()
  log.finish(config.train.steps, result, *best)
  return result


def model_flops_per_device(config) -> float:
  """The backbone's matmul FLOPs per step and device, as MFU counts them: the
  forward through the blocks that run, x3 when they are trained (backward),
  remat's recomputation and the heads not counted. (XLA's cost analysis counts a
  scan's body once, so it cannot be used here.)"""
  bb, d = config.model.backbone, config.data
  blocks = max(int(i) % bb.depth for i in bb.out_indices) + 1
  # An adapter runs every block up to its last interaction's (its out_indices),
  # on patch tokens only (no cls token); its own layers are not counted.
  flops = forward_flops(bb.embed_dim, blocks, d.crop_size, patch_size=bb.patch_size,
                        mlp_ratio=bb.mlp_ratio,
                        cls_token=config.model.get('adapter') is None)
  return flops * (1 if bb.freeze else 3) * config.train.batch_size / jax.device_count()


def describe(config, trainer: Trainer, state: TrainState, num_images: int) -> dict:
  """What the run will do, for the start block of the log."""
  bb, head = config.model.backbone, config.model.decode_head
  adapter = config.model.get('adapter')
  if adapter is None:
    model = f'InternViT {bb.depth} blocks x {bb.embed_dim}'
    frozen = ', backbone frozen'
  else:
    model = (f'InternViT-Adapter {bb.depth} blocks x {bb.embed_dim} '
             f'({len(adapter.interaction_indexes)} interactions)')
    frozen = ', ViT frozen'
  model += (f", {'UperNet' if head.type == 'uper' else 'linear head'}"
            f"{' + aux' if config.model.auxiliary_head is not None else ''}"
            f"{frozen if bb.freeze else ''}")
  return dict(
      experiment=f'{config.experiment} ({config.variant})', model=model,
      params_trainable=weights.params_count(state.trainable),
      params_frozen=weights.params_count(state.frozen), mesh=dict(trainer.mesh.shape),
      devices=jax.device_count(),
      data=f'{config.data.source} {config.data.root} ({num_images} images)')
