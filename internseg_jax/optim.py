"""The reference's optimizer recipe (mmcv semantics) on optax.

AdamW (0.9, 0.999, eps 1e-8) with:
- a poly schedule (power 1 to min_lr over all steps) times mmcv's linear warmup
  factor 1 - (1 - i / warmup) * (1 - warmup_ratio);
- layer-wise LR decay: with L = depth + 2, cls_token / pos_embed / patch_embed
  have layer id 0, block i id i + 1, everything else (neck, adapter, heads) L - 1, and
  the LR is scaled by rate ** (L - id - 1). Stacked block params get a
  per-block scale along their leading depth axis;
- no weight decay for biases and 1-D parameters (norm scales, layer scale,
  BatchNorm, the adapter's injector gamma); pos_embed, cls_token and the
  adapter's level_embed (3, C) do decay, as in the reference. The rule is by
  name because stacking makes per-block vectors 2-D here.
Trainable parameters are a flat dict {'backbone/blocks/attn/qkv/kernel': array};
frozen ones (internseg_jax.freeze) are kept out of the optimizer entirely.
"""
import re

import jax.numpy as jnp
import numpy as np
import optax


def lr_schedule(base_lr: float, total_steps: int, warmup_steps: int, warmup_ratio: float = 1e-6,
                power: float = 1.0, min_lr: float = 0.0):
  """mmcv PolyLrUpdaterHook with linear warmup, as a function of the step."""
  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    remaining = jnp.clip((total_steps - step) / total_steps, 0.0, 1.0)  # exact near the end
    lr = (base_lr - min_lr) * remaining ** power + min_lr
    if warmup_steps > 0:
      # 1 - k with k = (1 - i / warmup) * (1 - ratio), rearranged to stay exact in float32
      factor = warmup_ratio + (step / warmup_steps) * (1.0 - warmup_ratio)
      lr = jnp.where(step < warmup_steps, lr * factor, lr)
    return lr
  return schedule


def layer_id(path: str, depth: int) -> int | np.ndarray:
  """The mmcv layer id of a parameter; an array of ids for stacked blocks."""
  if re.match(r'^backbone/(cls_token|pos_embed|patch_embed)', path):
    return 0
  if path.startswith('backbone/blocks/'):
    return np.arange(depth) + 1
  return depth + 1


def lr_scales(params: dict, depth: int, rate: float) -> dict:
  """Per-parameter LR multipliers rate ** (L - id - 1), shaped to broadcast."""
  num_layers = depth + 2
  out = {}
  for path, p in params.items():
    ids = layer_id(path, depth)
    scale = np.asarray(rate, np.float64) ** (num_layers - np.asarray(ids) - 1)
    if np.ndim(scale):  # one per block along the stacked axis
      scale = scale.reshape((-1,) + (1,) * (p.ndim - 1))
    out[path] = jnp.asarray(scale, jnp.float32)
  return out


# Every multi-dimensional parameter that is not a bias: the kernels of Dense,
# Conv and ConvTranspose layers, and the embeddings.
DECAYED = re.compile(r'(kernel|cls_token|pos_embed|level_embed)$')


def decay_mask(params: dict) -> dict:
  """True where weight decay applies: kernels, cls_token, pos_embed, level_embed."""
  return {path: bool(DECAYED.search(path)) for path in params}


def scale_by_tree(scales: dict) -> optax.GradientTransformation:
  def update(updates, state, params=None):
    del params
    return {k: u * scales[k].astype(u.dtype) for k, u in updates.items()}, state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(train_config, trainable: dict, depth: int):
  """AdamW with the schedule, layer decay and decay mask of the config.

  Returns (optax transformation, schedule)."""
  t = train_config
  schedule = lr_schedule(t.lr, t.steps, t.warmup_steps, t.warmup_ratio)
  tx = optax.chain(
      optax.scale_by_adam(b1=t.b1, b2=t.b2, eps=t.eps),
      optax.add_decayed_weights(t.weight_decay, mask=decay_mask(trainable)),
      scale_by_tree(lr_scales(trainable, depth, t.layer_decay)),
      optax.scale_by_learning_rate(schedule),
  )
  if t.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(t.grad_clip), tx)
  return tx, schedule

