"""Weights: the one home for variables and checkpoints.

- `abstract_variables` / `random_variables` / `init_variables`: shapes, random
  values or a restored checkpoint, each created directly in its shards.
- `find_params_dir`, `params_metadata`, `restore_params`, `read_info`: read what
  the converter, a training run (`checkpoints/`) or `best/` wrote. The newest
  step of a run comes from Orbax's CheckpointManager, never from folder names.
- `key_problems` / `strict_match`: the strict key match, shared with convert/.
- `TrainCheckpoints`: a run's checkpoints (variables, optimizer state, step and
  RNG, data iterator; saved when Orbax's policy says so: every
  `checkpoint_every` steps and on preemption) and its best variables (`best/`,
  an Orbax manager keeping the top checkpoint by mIoU).

A "checkpoint folder" holds `params/` (an Orbax PyTree checkpoint of the
variables {'params': ..., 'batch_stats': ...}) and optionally `info.json`.
"""
import contextlib
import json
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from internseg_jax import sharding
from internseg_jax.errors import WeightsError
from internseg_jax.freeze import VIT_PARAMS
from internseg_jax.models.build import module_inits
from internseg_jax.models.resize import resize_pos_embed

PARAMS = 'params'
INFO = 'info.json'
MAX_LISTED = 40  # problems listed in one error; the rest are counted


def flatten(tree) -> dict:
  """{'a': {'b': x}} -> {'a/b': x}."""
  return traverse_util.flatten_dict(tree, sep='/')


def unflatten(flat: Mapping) -> dict:
  return traverse_util.unflatten_dict(dict(flat), sep='/')


# -- the strict key match ------------------------------------------------------

def key_problems(expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]],
                 *, unexpected: bool = True, describe=lambda key: key) -> list[str]:
  """Every missing, unexpected (if `unexpected`) and mis-shaped key, sorted.

  `expected` and `found` map names to shapes; `describe(key)` renders a key in
  messages (e.g. our path -> the PyTorch name)."""
  out = [f'missing: {describe(k)} {tuple(expected[k])}' for k in sorted(set(expected) - set(found))]
  if unexpected:
    out += [f'unexpected: {describe(k)} {tuple(found[k])}'
            for k in sorted(set(found) - set(expected))]
  out += [f'wrong shape: {describe(k)} is {tuple(found[k])}, expected {tuple(expected[k])}'
          for k in sorted(set(found) & set(expected))
          if tuple(found[k]) != tuple(expected[k])]
  return out


def raise_problems(problems: Sequence[str], what: str, error=WeightsError) -> None:
  """One error listing every problem (MaxText style), or nothing when there are none.
  The first line says what and how many; the problems follow, one per line."""
  if not problems:
    return
  shown = list(problems[:MAX_LISTED])
  if len(problems) > MAX_LISTED:
    shown.append(f'... and {len(problems) - MAX_LISTED} more')
  raise error(f'{what}: {len(problems)} problem(s)\n  ' + '\n  '.join(shown))


def strict_match(expected, found, what: str, error=WeightsError, **kwargs) -> None:
  """Raises `error` naming every missing, unexpected or mis-shaped key."""
  raise_problems(key_problems(expected, found, **kwargs), what, error)


# -- abstract and random variables -----------------------------------------------

def _merge(parts: dict) -> dict:
  """{module: {collection: tree}} -> {collection: {module: tree}}."""
  out = {}
  for name, variables in parts.items():
    for collection, tree in variables.items():
      out.setdefault(collection, {})[name] = tree
  return out


def part_of(path: str) -> str:
  """The part of the model a variable ('params/backbone/spm/...') belongs to: a
  checkpoint holds or lacks each part as a whole. Parts are the top-level
  modules ('backbone', 'neck', 'decode_head', 'auxiliary_head'), except that an
  adapter's own layers under backbone/ are the part 'adapter': a converted
  pretrained ViT has the ViT (part 'backbone') without them."""
  _, module, *rest = path.split('/')
  if module == 'backbone' and not VIT_PARAMS.match('/'.join([module, *rest])):
    return 'adapter'
  return module


def _inits(module, only):
  """module_inits of the top-level modules holding the parts `only` (None: all)."""
  inits = module_inits(module)
  if only is None:
    return inits
  wanted = {'backbone' if part == 'adapter' else part for part in only}
  return {k: f for k, f in inits.items() if k in wanted}


def abstract_variables(module, mesh: Mesh, policy=None, only=None):
  """Shapes, storage dtypes (`policy.storage_dtype`) and shardings of the
  variables (of the parts `only`, default all), computed without any data."""
  inits = _inits(module, only)
  shapes = flatten(_merge({k: jax.eval_shape(f, jax.random.key(0)) for k, f in inits.items()}))
  if only is not None:
    shapes = {k: s for k, s in shapes.items() if part_of(k) in only}
  shardings = flatten(sharding.param_shardings(unflatten(shapes), mesh))
  dtype = (lambda k, s: policy.storage_dtype(k, s.dtype)) if policy else (lambda k, s: s.dtype)
  return unflatten({k: jax.ShapeDtypeStruct(s.shape, dtype(k, s), sharding=shardings[k])
                    for k, s in shapes.items()})


def random_variables(module, mesh: Mesh, seed: int = 0, policy=None, only=None):
  """Random variables (of the parts `only`, default all) created directly in
  their shards (no host copy), in their storage dtypes."""
  inits = _inits(module, only)
  target = flatten(abstract_variables(module, mesh, policy, only))

  def init(rng):
    keys = jax.random.split(rng, len(inits))
    fresh = flatten(_merge({k: f(key) for (k, f), key in zip(sorted(inits.items()), keys)}))
    # Only the wanted parts are returned: under jit the rest is never computed.
    return unflatten({k: v.astype(target[k].dtype) for k, v in fresh.items() if k in target})
  out_shardings = unflatten({k: t.sharding for k, t in target.items()})
  return jax.jit(init, out_shardings=out_shardings)(jax.random.key(seed))


# -- reading checkpoints ---------------------------------------------------------

def _newest_step_dir(root: epath.Path) -> epath.Path | None:
  """The newest finished step of an Orbax CheckpointManager folder, or None
  (Orbax's own step listing: unfinished temporary folders are not steps)."""
  found = ocp.step.latest_step_metadata(root, ocp.step.standard_name_format())
  return None if found is None else epath.Path(found.path)


def find_params_dir(path) -> epath.Path:
  """A converter output, a checkpoint step folder, a training workdir (its newest
  checkpoint), a manager folder such as `best/` (its newest step), or a params
  folder itself -> the params folder."""
  path = epath.Path(path)
  if not path.exists():
    raise WeightsError(f'checkpoint path {path} does not exist')
  if (path / PARAMS).is_dir():
    return path / PARAMS
  for root in (path / 'checkpoints', path):
    if root.is_dir() and (step := _newest_step_dir(root)) is not None:
      return step / PARAMS
  if (path / '_CHECKPOINT_METADATA').exists() or (path / '_METADATA').exists():
    return path
  raise WeightsError(
      f'{path} holds no parameters: expected a converter output or checkpoint folder '
      f'(with {PARAMS}/), a training workdir (with checkpoints/<step>/) or its best/')


def read_info(path) -> dict:
  """The converter's info.json (or a best checkpoint's info) next to a params dir, or {}."""
  params_dir = find_params_dir(path)
  for info in (params_dir.parent / INFO, params_dir.parent / 'info' / 'metadata'):
    if info.exists():
      return json.loads(info.read_text())
  return {}


# The params item is read with the PyTree handler itself, not a Checkpointer:
# inside a CheckpointManager step the item folder has no checkpoint-level
# metadata file, and a Checkpointer warns about that on every read.

def params_metadata(params_dir) -> Any:
  """The stored tree with ShapeDtypeStruct leaves (no data read)."""
  with contextlib.closing(ocp.PyTreeCheckpointHandler()) as handler:
    meta = handler.metadata(epath.Path(params_dir))
  tree = getattr(meta, 'tree', meta)
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)


def restore_params(params_dir, target):
  """Restores a tree whose leaves are ShapeDtypeStructs with shardings; each array
  is read straight into its shards, cast to the target dtype."""
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  with contextlib.closing(ocp.PyTreeCheckpointHandler()) as handler:
    return handler.restore(epath.Path(params_dir),
                           args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args))


def restore_variables(path, target, required=('backbone',)):
  """Restores a checkpoint into the sharded `target` tree. Every part
  (`part_of`) present in the checkpoint must match exactly (missing, unexpected
  or mis-shaped entries are an error), except that a position embedding of
  another grid is resized (PyTorch bicubic). Parts absent from the checkpoint
  are returned as missing (an error if listed in `required`).
  Returns (flat dict of restored arrays, sorted missing part names)."""
  params_dir = find_params_dir(path)
  stored, wanted = flatten(params_metadata(params_dir)), flatten(target)
  present = {part_of(k) for k in stored}
  missing_modules = sorted({part_of(k) for k in wanted} - present)
  resized = [k for k in stored if k in wanted and k.endswith('pos_embed')
             and stored[k].shape != wanted[k].shape and stored[k].shape[-1] == wanted[k].shape[-1]]
  expected = {k: t.shape for k, t in wanted.items() if part_of(k) in present}
  expected.update({k: stored[k].shape for k in resized})
  problems = key_problems(expected, {k: s.shape for k, s in stored.items()})
  problems += [f'missing: {m} (the whole module)' for m in missing_modules if m in required]
  raise_problems(problems, f'checkpoint {params_dir} does not fit the model')

  def restore_target(name):
    t = wanted[name]
    if name in resized:  # read at its stored grid, replicated; resized below
      return jax.ShapeDtypeStruct(stored[name].shape, t.dtype,
                                  sharding=NamedSharding(t.sharding.mesh, P()))
    return t

  restored = flatten(restore_params(params_dir, unflatten({k: restore_target(k) for k in stored})))
  for name in resized:
    logging.info('resizing %s from %s to %s', name, stored[name].shape, wanted[name].shape)
    n = wanted[name].shape[1] - 1
    grid = (int(round(n ** 0.5)),) * 2
    restored[name] = jax.jit(lambda x: resize_pos_embed(x, grid),
                             out_shardings=wanted[name].sharding)(restored[name])
  return restored, missing_modules


def init_variables(module, mesh: Mesh, checkpoint=None, seed: int = 0, policy=None):
  """Variables of `module` from `checkpoint` (parts it lacks, e.g. the heads of
  a converted backbone or the adapter around a converted ViT, random), or all
  random; created in their shards, in the storage dtypes of `policy` (restores
  cast while reading)."""
  target = abstract_variables(module, mesh, policy)
  if not checkpoint:
    logging.info('no checkpoint given: random parameters')
    return random_variables(module, mesh, seed, policy)
  restored, missing = restore_variables(checkpoint, target)
  if missing:
    logging.warning('%s not in %s: randomly initialised', ', '.join(missing), checkpoint)
    restored.update(flatten(random_variables(module, mesh, seed, policy, only=missing)))
  return unflatten(restored)


# -- a training run's checkpoints -------------------------------------------------

class TrainCheckpoints:
  """`WORKDIR/checkpoints/<step>/{params,opt_state,state,data}` and `WORKDIR/best/<step>/`.

  `save` is called every step; Orbax's policy decides: every `every` steps, and
  at a preemption sync point when jax.distributed runs (SIGTERM on a cluster).
  Saves are asynchronous and atomic (a half-written step is never listed).
  """
  ITEMS = ('params', 'opt_state', 'state', 'data')

  def __init__(self, workdir: str, every: int, max_to_keep: int):
    policy = ocp.checkpoint_managers
    # Each manager its own barrier names: with several processes, Orbax's
    # background save threads meet at barriers whose names are the same for
    # every manager (unless prefixed), so a best/ save overlapping a
    # checkpoints/ save would join the other's barrier and fail.
    barriers = lambda name: ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True,
        multiprocessing_options=barriers('checkpoints'),
        save_decision_policy=policy.AnySavePolicy([
            policy.FixedIntervalPolicy(every), policy.PreemptionCheckpointingPolicy()]))
    self.manager = ocp.CheckpointManager(epath.Path(workdir) / 'checkpoints', options=options,
                                         item_names=self.ITEMS)
    best_options = ocp.CheckpointManagerOptions(
        max_to_keep=1, best_fn=lambda metrics: metrics['mIoU'], best_mode='max', create=True,
        enable_async_checkpointing=True, multiprocessing_options=barriers('best'))
    self.best = ocp.CheckpointManager(epath.Path(workdir) / 'best', options=best_options,
                                      item_names=('params', 'info'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, variables, opt_state, state: dict, data, force: bool = False) -> bool:
    """Saves if the policy (or `force`) says so; True when a save started."""
    from internseg_jax.data import pipeline  # grain: only where data is loaded
    return self.manager.save(step, force=force, args=ocp.args.Composite(
        params=ocp.args.StandardSave(variables), opt_state=ocp.args.StandardSave(opt_state),
        state=ocp.args.StandardSave(state), data=pipeline.checkpoint_args_save(data)))

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def restore(self, step: int, variables, opt_state, state: dict, data):
    """Abstract trees in, restored trees out (the data iterator in place)."""
    from internseg_jax.data import pipeline
    out = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(variables), opt_state=ocp.args.StandardRestore(opt_state),
        state=ocp.args.StandardRestore(state), data=pipeline.checkpoint_args_restore(data)))
    return out.params, out.opt_state, out.state

  def save_best(self, step: int, variables, miou: float) -> None:
    """Keeps `variables` as the best (Orbax keeps the top checkpoint by mIoU)."""
    if step in self.best.all_steps():  # redone after a preemption: replace it
      self.best.delete(step)
    info = dict(step=int(step), mIoU=float(miou))
    self.best.save(step, metrics={'mIoU': float(miou)}, args=ocp.args.Composite(
        params=ocp.args.StandardSave(variables), info=ocp.args.JsonSave(info)))

  def wait(self) -> None:
    self.manager.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
    self.best.close()


def params_count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))

