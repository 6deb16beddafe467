r"""Per-device memory plan of the seed experiments (full-size InternViT-6B), on 1 and 8 GPUs.

  python benchmarks/memory_plan.py [--experiments=linear,fewshot,head,full]
      [--layouts=1x1,8x1,2x4,1x8] [--budget_gib=75] [--no-standin] [--opt_level=0]
      [--out=benchmarks/results/memory_plan.md]

For each experiment config (224 variant: depth 48, width 3200, 504 crops, global
batch 16, bf16 compute, remat per block) and each mesh layout DATAxFSDP, builds a
`train.Trainer` on a mesh of fake CPU devices
(`--xla_force_host_platform_device_count=8`, set before jax is imported; the
1-device mesh is `devices[:1]`), takes its ABSTRACT state
(`Trainer.abstract_state()`: shapes, dtypes and shardings; the 6B parameters are
never materialized), lowers and compiles the jitted train step
(`Trainer.jit_step`, state donated) on `jax.ShapeDtypeStruct` inputs with
shardings, and reads XLA's per-device `compiled.memory_analysis()`. The state is
also sized analytically from the abstract shard shapes: trainable params
(float32), frozen params (train.frozen_dtype, bf16), AdamW mu + nu (float32,
trainable only), gradients (= trainable: float32, same sharding), and remat
residuals (one bf16 (B, T, C) block input per backbone block run, when the
backbone is trained). If the global batch does not fit on one device, smaller
power-of-two batches are compiled to find the largest that fits (gradient
accumulation is not implemented). Prints a markdown table and writes it, with
the method and caveats, to --out. About 5 minutes on 2 CPU cores; the whole
48-block model is compiled (a scan: compile time does not grow with depth).

CPU compilation is a proxy for GPU; see CAVEATS below (also in the report).
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2 ** 30

EXPERIMENTS = {  # key: (name, config)
    'linear': ('linear probing', 'configs/linear_frozen.py:224'),
    'fewshot': ('few-shot (1of1; any fraction)', 'configs/fewshot.py:1of1,224'),
    'head': ('head tuning', 'configs/upernet_frozen.py:224'),
    'full': ('full tuning', 'configs/upernet_full.py:224'),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--experiments', default=','.join(EXPERIMENTS))
  p.add_argument('--layouts', default='1x1,8x1,2x4,1x8',
                 help='mesh layouts DATAxFSDP; their product is the number of devices')
  p.add_argument('--global_batch', type=int, default=16)
  p.add_argument('--budget_gib', type=float, default=75.0,
                 help='usable memory of an 80 GB GPU (79.6 GiB) with '
                      'XLA_PYTHON_CLIENT_MEM_FRACTION=0.95, less CUDA context and workspaces')
  p.add_argument('--default_pool_gib', type=float, default=59.7,
                 help="JAX's default pool: 75%% of 79.6 GiB")
  p.add_argument('--standin', action=argparse.BooleanOptionalAction, default=True,
                 help='compile the proxy with an O(T)-memory attention stand-in')
  p.add_argument('--opt_level', type=int, default=0,
                 help='--xla_backend_optimization_level (-1: XLA default)')
  p.add_argument('--out', default=os.path.join(ROOT, 'benchmarks/results/memory_plan.md'))
  return p.parse_args(argv)


def setup_jax(opt_level: int):
  flags = os.environ.get('XLA_FLAGS', '')
  flags += ' --xla_force_host_platform_device_count=8'
  if opt_level >= 0:
    flags += f' --xla_backend_optimization_level={opt_level}'
  os.environ['XLA_FLAGS'] = flags
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
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


def flashlike_attention(q, k, v):
  """Memory stand-in for cuDNN flash attention on (B, T, N, H): touches only
  q, k, v, the output and a per-row float32 statistic. NOT attention maths."""
  import jax
  import jax.numpy as jnp
  stat = jnp.sum(q.astype(jnp.float32) * k.astype(jnp.float32), -1, keepdims=True)
  return v * jax.nn.sigmoid(stat).astype(v.dtype)


LICM_OFF = {'xla_disable_hlo_passes': 'while-loop-invariant-code-motion'}


def compile_case(config_name: str, data: int, fsdp: int, batch: int, standin: bool,
                 check_opt_level: bool = False):
  """Compiles one train step on abstract inputs; returns the analytic and
  compiled per-device sizes (bytes) and the compile time.

  temp: XLA's CPU pipeline as is; temp_licm: with while-loop-invariant code
  motion off (on CPU it hoists float32 copies of the whole stacked bf16
  weights out of the scan, because CPU dots upcast bf16; a GPU runs bf16 dots
  natively); temp_proxy: LICM off and the O(T) attention stand-in."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from internseg_jax import api, sharding, train
  from internseg_jax.models import intern_vit

  config = api.load_config(os.path.join(ROOT, config_name))
  config.train.batch_size = batch
  devices = jax.devices()[:data * fsdp]
  mesh = sharding.make_mesh(data, fsdp, devices=devices)
  t0 = time.time()
  trainer = train.Trainer(config, mesh)
  state = trainer.abstract_state()
  crop = config.data.crop_size
  batch_in = {
      'image': jax.ShapeDtypeStruct((batch, crop, crop, 3), jnp.float32,
                                    sharding=trainer.batch_sharding),
      'label': jax.ShapeDtypeStruct((batch, crop, crop), jnp.int32,
                                    sharding=sharding.batch_sharding(mesh, 3)),
  }

  def lower(attention):
    original = intern_vit.xla_attention
    intern_vit.xla_attention = attention
    try:  # a fresh Trainer: its jit traces anew with the patched attention
      t = train.Trainer(config, mesh)
      t.abstract_state()  # builds its optimizer
      return t.jit_step(state).lower(state, batch_in)
    finally:
      intern_vit.xla_attention = original

  lowered = lower(intern_vit.xla_attention)
  m = lowered.compile().memory_analysis()
  out = dict(arg=m.argument_size_in_bytes, out=m.output_size_in_bytes,
             alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes)
  out['temp_licm'] = lowered.compile(compiler_options=LICM_OFF).memory_analysis().temp_size_in_bytes
  out['temp_proxy'] = out['temp_licm']
  if standin:
    out['temp_proxy'] = lower(flashlike_attention).compile(
        compiler_options=LICM_OFF).memory_analysis().temp_size_in_bytes
  if check_opt_level:  # does --xla_backend_optimization_level change the sizes?
    out['temp_opt2'] = lowered.compile(
        compiler_options={'xla_backend_optimization_level': 2}).memory_analysis().temp_size_in_bytes
  out['seconds'] = time.time() - t0

  bb = config.model.backbone
  tokens = 1 + (crop // bb.patch_size) ** 2
  blocks_run = max(int(i) % bb.depth for i in bb.out_indices) + 1
  b_dev = batch // (data * fsdp)
  act_itemsize = np.dtype(config.model.dtype).itemsize
  residuals = 0 if bb.freeze else blocks_run * b_dev * tokens * bb.embed_dim * act_itemsize
  count = lambda t: int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(t)))
  out.update(
      trainable=per_device(state.trainable), frozen=per_device(state.frozen),
      opt=per_device(state.opt_state), batch_stats=per_device(state.batch_stats),
      inputs=per_device(batch_in), grads=per_device(state.trainable), residuals=residuals,
      n_trainable=count(state.trainable), n_frozen=count(state.frozen),
      blocks_run=blocks_run, tokens=tokens)
  out['static'] = out['trainable'] + out['frozen'] + out['opt'] + out['batch_stats']
  extra = max(out['out'] - out['alias'], 0)  # outputs not written over donated inputs
  out['peak'] = out['arg'] + out['temp'] + extra
  out['peak_proxy'] = out['arg'] + out['temp_proxy'] + extra
  return out


def gib(x) -> str:
  return f'{x / GIB:.1f}'


def fit_label(peak, budget, default_pool):
  if peak > budget:
    return 'NO'
  label = 'yes' if peak <= default_pool else 'yes, needs MEM_FRACTION'
  return label + (', tight (<10 %)' if peak > 0.9 * budget else '')


def mesh_note(key, rows, notes, budget):
  """Does the config's own mesh setting fit on 8 devices? If not, which does."""
  from internseg_jax import api
  config = api.load_config(os.path.join(ROOT, EXPERIMENTS[key][1]))
  data, fsdp = config.mesh.data, config.mesh.fsdp
  if data == -1:
    data = 8 // fsdp
  if fsdp == -1:
    fsdp = 8 // data
  eight = [r for r in rows if r['key'] == key and r['data'] * r['fsdp'] == 8]
  own = [r for r in eight if (r['data'], r['fsdp']) == (data, fsdp)]
  if not own or own[0]['peak_proxy'] <= budget:
    return
  ok = [f"mesh.data={r['data']} mesh.fsdp={r['fsdp']}: {gib(r['peak_proxy'])} GiB"
        for r in eight if r['peak_proxy'] <= budget]
  name = EXPERIMENTS[key][0]
  notes.append(f"{name}, 8 GPUs: the config's own mesh (mesh.data={config.mesh.data}, "
               f"mesh.fsdp={config.mesh.fsdp} -> {data} x {fsdp}) does NOT fit "
               f"({gib(own[0]['peak_proxy'])} GiB); use " + ('; or '.join(ok) or 'more devices')
               + '.')


def run(args):
  setup_jax(args.opt_level)
  import jax
  budget = args.budget_gib * GIB
  layouts = [tuple(int(v) for v in s.split('x')) for s in args.layouts.split(',')]
  rows, notes = [], []
  t_start = time.time()

  def case(key, data, fsdp, batch):
    name, config_name = EXPERIMENTS[key]
    check = args.opt_level == 0 and not rows
    r = compile_case(config_name, data, fsdp, batch, args.standin, check_opt_level=check)
    if check:
      same = 'identical' if r['temp_opt2'] == r['temp'] else 'DIFFERENT'
      notes.append(f'Optimization-level check ({name}, mesh {data}x{fsdp}, batch {batch}): '
                   f'temp {r["temp"]} B at level 0 vs {r["temp_opt2"]} B at level 2: {same}.')
    r.update(key=key, name=name, data=data, fsdp=fsdp, batch=batch)
    print(f'{name:30s} mesh {data}x{fsdp} batch {batch:2d}: temp CPU {gib(r["temp"])} / LICM off '
          f'{gib(r["temp_licm"])} / proxy {gib(r["temp_proxy"])} GiB, peak proxy '
          f'{gib(r["peak_proxy"])} GiB ({r["seconds"]:.0f} s)', flush=True)
    rows.append(r)
    return r

  for key in args.experiments.split(','):
    name = EXPERIMENTS[key][0]
    for data, fsdp in layouts:
      n = data * fsdp
      if args.global_batch % n:
        raise ValueError(f'global batch {args.global_batch} does not split over {n} devices')
      r = case(key, data, fsdp, args.global_batch)
      if n != 1:
        continue
      if r['peak_proxy'] <= budget:
        if r['peak_proxy'] > 0.9 * budget and args.global_batch > 1:
          half = case(key, data, fsdp, args.global_batch // 2)
          notes.append(f'{name}, 1 GPU: batch {args.global_batch} fits by the proxy '
                       f'({gib(r["peak_proxy"])} GiB) with under 10 % margin: check it on a GPU; '
                       f'batch {args.global_batch // 2} needs {gib(half["peak_proxy"])} GiB '
                       '(but train.py has no gradient accumulation to make up the batch).')
        continue
      # One device, global batch too big: the largest per-step batch that fits.
      floor = r['static'] + r['grads']
      if floor > budget:
        notes.append(f'{name}, 1 GPU: does not fit at any batch: params + AdamW state + '
                     f'gradients alone are {gib(floor)} GiB > {args.budget_gib:g} GiB.')
        continue
      best, b = None, args.global_batch // 2
      while b >= 1:
        if case(key, data, fsdp, b)['peak_proxy'] <= budget:
          best = b
          break
        b //= 2
      if best is None:
        notes.append(f'{name}, 1 GPU: does not fit even at batch 1.')
      else:
        notes.append(f'{name}, 1 GPU: global batch {args.global_batch} does not fit; the '
                     f'largest power-of-two batch per step that fits is {best}, so batch '
                     f'{args.global_batch} would need {args.global_batch // best} gradient '
                     'accumulation steps, which train.py does NOT implement (a 1-GPU run '
                     f'would have to train at batch {best}).')
    mesh_note(key, rows, notes, budget)
  total = time.time() - t_start
  return rows, notes, total, jax.__version__


def count(n: int) -> str:
  if not n:
    return '0'
  return f'{n / 1e9:.3f} B' if n >= 1e8 else f'{n / 1e6:.2f} M'


def render(args, rows, notes, total, jax_version) -> str:
  cmd = 'python benchmarks/memory_plan.py ' + ' '.join(sys.argv[1:])
  budget = args.budget_gib * GIB
  pool = args.default_pool_gib * GIB
  lines = [
      '# Memory plan: InternViT-6B seed experiments (per device)', '',
      f'Command: `{cmd.strip()}` (JAX {jax_version}, fake CPU devices, {total:.0f} s).', '',
      'Model: 224 variant (depth 48, width 3200, 25 heads), 504x504 crops (1297 tokens), '
      f'global batch {args.global_batch}, bf16 compute, remat per block (`full`), trainable '
      'params float32, frozen backbone bf16, AdamW mu+nu float32 for trainable params only. '
      'Few-shot is one row: every fraction trains the same model at the same batch.', '',
      'GiB per device. Analytic columns (trainable .. remat residuals) come from the abstract '
      'state\'s shard shapes; the others from `compiled.memory_analysis()` of the jitted, '
      'state-donating train step compiled for fake CPU devices: "args" = argument bytes '
      '(state + batch); "temp CPU" = temporaries of the CPU pipeline as is; "temp LICM off" = '
      'with while-loop-invariant code motion off; "temp proxy" = LICM off and an O(T) '
      'attention stand-in (see caveats); "act+tmp" = temp proxy - analytic grads; '
      '"peak" = args + temp proxy + non-aliased outputs. '
      f'Fits: peak <= {args.budget_gib:g} GiB usable on an 80 GB card; "needs MEM_FRACTION" '
      f'= above JAX\'s default 75 % pool ({args.default_pool_gib:g} GiB): run with '
      '`XLA_PYTHON_CLIENT_MEM_FRACTION=0.95`; "tight" = within 10 % of the budget.', '',
      '| experiment | GPUs | mesh data x fsdp | batch / device | trainable f32 | frozen bf16 '
      '| AdamW mu+nu | grads | remat residuals | args | temp CPU | temp LICM off | temp proxy '
      '| act+tmp | peak | fits |',
      '|' + '---|' * 16,
  ]
  for r in rows:
    n = r['data'] * r['fsdp']
    lines.append(
        f"| {r['name']} | {n} | {r['data']} x {r['fsdp']} | {r['batch'] // n} | "
        f"{gib(r['trainable'])} | {gib(r['frozen'])} | {gib(r['opt'])} | {gib(r['grads'])} | "
        f"{gib(r['residuals'])} | {gib(r['arg'])} | {gib(r['temp'])} | {gib(r['temp_licm'])} | "
        f"{gib(r['temp_proxy'])} | {gib(r['temp_proxy'] - r['grads'])} | "
        f"{gib(r['peak_proxy'])} | {fit_label(r['peak_proxy'], budget, pool)} |")
  lines += ['']
  if notes:
    lines += ['Notes:', ''] + [f'- {n}' for n in notes] + ['']
  counts = {}
  for r in rows:
    counts.setdefault(r['name'], (r['n_trainable'], r['n_frozen']))
  lines += ['Parameter counts: ' + '; '.join(
      f'{k}: {count(t)} trainable, {count(f)} frozen' for k, (t, f) in counts.items())
      + '.', '']
  return '\n'.join(lines)


CAVEATS = """## Method and caveats

- Method: `benchmarks/memory_plan.py` loads each config with `api.load_config`,
  builds `train.Trainer` on a (data, fsdp) mesh of fake CPU devices
  (`--xla_force_host_platform_device_count=8`; the 1-GPU mesh is `devices[:1]`),
  takes `Trainer.abstract_state()` (no arrays are created) and compiles
  `Trainer.jit_step` on `jax.ShapeDtypeStruct` inputs with shardings. The whole
  48-block model is compiled (the blocks run in `lax.scan`, so compile time does
  not grow with depth): nothing is extrapolated from fewer blocks.
- Analytic columns: params and AdamW state are the per-device shard sizes of the
  abstract state; gradients are taken equal to the trainable params (float32,
  same sharding); remat residuals are one bf16 (B, 1297, 3200) block input per
  backbone block run when the backbone is trained (a frozen backbone has no
  backward pass, so it saves nothing; its forward still needs one block's
  temporaries at a time).
- XLA's temp includes the gradients, every activation and every other
  temporary; "act+tmp" subtracts the analytic gradient size only.
- CPU temporaries are a PROXY for GPU, not a GPU measurement:
  - XLA's CPU dots upcast bf16 to float32; with loop-invariant code motion the
    converts of the whole stacked bf16 weights are hoisted out of the scan, i.e.
    float32 copies of all 48 blocks' kernels ("temp CPU"; +19 GiB for a frozen
    backbone on one device). A GPU runs bf16 dots natively, so the proxy turns
    that pass off ("temp LICM off"). Elementwise bf16 work is still upcast to
    float32 on CPU, so the proxy may still overestimate some temporaries.
  - GPU runs cuDNN flash attention. On CPU the forward attention is one fused
    kernel whose (T, T) scores do not show in buffer assignment, but the
    backward keeps float32 (B, 25, 1297, 1297) buffers. "temp proxy" swaps the
    XLA attention for a stand-in that keeps only (B, T, heads, 128)-sized tensors
    and per-row statistics (its maths is not attention; only its memory is
    meant to be flash-like). Fusion and scheduling differ on GPU too.
  - Fits with less than ~10 % margin should be checked on a GPU.
- `--xla_backend_optimization_level=0` only changes LLVM code generation: HLO
  passes and buffer assignment still run; the script checks this on its first
  case (see Notes) and it was also checked by hand on full tuning, 1 device
  (temp 156.4 GiB at both levels; compile 7 s vs 44 s).
- Gradient accumulation is not implemented in `train.py`: a run whose global
  batch does not fit must use more devices (fsdp) or a smaller global batch.
- Budget: an 80 GB card has 79.6 GiB; 75 GiB usable assumes
  `XLA_PYTHON_CLIENT_MEM_FRACTION=0.95` (JAX preallocates 75 % = 59.7 GiB by
  default) and leaves room for the CUDA context and cuDNN workspaces.
"""

OBSERVATIONS = """## Observation (measured separately, not by this script)

UperNet configs read blocks 11/23/35/47, so the backbone runs four `lax.scan`s,
each closing over the WHOLE stacked block params and dynamic-indexing them. In
the backward pass each scan accumulates its parameter gradient into its own
zero-initialised full-size (48, ...) float32 buffer, and the four are summed:
XLA's buffer assignment for full tuning (1 x 8, batch 2/device) shows about five
simultaneously live copies of each stacked kernel gradient. A hand-patched
InternViT that scans each segment over its own `lax.split` piece of the stacked
params (transpose: one concatenate) lowered the full-tuning temp from 20.4 to
14.9 GiB per device (LICM off; CPU default 21.1 -> 15.8 GiB), i.e. about 5.5 GiB
of the "act+tmp" of full tuning on 1 x 8 is this. Few-shot and linear probing
run one segment and are unaffected; head tuning has no backbone gradients.
"""


def main(argv=None):
  args = parse_args(argv)
  rows, notes, total, jax_version = run(args)
  text = render(args, rows, notes, total, jax_version) + '\n' + CAVEATS + '\n' + OBSERVATIONS
  print(text)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    f.write(text)


if __name__ == '__main__':
  main()
