r"""Peak memory of `convert.pth_to_orbax` on a multi-GB bf16 InternViT checkpoint.

  python benchmarks/convert_memory.py [--format=pth|safetensors] [--depth=10]
      [--width=3200 --heads=25] [--shard-gb=2] [--dir=/tmp] [--keep] [--src=EXISTING]

Writes a random InternViT-shaped checkpoint in bfloat16 (default: width 3200,
depth 10, about 2.5 GB; the real 6B files are depth 45/48, 11-12 GB) in a
separate process (generating must not count): `--format=pth` a torch.save'd
state dict, `--format=safetensors` a sharded Hugging Face folder (InternVisionModel
names, model-0000k-of-0000n.safetensors of `--shard-gb` each, the index and
config.json; written shard by shard with numpy, no torch). Then runs the
converter CLI in a subprocess while a sampler thread reads /proc/PID/status
every 50 ms (VmRSS, RssAnon, RssFile; VmHWM is the kernel's own high-water mark
of VmRSS, so it catches peaks between samples). The converter gets no config:
it reads the architecture from the tensors. Prints a table; the converter
should stay far below the data size (target for safetensors: peak RSS <= 0.25x).
The generated files and the output are removed at the end unless --keep.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ('VmRSS', 'RssAnon', 'RssFile', 'VmHWM')


def generate(path, width, heads, depth, pretrain_size, patch=14, mlp_ratio=4.0, seed=0):
  """A random InternViT state dict in bf16, written with torch.save (in this process)."""
  del heads  # the file has no trace of the head count
  import torch
  g = torch.Generator().manual_seed(seed)
  hidden = int(width * mlp_ratio)
  grid = pretrain_size // patch

  def randn(*shape, scale=0.02):
    t = torch.empty(shape, dtype=torch.bfloat16)
    # Fill row by row in float32 to keep the float32 temporary small.
    flat = t.view(shape[0], -1)
    for i in range(shape[0]):
      flat[i] = (torch.randn(flat.shape[1], generator=g) * scale).to(torch.bfloat16)
    return t

  sd = {
      'cls_token': randn(1, 1, width),
      'pos_embed': randn(1, 1 + grid * grid, width),
      'patch_embed.proj.weight': randn(width, 3, patch, patch),
      'patch_embed.proj.bias': randn(width),
  }
  for i in range(depth):
    p = f'blocks.{i}.'
    sd[p + 'norm1.weight'] = randn(width)
    sd[p + 'attn.qkv.weight'] = randn(3 * width, width)
    sd[p + 'attn.q_norm.weight'] = randn(width)
    sd[p + 'attn.k_norm.weight'] = randn(width)
    sd[p + 'attn.proj.weight'] = randn(width, width)
    sd[p + 'attn.proj.bias'] = randn(width)
    sd[p + 'ls1.gamma'] = randn(width)
    sd[p + 'norm2.weight'] = randn(width)
    sd[p + 'mlp.fc1.weight'] = randn(hidden, width)
    sd[p + 'mlp.fc1.bias'] = randn(hidden)
    sd[p + 'mlp.fc2.weight'] = randn(width, hidden)
    sd[p + 'mlp.fc2.bias'] = randn(width)
    sd[p + 'ls2.gamma'] = randn(width)
  torch.save(sd, path)


def hf_tensor_specs(width, depth, pretrain_size, patch=14, mlp_ratio=4.0):
  """(name, shape) of an InternVisionModel (modeling_intern_vit.py), in its order."""
  hidden, grid = int(width * mlp_ratio), pretrain_size // patch
  specs = [('embeddings.class_embedding', (1, 1, width)),
           ('embeddings.patch_embedding.weight', (width, 3, patch, patch)),
           ('embeddings.patch_embedding.bias', (width,)),
           ('embeddings.position_embedding', (1, 1 + grid * grid, width))]
  for i in range(depth):
    p = f'encoder.layers.{i}.'
    specs += [(p + 'ls1', (width,)), (p + 'ls2', (width,)),
              (p + 'attn.qkv.weight', (3 * width, width)),
              (p + 'attn.q_norm.weight', (width,)), (p + 'attn.k_norm.weight', (width,)),
              (p + 'attn.proj.weight', (width, width)), (p + 'attn.proj.bias', (width,)),
              (p + 'mlp.fc1.weight', (hidden, width)), (p + 'mlp.fc1.bias', (hidden,)),
              (p + 'mlp.fc2.weight', (width, hidden)), (p + 'mlp.fc2.bias', (width,)),
              (p + 'norm1.weight', (width,)), (p + 'norm2.weight', (width,))]
  return specs


def generate_safetensors(folder, width, heads, depth, pretrain_size, shard_bytes, seed=0):
  """A sharded Hugging Face InternViT folder in bf16, one shard in memory at a time."""
  import ml_dtypes
  import numpy as np
  from safetensors.numpy import save_file
  rng = np.random.default_rng(seed)
  os.makedirs(folder)
  specs = hf_tensor_specs(width, depth, pretrain_size)
  groups, current, size = [], [], 0
  for name, shape in specs:  # shards filled in order, as save_pretrained does
    nbytes = 2 * int(np.prod(shape))
    if current and size + nbytes > shard_bytes:
      groups.append(current)
      current, size = [], 0
    current.append((name, shape))
    size += nbytes
  groups.append(current)
  weight_map = {}
  for k, group in enumerate(groups, 1):
    filename = f'model-{k:05d}-of-{len(groups):05d}.safetensors'
    shard = {name: (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
             for name, shape in group}
    save_file(shard, os.path.join(folder, filename), metadata={'format': 'pt'})
    del shard
    weight_map.update(dict.fromkeys((name for name, _ in group), filename))
  total = sum(2 * int(np.prod(shape)) for _, shape in specs)
  with open(os.path.join(folder, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(dict(architectures=['InternVisionModel'], model_type='intern_vit_6b',
                   hidden_size=width, intermediate_size=4 * width, num_attention_heads=heads,
                   num_hidden_layers=depth, image_size=pretrain_size, patch_size=14,
                   qkv_bias=False, qk_normalization=True, norm_type='rms_norm',
                   layer_norm_eps=1e-6, torch_dtype='bfloat16'), f, indent=2)


def data_size(path):
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
             if f.endswith('.safetensors'))


def read_status(pid):
  out = {}
  try:
    with open(f'/proc/{pid}/status') as f:
      for line in f:
        key, _, value = line.partition(':')
        if key in FIELDS:
          out[key] = int(value.split()[0]) * 1024  # kB -> bytes
  except (FileNotFoundError, ProcessLookupError):
    pass
  return out


def run_sampled(cmd, interval, env=None, cwd=ROOT):
  """Runs `cmd`, sampling its memory; returns (returncode, wall seconds, peaks, stderr tail)."""
  peaks = dict.fromkeys(FIELDS, 0)
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  done = threading.Event()

  def sample():
    while not done.is_set():
      for k, v in read_status(proc.pid).items():
        peaks[k] = max(peaks[k], v)
      done.wait(interval)

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  # communicate() drains the pipes; VmHWM is read by the sampler up to the exit.
  stdout, stderr = proc.communicate()
  wall = time.perf_counter() - start
  done.set()
  sampler.join()
  return proc.returncode, wall, peaks, (stdout + stderr)[-3000:]


def gib(n):
  return f'{n / 2**30:.2f} GiB'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--format', choices=('pth', 'safetensors'), default='pth')
  parser.add_argument('--shard-gb', type=float, default=2.0, help='safetensors shard size')
  parser.add_argument('--width', type=int, default=3200)
  parser.add_argument('--heads', type=int, default=25)
  parser.add_argument('--depth', type=int, default=10)
  parser.add_argument('--pretrain-size', type=int, default=224)
  parser.add_argument('--dir', default='/tmp', help='where the big files go')
  parser.add_argument('--src', help='use this .pth / folder instead of generating one (kept)')
  parser.add_argument('--interval', type=float, default=0.05, help='sampling period, s')
  parser.add_argument('--keep', action='store_true', help='keep the generated files')
  parser.add_argument('--generate-only', metavar='PATH', help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.generate_only:
    if args.format == 'safetensors':
      generate_safetensors(args.generate_only, args.width, args.heads, args.depth,
                           args.pretrain_size, int(args.shard_gb * 2**30))
    else:
      generate(args.generate_only, args.width, args.heads, args.depth, args.pretrain_size)
    return

  work = tempfile.mkdtemp(prefix='convert_memory_', dir=args.dir)
  src = args.src or os.path.join(work, 'model.pth' if args.format == 'pth' else 'hf')
  dst = os.path.join(work, 'converted')
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu'))
  try:
    if not args.src:
      print(f'generating {src} ({args.format}, width {args.width}, depth {args.depth}, bf16) ...',
            flush=True)
      t = time.perf_counter()
      subprocess.run([sys.executable, os.path.abspath(__file__), '--generate-only', src,
                      f'--format={args.format}', f'--shard-gb={args.shard_gb}',
                      f'--width={args.width}', f'--heads={args.heads}',
                      f'--depth={args.depth}', f'--pretrain-size={args.pretrain_size}'],
                     check=True, cwd=ROOT, env=env)
      print(f'  done in {time.perf_counter() - t:.0f} s', flush=True)
    size = data_size(src)

    # What importing the converter's dependencies costs on its own (jax, torch, orbax).
    rc, base_wall, base, log = run_sampled(
        [sys.executable, '-c', 'import convert.pth_to_orbax'], args.interval, env)
    if rc:
      sys.exit(f'importing the converter failed:\n{log}')

    print('converting ...', flush=True)
    # No config: the converter reads the architecture from the tensors (heads =
    # width / 128, 25 for the 6B width) and keeps the file's own grid.
    rc, wall, peaks, log = run_sampled(
        [sys.executable, '-m', 'convert.pth_to_orbax', f'--src={src}', f'--dst={dst}'],
        args.interval, env)
    if rc:
      sys.exit(f'conversion failed (exit {rc}):\n{log}')
    out_size = sum(os.path.getsize(os.path.join(d, f))
                   for d, _, files in os.walk(dst) for f in files)

    rows = [
        ('data size (tensor files)', gib(size)),
        ('output size', gib(out_size)),
        ('conversion wall time', f'{wall:.1f} s'),
        ('peak VmRSS (sampled)', gib(peaks['VmRSS'])),
        ('peak VmHWM (kernel)', gib(peaks['VmHWM'])),
        ('peak RssAnon', gib(peaks['RssAnon'])),
        ('peak RssFile', gib(peaks['RssFile'])),
        ('peak VmHWM / data size', f'{peaks["VmHWM"] / size:.3f}'),
        ('import-only VmHWM', gib(base['VmHWM'])),
        ('(peak - import) / data size', f'{(peaks["VmHWM"] - base["VmHWM"]) / size:.3f}'),
    ]
    width = max(len(k) for k, _ in rows)
    what = args.src if args.src else \
        f'{args.format}, width {args.width}, depth {args.depth}, bf16'
    print(f'\nconvert.pth_to_orbax on {what}')
    for k, v in rows:
      print(f'  {k:<{width}}  {v}')
  finally:
    if args.keep:
      print(f'kept {work}')
    else:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
  main()
