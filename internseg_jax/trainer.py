"""The train state and the sharded train step.

Parameters are split by the freeze policy (internseg_jax.freeze) into a
trainable flat dict, which is differentiated and has optimizer state, and a
frozen one, which has neither (and may be stored in bf16). Everything lives on
the (data, fsdp) mesh with shardings from the rule table; the batch is split
over both axes. `Trainer` holds no state that changes: its optimizer, abstract
state and jitted functions are built once in `__init__`.
"""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from internseg_jax import inference, optim, sharding, weights
from internseg_jax.errors import ConfigError
from internseg_jax.freeze import FreezePolicy
from internseg_jax.models.segmentor import segmentation_loss


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  trainable: dict      # flat {'decode_head/conv_seg/kernel': array}
  frozen: dict         # flat, never differentiated
  batch_stats: Any
  opt_state: Any
  rng: jax.Array       # raw uint32 key data

  def variables(self):
    return {'params': weights.unflatten({**self.trainable, **self.frozen}),
            'batch_stats': self.batch_stats}


class Trainer:
  """The model, optimizer and jitted step of a config on a mesh."""

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    self.policy = FreezePolicy.from_config(config)
    self.module = self.policy.segmentor(config.model, training=True)
    aux = config.model.auxiliary_head
    self.aux_weight = aux.loss_weight if aux is not None else 0.0
    self.accumulate = config.train.accumulate
    self.replicated = NamedSharding(mesh, P())
    self.abstract_variables = weights.abstract_variables(self.module, mesh, self.policy)
    trainable, frozen = self.policy.split(weights.flatten(self.abstract_variables['params']))
    if not trainable:
      raise ConfigError('model.backbone.freeze=True leaves nothing to train (no neck or head)')
    self.tx, self.schedule = optim.make_optimizer(config.train, trainable,
                                                  config.model.backbone.depth)
    opt_shapes = jax.eval_shape(self.tx.init, trainable)
    opt_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                             opt_shapes, sharding.param_shardings(opt_shapes, mesh))
    scalar = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated)
    rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    self.abstract = TrainState(scalar(jax.ShapeDtypeStruct((), jnp.int32)), trainable, frozen,
                               self.abstract_variables['batch_stats'], opt_state, scalar(rng))
    self.shardings = jax.tree.map(lambda x: x.sharding, self.abstract)
    # Evaluation runs the inference module (no token padding, one scan per
    # output) on the same variables; jitted once, reused at every evaluation.
    self.forward = inference.segmentor_forward(self.policy.segmentor(config.model), mesh)

  def initial_state(self, checkpoint=None) -> TrainState:
    """From `checkpoint` (converted backbone or full model; missing modules
    random) or random; optimizer state fresh. Created in its shards."""
    variables = weights.init_variables(self.module, self.mesh, checkpoint,
                                       self.config.train.seed, self.policy)
    return self.from_variables(variables)

  def from_variables(self, variables, opt_state=None, step: int = 0, rng=None) -> TrainState:
    trainable, frozen = self.policy.split(weights.flatten(variables['params']))
    if opt_state is None:
      opt_state = jax.jit(self.tx.init, out_shardings=self.shardings.opt_state)(trainable)
    if rng is None:
      rng = jax.random.key_data(jax.random.key(self.config.train.seed))
    put = lambda x: jax.device_put(x, self.replicated)
    return TrainState(put(jnp.asarray(step, jnp.int32)), trainable, frozen,
                      variables['batch_stats'], opt_state, put(rng))

  def loss_fn(self, trainable, frozen, batch_stats, batch, rng):
    params = weights.unflatten({**trainable, **frozen})
    outputs, updates = self.module.apply(
        {'params': params, 'batch_stats': batch_stats}, batch['image'], train=True,
        rngs={'dropout': rng}, mutable=['batch_stats'])
    loss, parts = segmentation_loss(outputs, batch['label'], self.aux_weight)
    return loss, (parts, updates['batch_stats'])

  def _gradients(self, state: TrainState, batch, rng):
    grad_fn = jax.value_and_grad(self.loss_fn, has_aux=True)
    k = self.accumulate
    if k == 1:
      (loss, (parts, stats)), grads = grad_fn(state.trainable, state.frozen, state.batch_stats,
                                              batch, rng)
      return loss, parts, stats, grads

    # k micro-batches, one update: micro-batch j takes rows j, j + k, j + 2k, ...
    # so every device keeps its own rows (no resharding). The batch loss is the
    # mean over all pixels, so the mean of the micro-batch losses and gradients
    # equals the full-batch ones. BatchNorm statistics are per micro-batch and
    # the running statistics are updated k times (the reference: once, over 16).
    def micro(x):
      x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
      spec = P(None, sharding.BATCH_AXES, *([None] * (x.ndim - 2)))
      return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def body(carry, xs):
      grads, loss, parts, stats = carry
      mb, i = xs
      (l, (p, stats)), g = grad_fn(state.trainable, state.frozen, stats, mb,
                                   jax.random.fold_in(rng, i))
      add = lambda a, b: a + b.astype(a.dtype)
      return (jax.tree.map(add, grads, g), loss + l, jax.tree.map(add, parts, p), stats), None

    zeros = jax.tree.map(lambda t: jnp.zeros(t.shape, jnp.float32), state.trainable)
    _, (p0, _) = jax.eval_shape(self.loss_fn, state.trainable, state.frozen, state.batch_stats,
                                jax.tree.map(lambda x: x[:x.shape[0] // k], batch), rng)
    parts0 = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), p0)
    (grads, loss, parts, stats), _ = jax.lax.scan(
        body, (zeros, jnp.float32(0), parts0, state.batch_stats),
        (jax.tree.map(micro, batch), jnp.arange(k)))
    scale = lambda x: x / k
    grads = jax.tree.map(lambda g, t: scale(g).astype(t.dtype), grads, state.trainable)
    return scale(loss), jax.tree.map(scale, parts), stats, grads

  def step_fn(self, state: TrainState, batch):
    rng = jax.random.wrap_key_data(state.rng)
    rng, step_rng = jax.random.split(jax.random.fold_in(rng, state.step))
    loss, parts, batch_stats, grads = self._gradients(state, batch, step_rng)
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

  def jit_step(self):
    batch_shardings = {'image': sharding.batch_sharding(self.mesh),
                       'label': sharding.batch_sharding(self.mesh, ndim=3)}
    return jax.jit(self.step_fn, in_shardings=(self.shardings, batch_shardings),
                   out_shardings=(self.shardings, self.replicated), donate_argnums=0)
