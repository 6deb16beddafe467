"""Resizes with PyTorch semantics vs torch.nn.functional.interpolate itself."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from internseg_jax.models import resize
from tests.reference.intern_vit_torch import torch_bicubic_resize_pos_embed

SIZES = [((16, 16), (36, 36)), ((32, 32), (36, 36)), ((32, 32), (16, 16)),
         ((7, 9), (20, 5)), ((5, 5), (1, 1))]


def _torch_resize(x_nhwc, size, mode):
  t = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).double()
  out = F.interpolate(t, size=size, mode=mode, align_corners=False)
  return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize('mode', ['bicubic', 'bilinear'])
@pytest.mark.parametrize('src,dst', SIZES)
def test_resize_matches_torch(mode, src, dst):
  x = np.random.default_rng(0).normal(size=(2, *src, 3))
  fn = resize.resize_bicubic if mode == 'bicubic' else resize.resize_bilinear
  want = _torch_resize(x, dst, mode)
  # numpy path is float64 throughout: agreement to rounding.
  np.testing.assert_allclose(fn(x, dst), want, rtol=0, atol=1e-12)
  # jax path computes in float32.
  got = np.asarray(fn(jnp.asarray(x, jnp.float32), dst))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_jax_image_resize_is_not_pytorch_bicubic():
  """Documents why we do not use jax.image.resize (a=-0.5, antialiasing)."""
  import jax
  x = np.random.default_rng(0).normal(size=(1, 32, 32, 1)).astype(np.float32)
  ours = resize.resize_bicubic(x, (16, 16))
  theirs = np.asarray(jax.image.resize(x, (1, 16, 16, 1), 'bicubic'))
  assert np.abs(ours - theirs).max() > 1e-2


@pytest.mark.parametrize('g,new', [(16, 36), (32, 36), (32, 16)])
def test_pos_embed_resize_matches_reference(g, new):
  pos = np.random.default_rng(1).normal(size=(1, 1 + g * g, 8)).astype(np.float32)
  want = torch_bicubic_resize_pos_embed(pos, new)
  got_np = resize.resize_pos_embed(pos, (new, new))
  got_jax = np.asarray(resize.resize_pos_embed(jnp.asarray(pos), (new, new)))
  assert got_np.shape == (1, 1 + new * new, 8)
  np.testing.assert_array_equal(got_np[:, 0], pos[:, 0])  # cls part untouched
  np.testing.assert_allclose(got_np, want, rtol=0, atol=1e-5)
  np.testing.assert_allclose(got_jax, want, rtol=0, atol=1e-5)
