r"""Per-device memory plan of the experiments (full-size InternViT-6B), on 1 and 8 GPUs.

  python benchmarks/memory_plan.py [--experiments=linear,fewshot,head,full,adapter]
      [--plan=readme,gpu] [--rows=KEY:DATAxFSDP:BATCH:ACCUMULATE,...] [--budget_gib=75]
      [--check_opt_level] [--smoke]

For each row of the plan (experiment, mesh DATAxFSDP, global batch, gradient
accumulation), builds the real `trainer.Trainer` of the experiment's config
(224 variant: depth 48, width 3200, 504 crops; the adapter: 512 crops, patch 16,
built by benchmarks/adapter_setup.py) on a mesh of fake CPU devices
(`--xla_force_host_platform_device_count=8`, set before jax is imported; a
1-device mesh is `devices[:1]`), lowers its jitted, state-donating step
(`Trainer.jit_step`) on the ABSTRACT state (`Trainer.abstract`: shapes, dtypes
and shardings; the 6B parameters are never created) and a batch of
`jax.ShapeDtypeStruct`s, compiles it for the CPU as a GPU proxy (see CAVEATS)
and reads XLA's per-device `compiled.memory_analysis()`. The state is also
sized analytically from the abstract shard shapes.

Plans: `readme` = the rows of the README table (4 layouts per experiment, the
largest 1-GPU batch when 16 does not fit, batch 16 as micro-batches on 1 GPU);
`gpu` = the 1-GPU settings that benchmarks/gpu_train.py measures (its
"predicted" column). Rows are merged into benchmarks/results/memory_plan.json
(a row computed again replaces the old one; each row records its JAX version
and date), and benchmarks/results/memory_plan.md is rendered from all rows.
A full-tuning row compiles in ~45 s on 2 busy cores; the whole plan ~25 min.
`--smoke`: the tiny configs, 2 rows, written to /tmp (checks the script).
"""
import argparse
import contextlib
import datetime
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2 ** 30
RESULTS = os.path.join(ROOT, 'benchmarks', 'results')

EXPERIMENTS = {  # key: (name, config; None = the adapter, benchmarks/adapter_setup.py)
    'linear': ('linear probing', 'configs/linear_frozen.py:224'),
    'fewshot': ('few-shot (1of1; any fraction)', 'configs/fewshot.py:1of1,224'),
    'head': ('head tuning', 'configs/upernet_frozen.py:224'),
    'full': ('full tuning', 'configs/upernet_full.py:224'),
    'adapter': ('adapter tuning', None),
}
LAYOUTS = ((1, 1), (8, 1), (2, 4), (1, 8))

# (key, data, fsdp, global batch, accumulate): rows beyond the four layouts at batch 16.
README_EXTRA = (
    ('linear', 1, 1, 8, 1),
    ('head', 1, 1, 8, 1), ('head', 1, 1, 16, 2), ('head', 1, 1, 16, 16),
    ('full', 1, 1, 16, 2), ('full', 1, 1, 16, 16), ('full', 1, 8, 16, 2),
    ('adapter', 1, 1, 8, 1), ('adapter', 1, 1, 16, 2), ('adapter', 1, 1, 16, 4),
    ('adapter', 1, 1, 16, 8), ('adapter', 1, 1, 16, 16),
)
# What benchmarks/gpu_train.py runs on one card (keep in step with its ROWS).
GPU_ROWS = (
    ('full', 1, 1, 2, 1), ('full', 1, 1, 4, 1), ('full', 1, 1, 8, 1), ('full', 1, 1, 16, 2),
    ('head', 1, 1, 8, 1), ('head', 1, 1, 16, 1), ('linear', 1, 1, 8, 1), ('linear', 1, 1, 16, 1),
    ('adapter', 1, 1, 8, 1),
)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--experiments', default=','.join(EXPERIMENTS))
  p.add_argument('--plan', default='readme,gpu', help='readme, gpu or both')
  p.add_argument('--rows', default='',
                 help='instead of the plan: KEY:DATAxFSDP:BATCH:ACCUMULATE,... '
                      '(e.g. adapter:1x1:16:4) to (re)compute only these rows')
  p.add_argument('--global_batch', type=int, default=16)
  p.add_argument('--budget_gib', type=float, default=75.0,
                 help='usable memory of an 80 GB GPU (79.6 GiB) with '
                      'XLA_PYTHON_CLIENT_MEM_FRACTION=0.95, less CUDA context and workspaces')
  p.add_argument('--default_pool_gib', type=float, default=59.7,
                 help="JAX's default pool: 75%% of 79.6 GiB")
  p.add_argument('--standin', action=argparse.BooleanOptionalAction, default=True,
                 help='compile with an O(T)-memory attention stand-in (the proxy)')
  p.add_argument('--check_opt_level', action='store_true',
                 help='also compile the first row at --xla_backend_optimization_level=2')
  p.add_argument('--smoke', action='store_true', help='tiny configs, 2 rows, output to /tmp')
  p.add_argument('--results', default=RESULTS)
  return p.parse_args(argv)


def setup_jax():
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8'
                             ' --xla_backend_optimization_level=0')
  os.environ['JAX_PLATFORMS'] = 'cpu'
  sys.path.insert(0, ROOT)


def per_device(tree) -> int:
  """Bytes of one device's shards of a tree of ShapeDtypeStructs with shardings."""
  import jax
  import numpy as np
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total


def flashlike_attention(q, k, v, valid_keys: int = 0):
  """Memory stand-in for cuDNN flash attention on (B, T, N, H): touches only
  q, k, v, the output and a per-row float32 statistic. NOT attention maths."""
  import jax
  import jax.numpy as jnp
  del valid_keys
  stat = jnp.sum(q.astype(jnp.float32) * k.astype(jnp.float32), -1, keepdims=True)
  return v * jax.nn.sigmoid(stat).astype(v.dtype)


# On CPU, while-loop-invariant code motion hoists float32 copies of the whole
# stacked bf16 weights out of the scan (CPU dots upcast bf16); a GPU runs bf16
# dots natively, so the proxy turns that pass off.
LICM_OFF = {'xla_disable_hlo_passes': 'while-loop-invariant-code-motion'}


def load_experiment(key: str, smoke: bool = False):
  from internseg_jax import api
  from benchmarks import adapter_setup
  name, spec = EXPERIMENTS[key]
  if spec is None:
    config = adapter_setup.adapter_config(tiny=smoke)
    return config, adapter_setup.install(config)
  spec = spec.replace(':224', ':224,tiny').replace(',224', ',224,tiny') if smoke else spec
  return api.load_config(os.path.join(ROOT, spec)), contextlib.nullcontext()


def compile_case(key: str, data: int, fsdp: int, batch: int, accumulate: int, standin: bool,
                 smoke: bool = False, opt_level_check: bool = False) -> dict:
  """Compiles one train step on abstract inputs; returns analytic and compiled
  per-device sizes (bytes) and the compile time."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from internseg_jax import sharding
  from internseg_jax.models import intern_vit
  from internseg_jax.trainer import Trainer

  config, context = load_experiment(key, smoke)
  config.train.batch_size, config.train.accumulate = batch, accumulate
  mesh = sharding.make_mesh(data, fsdp, devices=jax.devices()[:data * fsdp])
  crop = config.data.crop_size
  t0 = time.time()
  with context:
    trainer = Trainer(config, mesh)
    state = trainer.abstract
    batch_in = {
        'image': jax.ShapeDtypeStruct((batch, crop, crop, 3), jnp.float32,
                                      sharding=sharding.batch_sharding(mesh)),
        'label': jax.ShapeDtypeStruct((batch, crop, crop), jnp.int32,
                                      sharding=sharding.batch_sharding(mesh, 3))}
    original = intern_vit.xla_attention
    if standin:  # traced when lowered: the blocks call the module-level name
      intern_vit.xla_attention = flashlike_attention
    try:
      lowered = trainer.jit_step().lower(state, batch_in)
    finally:
      intern_vit.xla_attention = original
  m = lowered.compile(compiler_options=LICM_OFF).memory_analysis()
  out = dict(arg=m.argument_size_in_bytes, out=m.output_size_in_bytes,
             alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes)
  if opt_level_check:  # does the backend optimization level change the sizes?
    out['temp_opt2'] = lowered.compile(compiler_options={
        **LICM_OFF, 'xla_backend_optimization_level': 2}).memory_analysis().temp_size_in_bytes
  out['seconds'] = time.time() - t0

  bb = config.model.backbone
  adapter = EXPERIMENTS[key][1] is None
  tokens = (crop // 16) ** 2 if adapter else 1 + (crop // bb.patch_size) ** 2
  blocks_run = bb.depth if adapter else max(int(i) % bb.depth for i in bb.out_indices) + 1
  n = data * fsdp
  micro = batch // accumulate // n
  # Differentiated blocks (trained, or the adapter's frozen ViT that gradients
  # pass through) keep one block input each for the backward pass.
  differentiated = adapter or not bb.freeze
  residuals = (blocks_run * micro * tokens * bb.embed_dim * np.dtype(config.model.dtype).itemsize
               if differentiated else 0)
  count = lambda t: int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(t)))
  out.update(
      trainable=per_device(state.trainable), frozen=per_device(state.frozen),
      opt=per_device(state.opt_state), batch_stats=per_device(state.batch_stats),
      grads=per_device(state.trainable) * (2 if accumulate > 1 else 1), residuals=residuals,
      n_trainable=count(state.trainable), n_frozen=count(state.frozen), tokens=tokens)
  out['static'] = out['trainable'] + out['frozen'] + out['opt'] + out['batch_stats']
  out['peak'] = out['arg'] + out['temp'] + max(out['out'] - out['alias'], 0)
  return out


def gib(x) -> str:
  return f'{x / GIB:.1f}'


def fit_label(peak, budget, default_pool):
  if peak > budget:
    return 'NO'
  label = 'yes' if peak <= default_pool else 'yes, needs MEM_FRACTION'
  return label + (', tight (<10 %)' if peak > 0.9 * budget else '')


def row_key(r) -> str:
  return f"{r['key']} {r['data']}x{r['fsdp']} b{r['batch']} a{r['accumulate']}"


def plan_rows(args) -> list:
  keys = args.experiments.split(',')
  if args.smoke:
    return [(keys[0], 1, 1, 4, 1), (keys[0], 1, 1, 4, 2)]
  if args.rows:
    rows = []
    for item in args.rows.split(','):
      key, mesh, batch, accumulate = item.split(':')
      data, fsdp = mesh.split('x')
      rows.append((key, int(data), int(fsdp), int(batch), int(accumulate)))
    return rows
  plans = args.plan.split(',')
  rows = []
  if 'readme' in plans:
    rows += [(k, d, f, args.global_batch, 1) for k in keys for d, f in LAYOUTS]
    rows += [r for r in README_EXTRA if r[0] in keys]
  if 'gpu' in plans:
    rows += [r for r in GPU_ROWS if r[0] in keys]
  return list(dict.fromkeys(rows))  # in order, without repeats


def run(args, store: dict) -> None:
  setup_jax()
  import jax
  for i, (key, data, fsdp, batch, accumulate) in enumerate(plan_rows(args)):
    check = args.check_opt_level and i == 0
    r = compile_case(key, data, fsdp, batch, accumulate, args.standin, args.smoke, check)
    r.update(key=key, name=EXPERIMENTS[key][0], data=data, fsdp=fsdp, batch=batch,
             accumulate=accumulate, jax=jax.__version__, standin=args.standin,
             date=datetime.date.today().isoformat())
    if check:
      store['opt_level_check'] = (
          f"{r['name']}, mesh {data}x{fsdp}, batch {batch}: temp {r['temp']} B at backend "
          f"optimization level 0 vs {r['temp_opt2']} B at level 2: "
          f"{'identical' if r['temp_opt2'] == r['temp'] else 'DIFFERENT'} (JAX {jax.__version__}).")
    print(f"{r['name']:30s} mesh {data}x{fsdp} batch {batch:2d} accumulate {accumulate:2d}: "
          f"temp {gib(r['temp'])} GiB, peak {gib(r['peak'])} GiB ({r['seconds']:.0f} s)",
          flush=True)
    store['rows'][row_key(r)] = r
    save_store(args, store)  # after every row: an interrupted run keeps what it did


def load_store(args) -> dict:
  path = os.path.join(args.results, 'memory_plan.json')
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return {'rows': {}}


def save_store(args, store) -> None:
  from internseg_jax import files
  os.makedirs(args.results, exist_ok=True)
  files.atomic_write(os.path.join(args.results, 'memory_plan.json'),
                     json.dumps(store, indent=1, sort_keys=True))


def notes_for(rows, budget, args) -> list:
  """What the rows say about fitting on 1 GPU and on the configs' own 8-GPU meshes."""
  notes = []
  for key, (name, _) in EXPERIMENTS.items():
    one = {(r['batch'], r['accumulate']): r for r in rows
           if r['key'] == key and r['data'] * r['fsdp'] == 1}
    full = one.get((args.global_batch, 1))
    if full is None:
      continue
    if full['peak'] <= budget:
      tight = ' with under 10 % margin: check it on a GPU' if full['peak'] > 0.9 * budget else ''
      notes.append(f"{name}, 1 GPU: batch {args.global_batch} at once fits ({gib(full['peak'])} "
                   f"GiB){tight}.")
    elif full['static'] + full['trainable'] > budget:
      notes.append(f"{name}, 1 GPU: does not fit at any batch: params + AdamW state + gradients "
                   f"alone are {gib(full['static'] + full['trainable'])} GiB > "
                   f"{args.budget_gib:g} GiB.")
      continue
    else:
      notes.append(f"{name}, 1 GPU: batch {args.global_batch} at once does not fit "
                   f"({gib(full['peak'])} GiB).")
    accumulated = sorted((k, r) for (b, k), r in one.items() if b == args.global_batch and k > 1)
    for k, r in accumulated:
      notes.append(f"{name}, 1 GPU: batch {args.global_batch} as {k} micro-batches of "
                   f"{args.global_batch // k} (`train.accumulate={k}`): {gib(r['peak'])} GiB "
                   f"({gib(full['peak'] - r['peak'])} GiB less than at once; the float32 "
                   f"gradient sum costs {gib(r['trainable'])} GiB).")
  return notes


def render(args, store) -> str:
  budget = args.budget_gib * GIB
  pool = args.default_pool_gib * GIB
  order = {k: i for i, k in enumerate(EXPERIMENTS)}
  rows = sorted(store['rows'].values(), key=lambda r: (
      order[r['key']], r['data'] * r['fsdp'], -r['data'], -r['batch'] // r['accumulate'],
      r['accumulate']))
  versions = sorted({r['jax'] for r in rows})
  lines = [
      '# Memory plan: InternViT-6B experiments (per device)', '',
      '`python benchmarks/memory_plan.py` (fake CPU devices; JAX '
      f"{', '.join(versions)}; each row's date in memory_plan.json).", '',
      'Models: 224 variant (depth 48, width 3200, 25 heads), 504x504 crops (1297 tokens); '
      'the adapter: 512x512 crops, patch 16 (1024 tokens), frozen ViT. bf16 compute, remat per '
      'block (`full`), trainable params float32, frozen ViT bf16, AdamW mu+nu float32 for '
      'trainable params only. Few-shot is one row: every fraction trains the same model.', '',
      'GiB per device. "batch" = global batch; "micro" = micro-batches x per-device micro-batch '
      '(`train.accumulate`; 1 x b = the whole batch at once). Analytic columns (trainable .. '
      'remat residuals) come from the abstract state\'s shard shapes ("grads" counts the float32 '
      'gradient sum twice when accumulating: the sum and one micro-batch\'s gradients); the '
      'others from `compiled.memory_analysis()` of the jitted, state-donating train step '
      'compiled for fake CPU devices with while-loop-invariant code motion off and an O(T) '
      'attention stand-in (see caveats): "args" = argument bytes (state + batch); "temp" = '
      'temporaries; "peak" = args + temp + non-aliased outputs. '
      f'Fits: peak <= {args.budget_gib:g} GiB usable on an 80 GB card; "needs MEM_FRACTION" = '
      f'above JAX\'s default 75 % pool ({args.default_pool_gib:g} GiB): run with '
      '`XLA_PYTHON_CLIENT_MEM_FRACTION=0.95`; "tight" = within 10 % of the budget.', '',
      '| experiment | GPUs | mesh data x fsdp | batch | micro | trainable f32 | frozen bf16 '
      '| AdamW mu+nu | grads | remat residuals | args | temp | peak | fits |',
      '|' + '---|' * 14,
  ]
  for r in rows:
    n = r['data'] * r['fsdp']
    micro = f"{r['accumulate']} x {r['batch'] // r['accumulate'] // n}"
    lines.append(
        f"| {r['name']} | {n} | {r['data']} x {r['fsdp']} | {r['batch']} | {micro} | "
        f"{gib(r['trainable'])} | {gib(r['frozen'])} | {gib(r['opt'])} | {gib(r['grads'])} | "
        f"{gib(r['residuals'])} | {gib(r['arg'])} | {gib(r['temp'])} | {gib(r['peak'])} | "
        f"{fit_label(r['peak'], budget, pool)} |")
  notes = notes_for(rows, budget, args)
  if 'opt_level_check' in store:
    notes.append('Optimization-level check: ' + store['opt_level_check'])
  lines += ['', 'Notes:', ''] + [f'- {n}' for n in notes] + ['']
  counts = {}
  for r in rows:
    counts.setdefault(r['name'], (r['n_trainable'], r['n_frozen']))
  count = lambda n: '0' if not n else (f'{n / 1e9:.3f} B' if n >= 1e8 else f'{n / 1e6:.2f} M')
  lines += ['Parameter counts: ' + '; '.join(
      f'{k}: {count(t)} trainable, {count(f)} frozen' for k, (t, f) in counts.items()) + '.', '']
  return '\n'.join(lines) + '\n' + CAVEATS


CAVEATS = """## Method and caveats

- Method: `benchmarks/memory_plan.py` loads each config (the adapter from
  `benchmarks/adapter_setup.py`), builds `trainer.Trainer` on a (data, fsdp)
  mesh of fake CPU devices (`--xla_force_host_platform_device_count=8`; one
  device is `devices[:1]`) and compiles `Trainer.jit_step()` on
  `Trainer.abstract` and a `jax.ShapeDtypeStruct` batch: no arrays are created.
  The whole 48-block model is compiled (`lax.scan` over the blocks):
  nothing is extrapolated from fewer blocks.
- Analytic columns: params and AdamW state are the per-device shard sizes of the
  abstract state; gradients are taken equal to the trainable params (float32,
  same sharding; twice that with accumulation); remat residuals are one bf16
  (B, T, 3200) block input per differentiated block (the adapter's frozen ViT is
  differentiated with respect to its inputs: the injectors before it train).
- XLA's temp includes the gradients, every activation and every other temporary.
- CPU temporaries are a PROXY for GPU, not a GPU measurement:
  - XLA's CPU dots upcast bf16 to float32; with loop-invariant code motion the
    converts of the whole stacked bf16 weights are hoisted out of the scan
    (float32 copies of all 48 blocks' kernels: +19 GiB for a frozen backbone on
    one device, measured before). A GPU runs bf16 dots natively, so the proxy
    turns that pass off. Elementwise bf16 work is still upcast on CPU, so the
    proxy may overestimate some temporaries.
  - GPU runs cuDNN flash attention. On CPU the backward of the XLA attention
    keeps float32 (B, 25, T, T) buffers; the proxy swaps the attention for a
    stand-in that keeps only (B, T, heads, 128)-sized tensors and per-row
    statistics (its maths is not attention; only its memory is flash-like).
    Fusion and scheduling differ on GPU too.
  - benchmarks/gpu_train.py prints this plan's peak next to the measured one
    for each setting it runs (the `gpu` plan).
  - Fits with less than ~10 % margin should be checked on a GPU.
- `--xla_backend_optimization_level=0` only changes LLVM code generation (HLO
  passes and buffer assignment still run); `--check_opt_level` compares level 2
  on the first row (see Notes).
- Gradient accumulation (`train.accumulate`): the step scans over the
  micro-batches, so activations are those of one micro-batch, plus a float32
  gradient sum the size of the trainable parameters.
- Trained backbones with UperNet run ONE scan over the blocks that emits every
  block's output (`InternViT.trained_blocks`): the backward pass holds one
  gradient buffer for the stacked weights and no copies of per-output slices.
- Budget: an 80 GB card has 79.6 GiB; 75 GiB usable assumes
  `XLA_PYTHON_CLIENT_MEM_FRACTION=0.95` (JAX preallocates 75 % = 59.7 GiB by
  default) and leaves room for the CUDA context and cuDNN workspaces.
"""


def main(argv=None):
  args = parse_args(argv)
  if args.smoke:
    args.results = os.path.join('/tmp', 'memory_plan_smoke')
  store = load_store(args)
  start = time.time()
  run(args, store)
  text = render(args, store)
  print(text)
  from internseg_jax import files
  files.atomic_write(os.path.join(args.results, 'memory_plan.md'), text)
  print(f'{time.time() - start:.0f} s')


if __name__ == '__main__':
  main()
