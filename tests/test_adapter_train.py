"""Adapter tuning end to end on CPU: `python -m internseg_jax.main
--config=configs/upernet_adapter.py:tiny` trains in the sharded trainer (8 fake
devices, mesh 2 x 4), evaluates and writes overlays; the ViT is frozen (stored in
bf16, never changed, no optimizer state), the adapter and heads train in float32;
a run resumed from a checkpoint continues exactly (same losses, bit-identical
parameters and optimizer state).

The two runs share the session's persistent XLA compilation cache
(tests/conftest.py), so the resumed run compiles nothing: the adapter's train
step takes about a minute of CPU to compile.
"""
import json
import os
import shutil

import jax
import numpy as np

from internseg_jax import weights
from tests.test_train import run_main, train_rows

ARGS = ['--config=configs/upernet_adapter.py:tiny', '--config.train.steps=4',
        '--config.train.checkpoint_every=2', '--config.train.log_every=1',
        '--config.train.eval_every=0', '--config.mesh.data=2', '--config.mesh.fsdp=4']
VIT = ('blocks', 'patch_embed', 'pos_embed')


def flat(tree) -> dict:
  """Any pytree (the optimizer state holds tuples) -> {'a/b/c': leaf}."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path, simple=True, separator='/'): x for path, x in leaves}


def stored_tree(workdir, step, item):
  return flat(weights.params_metadata(os.path.join(workdir, 'checkpoints', str(step), item)))


def restored_item(workdir, step, item):
  """A checkpoint item's arrays as numpy (flat)."""
  folder = os.path.join(workdir, 'checkpoints', str(step), item)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        weights.params_metadata(folder))
  return flat(jax.tree.map(np.asarray, weights.restore_params(folder, target)))


def is_vit(path):
  parts = path.split('/')
  return 'backbone' in parts and parts[parts.index('backbone') + 1] in VIT


def test_cli_trains_evaluates_writes_overlays_and_resumes_exactly(tmp_path):
  full = tmp_path / 'full'
  result = run_main(full, *ARGS)
  assert result.returncode == 0, result.stderr[-3000:]
  log = result.stdout + result.stderr
  assert 'InternViT-Adapter 8 blocks x 64 (4 interactions)' in log and 'ViT frozen' in log
  assert [r['step'] for r in train_rows(full)] == [1, 2, 3, 4]
  assert all(np.isfinite(r['loss']) for r in train_rows(full))
  out = json.loads((full / 'eval_results.json').read_text())
  assert 0.0 <= out['mIoU'] <= 1.0 and out['num_images'] == 8
  written = sorted(os.listdir(full / 'predictions'))
  assert sum(n.endswith('_overlay.png') for n in written) == 2
  assert sum(n.endswith('_labels.png') for n in written) == 2

  # The frozen ViT: bf16, unchanged by training, no optimizer state; the adapter
  # (level_embed, spm, interactions, up, norms) and heads: float32, trained.
  params = stored_tree(full, 4, 'params')
  vit = {k for k in params if is_vit(k)}
  assert {k.split('/')[2] for k in vit} == set(VIT)
  assert all(params[k].dtype == np.dtype('bfloat16') for k in vit)
  assert all(params[k].dtype == np.float32 for k in params if k not in vit)
  opt_paths = set(stored_tree(full, 4, 'opt_state'))
  assert not any('backbone/' + name in p for p in opt_paths for name in VIT)
  assert any(p.endswith('backbone/level_embed') for p in opt_paths)
  assert any('backbone/interactions_3/extra_extractors_1/attn' in p for p in opt_paths)
  before, after = (restored_item(full, step, 'params') for step in (2, 4))
  for key in vit:
    np.testing.assert_array_equal(before[key], after[key], err_msg=key)
  for key in ('params/backbone/level_embed', 'params/backbone/spm/fc2/kernel',
              'params/backbone/interactions_0/injector/gamma'):
    assert not np.array_equal(before[key], after[key]), key

  # Resume: a workdir holding the first run's checkpoint of step 2 (what a run
  # killed after it would have) continues to step 4 exactly as the first run did.
  resumed = tmp_path / 'resumed'
  shutil.copytree(full / 'checkpoints' / '2', resumed / 'checkpoints' / '2')
  result = run_main(resumed, *ARGS, f'--config.data.root={full / "data"}',
                    '--config.predict.after_train=0')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'resuming at 2' in result.stdout + result.stderr
  want = {r['step']: r['loss'] for r in train_rows(full)}
  got = {r['step']: r['loss'] for r in train_rows(resumed)}
  assert sorted(got) == [3, 4] and all(got[s] == want[s] for s in got), (got, want)
  for item in ('params', 'opt_state'):
    a, b = restored_item(full, 4, item), restored_item(resumed, 4, item)
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f'{item}/{key}')
