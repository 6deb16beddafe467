"""The grain training pipeline: determinism over workers, restarts and
processes, Orbax checkpointing of its state, and to_global."""
import json
import os

import cv2
import numpy as np
import pytest

from internseg_jax.data import pipeline, sources, synthetic

CROP = 56
NUM_TRAIN = 10   # not a multiple of the batch sizes below: batches straddle epochs


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('ade') / 'ADEChallengeData2016')
  synthetic.write_ade_folder(root, NUM_TRAIN, 1, size_range=(40, 72), seed=5)
  return sources.ADEFolder(root, 'training')


def simple_transform(image, label, rng, crop=CROP):
  """Resize to crop x crop, random flip, and a random per-example offset: cheap,
  uses the rng, and module-level so spawned workers can unpickle it."""
  image = cv2.resize(image, (crop, crop), interpolation=cv2.INTER_LINEAR)
  label = cv2.resize(label, (crop, crop), interpolation=cv2.INTER_NEAREST)
  if rng.random() < 0.5:
    image, label = image[:, ::-1], label[:, ::-1]
  return image.astype(np.float32) / 255 + np.float32(rng.uniform(-1, 1)), label


def probe_worker_transform(image, label, rng):
  """Reports, in the pixels, the process it ran in and whether a JAX backend
  had been initialised there."""
  import sys
  initialised = 0.0
  if 'jax' in sys.modules:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    initialised = float(xla_bridge.backends_are_initialized())
  image, label = simple_transform(image, label, rng)
  image[0, 0, 0], image[0, 0, 1] = initialised, os.getpid()
  return image, label


def loader(source, **kwargs):
  kwargs = {'global_batch_size': 4, 'seed': 0, 'transform': simple_transform,
            'with_metadata': True, 'process_index': 0, 'process_count': 1, **kwargs}
  return pipeline.train_loader(source, **kwargs)


def take(it, k):
  return [next(it) for _ in range(k)]


def assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batches_shapes_and_types(source):
  with loader(source, global_batch_size=6, with_metadata=False) as it:
    batch = next(it)
  assert set(batch) == {'image', 'label'}
  assert batch['image'].shape == (6, CROP, CROP, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (6, CROP, CROP) and batch['label'].dtype == np.int32


def test_same_batches_for_0_1_2_workers_and_resume_across_worker_counts(source):
  with loader(source, num_workers=0) as it:
    want = take(it, 7)
  with loader(source, num_workers=1, prefetch=2) as it:
    assert_same(take(it, 7), want)
  with loader(source, num_workers=2, prefetch=2) as it:
    assert_same(take(it, 3), want[:3])
    state = it.get_state()            # mid-epoch, workers running ahead
    assert_same(take(it, 2), want[3:5])
    json.dumps(state)                 # what grain's Orbax handler writes
  # Saved with 2 workers, restored with none.
  with loader(source, num_workers=0) as it:
    it.set_state(state)
    assert_same(take(it, 4), want[3:])


def test_workers_are_separate_processes_without_jax_backend(source):
  import jax
  jax.devices()                       # the parent has a backend; a forked child would too
  with loader(source, num_workers=1, prefetch=1, transform=probe_worker_transform) as it:
    batch = next(it)
  assert (batch['image'][:, 0, 0, 0] == 0).all()          # no backend initialised
  assert (batch['image'][:, 0, 0, 1] != os.getpid()).all()


def test_get_set_state_mid_epoch(source):
  with loader(source) as it:
    want = take(it, 9)
  with loader(source) as it:
    take(it, 2)                       # position 8 of the 10-record epoch
    state = it.get_state()
    assert state['position'] == 8 and it.epoch == 0
    take(it, 3)
    it.set_state(state)               # rewinding a running iterator restarts it
    assert_same(take(it, 2), want[2:4])
  with loader(source) as fresh:
    fresh.set_state(state)
    assert_same(take(fresh, 7), want[2:])
    assert fresh.get_state()['position'] == 36


def test_set_state_refuses_another_stream(source):
  with loader(source) as it:
    next(it)
    state = it.get_state()
  for kwargs in ({'seed': 1}, {'shuffle': False}):
    with loader(source, **kwargs) as other, pytest.raises(ValueError, match='cannot resume'):
      other.set_state(state)


def test_orbax_checkpoint_manager(source, tmp_path):
  import orbax.checkpoint as ocp
  with loader(source) as it:
    want = take(it, 6)
  options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
  with loader(source) as it, ocp.CheckpointManager(str(tmp_path / 'ckpt'), options=options) as m:
    take(it, 3)
    m.save(3, args=ocp.args.Composite(data=pipeline.checkpoint_args_save(it)))
    take(it, 1)                       # moves on after the save; must not leak into it
    m.wait_until_finished()
  saved = tmp_path / 'ckpt' / '3' / 'data' / 'process_0-of-1.json'
  assert json.loads(saved.read_text())['position'] == 12
  with loader(source) as fresh, ocp.CheckpointManager(str(tmp_path / 'ckpt'),
                                                      options=options) as m:
    assert m.latest_step() == 3
    m.restore(3, args=ocp.args.Composite(data=pipeline.checkpoint_args_restore(fresh)))
    assert_same(take(fresh, 3), want[3:])


def test_processes_get_disjoint_shards_covering_each_epoch(source):
  steps = 10                          # 2 processes x 2 records x 10 steps = 4 epochs
  with loader(source, process_index=0, process_count=2) as p0, \
       loader(source, process_index=1, process_count=2) as p1, \
       loader(source, process_index=0, process_count=1) as single:
    b0, b1, whole = take(p0, steps), take(p1, steps), take(single, steps)
  for a, b, g in zip(b0, b1, whole):
    assert a['image'].shape[0] == b['image'].shape[0] == 2
    # The global batch does not depend on the number of processes.
    assert_same([{k: np.concatenate([a[k], b[k]]) for k in a}], [g])
  seen = {0: [], 1: []}
  for p, batches in enumerate((b0, b1)):
    for batch in batches:
      seen[p] += list(zip(batch['epoch'].tolist(), batch['index'].tolist()))
  assert not set(seen[0]) & set(seen[1])
  both = seen[0] + seen[1]
  assert len(set(both)) == len(both)
  for epoch in range(4):
    assert sorted(i for e, i in both if e == epoch) == list(range(NUM_TRAIN))
  with pytest.raises(ValueError, match='multiple of the process count'):
    loader(source, global_batch_size=5, process_index=0, process_count=2)


def epoch_orders(source, epochs=3, **kwargs):
  with loader(source, global_batch_size=NUM_TRAIN, **kwargs) as it:
    batches = take(it, epochs)
  for e, batch in enumerate(batches):
    assert (batch['epoch'] == e).all()
  return [batch['index'].tolist() for batch in batches]


def test_seeds_and_epochs_reshuffle(source):
  orders = epoch_orders(source, seed=0)
  assert all(sorted(o) == list(range(NUM_TRAIN)) for o in orders)
  assert len({tuple(o) for o in orders}) == 3                 # each epoch reshuffled
  assert epoch_orders(source, seed=0) == orders               # reproducible
  other = epoch_orders(source, seed=1)
  assert other[0] != orders[0] and other[0] != orders[1]      # seed 1 is not seed 0 shifted
  assert epoch_orders(source, shuffle=False) == [list(range(NUM_TRAIN))] * 3


def test_transform_randomness_per_seed_index_epoch(source):
  seed = 7
  with loader(source, seed=seed, global_batch_size=5) as it:
    batches = take(it, 4)             # 2 epochs
  outputs = {}
  for batch in batches:
    for i in range(5):
      index, epoch = int(batch['index'][i]), int(batch['epoch'][i])
      record = source[index]
      image, label = simple_transform(record['image'], record['label'],
                                      pipeline.example_rng(seed, index, epoch))
      np.testing.assert_array_equal(batch['image'][i], image)
      np.testing.assert_array_equal(batch['label'][i], label)
      outputs[index, epoch] = batch['image'][i]
  assert len(outputs) == 2 * NUM_TRAIN
  for index in range(NUM_TRAIN):      # the same record is augmented anew each epoch
    assert not np.array_equal(outputs[index, 0], outputs[index, 1])


def test_default_train_transform_from_config(source):
  from configs import common
  data = common.base_config().data
  data.crop_size, data.scale = CROP, (4 * CROP, CROP)
  with pipeline.train_loader(source, global_batch_size=2, seed=0, process_index=0,
                             process_count=1, transform=pipeline.config_transform(data)) as it:
    batch = next(it)
  assert batch['image'].shape == (2, CROP, CROP, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (2, CROP, CROP) and batch['label'].dtype == np.int32
  labels = np.unique(batch['label'])
  assert ((labels < 150) | (labels == 255)).all()


def test_to_global_shape_and_sharding(source):
  import jax
  from internseg_jax import sharding
  mesh = sharding.make_mesh(data=4, fsdp=2)
  with loader(source, global_batch_size=8, with_metadata=False) as it:
    batch = next(it)
  out = pipeline.to_global(batch, mesh)
  assert jax.device_count() == 8
  assert out['image'].shape == (8, CROP, CROP, 3) and out['image'].dtype == np.float32
  assert out['label'].shape == (8, CROP, CROP) and out['label'].dtype == np.int32
  for key in out:
    assert out[key].sharding.is_equivalent_to(
        sharding.batch_sharding(mesh, batch[key].ndim), batch[key].ndim)
    assert len(out[key].addressable_shards) == 8
    assert out[key].addressable_shards[0].data.shape[0] == 1
    np.testing.assert_array_equal(np.asarray(out[key]), batch[key])
