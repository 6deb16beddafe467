r"""GPU: training-step speed and memory of the full-size experiments on one card.

  python benchmarks/gpu_train.py [--groups full,head,adapter,linear] [--steps 5]
      [--deadline 420] [--out benchmarks/results]       # ~6-7 min on one H200
  python benchmarks/gpu_train.py --smoke                # tiny models on CPU (checks the script)

The real `trainer.Trainer` and configs (configs/upernet_full.py,
upernet_frozen.py, linear_frozen.py; the adapter from benchmarks/adapter_setup.py),
full size (48 blocks, width 3200; 504 crops, the adapter 512), random init,
random batches, bf16 compute, per-block remat, a 1-device mesh:
  full     full tuning, UperNet + aux: batch 2, batch 8 (4 if 8 is out of
           memory: the largest that fits), and 16 by accumulation
           (`train.accumulate`) of the largest micro-batch that fit; if even
           batch 2 is out of memory (the memory plan predicts 163 GiB), the
           same step with 24 of the 48 blocks at batch 2 and 8, labelled so
  head     head tuning (frozen backbone, UperNet + aux): batch 8, 16
  adapter  adapter tuning: batch 8, and again with the deformable attention's
           sampling core replaced by a cheap stand-in of the same shapes (the
           difference is its share of the step)
  linear   linear probing: batch 8, 16
For each: compile time, median step time over --steps steps after one warm-up
step, images/s, model TFLOP/s (benchmarks/flops.py: backbone x3 trained, x1
frozen, x2 for the adapter's frozen ViT; neck, heads, aux and adapter layers
x3), % of the bf16 matmul peak measured at the start (8192^3, JAX), the peak GPU
memory (`memory_stats()['peak_bytes_in_use']`), XLA's own GPU estimate
(`memory_analysis()`: arguments + temporaries) and the memory plan's prediction
for the same setting (benchmarks/results/memory_plan.json, `gpu` plan).

Each group runs in its own process, its settings in rising order of memory so
the process's peak after each setting is that setting's peak; an out-of-memory
setting ends its group and is reported, the rest of the run goes on. Groups
that would start after --deadline seconds are skipped (and listed). Prints one
table and writes gpu_train.json to --out.
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
os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.95')

CONFIGS = {'full': 'configs/upernet_full.py', 'head': 'configs/upernet_frozen.py',
           'linear': 'configs/linear_frozen.py', 'adapter': None}
NAMES = {'full': 'full tuning', 'head': 'head tuning', 'linear': 'linear probing',
         'adapter': 'adapter tuning'}
# group -> [(global batch, accumulate)], rising memory. Keep in step with memory_plan.GPU_ROWS.
GROUPS = {'full': [(2, 1), (8, 1), (16, 2)], 'head': [(8, 1), (16, 1)],
          'adapter': [(8, 1)], 'linear': [(8, 1), (16, 1)]}
FALLBACK = {'full': [(4, 1), (16, 4)]}   # when batch 2 fits and a larger setting does not
# When even the first setting does not fit: the same step with fewer blocks
# (batch, accumulate, depth), reported as such, so the trained path is measured.
SHALLOW = {'full': [(2, 1, 24), (8, 1, 24)]}
SMOKE_GROUPS = {'full': [(2, 1), (4, 2)], 'head': [(2, 1), (4, 1)], 'adapter': [(2, 1)],
                'linear': [(2, 1)]}
TARGETS = {'full': 45.0, 'head': 60.0, 'linear': 70.0}   # % of the measured bf16 peak
GROUP_SECONDS = {'full': 240, 'head': 120, 'adapter': 200, 'linear': 90}  # child time limits
GIB = 2 ** 30


def is_oom(error: Exception) -> bool:
  text = str(error)
  return 'RESOURCE_EXHAUSTED' in text or 'Out of memory' in text or 'out of memory' in text


def first_line(error: Exception) -> str:
  return ((str(error) or repr(error)).strip().splitlines() or [repr(error)])[0][:300]


def versions() -> dict:
  import jax
  import jaxlib
  import jax.extend.backend
  device = jax.devices()[0]
  out = dict(jax=jax.__version__, jaxlib=jaxlib.__version__, backend=jax.default_backend(),
             device=device.device_kind, devices=jax.device_count())
  try:
    out['platform_version'] = jax.extend.backend.get_backend().platform_version
  except Exception as e:  # informational only
    out['platform_version'] = f'unknown ({e})'
  return out


def matmul_peak(n: int, iters: int = 20) -> float:
  """bf16 n x n x n matmul rate in TFLOP/s (median of `iters` timed calls)."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  mm = jax.jit(lambda a, b: a @ b)
  mm(a, b).block_until_ready()
  mm(a, b).block_until_ready()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    mm(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * n ** 3 / sorted(times)[len(times) // 2] / 1e12


def load(group: str, smoke: bool):
  """(config, a function returning a context in which the project builds this
  group's model)."""
  import contextlib
  from internseg_jax import api
  from benchmarks import adapter_setup
  if CONFIGS[group] is None:
    config = adapter_setup.adapter_config(tiny=smoke)
    return config, lambda: adapter_setup.install(config)
  config = api.load_config(CONFIGS[group] + (':tiny' if smoke else ''))
  return config, contextlib.nullcontext


def cheap_deform_core(value, spatial_shapes, sampling_locations, attention_weights):
  """Stand-in for deform_attn.ms_deform_attn_core with the same inputs and
  output shape (and gradients into all of them), at the cost of a mean: what
  the step loses with it is the sampling core's time."""
  import jax.numpy as jnp
  del spatial_shapes
  b, _, m, d = value.shape
  lq = sampling_locations.shape[1]
  mix = attention_weights.sum((-2, -1)) + 1e-3 * sampling_locations.sum((-3, -2, -1))
  out = mix[..., None].astype(value.dtype) * value.mean(1)[:, None]
  return out.reshape(b, lq, m * d)


def random_batch(mesh, batch: int, crop: int, seed: int = 0):
  import jax
  import numpy as np
  from internseg_jax import sharding
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(batch, crop, crop, 3)).astype(np.float32)
  label = rng.integers(0, 150, size=(batch, crop, crop)).astype(np.int32)
  return {'image': jax.device_put(image, sharding.batch_sharding(mesh)),
          'label': jax.device_put(label, sharding.batch_sharding(mesh, 3))}


def time_steps(step, state, batch, steps: int):
  """One warm-up step, then `steps` timed ones; (state, median seconds, loss)."""
  import jax
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics['loss'])
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics['loss'])
    times.append(time.perf_counter() - start)
  return state, sorted(times)[len(times) // 2], float(metrics['loss'])


def run_group(group: str, settings, smoke: bool, steps: int, emit=lambda row: None) -> list:
  """One process: the group's settings in order, sharing one train state;
  `emit(row)` after each setting (so a killed process still reports them)."""
  import jax
  from benchmarks import flops
  from internseg_jax import sharding
  from internseg_jax.models import deform_attn
  from internseg_jax.trainer import Trainer
  device = jax.devices()[0]
  mesh = sharding.make_mesh(1, 1, devices=[device])
  rows, state = [], None
  for batch, accumulate, *depth in settings:
    config, context = load(group, smoke)
    config.train.batch_size, config.train.accumulate = batch, accumulate
    row = dict(group=group, name=NAMES[group], batch=batch, accumulate=accumulate)
    bb = config.model.backbone
    if depth and depth[0] != bb.depth:  # fewer blocks, outputs at the same relative places
      d = bb.depth = depth[0]
      bb.out_indices = [d // 4 - 1, d // 2 - 1, 3 * d // 4 - 1, d - 1]
      row.update(depth=d, name=f'{NAMES[group]} ({d} of 48 blocks)')
    rows.append(row)
    try:
      with context():
        trainer = Trainer(config, mesh)
        if state is None:
          start = time.perf_counter()
          state = trainer.initial_state()
          jax.block_until_ready(state)
          row['init_s'] = time.perf_counter() - start
        data = random_batch(mesh, batch, config.data.crop_size)
        start = time.perf_counter()
        compiled = trainer.jit_step().lower(state, data).compile()
        row['compile_s'] = time.perf_counter() - start
        analysis = compiled.memory_analysis()
        if analysis is not None:
          row['xla_gib'] = (analysis.argument_size_in_bytes + analysis.temp_size_in_bytes) / GIB
        state, row['step_s'], row['loss'] = time_steps(compiled, state, data, steps)
      stats = device.memory_stats() or {}
      row['peak_gib'] = stats.get('peak_bytes_in_use', 0) / GIB
      row['limit_gib'] = stats.get('bytes_limit', 0) / GIB
    except Exception as e:  # out of memory ends the group; anything else is reported too
      row['error'] = ('out of memory: ' if is_oom(e) else '') + first_line(e)
      emit(row)
      break
    count = flops.train_flops(config, adapter=trainer.module.backbone if group == 'adapter'
                              else None)
    row.update(images_s=batch / row['step_s'], step_tflop=count['total'] * batch / 1e12,
               backbone_passes=count['backbone_passes'])
    row['tflops'] = row['step_tflop'] / row['step_s']
    if group == 'adapter':  # the same step with the deformable sampling core stubbed out
      original = deform_attn.ms_deform_attn_core
      deform_attn.ms_deform_attn_core = cheap_deform_core
      try:
        with context():
          stub = Trainer(config, mesh).jit_step().lower(state, data).compile()
          state, row['stub_step_s'], _ = time_steps(stub, state, data, steps)
        row['deform_share'] = 1.0 - row['stub_step_s'] / row['step_s']
      except Exception as e:
        row['stub_error'] = first_line(e)
      finally:
        deform_attn.ms_deform_attn_core = original
    emit(row)
  return rows


ROW = 'ROW '  # the prefix of a group's per-setting result lines


def child(args, part: str, payload, timeout: float):
  """Runs `--part part` in a fresh process. 'info': its JSON dict or {'error'};
  'group': its rows, each setting that did not report (timed out, crashed)
  as an error row."""
  cmd = [sys.executable, os.path.abspath(__file__), '--part', part, '--payload',
         json.dumps(payload), '--steps', str(args.steps)] + (['--smoke'] if args.smoke else [])
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1))
    stdout, error = proc.stdout, (None if proc.returncode == 0 else
                                  f'exit {proc.returncode}: ' + proc.stderr.strip()[-600:])
  except subprocess.TimeoutExpired as e:
    stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or '')
    error = f'timed out after {timeout:.0f} s'
  lines = stdout.strip().splitlines()
  if part == 'info':
    return json.loads(lines[-1]) if lines and not error else dict(error=error or 'no output')
  group, settings = payload
  rows = [json.loads(line[len(ROW):]) for line in lines if line.startswith(ROW)]
  if len(rows) < len(settings) and not (rows and 'error' in rows[-1]):
    batch, accumulate, *_ = settings[len(rows)]
    rows.append(dict(group=group, name=NAMES[group], batch=batch, accumulate=accumulate,
                     error=error or 'no result'))
  return rows


def plan_predictions(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f).get('rows', {})


def render(info, rows, skipped, plan) -> str:
  peak = info.get('peak_tflops') or float('nan')
  limit = max([r.get('limit_gib', 0) for r in rows] or [0])
  lines = [f"jax {info.get('jax')}, jaxlib {info.get('jaxlib')}, {info.get('device')} "
           f"({info.get('backend')}, {info.get('platform_version')}); measured bf16 matmul "
           f"peak {peak:.1f} TFLOP/s; JAX's memory limit {limit:.1f} GiB", '',
           '| run | batch | micro | compile s | step s | images/s | model TFLOP/s | % of peak '
           '| peak memory GiB | XLA estimate GiB | plan GiB | plan vs measured |',
           '|' + '---|' * 12]
  for r in rows:
    micro = f"{r['accumulate']} x {r['batch'] // r['accumulate']}"
    head = f"| {r['name']} | {r['batch']} | {micro} |"
    predicted = None if 'depth' in r else plan.get(
        f"{r['group']} 1x1 b{r['batch']} a{r['accumulate']}")
    plan_gib = predicted['peak'] / GIB if predicted else None
    if 'error' in r:
      xla = f"{r['xla_gib']:.1f}" if 'xla_gib' in r else '—'
      lines.append(f"{head} {r['error'][:160]} |" + ' |' * 5 +
                   f" {xla} | {f'{plan_gib:.1f}' if plan_gib else '—'} | |")
      continue
    diff = (f'{100 * (plan_gib - r["peak_gib"]) / r["peak_gib"]:+.0f} %'
            if plan_gib and r.get('peak_gib') else '—')
    lines.append(
        f"{head} {r['compile_s']:.0f} | {r['step_s']:.3f} | {r['images_s']:.1f} | "
        f"{r['tflops']:.0f} | {100 * r['tflops'] / peak:.1f} % | {r.get('peak_gib', 0):.1f} | "
        f"{r.get('xla_gib', float('nan')):.1f} | "
        f"{f'{plan_gib:.1f}' if plan_gib else '—'} | {diff} |")
  lines.append('')
  for r in rows:
    if 'deform_share' in r:
      lines.append(f"{r['name']} batch {r['batch']}: deformable sampling core "
                   f"{100 * r['deform_share']:.0f} % of the step ({r['step_s']:.3f} s; "
                   f"{r['stub_step_s']:.3f} s with the stand-in)")
  by = {(r['group'], r['batch'], r['accumulate']): r for r in rows if 'error' not in r}
  if ('adapter', 8, 1) in by and ('head', 8, 1) in by:
    ratio = by[('adapter', 8, 1)]['images_s'] / by[('head', 8, 1)]['images_s']
    lines.append(f'adapter / head tuning images/s at batch 8: {ratio:.2f} (target >= 0.8)')
  for group, target in TARGETS.items():
    got = [100 * r['tflops'] / peak for k, r in by.items() if k[0] == group]
    if got:
      lines.append(f'{NAMES[group]}: best {max(got):.1f} % of peak (target >= {target:.0f} %)')
  compared = [(r, plan[k]['peak'] / GIB) for r in rows if 'error' not in r and r.get('peak_gib')
              and 'depth' not in r
              and (k := f"{r['group']} 1x1 b{r['batch']} a{r['accumulate']}") in plan]
  if compared:
    close = sum(abs(p - r['peak_gib']) <= 0.15 * r['peak_gib'] for r, p in compared)
    lines.append(f'memory plan within 15 % of the measured peak: {close} of {len(compared)} '
                 'settings (target: all)')
  if skipped:
    lines.append('skipped (deadline): ' + ', '.join(skipped))
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--groups', default='full,head,adapter,linear')
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--deadline', type=float, default=420.0,
                      help='seconds after which no further group is started')
  parser.add_argument('--smoke', action='store_true')
  parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results'))
  parser.add_argument('--plan', default=os.path.join(ROOT, 'benchmarks', 'results',
                                                     'memory_plan.json'))
  parser.add_argument('--part', choices=['info', 'group'], help=argparse.SUPPRESS)
  parser.add_argument('--payload', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.smoke:
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
    args.steps = min(args.steps, 2)
    args.deadline = max(args.deadline, 3600.0)  # CPU compiles of the tiny models are slow
  if args.part == 'info':
    info = versions()
    if info['backend'] != 'gpu' and not args.smoke:
      print(json.dumps(dict(info, error='jax sees no GPU')))
      return
    info['peak_tflops'] = matmul_peak(512 if args.smoke else 8192)
    print(json.dumps(info))
    return
  if args.part == 'group':
    group, settings = json.loads(args.payload)
    run_group(group, [tuple(s) for s in settings], args.smoke, args.steps,
              emit=lambda row: print(ROW + json.dumps(row), flush=True))
    return

  start = time.time()
  info = child(args, 'info', None, 120)
  print(json.dumps(info), flush=True)
  if 'error' in info:
    sys.exit(f"gpu_train: {info['error']}: run on a machine where jax sees a GPU "
             "(pip install -r requirements-gpu.txt), or pass --smoke")
  groups = SMOKE_GROUPS if args.smoke else GROUPS
  rows, skipped = [], []
  for group in args.groups.split(','):
    oom = []  # of the main settings
    for i, settings in enumerate([groups[group], FALLBACK.get(group), SHALLOW.get(group)]):
      if i == 1 and not (any(oom) and not oom[0]):
        continue  # FALLBACK: only when the first setting ran and a larger one did not fit
      if i == 2 and not (oom and oom[0]):
        continue  # SHALLOW: only when the first setting did not fit
      if not settings or (i and args.smoke):
        continue
      left = args.deadline - (time.time() - start)
      if left < 30:
        skipped.append(f'{group} {settings}')
        continue
      got = child(args, 'group', [group, settings], min(GROUP_SECONDS[group] * (
          6 if args.smoke else 1), left + 60))
      rows += got
      if i == 0:
        oom = [('out of memory' in r.get('error', '')) for r in got]
      print(json.dumps(got), flush=True)
  text = render(info, rows, skipped, {} if args.smoke else plan_predictions(args.plan))
  print('\n' + text + f'\n\ntotal {time.time() - start:.0f} s')
  if not args.smoke:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'gpu_train.json'), 'w') as f:
      json.dump(dict(info=info, rows=rows, skipped=skipped), f, indent=1)
    with open(os.path.join(args.out, 'gpu_train.md'), 'w') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  main()
