r"""CPU: JAX InternViT forward vs the PyTorch reference, same config and inputs.

  python benchmarks/cpu_forward.py [--width 384 --depth 6 --size 224 --batch 4 --repeats 30]

Both run float32 on all cores; weights are converted from the reference so the
outputs are checked to agree before timing. Prints median times and the ratio.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from tests.convert_helpers import state_dict_to_params  # noqa: E402
from internseg_jax.models.intern_vit import InternViT  # noqa: E402
from tests.reference.intern_vit_torch import InternViTTorch, randomize_  # noqa: E402


def interleaved_medians(fns, repeats):
  """Median time of each function, run in turns so that both see the same
  machine load (2-core machines are noisy)."""
  for fn in fns:
    fn(); fn()  # warm-up (and compile)
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, out in zip(fns, times):
      start = time.perf_counter()
      fn()
      out.append(time.perf_counter() - start)
  return [float(np.median(t)) for t in times]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--width', type=int, default=384)
  parser.add_argument('--depth', type=int, default=6)
  parser.add_argument('--heads', type=int, default=6)
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--repeats', type=int, default=30)
  args = parser.parse_args()

  torch.set_num_threads(os.cpu_count())
  out = (args.depth - 1,)
  ref = randomize_(InternViTTorch(embed_dim=args.width, depth=args.depth, num_heads=args.heads,
                                  pretrain_size=args.size, out_indices=out, use_sdpa=True), 0).eval()
  params = jax.device_put(state_dict_to_params(ref.state_dict(), args.heads)['backbone'])
  model = InternViT(embed_dim=args.width, depth=args.depth, num_heads=args.heads,
                    img_size=args.size, out_indices=out, attention='xla')
  images = np.random.default_rng(0).normal(size=(args.batch, args.size, args.size, 3)).astype(np.float32)
  x_jax = jax.device_put(jnp.asarray(images))
  x_torch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  forward = jax.jit(lambda p, x: model.apply({'params': p}, x)[0])

  def run_jax():
    return forward(params, x_jax).block_until_ready()

  def run_torch():
    with torch.inference_mode():
      return ref(x_torch)[0]

  got, want = np.asarray(run_jax()), run_torch().permute(0, 2, 3, 1).numpy()
  err = np.linalg.norm(got - want) / np.linalg.norm(want)
  t_jax, t_torch = interleaved_medians([run_jax, run_torch], args.repeats)
  print(f'config: width {args.width}, depth {args.depth}, heads {args.heads}, '
        f'{args.size}px, batch {args.batch}, float32, {os.cpu_count()} cores')
  print(f'jax {jax.__version__} / torch {torch.__version__}; outputs agree: rel L2 {err:.2e}')
  print(f'median forward  JAX: {t_jax * 1e3:8.1f} ms   PyTorch: {t_torch * 1e3:8.1f} ms')
  print(f'PyTorch / JAX time ratio: {t_torch / t_jax:.2f} (> 1 means JAX is faster)')


if __name__ == '__main__':
  main()
