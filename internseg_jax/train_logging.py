"""Training logs a person can read: metrics.jsonl, TensorBoard events, a tqdm bar
with ETA, an end-of-run summary and a PNG of the loss and mIoU curves. Only
process 0 writes (`enabled`)."""
import json
import os
import time

import numpy as np
from absl import logging
from tqdm import tqdm


class Logger:

  def __init__(self, workdir: str, config, enabled: bool = True):
    self.workdir, self.config, self.enabled = workdir, config, enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.best_miou = -1.0
    self.flops_per_step = None  # backbone model FLOPs per step and device
    self.bar = self.tb = None
    if enabled and os.path.exists(self.path):  # a resumed run continues the file
      for row in self.rows():
        if 'mIoU' in row and row['mIoU'] is not None:
          self.best_miou = max(self.best_miou, row['mIoU'])

  def rows(self):
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      return [json.loads(line) for line in f if line.strip()]

  def _write(self, row: dict):
    with open(self.path, 'a') as f:
      f.write(json.dumps(row) + '\n')

  def start(self, step: int, total: int, info: dict):
    self.last_time, self.last_step, self.start_time = time.time(), step, time.time()
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(os.path.join(self.workdir, 'tensorboard'))
    self.bar = tqdm(total=total, initial=step, desc='train', unit='step', dynamic_ncols=True)
    logging.info('training steps %d -> %d: %s trainable, %s frozen parameters, %d devices, mesh %s',
                 step, total, f"{info['trainable']:,}", f"{info['frozen']:,}", info['devices'],
                 info['mesh'])

  def tick(self, step: int):
    if self.bar is not None:
      self.bar.update(step - self.bar.n)

  def train_row(self, step: int, values: dict):
    now = time.time()
    steps = max(step - self.last_step, 1)
    seconds = (now - self.last_time) / steps
    self.last_time, self.last_step = now, step
    row = {'step': step, **{k: float(v) for k, v in values.items()},
           'images_per_s': self.config.train.batch_size / seconds, 'seconds_per_step': seconds}
    if self.flops_per_step:
      row['tflops_per_device'] = self.flops_per_step / seconds / 1e12
    if not self.enabled:
      return
    self._write(row)
    for k, v in row.items():
      if k != 'step':
        self.tb.add_scalar(f'train/{k}', v, step)
    self.tick(step)
    self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                         img_s=f"{row['images_per_s']:.1f}")

  def eval_row(self, step: int, result: dict) -> bool:
    """Logs an evaluation; True when its mIoU is the best so far."""
    miou = float(result['mIoU'])
    improved = miou > self.best_miou
    self.best_miou = max(self.best_miou, miou)
    if self.enabled:
      row = {'step': step, 'mIoU': miou, 'aAcc': float(result['aAcc']),
             'mAcc': float(result['mAcc'])}
      self._write(row)
      for k in ('mIoU', 'aAcc', 'mAcc'):
        self.tb.add_scalar(f'eval/{k}', row[k], step)
      logging.info('step %d: mIoU %.4f aAcc %.4f mAcc %.4f%s', step, miou, row['aAcc'],
                   row['mAcc'], ' (best)' if improved else '')
    return improved

  def finish(self, step: int, result: dict):
    if not self.enabled:
      return
    self.bar.close()
    self.tb.close()
    minutes = (time.time() - self.start_time) / 60
    plot = self.plot()
    summary = (f"finished {step} steps in {minutes:.1f} min: mIoU {result['mIoU']:.4f}, "
               f"aAcc {result['aAcc']:.4f}, mAcc {result['mAcc']:.4f} (best mIoU "
               f"{self.best_miou:.4f}); results in {self.workdir}/eval_results.json, curves in "
               f"{plot}")
    logging.info(summary)
    print(summary)

  def plot(self) -> str:
    """curves.png: training loss and evaluation mIoU against the step."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = self.rows()
    train = [(r['step'], r['loss']) for r in rows if 'loss' in r]
    evals = [(r['step'], r['mIoU']) for r in rows if 'mIoU' in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    if train:
      ax1.plot(*zip(*train), lw=1)
    ax1.set(title='training loss', xlabel='step')
    if evals:
      ax2.plot(*zip(*evals), marker='o')
    ax2.set(title='val mIoU', xlabel='step', ylim=(0, 1))
    fig.tight_layout()
    path = os.path.join(self.workdir, 'curves.png')
    fig.savefig(path + '.tmp.png', dpi=100)
    plt.close(fig)
    os.replace(path + '.tmp.png', path)
    return path
