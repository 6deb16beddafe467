r"""Time and memory of evaluating a generated 2,000-image val split with the tiny model.

  python benchmarks/eval_tiny.py [--images 2000 --config configs/upernet_frozen.py:tiny]

Generates an ADE-format folder (96-160 px images, 150 classes), builds the tiny
model with random weights, runs the full evaluation (test pipeline, sliding
windows, streaming mIoU) and prints images/s and the process's peak RSS, plus
the RSS after the first 10 % of images to show that memory does not grow with
the number of images.
"""
import argparse
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from internseg_jax import api, evaluate  # noqa: E402
from internseg_jax.data import sources, synthetic  # noqa: E402


def rss_mib():
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) / 1024
  return float('nan')


class Probe:
  """Wraps a source and records RSS when 10 % of it has been read."""

  def __init__(self, dataset):
    self.dataset, self.early = dataset, None

  def __len__(self):
    return len(self.dataset)

  def __getitem__(self, i):
    if i == len(self) // 10:
      self.early = rss_mib()
    return self.dataset[i]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--images', type=int, default=2000)
  parser.add_argument('--config', default='configs/upernet_frozen.py:tiny')
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    start = time.time()
    synthetic.write_ade_folder(tmp, 0, args.images, 150, size_range=(96, 160), seed=0)
    print(f'generated {args.images} images in {time.time() - start:.1f} s')
    model = api.init_model(args.config)
    dataset = Probe(sources.ADEFolder(tmp, 'validation'))
    start = time.time()
    result = evaluate.evaluate(model, dataset, os.path.join(tmp, 'wd'))
    seconds = time.time() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f'config {args.config}, {os.cpu_count()} cores, mIoU {result["mIoU"]:.4f} (random weights)')
  print(f'evaluated {args.images} images in {seconds:.1f} s ({args.images / seconds:.1f} images/s)')
  print(f'RSS after 10% of the images: {dataset.early:.0f} MiB; at the end: {rss_mib():.0f} MiB; '
        f'peak: {peak:.0f} MiB')


if __name__ == '__main__':
  main()
