"""train_logging.Logger: interval means, the last lr, the NaN flag, resume, curves.png."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from internseg_jax import train_logging

INFO = dict(experiment='demo', model='InternViT 2 blocks x 32, UperNet',
            params_trainable=1234567, params_frozen=0, mesh={'data': 8, 'fsdp': 1},
            devices=8, data='synthetic /tmp/x/data, 64 training images')


class Clock:
  """Stands in for time.time so the throughput values have known answers."""

  def __init__(self, now=100.0):
    self.now = now

  def __call__(self):
    return self.now


@pytest.fixture
def clock(monkeypatch):
  c = Clock()
  monkeypatch.setattr(train_logging.time, 'time', c)
  return c


def step_metrics(rng, loss=None, finite=True):
  loss = float(rng.uniform(0.5, 2.0)) if loss is None else loss
  decode = float(rng.uniform(0.3, 1.5))
  return dict(loss=jnp.float32(loss), loss_decode=jnp.float32(decode),
              loss_aux=jnp.float32(rng.uniform(0.1, 0.5)),
              grad_norm=jnp.float32(rng.uniform(0.1, 5.0)),
              lr=jnp.float32(rng.uniform(1e-5, 1e-3)), finite=jnp.bool_(finite))


def rows(tmp_path):
  with open(tmp_path / 'metrics.jsonl') as f:
    return [json.loads(line) for line in f]


def test_flush_writes_interval_means_last_lr_and_throughput(tmp_path, clock, capsys):
  rng = np.random.default_rng(0)
  log = train_logging.Logger(str(tmp_path), total_steps=10, global_batch_size=4,
                             flops_per_step=3e12)
  log.start(0, INFO)
  kept = []
  for step in range(1, 5):
    metrics = step_metrics(rng)
    log.add(step, metrics)
    log.tick(step)
    kept.append(jax.device_get(metrics))
  clock.now += 8.0   # 4 steps in 8 s
  row = log.flush(4)
  assert row.pop('finite') is True
  for k in ('loss', 'loss_decode', 'loss_aux', 'grad_norm'):
    # Means of float32 values taken in float64: equal to numpy's to rounding.
    np.testing.assert_allclose(row[k], np.mean([np.float64(m[k]) for m in kept]), rtol=1e-12)
  assert row['lr'] == float(kept[-1]['lr'])             # the step's own lr, not a mean
  assert row['seconds_per_step'] == pytest.approx(2.0)
  assert row['images_per_s'] == pytest.approx(2.0)       # 4 images per 2 s
  assert row['tflops_per_device'] == pytest.approx(1.5)  # 3 TFLOP per 2 s
  assert list(row) == ['step', 'loss', 'loss_decode', 'loss_aux', 'grad_norm', 'lr',
                       'images_per_s', 'seconds_per_step', 'tflops_per_device']
  assert rows(tmp_path) == [row]
  # The next interval starts after the flush: only its own steps count.
  log.add(5, step_metrics(rng, loss=1.0))
  log.add(6, step_metrics(rng, loss=3.0))
  clock.now += 1.0
  row = log.flush(6)
  assert row['loss'] == 2.0 and row['seconds_per_step'] == pytest.approx(0.5)
  out = capsys.readouterr().out
  assert 'experiment  demo' in out and '1,234,567 trainable, 0 frozen' in out
  assert 'data 8 x fsdp 1 (8 devices)' in out and '0 -> 10' in out and str(tmp_path) in out
  log.close()


class Unreadable:
  """A metric that fails when read on the host: add() must only keep it (a
  read would wait for the step and stall JAX's asynchronous dispatch)."""

  def _fail(self, *args, **kwargs):
    raise AssertionError('add() read a metric value')

  __array__ = __float__ = __bool__ = __index__ = __int__ = _fail


def test_add_does_not_read_values(tmp_path):
  log = train_logging.Logger(str(tmp_path), total_steps=2, global_batch_size=2)
  log.start(0, {})
  log.add(1, dict(loss=Unreadable(), lr=Unreadable(), finite=Unreadable()))
  log.close()


def test_one_non_finite_step_flags_the_interval_and_is_still_written(tmp_path, clock):
  rng = np.random.default_rng(1)
  log = train_logging.Logger(str(tmp_path), total_steps=6, global_batch_size=2)
  log.start(0, {})
  log.add(1, step_metrics(rng))
  log.add(2, step_metrics(rng, loss=float('nan'), finite=False))
  log.add(3, step_metrics(rng))
  clock.now += 3.0
  row = log.flush(3)
  assert row['finite'] is False and math.isnan(row['loss'])
  written = rows(tmp_path)
  assert len(written) == 1 and written[0]['step'] == 3 and math.isnan(written[0]['loss'])
  assert 'tflops_per_device' not in row   # no flops_per_step given
  log.close()


def test_disabled_logger_returns_values_but_writes_nothing(tmp_path, clock):
  rng = np.random.default_rng(2)
  log = train_logging.Logger(str(tmp_path / 'w'), total_steps=4, global_batch_size=2,
                             enabled=False)
  log.start(0, INFO)
  values = [step_metrics(rng) for _ in range(2)]
  for i, m in enumerate(values):
    log.add(i + 1, m)
  clock.now += 1.0
  row = log.flush(2)
  assert row['finite'] is True
  np.testing.assert_allclose(row['loss'], np.mean([float(m['loss']) for m in values]),
                             rtol=1e-12)
  log.eval_row(2, dict(mIoU=0.5, aAcc=0.9, mAcc=0.6), best=True)
  log.finish(2, dict(mIoU=0.5, aAcc=0.9, mAcc=0.6), 0.5, 2)
  assert not (tmp_path / 'w').exists()


def test_resume_drops_rows_after_the_restart_step(tmp_path, clock):
  lines = [dict(step=s, loss=1.0 / s) for s in (2, 4, 6, 8)] + [
      dict(step=4, mIoU=0.3, aAcc=0.5, mAcc=0.4, best=True),
      dict(step=8, mIoU=0.4, aAcc=0.6, mAcc=0.5, best=True)]
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in lines))
  log = train_logging.Logger(str(tmp_path), total_steps=8, global_batch_size=2)
  log.start(4, INFO)
  assert [r['step'] for r in rows(tmp_path)] == [2, 4, 4]
  log.add(5, step_metrics(np.random.default_rng(3)))
  log.add(6, step_metrics(np.random.default_rng(4)))
  clock.now += 2.0
  log.flush(6)
  assert [r['step'] for r in rows(tmp_path)] == [2, 4, 4, 6]
  log.close()


def test_eval_rows_finish_and_curves_png(tmp_path, clock, capsys):
  rng = np.random.default_rng(5)
  log = train_logging.Logger(str(tmp_path), total_steps=600, global_batch_size=8)
  log.start(0, INFO)
  for step in range(1, 601):
    log.add(step, step_metrics(rng))
    if step % 50 == 0:
      clock.now += 10.0
      log.flush(step)
  capsys.readouterr()
  result = dict(mIoU=0.75, aAcc=0.9, mAcc=0.8)
  log.eval_row(600, result, best=True)
  log.finish(600, result, 0.75, 600)
  out = capsys.readouterr().out.splitlines()
  assert out[0] == 'step 600: mIoU 0.7500  aAcc 0.9000  mAcc 0.8000  (best)'
  assert len(out) == 2   # one evaluation line, one summary line
  assert 'finished 600 steps' in out[1] and 'best mIoU 0.7500 at step 600' in out[1]
  evals = [r for r in rows(tmp_path) if 'mIoU' in r]
  assert evals == [dict(step=600, mIoU=0.75, aAcc=0.9, mAcc=0.8, best=True)]
  with Image.open(tmp_path / 'curves.png') as img:
    assert img.format == 'PNG' and img.size[0] > 600
    img.verify()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['curves.png', 'metrics.jsonl',
                                                        'tensorboard']


def test_plot_without_evaluations(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text(json.dumps(dict(step=5, loss=1.0, lr=1e-3)) + '\n')
  path = train_logging.plot_curves(str(tmp_path / 'metrics.jsonl'), str(tmp_path / 'c.png'), 10)
  with Image.open(path) as img:
    img.verify()
