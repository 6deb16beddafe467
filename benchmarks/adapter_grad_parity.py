r"""Gradients of the Flax InternViT-Adapter vs PyTorch autograd on the reference.

  python benchmarks/adapter_grad_parity.py

Too slow for the test suite (the backward compile alone takes ~20 s of CPU on the
tiny model), so it is a script: a depth-2 adapter with 2 interactions (width 64),
float32, every parameter's gradient (ViT blocks included) of a random linear
function of the four outputs, with remat 'full' and 'none'; then a training-mode
step with drop path under remat (finite gradients, losses that vary with the key).
Prints the largest relative L2 error per remat setting (measured: <= 4.3e-6).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from convert import name_map  # noqa: E402
from convert.adapter import adapter_params  # noqa: E402
from internseg_jax.models.adapter import InternViTAdapter  # noqa: E402
from internseg_jax.weights import flatten  # noqa: E402
from tests.reference import adapter_torch as ref  # noqa: E402

ARCH = dict(embed_dim=64, depth=2, num_heads=4, img_size=64, conv_inplane=16,
            deform_num_heads=4, interaction_indexes=((0, 0), (1, 1)))


def main():
  torch_model = ref.randomize_adapter_(ref.InternViTAdapterTorch(**ARCH), seed=1)
  sd = {'backbone.' + k: v for k, v in torch_model.state_dict().items()}
  x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  shapes = [(2, 16, 16, 64), (2, 8, 8, 64), (2, 4, 4, 64), (2, 2, 2, 64)]
  cotangents = [np.random.default_rng(i).normal(size=s).astype(np.float32)
                for i, s in enumerate(shapes, start=1)]
  outs = torch_model(torch.from_numpy(x).permute(0, 3, 1, 2))
  sum((o.permute(0, 2, 3, 1) * torch.from_numpy(c)).sum() for o, c in zip(outs, cotangents)).backward()
  want = {'backbone.' + k: p.grad.numpy() for k, p in torch_model.named_parameters()}
  linear = lambda outs: sum(jnp.sum(o * c) for o, c in zip(outs, cotangents))

  for remat in ('full', 'none'):
    model = InternViTAdapter(**ARCH, attention='xla', remat=remat)
    params = adapter_params(sd, model)
    got = flatten(jax.jit(jax.grad(lambda p: linear(model.apply({'params': p}, x))))(params))
    worst = 0.0
    for path, key, transform, block in name_map.adapter_rows(ARCH['depth'], 2):
      if path in got:
        g = np.asarray(got[path] if block is None else got[path][block])
        w = transform.apply(want[key])
        worst = max(worst, np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30))
    print(f'remat {remat:5s}: largest relative L2 error of a parameter gradient {worst:.2e}')

  model = InternViTAdapter(**ARCH, attention='xla', remat='full', drop_path_rate=0.3)
  params = adapter_params(sd, model)
  loss = jax.jit(lambda p, key: linear(model.apply({'params': p}, x, train=True,
                                                   rngs={'dropout': key})))
  grads = jax.jit(jax.grad(loss))(params, jax.random.key(1))
  finite = all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  print(f'drop path 0.3 under remat: losses {float(loss(params, jax.random.key(1))):.3f} / '
        f'{float(loss(params, jax.random.key(2))):.3f} for two keys, '
        f'eval {float(linear(jax.jit(model.apply)({"params": params}, x))):.3f}, '
        f'gradients finite: {finite}')


if __name__ == '__main__':
  main()
