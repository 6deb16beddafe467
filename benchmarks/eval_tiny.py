r"""Data-parallel evaluation speed and memory: the same val split on 1 and 8 devices.

  python benchmarks/eval_tiny.py [--images 2000 --config configs/upernet_frozen.py:tiny]
  python benchmarks/eval_tiny.py --smoke      # 40 images

Generates an ADE-format val folder once (96-160 px images, 150 classes), then
evaluates it (internseg_jax.evaluate: grain decodes and test-transforms ahead,
inference.WindowRunner packs the windows of many images into fixed-size batches
split over the mesh, streaming mIoU) with the tiny model and random weights,
in two fresh processes with 8 fake CPU devices
(`--xla_force_host_platform_device_count=8`, set before jax is imported): on a
mesh over `jax.devices()[:1]` and on all 8. Prints images/s (compilation
excluded: one warm-up call first), the mIoU (the same on both meshes: a check
that the batching changes nothing), the process's peak RSS, its RSS after 10 %
of the evaluation's time and at the end (streaming: no growth), and the
largest grain worker's peak RSS.

Fake CPU devices share the machine's cores: 8 of them are no faster than 1
(XLA's CPU client already uses every core for one device); the 8-device number
shows what the data-parallel path costs or saves on the host, not a GPU speed-up.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rss_mib() -> float:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) / 1024
  return float('nan')


class RssSampler(threading.Thread):
  """Samples this process's RSS every `period` seconds (the images are read in
  grain workers, so progress is taken as the share of the elapsed time)."""

  def __init__(self, period: float = 0.2):
    super().__init__(daemon=True)
    self.period, self.samples, self.stopped = period, [], threading.Event()

  def run(self):
    while not self.stopped.is_set():
      self.samples.append((time.time(), rss_mib()))
      self.stopped.wait(self.period)

  def at_fraction(self, fraction: float) -> float:
    start, end = self.samples[0][0], self.samples[-1][0]
    return next(r for t, r in self.samples if t >= start + fraction * (end - start))


def run_child(root: str, config_spec: str, devices: int, windows_per_device: int) -> dict:
  """In a process with 8 fake devices: evaluate `root` on `devices` of them."""
  import jax
  import numpy as np
  from internseg_jax import api, evaluate, sharding
  from internseg_jax.data import sources
  config = api.load_config(config_spec)
  if windows_per_device:
    config.eval.windows_per_device = windows_per_device
  mesh = sharding.make_mesh(-1, 1, devices=jax.devices()[:devices])
  model = api.init_model(config, mesh=mesh)
  forward = model.batched_logits_fn
  crop, per_call = config.eval.crop_size, config.eval.windows_per_device * devices
  start = time.time()
  warm = jax.device_put(np.zeros((per_call, crop, crop, 3), np.float32),
                        sharding.batch_sharding(mesh))
  forward(warm).block_until_ready()
  compile_s = time.time() - start
  dataset = sources.ADEFolder(root, 'validation')
  sampler = RssSampler()
  sampler.start()
  start = time.time()
  result = evaluate.evaluate(forward, mesh, config, dataset)
  seconds = time.time() - start
  sampler.stopped.set()
  sampler.join()
  n = len(dataset)
  return dict(devices=devices, windows_per_call=per_call, images=n, seconds=seconds,
              images_s=n / seconds, compile_s=compile_s, mIoU=float(result['mIoU']),
              rss_early_mib=sampler.at_fraction(0.1), rss_end_mib=sampler.samples[-1][1],
              peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              worker_peak_rss_mib=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
              workers=config.data.num_workers, jax=jax.__version__)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--images', type=int, default=2000)
  parser.add_argument('--config', default='configs/upernet_frozen.py:tiny')
  parser.add_argument('--windows_per_device', type=int, default=0,
                      help='0: the config\'s eval.windows_per_device')
  parser.add_argument('--devices', default='1,8', help='the mesh sizes to run, in turn')
  parser.add_argument('--smoke', action='store_true')
  parser.add_argument('--json', help='also write the results here')
  parser.add_argument('--child', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    root, devices = args.child.rsplit(':', 1)
    print(json.dumps(run_child(root, args.config, int(devices), args.windows_per_device)))
    return
  images = 40 if args.smoke else args.images
  from internseg_jax.data import synthetic
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    start = time.time()
    synthetic.write_ade_folder(tmp, 0, images, 150, size_range=(96, 160), seed=0)
    print(f'generated {images} val images in {time.time() - start:.1f} s', flush=True)
    env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=(
        os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip())
    for devices in [int(d) for d in args.devices.split(',')]:
      cmd = [sys.executable, os.path.abspath(__file__), '--config', args.config,
             '--windows_per_device', str(args.windows_per_device), '--child', f'{tmp}:{devices}']
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
      if proc.returncode != 0:
        sys.exit(f'eval_tiny: the {devices}-device run failed:\n{proc.stderr[-3000:]}')
      rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  load = os.getloadavg()
  print(f'config {args.config}, {images} images, {os.cpu_count()} cores (load average '
        f'{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} over 1 / 5 / 15 min), jax {rows[0]["jax"]}, '
        f'{rows[0]["workers"]} grain workers, random weights')
  for r in rows:
    print(f"{r['devices']} device(s), {r['windows_per_call']:3d} windows per call: "
          f"{r['seconds']:.1f} s, {r['images_s']:.1f} images/s (compile {r['compile_s']:.1f} s "
          f"before), mIoU {r['mIoU']:.4f}; RSS at 10 % of the time: {r['rss_early_mib']:.0f} MiB, at "
          f"the end {r['rss_end_mib']:.0f} MiB, peak {r['peak_rss_mib']:.0f} MiB; largest "
          f"worker peak {r['worker_peak_rss_mib']:.0f} MiB")
  if len(rows) == 2:
    same = rows[0]['mIoU'] == rows[1]['mIoU']
    print(f"{rows[1]['devices']} / {rows[0]['devices']} device images/s: "
          f"{rows[1]['images_s'] / rows[0]['images_s']:.2f}; "
          f"mIoU {'identical' if same else 'DIFFERENT'} on both meshes")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
