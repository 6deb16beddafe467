"""Training: train state, the sharded step, the loop, checkpoints and resume.

Parameters are split by one rule (optim.is_trainable) into a trainable flat dict,
which is differentiated and has optimizer state, and a frozen one, which has
neither (and may be stored in bf16). Everything lives on the (data, fsdp) mesh
with shardings from the rule table; the batch is split over both axes.
Checkpoints (Orbax, asynchronous, atomic) hold the variables (`params/`, the
same layout as a converter output), the optimizer state, the step and RNG, and
the data iterator, so a rerun with the same workdir resumes exactly.
"""
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from internseg_jax import api, checkpoint, evaluate, optim, sharding
from internseg_jax.trees import flatten, unflatten
from internseg_jax.data import sources, subsets, transforms
from internseg_jax.models.build import build_segmentor
from internseg_jax.models.intern_vit import forward_flops
from internseg_jax.models.segmentor import segmentation_loss
from internseg_jax import train_logging


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  trainable: dict      # flat {'decode_head/conv_seg/kernel': array}
  frozen: dict         # flat, never differentiated
  batch_stats: Any
  opt_state: Any
  rng: jax.Array       # raw uint32 key data

  def variables(self):
    return {'params': unflatten({**self.trainable, **self.frozen}),
            'batch_stats': self.batch_stats}


class Trainer:
  """Builds the model, optimizer and jitted step for a config on a mesh."""

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    self.freeze = bool(config.model.backbone.freeze)
    model = config.model
    if not self.freeze and model.backbone.attention == 'auto':
      # cuDNN flash attention has no backward pass for 1297 tokens (seen on an
      # H200, jax 0.11): a trained backbone uses the XLA attention.
      model = model.copy_and_resolve_references()
      model.backbone.attention = 'xla'
    self.module = build_segmentor(model)
    self.depth = config.model.backbone.depth
    aux = config.model.get('auxiliary_head')
    self.aux_weight = aux.loss_weight if aux is not None else 0.0
    self.batch_sharding = sharding.batch_sharding(mesh)
    self.replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def frozen_dtype(self, path: str):
    """Storage dtype override: a frozen backbone in train.frozen_dtype."""
    name = path.split('/', 1)[1] if path.startswith('params/') else None
    if name is not None and not optim.is_trainable(name, self.freeze):
      return jnp.dtype(self.config.train.frozen_dtype)
    return None

  def _optimizer(self, trainable: dict):
    if not trainable:
      raise ValueError('no trainable parameters')
    self.tx, self.schedule = optim.make_optimizer(self.config.train, trainable, self.depth)

  def initial_state(self, checkpoint=None) -> TrainState:
    """From `checkpoint` (converted backbone or full model; missing modules
    random) or random; optimizer state fresh."""
    variables = api.init_variables(self.module, self.mesh, checkpoint, self.config.train.seed,
                                   dtype_of=self.frozen_dtype)
    trainable, frozen = optim.split_trainable(variables['params'], self.freeze)
    self._optimizer(trainable)
    opt_shapes = jax.eval_shape(self.tx.init, trainable)
    opt_state = jax.jit(self.tx.init, out_shardings=sharding.param_shardings(opt_shapes, self.mesh))(
        trainable)
    rng = jax.random.key_data(jax.random.key(self.config.train.seed))
    return TrainState(jax.device_put(jnp.zeros((), jnp.int32), self.replicated), trainable,
                      frozen, variables['batch_stats'], opt_state,
                      jax.device_put(rng, self.replicated))

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the state, without creating it (resume)."""
    target = api.abstract_variables(self.module, self.mesh)
    flat = {k: jax.ShapeDtypeStruct(t.shape, self.frozen_dtype(k) or t.dtype, sharding=t.sharding)
            for k, t in flatten(target).items()}
    trainable, frozen = optim.split_trainable(unflatten(flat)['params'], self.freeze)
    self._optimizer(trainable)
    opt_shapes = jax.eval_shape(self.tx.init, trainable)
    opt_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                             opt_shapes, sharding.param_shardings(opt_shapes, self.mesh))
    rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    scalar = lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated)
    return TrainState(scalar(jax.ShapeDtypeStruct((), jnp.int32)), trainable, frozen,
                      unflatten(flat)['batch_stats'], opt_state, scalar(rng))

  def loss_fn(self, trainable, state, batch, rng):
    params = unflatten({**trainable, **state.frozen})
    outputs, updates = self.module.apply(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
        rngs={'dropout': rng}, mutable=['batch_stats'])
    loss, parts = segmentation_loss(outputs, batch['label'], self.aux_weight)
    return loss, (parts, updates['batch_stats'])

  def step_fn(self, state: TrainState, batch):
    rng = jax.random.wrap_key_data(state.rng)
    rng, step_rng = jax.random.split(jax.random.fold_in(rng, state.step))
    (loss, (parts, batch_stats)), grads = jax.value_and_grad(self.loss_fn, has_aux=True)(
        state.trainable, state, batch, step_rng)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(
        optax.global_norm(trainable))
    metrics = dict(parts, loss=loss, lr=self.schedule(state.step), grad_norm=grad_norm,
                   finite=finite)
    new = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state,
                        batch_stats=batch_stats, rng=jax.random.key_data(rng))
    return new, metrics

  def jit_step(self, state: TrainState):
    shardings = jax.tree.map(lambda x: x.sharding, state)
    batch_shardings = {'image': self.batch_sharding,
                       'label': sharding.batch_sharding(self.mesh, ndim=3)}
    return jax.jit(self.step_fn, in_shardings=(shardings, batch_shardings),
                   out_shardings=(shardings, self.replicated), donate_argnums=0)


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.train.max_to_keep, create=True, enable_async_checkpointing=True)
  return ocp.CheckpointManager(epath.Path(workdir) / 'checkpoints', options=options,
                               item_names=('params', 'opt_state', 'state', 'data'))


def save_args(state: TrainState, loader):
  from internseg_jax.data import pipeline  # grain: only where data is loaded
  return ocp.args.Composite(
      params=ocp.args.StandardSave(state.variables()),
      opt_state=ocp.args.StandardSave(state.opt_state),
      state=ocp.args.StandardSave({'step': state.step, 'rng': state.rng}),
      data=pipeline.checkpoint_args_save(loader))


def restore(manager, step: int, abstract: TrainState, loader) -> TrainState:
  from internseg_jax.data import pipeline
  variables = {'params': unflatten({**abstract.trainable, **abstract.frozen}),
               'batch_stats': abstract.batch_stats}
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(variables),
      opt_state=ocp.args.StandardRestore(abstract.opt_state),
      state=ocp.args.StandardRestore({'step': abstract.step, 'rng': abstract.rng}),
      data=pipeline.checkpoint_args_restore(loader)))
  flat = flatten(restored.params['params'])
  return TrainState(restored.state['step'], {k: flat[k] for k in abstract.trainable},
                    {k: flat[k] for k in abstract.frozen}, restored.params['batch_stats'],
                    restored.opt_state, restored.state['rng'])


def make_loader(config, workdir: str):
  """(this process's training iterator, the number of training images)."""
  from internseg_jax.data import pipeline
  d = config.data
  source = sources.make_source(d, 'training', log_dir=workdir)
  if d.fraction > 1:  # a seeded subset, its file list written (and reread on resume)
    source = subsets.fewshot_source(source, d.fraction, d.subset_seed, workdir,
                                    write=jax.process_index() == 0)
  logging.info('training on %d images (%s)', len(source), d.root)
  return pipeline.train_loader(
      source, global_batch_size=config.train.batch_size, seed=config.train.seed,
      transform=pipeline.config_transform(d), num_workers=d.num_workers, prefetch=d.prefetch,
      process_index=jax.process_index(), process_count=jax.process_count()), len(source)


def evaluate_state(trainer: Trainer, state: TrainState, workdir: str | None, dataset) -> dict:
  model = api.Model(trainer.config, trainer.module, state.variables(), trainer.mesh)
  return evaluate.evaluate(model, dataset, workdir if jax.process_index() == 0 else None,
                           limit=trainer.config.eval.limit)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains (resuming from DIR/checkpoints if there are any), evaluates
  every `train.eval_every` steps and at the end, keeps the best by mIoU."""
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  n = mesh.shape['data'] * mesh.shape['fsdp']
  if config.train.batch_size % n:
    raise ValueError(f'train.batch_size {config.train.batch_size} is not divisible by the '
                     f'{n} devices of the mesh')
  from internseg_jax.data import pipeline
  trainer = Trainer(config, mesh)
  loader, num_images = make_loader(config, workdir)
  val = sources.make_source(config.data, 'validation')
  manager = checkpoint_manager(workdir, config)
  log = train_logging.Logger(workdir, total_steps=config.train.steps,
                             global_batch_size=config.train.batch_size,
                             flops_per_step=model_flops_per_device(config),
                             enabled=jax.process_index() == 0)

  latest = manager.latest_step()
  if latest is not None:
    logging.info('resuming from %s/checkpoints/%d', workdir, latest)
    state = restore(manager, latest, trainer.abstract_state(), loader)
  else:
    state = trainer.initial_state(config.init.checkpoint or config.init.pretrained)
  iterator = iter(loader)
  start, total = int(state.step), config.train.steps
  # Every process reads the best so far, so all agree on when to save_best.
  best_miou, best_step = train_logging.best_eval(workdir, start)
  log.start(start, describe(config, trainer, state, num_images))
  last_good = latest
  step_fn = None
  try:
    for step in range(start, total):
      batch = pipeline.to_global(next(iterator), mesh)
      if step_fn is None:
        step_fn = trainer.jit_step(state)
      state, metrics = step_fn(state, batch)
      done = step + 1
      log.add(done, metrics)
      at_log = done % config.train.log_every == 0 or done == total
      at_ckpt = done % config.train.checkpoint_every == 0 or done == total
      if at_log or at_ckpt:  # checked before any checkpoint: a NaN state is never saved
        row = log.flush(done)
        if not row['finite']:
          manager.wait_until_finished()
          raise FloatingPointError(
              f'non-finite loss or parameters at step {done} (loss {row["loss"]}); stopped. The '
              f'last good checkpoint (step {last_good}) is kept in {workdir}/checkpoints; lower '
              'train.lr or check the data before resuming.')
      else:
        log.tick(done)
      if at_ckpt:
        manager.save(done, args=save_args(state, loader))
        last_good = done
      if config.train.eval_every and done % config.train.eval_every == 0 and done != total:
        result = evaluate_state(trainer, state, None, val)
        best = float(result['mIoU']) > best_miou
        if best:
          best_miou, best_step = float(result['mIoU']), done
          save_best(workdir, state, done, result)
        log.eval_row(done, result, best)
    manager.wait_until_finished()
    result = evaluate_state(trainer, state, workdir, val)
    best = float(result['mIoU']) > best_miou
    if best:
      best_miou, best_step = float(result['mIoU']), total
      save_best(workdir, state, total, result)
    log.eval_row(total, result, best)
  finally:
    log.close()
  log.finish(total, result, best_miou, best_step)
  manager.close()
  return result


def save_best(workdir: str, state: TrainState, step: int, result: dict) -> None:
  """DIR/best: the variables with the highest mIoU so far (replaced atomically)."""
  best = os.path.join(workdir, 'best')
  fresh, old = best + '.new', best + '.old'
  lead = jax.process_index() == 0
  if lead:
    for path in (fresh, old):
      if os.path.exists(path):
        epath.Path(path).rmtree()
  checkpoint.save_params(fresh, state.variables(), dict(step=step, mIoU=float(result['mIoU'])))
  if lead:
    if os.path.exists(best):
      os.rename(best, old)
    os.rename(fresh, best)
    if os.path.exists(old):
      epath.Path(old).rmtree()


def model_flops_per_device(config) -> float:
  """The backbone's matmul FLOPs per step and device, as MFU counts them: the
  forward through the blocks that run, x3 when they are trained (backward),
  remat's recomputation and the heads not counted. (XLA's cost analysis counts a
  scan's body once, so it cannot be used here.)"""
  bb, d = config.model.backbone, config.data
  blocks = max(int(i) % bb.depth for i in bb.out_indices) + 1
  flops = forward_flops(bb.embed_dim, blocks, d.crop_size, patch_size=bb.patch_size,
                        mlp_ratio=bb.mlp_ratio)
  return flops * (1 if bb.freeze else 3) * config.train.batch_size / jax.device_count()


def describe(config, trainer: Trainer, state: TrainState, num_images: int) -> dict:
  """What the run will do, for the Logger's start block."""
  count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
  bb, head = config.model.backbone, config.model.decode_head
  heads = {'uper': 'UperNet', 'linear': 'linear head'}.get(head.type, head.type)
  if config.model.auxiliary_head:
    heads += ' + auxiliary FCN head'
  d = config.data
  return dict(experiment=config.get('experiment'),
              model=f'InternViT {bb.depth} blocks x {bb.embed_dim}, {heads}',
              params_trainable=count(state.trainable), params_frozen=count(state.frozen),
              mesh=dict(trainer.mesh.shape), devices=jax.device_count(),
              data=f'{d.source} {d.root}, {num_images} training images')
