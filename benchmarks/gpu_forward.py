r"""GPU: full InternViT-6B forward, JAX vs the PyTorch reference, on one card.

  python benchmarks/gpu_forward.py            # ~5 min on one H100/H200
  python benchmarks/gpu_forward.py --smoke    # tiny sizes, any device (checks the script)

Random init, bf16 weights and compute, 504x504 images, batch 8, the 48-block
224px layout (out_indices [47]). Each part runs in its own process so peak GPU
memory is measured cleanly:
  peak    measured bf16 matmul rate (8192^3) in JAX and PyTorch; the max is the peak
  jax     InternViT in JAX, cuDNN attention and XLA attention
  torch   the reference (tests/reference) with SDPA attention, eager
  parity  full width, 4 blocks, shared weights: JAX vs PyTorch outputs on the GPU
Prints a table; `--json FILE` also writes the rows.
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


PARTS = dict(peak=part_peak, jax=part_jax, torch=part_torch, parity=part_parity)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--part', choices=sorted(PARTS))
  parser.add_argument('--smoke', action='store_true')
  parser.add_argument('--json')
  parser.add_argument('--timeout', type=int, default=240)
  args = parser.parse_args()
  cfg = SMOKE if args.smoke else FULL
  if args.part:  # child process: one part, rows as JSON on the last line
    print(json.dumps(PARTS[args.part](cfg)))
    return
  rows = []
  for part in ('peak', 'parity', 'jax', 'torch'):
    cmd = [sys.executable, __file__, '--part', part] + (['--smoke'] if args.smoke else [])
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
      out = proc.stdout.strip().splitlines()
      rows += json.loads(out[-1]) if proc.returncode == 0 and out else [
          dict(part=part, error=proc.stderr[-800:])]
    except subprocess.TimeoutExpired:
      rows.append(dict(part=part, error=f'timed out after {args.timeout} s'))
  peak = max([r['tflops'] for r in rows if r['part'] == 'peak' and 'tflops' in r] or [0])
  print(f"\nInternViT forward, {cfg['depth']} blocks x {cfg['width']}, {cfg['size']}px, batch "
        f"{cfg['batch']}, bf16, {forward_flops(**cfg) / 1e12:.2f} TFLOP/image")
  print(f"{'impl':28s} {'img/s':>8s} {'TFLOP/s':>8s} {'% peak':>7s} {'peak GiB':>9s}")
  for r in rows:
    if 'error' in r:
      print(f"{r.get('impl', r['part']):28s} ERROR {r['error']}")
    elif r['part'] == 'parity':
      print(f"{r['impl']:28s} rel L2 {r['rel_l2']:.2e}")
    elif r['part'] == 'peak':
      print(f"{r['impl']:28s} {'':8s} {r['tflops']:8.1f}")
    else:
      print(f"{r['impl']:28s} {r['images_s']:8.2f} {r['tflops']:8.1f} "
            f"{100 * r['tflops'] / peak:6.1f}% {r['peak_gib']:9.2f}")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(config=cfg, peak_tflops=peak, rows=rows), f, indent=2)


if __name__ == '__main__':
  main()
