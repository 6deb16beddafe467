"""Training logs a person can read: a start block saying what the run will do,
a tqdm bar with ETA, metrics.jsonl and TensorBoard rows that are means over each
logging interval (one step's loss zigzags too much to judge convergence), one
console line per evaluation, one summary line at the end and curves.png.

Only process 0 writes (`enabled`); the others still collect and return the
values, so every process can run the same NaN check and stop together.
"""
import io
import json
import os
import time

import jax
import numpy as np
from tqdm import tqdm

from internseg_jax import files

METRICS_FILE = 'metrics.jsonl'
CURVES_FILE = 'curves.png'
# Averaged over the interval in this order; any other metric added is averaged too.
_MEAN_KEYS = ('loss', 'loss_decode', 'loss_aux', 'grad_norm')


def read_rows(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _console(line: str) -> None:
  """Our own lines: through tqdm.write, which clears and redraws the bar
  instead of leaving a torn copy of it above the text."""
  tqdm.write(line)


class Logger:
  """add() every step, tick() to move the bar, flush() at log steps,
  eval_row() after evaluations, finish() at the end (close() on errors)."""

  def __init__(self, workdir: str, *, total_steps: int, global_batch_size: int,
               flops_per_step: float | None = None, enabled: bool = True):
    self.workdir, self.enabled = workdir, enabled
    self.total_steps, self.global_batch_size = int(total_steps), int(global_batch_size)
    self.flops_per_step = flops_per_step  # model FLOPs per step and device (MFU's count)
    self.path = os.path.join(workdir, METRICS_FILE)
    self.bar = self.tb = None
    self._pending = []  # (step, {name: device array}) since the last flush
    self.start_step = self._flush_step = 0
    self.start_time = self._flush_time = time.time()

  def start(self, step: int, info: dict) -> None:
    """Begins (or resumes at) `step`: drops metrics.jsonl rows of steps after
    `step` (a resumed run redoes them and writes them again), opens TensorBoard
    and the bar, and prints the start block from `info` (see `start_block`)."""
    self.start_step = self._flush_step = int(step)
    self.start_time = self._flush_time = time.time()
    self._pending = []
    if not self.enabled:
      return
    os.makedirs(self.workdir, exist_ok=True)
    rows = read_rows(self.path)
    kept = [r for r in rows if r.get('step', 0) <= step]
    if len(kept) != len(rows):
      files.atomic_write(self.path, ''.join(json.dumps(r) + '\n' for r in kept))
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(os.path.join(self.workdir, 'tensorboard'))
    _console(start_block(info, step, self.total_steps, self.global_batch_size, self.workdir))
    self.bar = tqdm(total=self.total_steps, initial=step, desc='train', unit='step',
                    dynamic_ncols=True, mininterval=0.5)

  def add(self, step: int, metrics: dict) -> None:
    """Keeps the step's metrics (device arrays) for the next flush. No
    device->host copy here: that would wait for the step and stall dispatch."""
    self._pending.append((int(step), metrics))

  def tick(self, step: int) -> None:
    if self.bar is not None and step > self.bar.n:
      self.bar.update(step - self.bar.n)

  def flush(self, step: int) -> dict:
    """Fetches everything kept since the last flush (one jax.device_get) and
    returns the row: interval means of the losses and grad_norm, the last
    step's lr, images_per_s / seconds_per_step (wall-clock since the previous
    flush), tflops_per_device when known, and `finite` (all steps finite; not
    written). Writes it (NaN values included) on the enabled process."""
    values = [v for _, v in jax.device_get(self._pending)]
    now = time.time()   # after the fetch, which waits for the interval's last step
    steps = max(int(step) - self._flush_step, 1)
    seconds = (now - self._flush_time) / steps
    self._pending, self._flush_step, self._flush_time = [], int(step), now
    row = {'step': int(step)}
    names = [k for k in _MEAN_KEYS if values and k in values[0]]
    names += sorted(k for k in (values[0] if values else {})
                    if k not in _MEAN_KEYS and k not in ('lr', 'finite'))
    for k in names:
      row[k] = float(np.mean([np.asarray(v[k], np.float64) for v in values]))
    if values and 'lr' in values[-1]:
      row['lr'] = float(values[-1]['lr'])
    row['images_per_s'] = self.global_batch_size / seconds
    row['seconds_per_step'] = seconds
    if self.flops_per_step:
      row['tflops_per_device'] = self.flops_per_step / seconds / 1e12
    if values and 'finite' in values[0]:
      finite = all(bool(v['finite']) for v in values)
    else:
      finite = all(np.isfinite(row[k]) for k in names)
    if self.enabled:
      self._append(row)
      for k, v in row.items():
        if k != 'step':
          self.tb.add_scalar(f'train/{k}', v, step)
      self.tick(step)
      # A dict keeps this order (keyword arguments would be sorted by name).
      self.bar.set_postfix({'loss': f"{row.get('loss', float('nan')):.4f}",
                            'lr': f"{row.get('lr', float('nan')):.2e}",
                            'img/s': f"{row['images_per_s']:.1f}"})
    return {**row, 'finite': finite}

  def eval_row(self, step: int, result: dict, best: bool) -> None:
    """Writes the evaluation row and prints one line. An evaluation right after
    a flush restarts the clock, so its time does not count as training time."""
    if int(step) == self._flush_step and not self._pending:
      self._flush_time = time.time()
    if not self.enabled:
      return
    row = {'step': int(step), 'mIoU': float(result['mIoU']), 'aAcc': float(result['aAcc']),
           'mAcc': float(result['mAcc']), 'best': bool(best)}
    self._append(row)
    for k in ('mIoU', 'aAcc', 'mAcc'):
      self.tb.add_scalar(f'eval/{k}', row[k], step)
    _console(f"step {step}: mIoU {row['mIoU']:.4f}  aAcc {row['aAcc']:.4f}  "
             f"mAcc {row['mAcc']:.4f}{'  (best)' if best else ''}")

  def close(self) -> None:
    """Closes the bar and TensorBoard (idempotent; for a run that stops early)."""
    if self.bar is not None:
      self.bar.close()
    if self.tb is not None:
      self.tb.close()
    self.bar = self.tb = None

  def finish(self, step: int, result: dict, best_miou: float, best_step: int) -> None:
    """Closes, draws curves.png and prints the one summary line."""
    if not self.enabled:
      return
    self.tick(step)
    self.close()
    minutes = (time.time() - self.start_time) / 60
    curves = self.plot()
    _console(f"finished {step} steps in {minutes:.1f} min: mIoU {result['mIoU']:.4f}, "
             f"aAcc {result['aAcc']:.4f}, mAcc {result['mAcc']:.4f}; best mIoU {best_miou:.4f} "
             f"at step {best_step}; results {os.path.join(self.workdir, 'eval_results.json')}, "
             f"curves {curves}")

  def plot(self) -> str | None:
    if not self.enabled:
      return None
    return plot_curves(self.path, os.path.join(self.workdir, CURVES_FILE), self.total_steps)

  def _append(self, row: dict) -> None:
    # json writes NaN as NaN (not strict JSON, but Python's json reads it back).
    with open(self.path, 'a') as f:
      f.write(json.dumps(row) + '\n')


def _format_mesh(mesh) -> str:
  if isinstance(mesh, dict):
    return ' x '.join(f'{k} {v}' for k, v in mesh.items())
  return str(mesh)


def start_block(info: dict, step: int, total_steps: int, batch: int, workdir: str) -> str:
  """A few aligned lines saying what the run will do. Known `info` keys:
  experiment, model, params_trainable, params_frozen, mesh (dict), devices,
  data; others are listed after them as they are."""
  info = dict(info)
  lines = []

  def add(name, value):
    if value is not None:
      lines.append(f'  {name:<11} {value}')

  add('experiment', info.pop('experiment', None))
  add('model', info.pop('model', None))
  trainable, frozen = info.pop('params_trainable', None), info.pop('params_frozen', None)
  if trainable is not None:
    add('parameters', f'{trainable:,} trainable' +
        (f', {frozen:,} frozen' if frozen is not None else ''))
  mesh, devices = info.pop('mesh', None), info.pop('devices', None)
  where = [] if mesh is None else [_format_mesh(mesh)]
  if devices is not None:
    where.append(f"({devices} device{'' if devices == 1 else 's'})")
  add('mesh', ' '.join(where) or None)
  add('data', info.pop('data', None))
  resumed = f' (resuming at {step})' if step else ''
  add('steps', f'{step} -> {total_steps}{resumed}, global batch {batch}')
  for key, value in info.items():
    add(key, value)
  add('workdir', f'{workdir} (metrics.jsonl, curves.png, tensorboard/, checkpoints/, best/)')
  return '\n'.join(['training:'] + lines)


def plot_curves(metrics_path: str, out_path: str, total_steps: int) -> str:
  """curves.png from metrics.jsonl: the interval-mean training loss (its parts
  lighter) with the learning rate below it, and validation mIoU with the best
  point marked; every panel's step axis spans the whole run. Written atomically."""
  import matplotlib
  matplotlib.use('Agg')  # no display needed; also safe in threads and on servers
  import matplotlib.pyplot as plt
  import matplotlib.ticker
  rows = read_rows(metrics_path)
  train = [r for r in rows if 'loss' in r]
  evals = [r for r in rows if r.get('mIoU') is not None]
  x_max = max([total_steps, 1] + [r['step'] for r in rows])
  xlim = (0, x_max * 1.03)  # room for a point at the last step
  fig = plt.figure(figsize=(12, 5.5))
  grid = fig.add_gridspec(2, 2, height_ratios=(3, 1), width_ratios=(3, 2), hspace=0.08,
                          wspace=0.22)
  ax_loss = fig.add_subplot(grid[0, 0])
  ax_lr = fig.add_subplot(grid[1, 0], sharex=ax_loss)
  ax_iou = fig.add_subplot(grid[:, 1])
  steps = [r['step'] for r in train]
  if train:
    ax_loss.plot(steps, [r['loss'] for r in train], lw=2, color='C0', label='loss (total)')
    for k, colour in (('loss_decode', 'C1'), ('loss_aux', 'C2')):
      if any(k in r for r in train):
        ax_loss.plot([r['step'] for r in train if k in r], [r[k] for r in train if k in r],
                     lw=1, alpha=0.5, color=colour, label=k.replace('_', ' '))
    ax_loss.legend(loc='upper right', fontsize=9)
  interval = f' over {steps[1] - steps[0]} steps' if len(steps) > 1 else ''
  ax_loss.set_title(f'training loss (mean{interval})')
  ax_loss.set_ylabel('loss')
  ax_loss.set_ylim(bottom=0)
  ax_loss.grid(alpha=0.3)
  ax_loss.tick_params(labelbottom=False)
  lr = [(r['step'], r['lr']) for r in train if 'lr' in r]
  if lr:
    ax_lr.plot(*zip(*lr), lw=1.5, color='C3')
  ax_lr.set_ylabel('learning rate')
  ax_lr.set_xlabel('step')
  # Tick labels such as 5e-04: matplotlib's shared '1e-4' offset would sit on the loss panel.
  ax_lr.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(3))
  ax_lr.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter('%.0e'))
  ax_lr.grid(alpha=0.3)
  ax_lr.set_xlim(*xlim)
  if evals:
    ax_iou.plot([r['step'] for r in evals], [r['mIoU'] for r in evals], marker='o', color='C0',
                label='mIoU')
    best = max(evals, key=lambda r: r['mIoU'])
    # The value goes in the legend: an annotation next to the point would cross the line.
    ax_iou.plot([best['step']], [best['mIoU']], marker='*', markersize=16, color='C1',
                linestyle='none', label=f"best {best['mIoU']:.3f} at step {best['step']}")
    ax_iou.legend(loc='lower right', fontsize=9)
  else:
    ax_iou.text(0.5, 0.5, 'no evaluation yet', ha='center', va='center',
                transform=ax_iou.transAxes, color='grey')
  ax_iou.set(title='validation mIoU', xlabel='step', ylabel='mIoU (0..1)', xlim=xlim, ylim=(0, 1))
  ax_iou.grid(alpha=0.3)
  fig.align_ylabels([ax_loss, ax_lr])
  buf = io.BytesIO()
  try:
    fig.savefig(buf, format='png', dpi=100, bbox_inches='tight')
  finally:
    plt.close(fig)
  files.atomic_write(out_path, buf.getvalue())
  return out_path
