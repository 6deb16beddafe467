r"""GPU: full InternViT-6B forward, JAX vs the PyTorch reference, and the
segmentors' inference forward (head tuning, the adapter), on one card.

  python benchmarks/gpu_forward.py [--parts peak,parity,jax,torch,head,adapter]
      [--json FILE]                              # ~5 min on one H100/H200
  python benchmarks/gpu_forward.py --smoke       # tiny sizes, any device (checks the script)

Random init, bf16 compute, batch 8. Each part runs in its own process so peak
GPU memory is measured cleanly:
  peak     measured bf16 matmul rate (8192^3) in JAX and PyTorch; the max is the peak
  jax      InternViT alone (48 blocks, 504 px, out_indices [47], bf16 weights),
           cuDNN attention and XLA attention
  torch    the reference (tests/reference) with SDPA attention, eager
  parity   full width, 4 blocks, shared weights: JAX vs PyTorch outputs on the GPU
  head     head tuning's segmentor (frozen ViT + neck + UperNet), 504 px,
           `Segmentor.logits` as evaluation runs it (logits upsampled to the input)
  adapter  the adapter's segmentor (InternViTAdapter, 48 blocks, + UperNet),
           512 px, the same way; again with the deformable attention's sampling
           core replaced by a cheap stand-in of the same shapes: the difference
           is its share of the forward. Target: >= 0.8x head tuning's images/s.
Model TFLOP/s count the matmuls and convolutions (benchmarks/flops.py).
Prints a table; `--json FILE` also writes the rows.
"""
import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

FULL = dict(width=3200, depth=48, heads=25, size=504, batch=8, pretrain=224, iters=10)
SMOKE = dict(width=128, depth=4, heads=2, size=56, batch=2, pretrain=28, iters=2)


def forward_flops(width, depth, size, patch=14, mlp_ratio=4, **_):
  """Matmul FLOPs of one image (internseg_jax.models.intern_vit.forward_flops)."""
  from internseg_jax.models.intern_vit import forward_flops as flops
  return flops(width, depth, size, patch_size=patch, mlp_ratio=mlp_ratio)


def timed(fn, iters, sync):
  fn(); fn(); sync()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    fn(); sync()
    times.append(time.perf_counter() - start)
  times.sort()
  return times[len(times) // 2]


def part_peak(cfg):
  import jax, jax.numpy as jnp, torch
  n = 8192 if cfg is FULL else 512
  rows = []
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  mm = jax.jit(lambda a, b: a @ b)
  t = timed(lambda: mm(a, b).block_until_ready(), 20, lambda: None)
  rows.append(dict(part='peak', impl='jax matmul', tflops=2 * n ** 3 / t / 1e12))
  dev = 'cuda' if torch.cuda.is_available() else 'cpu'
  ta = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
  tb = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
  sync = torch.cuda.synchronize if dev == 'cuda' else (lambda: None)
  t = timed(lambda: ta @ tb, 20, sync)
  rows.append(dict(part='peak', impl='torch matmul', tflops=2 * n ** 3 / t / 1e12))
  return rows


def part_jax(cfg):
  import jax, jax.numpy as jnp
  from internseg_jax.models.intern_vit import InternViT
  rows = []
  x = jax.random.normal(jax.random.key(1), (cfg['batch'], cfg['size'], cfg['size'], 3))
  for attention in ('cudnn', 'xla') if jax.default_backend() == 'gpu' else ('xla',):
    model = InternViT(embed_dim=cfg['width'], depth=cfg['depth'], num_heads=cfg['heads'],
                      img_size=cfg['size'], out_indices=(cfg['depth'] - 1,), attention=attention,
                      dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = jax.jit(lambda k: model.init(k, jnp.zeros((1, 14, 14, 3)))['params'])(jax.random.key(0))
    fwd = jax.jit(lambda p, x: model.apply({'params': p}, x)[0])
    try:
      start = time.perf_counter()
      fwd(params, x).block_until_ready()
      compile_s = time.perf_counter() - start
      t = timed(lambda: fwd(params, x).block_until_ready(), cfg['iters'], lambda: None)
    except Exception as e:  # e.g. cuDNN refusing a shape: report, keep going
      rows.append(dict(part='jax', impl=f'jax {attention}', error=str(e)[:300]))
      continue
    stats = jax.devices()[0].memory_stats() or {}
    rows.append(dict(part='jax', impl=f'jax {attention}', seconds=t, compile_s=compile_s,
                     images_s=cfg['batch'] / t,
                     tflops=forward_flops(**cfg) * cfg['batch'] / t / 1e12,
                     peak_gib=stats.get('peak_bytes_in_use', 0) / 2 ** 30))
    del params
  return rows


def _torch_model(cfg, device, dtype, use_sdpa=True):
  import torch
  from tests.reference.intern_vit_torch import InternViTTorch
  with torch.device(device):
    model = InternViTTorch(embed_dim=cfg['width'], depth=cfg['depth'], num_heads=cfg['heads'],
                           pretrain_size=cfg['pretrain'], out_indices=(cfg['depth'] - 1,),
                           use_sdpa=use_sdpa).to(dtype).eval()
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():  # random values on the device: a 6B CPU init would take minutes
      for name, p in model.named_parameters():
        if p.ndim >= 2 and name not in ('cls_token', 'pos_embed'):
          p.normal_(0, p[0].numel() ** -0.5, generator=gen)
        elif name.endswith('gamma'):
          p.uniform_(0.05, 0.5, generator=gen)
        elif name.endswith('weight'):
          p.normal_(1.0, 0.2, generator=gen)
        else:
          p.normal_(0, 0.02, generator=gen)
  return model


def part_torch(cfg):
  import torch
  dev = 'cuda' if torch.cuda.is_available() else 'cpu'
  model = _torch_model(cfg, dev, torch.bfloat16)
  x = torch.randn(cfg['batch'], 3, cfg['size'], cfg['size'], device=dev, dtype=torch.bfloat16)
  sync = torch.cuda.synchronize if dev == 'cuda' else (lambda: None)
  if dev == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  with torch.inference_mode():
    t = timed(lambda: model(x), cfg['iters'], sync)
  peak = torch.cuda.max_memory_allocated() / 2 ** 30 if dev == 'cuda' else 0
  return [dict(part='torch', impl='torch sdpa eager', seconds=t, images_s=cfg['batch'] / t,
               tflops=forward_flops(**cfg) * cfg['batch'] / t / 1e12, peak_gib=peak)]


def part_parity(cfg):
  """Same weights in both frameworks (full width, 4 blocks), outputs compared."""
  import jax, jax.numpy as jnp, numpy as np, torch
  from tests.convert_helpers import state_dict_to_params
  from internseg_jax.models.intern_vit import InternViT
  dev = 'cuda' if torch.cuda.is_available() else 'cpu'
  small = dict(cfg, depth=4, batch=2)
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  ref32 = _torch_model(small, dev, torch.float32, use_sdpa=True)
  x = np.random.default_rng(0).normal(size=(2, cfg['size'], cfg['size'], 3)).astype(np.float32)
  xt = torch.from_numpy(x).permute(0, 3, 1, 2).to(dev)
  sd = {k: v.cpu() for k, v in ref32.state_dict().items()}
  params = state_dict_to_params(sd, cfg['heads'], cfg['pretrain'])['backbone']
  rows = []
  for dtype, attention in ((torch.float32, 'xla'), (torch.bfloat16, 'auto')):
    with torch.inference_mode():
      want = ref32.to(dtype)(xt.to(dtype))[0].float().permute(0, 2, 3, 1).cpu().numpy()
    jdtype = jnp.float32 if dtype == torch.float32 else jnp.bfloat16
    model = InternViT(embed_dim=cfg['width'], depth=4, num_heads=cfg['heads'],
                      img_size=cfg['pretrain'], out_indices=(3,), attention=attention,
                      dtype=jdtype, param_dtype=jdtype)
    with jax.default_matmul_precision('highest'):
      got = np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x)[0])(
          jax.tree.map(lambda a: jnp.asarray(a, jdtype), params), x), np.float32)
    err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    rows.append(dict(part='parity', impl=f'{jnp.dtype(jdtype).name} jax-{attention} vs torch',
                     rel_l2=err))
  return rows


def _segmentor_forward(group: str, cfg, standin: bool = False):
  """Inference forward (`Segmentor.logits`, the evaluation path) of a full
  segmentor with random weights in their storage dtypes (frozen ViT bf16):
  head tuning (504 crops) or the adapter (512 crops); rows of images/s, model
  TFLOP/s and peak memory. `standin`: also time the adapter with its
  deformable sampling core replaced by a cheap stand-in (its share of the time)."""
  import jax
  import numpy as np
  from benchmarks import adapter_setup, flops
  from benchmarks.gpu_train import cheap_deform_core
  from internseg_jax import api, sharding
  from internseg_jax.models import deform_attn
  smoke = cfg is SMOKE
  adapter = group == 'adapter'
  if adapter:
    config = adapter_setup.adapter_config(tiny=smoke)
    context = adapter_setup.install(config)
  else:
    config = api.load_config('configs/upernet_frozen.py' + (':tiny' if smoke else ''))
    context = contextlib.nullcontext()
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  crop, batch = config.data.crop_size, cfg['batch']
  x = np.random.default_rng(0).normal(size=(batch, crop, crop, 3)).astype(np.float32)
  name = 'adapter tuning' if adapter else 'head tuning'
  with context:
    model = api.init_model(config, mesh=mesh)
    per_image = flops.train_flops(config, model.module.backbone if adapter else None)['inference']
    images = jax.device_put(x, sharding.batch_sharding(mesh))
    forward = model.batched_logits_fn
    start = time.perf_counter()
    forward(images).block_until_ready()
    compile_s = time.perf_counter() - start
    t = timed(lambda: forward(images).block_until_ready(), cfg['iters'], lambda: None)
    stats = jax.devices()[0].memory_stats() or {}
    row = dict(part=group, impl=f'{name} segmentor, {crop}px', seconds=t, compile_s=compile_s,
               images_s=batch / t, tflops=per_image * batch / t / 1e12,
               peak_gib=stats.get('peak_bytes_in_use', 0) / 2 ** 30)
    if standin:
      original = deform_attn.ms_deform_attn_core
      deform_attn.ms_deform_attn_core = cheap_deform_core
      try:
        stub = inference_forward(model, mesh)
        stub(images).block_until_ready()
        row['stub_seconds'] = timed(lambda: stub(images).block_until_ready(), cfg['iters'],
                                    lambda: None)
        row['deform_share'] = 1.0 - row['stub_seconds'] / t
      finally:
        deform_attn.ms_deform_attn_core = original
  return [row]


def inference_forward(model, mesh):
  """A freshly traced `Segmentor.logits` of the same model (picks up patches)."""
  from internseg_jax import inference
  forward = inference.segmentor_forward(model.module, mesh)
  return lambda images: forward(model.variables, images)


def part_head(cfg):
  return _segmentor_forward('head', cfg)


def part_adapter(cfg):
  return _segmentor_forward('adapter', cfg, standin=True)


PARTS = dict(peak=part_peak, jax=part_jax, torch=part_torch, parity=part_parity, head=part_head,
             adapter=part_adapter)


def versions():
  import jax
  import jaxlib
  return dict(part='versions', jax=jax.__version__, jaxlib=jaxlib.__version__,
              backend=jax.default_backend(), device=jax.devices()[0].device_kind)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--part', choices=sorted(PARTS))
  parser.add_argument('--parts', default='peak,parity,jax,torch,head,adapter',
                      help='the parts to run, each in its own process, in this order')
  parser.add_argument('--smoke', action='store_true')
  parser.add_argument('--json')
  parser.add_argument('--timeout', type=int, default=240, help='seconds per part')
  args = parser.parse_args()
  cfg = SMOKE if args.smoke else FULL
  if args.part:  # child process: one part, rows as JSON on the last line
    print(json.dumps([versions()] + PARTS[args.part](cfg)))
    return
  if not args.smoke:
    backend = subprocess.run([sys.executable, '-c', 'import jax; print(jax.default_backend())'],
                             capture_output=True, text=True).stdout.strip()
    if backend != 'gpu':
      sys.exit(f'gpu_forward: jax sees no GPU (backend {backend or "unknown"}): run on a '
               'machine with one (pip install -r requirements-gpu.txt), or pass --smoke')
  rows, info = [], {}
  for part in args.parts.split(','):
    cmd = [sys.executable, __file__, '--part', part] + (['--smoke'] if args.smoke else [])
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
      out = proc.stdout.strip().splitlines()
      got = json.loads(out[-1]) if proc.returncode == 0 and out else [
          dict(part=part, error=proc.stderr[-800:])]
    except subprocess.TimeoutExpired:
      got = [dict(part=part, error=f'timed out after {args.timeout} s')]
    info.update(next((r for r in got if r['part'] == 'versions'), {}))
    rows += [r for r in got if r['part'] != 'versions']
  peak = max([r['tflops'] for r in rows if r['part'] == 'peak' and 'tflops' in r] or [0])
  print(f"\njax {info.get('jax')}, jaxlib {info.get('jaxlib')}, {info.get('device')}")
  print(f"InternViT forward, {cfg['depth']} blocks x {cfg['width']}, {cfg['size']}px, batch "
        f"{cfg['batch']}, bf16, {forward_flops(**cfg) / 1e12:.2f} TFLOP/image")
  print(f"{'impl':34s} {'img/s':>8s} {'TFLOP/s':>8s} {'% peak':>7s} {'peak GiB':>9s}")
  for r in rows:
    if 'error' in r:
      print(f"{r.get('impl', r['part']):34s} ERROR {r['error']}")
    elif r['part'] == 'parity':
      print(f"{r['impl']:34s} rel L2 {r['rel_l2']:.2e}")
    elif r['part'] == 'peak':
      print(f"{r['impl']:34s} {'':8s} {r['tflops']:8.1f}")
    else:
      print(f"{r['impl']:34s} {r['images_s']:8.2f} {r['tflops']:8.1f} "
            f"{100 * r['tflops'] / (peak or float('nan')):6.1f}% {r['peak_gib']:9.2f}")
  by = {r['part']: r for r in rows if 'images_s' in r}
  if 'deform_share' in by.get('adapter', {}):
    a = by['adapter']
    print(f"adapter: deformable sampling core {100 * a['deform_share']:.0f} % of the forward "
          f"({a['seconds']:.3f} s per batch; {a['stub_seconds']:.3f} s with the stand-in)")
  if 'adapter' in by and 'head' in by:
    print(f"adapter / head tuning images/s at batch {cfg['batch']}: "
          f"{by['adapter']['images_s'] / by['head']['images_s']:.2f} (target >= 0.8)")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(config=cfg, versions=info, peak_tflops=peak, rows=rows), f, indent=2)


if __name__ == '__main__':
  main()
