r"""Training input pipeline throughput: grain (0, 1, 2 workers) vs a plain loop.

  python benchmarks/data_pipeline.py [--images 200 --batch 8 --crop 504 --workers 0,1,2]

Writes N generated 683x512 JPEGs (+ PNG labels) as an ADE folder in a temporary
directory, then measures, in the same run:
  plain    a single-process loop over the same records doing what each pipeline
           element does, directly: decode (OpenCV), transforms.train_transform,
           stack into batches;
  grain/w  internseg_jax.data.pipeline.train_loader with w worker processes
           (w = 0: in this process, in background threads; 1 unless WtT).
Every delivered batch is read once (`consume`), as the host-to-device copy
would. OpenCV runs one thread everywhere (the workers set that themselves), so "cores
used" is 1 for plain and grain/0 and w for grain/w (the main process then only
copies finished batches out of shared memory). Throughput is steady state: the
worker start-up and the first batches are timed separately. The settings run
in turns for --rounds rounds and the medians are reported (shared, noisy
machines). The last line is
`images/s per core: N`: the best grain setting's throughput divided by the
cores it used (workers x threads).
Also printed: images per CPU-second (CPU time of this process and its workers,
from /proc), which is less sensitive to other load on a shared machine.
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from internseg_jax.data import pipeline, sources, synthetic  # noqa: E402


def write_folder(root: str, count: int, seed: int = 0) -> str:
  """ADE layout with `count` 683x512 (w x h) JPEG images and PNG labels."""
  image_dir = os.path.join(root, 'images', 'training')
  label_dir = os.path.join(root, 'annotations', 'training')
  os.makedirs(image_dir, exist_ok=True)
  os.makedirs(label_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  for i in range(count):
    image, label = synthetic.make_example(rng, 150, 512, 683, max_shapes=8)
    name = f'ADE_train_{i:08d}'
    cv2.imwrite(os.path.join(image_dir, name + '.jpg'), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                [cv2.IMWRITE_JPEG_QUALITY, 90])
    cv2.imwrite(os.path.join(label_dir, name + '.png'), label)
  return root


def train_transform(crop: int):
  try:
    return pipeline.default_transform(crop_size=crop, scale=(4 * crop, crop)), 'train_transform'
  except (ImportError, AttributeError):  # transforms.train_transform not there yet
    print('WARNING: internseg_jax.data.transforms.train_transform is missing; timing a '
          'stand-in (resize + crop + flip + normalize), NOT the real transform')

    def standin(image, label, rng):
      r = rng.uniform(0.5, 2.0)
      f = min(4 * crop * r / max(image.shape[:2]), crop * r / min(image.shape[:2]))
      size = (int(image.shape[1] * f + 0.5), int(image.shape[0] * f + 0.5))
      image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
      label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
      y = int(rng.integers(0, max(size[1] - crop, 0) + 1))
      x = int(rng.integers(0, max(size[0] - crop, 0) + 1))
      out = np.zeros((crop, crop, 3), np.float32)
      lab = np.full((crop, crop), 255, np.uint8)
      ci, cl = image[y:y + crop, x:x + crop], label[y:y + crop, x:x + crop]
      out[:ci.shape[0], :ci.shape[1]] = (ci - 120.0) / 58.0
      lab[:cl.shape[0], :cl.shape[1]] = cl
      return out, lab
    return standin, 'stand-in'


def cpu_seconds() -> float:
  """CPU time (user + system) of this process and its live child processes
  (the grain workers), from /proc; this process only elsewhere."""
  total = time.process_time()
  try:
    tick = os.sysconf('SC_CLK_TCK')
    me = os.getpid()
    for pid in os.listdir('/proc'):
      if not pid.isdigit():
        continue
      try:
        with open(f'/proc/{pid}/stat') as f:
          fields = f.read().rsplit(')', 1)[1].split()
      except OSError:
        continue
      if int(fields[1]) == me:                  # ppid
        total += (int(fields[11]) + int(fields[12])) / tick   # utime + stime
  except (OSError, ValueError, AttributeError):
    pass
  return total


def consume(batch) -> None:
  """Reads every byte once, as the host-to-device copy of a training step would
  (for worker outputs this is where the shared-memory pages are first touched)."""
  for value in batch.values():
    value.max()


def plain_loop(source, transform, batch: int, images: int, seed: int) -> float:
  """(images/s, images per CPU-second) of decode + transform + stack, one
  process, no grain."""
  start, cpu = time.perf_counter(), cpu_seconds()
  done = 0
  while done < images:
    examples = []
    for _ in range(batch):
      index = done % len(source)
      record = source[index]
      image, label = transform(record['image'], record['label'],
                               pipeline.example_rng(seed, index, done // len(source)))
      examples.append((np.asarray(image, np.float32), np.asarray(label, np.int32)))
      done += 1
    out = {'image': np.stack([e[0] for e in examples]),
           'label': np.stack([e[1] for e in examples])}
    consume(out)
  return done / (time.perf_counter() - start), done / (cpu_seconds() - cpu)


def grain_loop(source, transform, batch: int, images: int, seed: int, workers: int,
               threads: int, prefetch: int) -> tuple[float, float, float]:
  """(steady images/s, images per CPU-second, seconds to the first batches)."""
  start = time.perf_counter()
  with pipeline.train_loader(source, global_batch_size=batch, seed=seed, transform=transform,
                             num_workers=workers, read_threads=threads, prefetch=prefetch, process_index=0,
                             process_count=1) as it:
    for _ in range(max(1, workers)):       # start-up: every worker delivered once
      next(it)
    startup = time.perf_counter() - start
    steps = max(1, images // batch)
    start, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(steps):
      out = next(it)
      consume(out)
    elapsed = time.perf_counter() - start
    cpu = cpu_seconds() - cpu
  assert out['image'].shape[0] == batch
  return steps * batch / elapsed, steps * batch / cpu, startup


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--images', type=int, default=200, help='generated images')
  parser.add_argument('--measure', type=int, default=160, help='images timed per setting')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--crop', type=int, default=504)
  parser.add_argument('--workers', default='0,1,2',
                      help='grain settings: W (W worker processes) or WtT (T read threads '
                      'in each worker, or in this process when W = 0)')
  parser.add_argument('--prefetch', type=int, default=2)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--root', default=None, help='reuse/write the folder here')
  parser.add_argument('--json', default=None, help='also write the results here')
  args = parser.parse_args()

  cv2.setNumThreads(1)
  cores = os.cpu_count()
  tmp = None
  root = args.root
  if root is None:
    tmp = tempfile.TemporaryDirectory()
    root = tmp.name
  if not os.path.isdir(os.path.join(root, 'images', 'training')):
    t = time.perf_counter()
    write_folder(root, args.images)
    print(f'wrote {args.images} 683x512 images in {time.perf_counter() - t:.1f}s to {root}')
  source = sources.ADEFolder(root, 'training')
  transform, kind = train_transform(args.crop)
  print(f'{len(source)} images, crop {args.crop}, batch {args.batch}, transform {kind}, '
        f'{cores} cores')

  settings = [('plain loop', 1, None)]
  for item in filter(None, (w.strip() for w in args.workers.split(','))):
    workers, _, threads = item.partition('t')
    workers, threads = int(workers), int(threads or 1)
    name = f'grain {workers} workers' + (f' x {threads} threads' if threads > 1 else '')
    settings.append((name, max(1, workers) * threads, (workers, threads)))
  rates = {name: [] for name, _, _ in settings}
  per_cpu = {name: [] for name, _, _ in settings}
  startups = {name: [] for name, _, _ in settings}
  for r in range(args.rounds):  # settings in turns: all see the same machine load
    for name, _, grain_setting in settings:
      if grain_setting is None:
        rate, eff = plain_loop(source, transform, args.batch, args.measure, seed=r)
      else:
        rate, eff, startup = grain_loop(source, transform, args.batch, args.measure, r,
                                        *grain_setting, args.prefetch)
        startups[name].append(startup)
      rates[name].append(rate)
      per_cpu[name].append(eff)
    print(f'round {r}: ' + ', '.join(f'{n} {rates[n][-1]:.1f}' for n, _, _ in settings),
          flush=True)
  plain = float(np.median(rates['plain loop']))
  rows = []
  for name, used, _ in settings:
    rate = float(np.median(rates[name]))
    row = {'setting': name, 'images_per_s': rate, 'cores': used, 'vs_plain': rate / plain,
           'images_per_cpu_s': float(np.median(per_cpu[name])), 'rounds': rates[name]}
    if startups[name]:
      row['startup_s'] = float(np.median(startups[name]))
    rows.append(row)
    print(f'{name:18s} {rate:7.2f} images/s (median of {args.rounds}), {rate / plain:.2f}x '
          f'plain, {used} core(s); {row["images_per_cpu_s"]:.1f} images per CPU-second' +
          (f'; start-up {row["startup_s"]:.1f}s' if 'startup_s' in row else ''))
  best = max(rows[1:] or rows, key=lambda r: r['images_per_s'])  # the grain settings
  per_core = best['images_per_s'] / best['cores']
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'crop': args.crop, 'batch': args.batch, 'images': len(source),
                 'transform': kind, 'cpu_count': cores, 'rows': rows,
                 'best': best['setting'], 'images_per_s_per_core': per_core}, f, indent=2)
  if tmp is not None:
    tmp.cleanup()
  print(f'best: {best["setting"]} ({best["images_per_s"]:.2f} images/s on {best["cores"]} '
        f'core(s))')
  print(f'images/s per core: {per_core:.2f}')


if __name__ == '__main__':  # required: grain workers are spawned and re-import this file
  main()
