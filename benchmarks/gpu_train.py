r"""GPU: training-step speed and memory of the full-width model on one card.

  python benchmarks/gpu_train.py            # < 8 min on one H100/H200
  python benchmarks/gpu_train.py --smoke    # tiny sizes, any device (checks the script)

(a) linear probing: the full frozen 48-block backbone (bf16) + linear head, batch 8;
(b) full tuning: UperNet + aux, width 3200, drop path 0.4, per-block remat, with
    as many blocks as fit (tries 32, 24, 16: 48 needs ~96 GiB for weights, grads and
    AdamW state alone), batch 8.
Random init and random 504x504 batches (no input pipeline). Prints steps/s,
images/s, TFLOP/s per device (XLA's cost analysis of the compiled step) and % of
the card's measured bf16 matmul peak, and the peak GPU memory. Each part runs in
its own process.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')


def peak_tflops(n):
  import jax, jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  mm = jax.jit(lambda a, b: a @ b)
  mm(a, b).block_until_ready()
  start = time.perf_counter()
  for _ in range(20):
    out = mm(a, b)
  out.block_until_ready()
  return 2 * n ** 3 * 20 / (time.perf_counter() - start) / 1e12


def run_part(part, depth, smoke):
  import jax
  import numpy as np
  from internseg_jax import api, sharding, train
  name = 'linear_frozen' if part == 'linear' else 'upernet_full'
  config = api.load_config(f'configs/{name}.py' + (':tiny' if smoke else ''))
  bb = config.model.backbone
  if depth:
    bb.depth = depth
    bb.out_indices = train_out_indices(part, depth)
  config.train.batch_size = 2 if smoke else 8
  config.train.warmup_steps = 0
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  trainer = train.Trainer(config, mesh)
  state = trainer.initial_state()
  crop = config.data.crop_size if not smoke else 56
  rng = np.random.default_rng(0)
  n = config.train.batch_size
  batch = {'image': rng.normal(size=(n, crop, crop, 3)).astype(np.float32),
           'label': rng.integers(0, 150, size=(n, crop, crop)).astype(np.int32)}
  batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
  start = time.perf_counter()
  compiled = trainer.jit_step(state).lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  steps = 3 if smoke else 10
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / steps
  stats = jax.devices()[0].memory_stats() or {}
  # XLA's cost analysis counts a scan body once, so count the backbone's matmuls
  # analytically (model FLOPs, as MFU does): forward only when frozen, forward +
  # backward (x3) when trained; remat's recomputation and the heads not counted.
  from benchmarks.gpu_forward import forward_flops
  passes = 1 if bb.freeze else 3
  flops = forward_flops(bb.embed_dim, bb.depth, crop) * n * passes
  return dict(part=part, depth=bb.depth, batch=n, seconds=seconds, compile_s=compile_s,
              images_s=n / seconds, tflops=flops / seconds / 1e12, backbone_passes=passes,
              loss=float(metrics['loss']), peak_gib=stats.get('peak_bytes_in_use', 0) / 2 ** 30)


def train_out_indices(part, depth):
  if part == 'linear':
    return [depth - 4]
  return [depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1, depth - 1]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--part', choices=['peak', 'linear', 'full'])
  parser.add_argument('--depth', type=int, default=0)
  parser.add_argument('--smoke', action='store_true')
  parser.add_argument('--json')
  parser.add_argument('--timeout', type=int, default=300)
  args = parser.parse_args()
  if args.part == 'peak':
    print(json.dumps([dict(part='peak', tflops=peak_tflops(512 if args.smoke else 8192))]))
    return
  if args.part:
    print(json.dumps([run_part(args.part, args.depth, args.smoke)]))
    return
  rows = []

  def child(*extra):
    cmd = [sys.executable, __file__, *extra] + (['--smoke'] if args.smoke else [])
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
      return [dict(part=extra[1], error=f'timed out after {args.timeout} s')]
    out = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and out:
      return json.loads(out[-1])
    return [dict(part=extra[1], error=proc.stderr[-600:])]

  rows += child('--part', 'peak')
  rows += child('--part', 'linear', '--depth', '0')
  for depth in ([0] if args.smoke else [32, 24, 16]):
    got = child('--part', 'full', '--depth', str(depth))
    rows += got
    if 'error' not in got[0]:
      break
  peak = max([r['tflops'] for r in rows if r['part'] == 'peak' and 'tflops' in r] or [1])
  print(f"\nmeasured bf16 matmul peak: {peak:.1f} TFLOP/s")
  print(f"{'part':8s} {'depth':>5s} {'batch':>5s} {'step s':>7s} {'img/s':>7s} {'TFLOP/s':>8s} "
        f"{'% peak':>7s} {'peak GiB':>9s}")
  for r in rows:
    if r['part'] == 'peak':
      continue
    if 'error' in r:
      print(f"{r['part']:8s} ERROR {r['error'][-300:]}")
      continue
    print(f"{r['part']:8s} {r['depth']:5d} {r['batch']:5d} {r['seconds']:7.3f} {r['images_s']:7.2f} "
          f"{r['tflops']:8.1f} {100 * r['tflops'] / peak:6.1f}% {r['peak_gib']:9.2f}")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(peak_tflops=peak, rows=rows), f, indent=2)


if __name__ == '__main__':
  main()
