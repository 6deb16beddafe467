"""Prints the CPU parity errors of the Flax backbone vs the PyTorch reference.

  python benchmarks/parity_report.py

The same comparisons as tests/test_intern_vit.py, with the errors printed
instead of only checked against their bounds.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402

from tests.convert_helpers import state_dict_to_params  # noqa: E402
from internseg_jax.models.intern_vit import InternViT  # noqa: E402
from tests.reference import intern_vit_torch as ref  # noqa: E402
from tests.test_intern_vit import CASES, images_of, rel_l2, torch_features  # noqa: E402


def main():
  c, heads = 64, 4
  print(f"{'depth':>5s} {'out_indices':14s} {'pretrain':>8s} {'input':>9s} {'qkv_bias':8s} "
        f"{'dtype':9s} max rel L2")
  for depth, out_indices, pretrain, hw, qkv_bias in CASES:
    torch_model = ref.randomize_(ref.InternViTTorch(
        embed_dim=c, depth=depth, num_heads=heads, pretrain_size=pretrain, qkv_bias=qkv_bias,
        out_indices=out_indices), seed=depth)
    images = images_of((2, *hw, 3))
    want = torch_features(torch_model, images)
    params = state_dict_to_params(torch_model.state_dict(), heads)['backbone']
    for dtype in (jnp.float32, jnp.bfloat16):
      model = InternViT(embed_dim=c, depth=depth, num_heads=heads, img_size=pretrain,
                        qkv_bias=qkv_bias, out_indices=out_indices, attention='xla', dtype=dtype)
      got = model.apply({'params': params}, jnp.asarray(images))
      err = max(rel_l2(g, w) for g, w in zip(got, want))
      print(f'{depth:5d} {str(out_indices):14s} {pretrain:8d} {hw[0]:4d}x{hw[1]:<4d} '
            f'{str(qkv_bias):8s} {jnp.dtype(dtype).name:9s} {err:.2e}')


if __name__ == '__main__':
  main()
