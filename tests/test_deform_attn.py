"""Multi-scale deformable attention vs the float32 PyTorch grid_sample reference
(tests/reference/adapter_torch.py, the authors' `ms_deform_attn_core_pytorch` form).

Tolerances (float32): forward relative L2 <= 1e-5; gradients w.r.t. value,
sampling locations and attention weights relative L2 <= 1e-4; init values of the
grid bias to 1e-6.
"""
import math

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert import name_map
from internseg_jax.models.deform_attn import MSDeformAttn, ms_deform_attn_core, reference_points
from internseg_jax.weights import unflatten
from tests.reference import adapter_torch as ref

LEVELS = ((7, 5), (4, 3), (2, 2))   # odd sizes, and a 2x2 map where most points fall outside


def rel_l2(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.linalg.norm(got - want) / np.linalg.norm(want)


def core_inputs(seed=0, b=2, lq=11, m=3, d=4, p=3, levels=LEVELS):
  rng = np.random.default_rng(seed)
  s = sum(h * w for h, w in levels)
  value = rng.normal(size=(b, s, m, d)).astype(np.float32)
  # [-0.2, 1.2]: about half the points have a coordinate outside the map.
  locations = rng.uniform(-0.2, 1.2, size=(b, lq, m, len(levels), p, 2)).astype(np.float32)
  logits = rng.normal(size=(b, lq, m, len(levels) * p))
  weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  return value, locations, weights.reshape(b, lq, m, len(levels), p).astype(np.float32)


def test_core_matches_grid_sample_reference():
  value, locations, weights = core_inputs()
  got = jax.jit(ms_deform_attn_core, static_argnums=1)(value, LEVELS, locations, weights)
  want = ref.ms_deform_attn_grid_sample(*(torch.from_numpy(a) for a in (value,)), LEVELS,
                                        torch.from_numpy(locations), torch.from_numpy(weights))
  assert got.shape == want.shape == (2, 11, 12)
  assert rel_l2(got, want.numpy()) <= 1e-5
  outside = (locations < 0) | (locations > 1)
  assert 0.35 < outside.any(-1).mean() < 0.65  # the zeros padding is exercised


def test_core_gradients_match_grid_sample_reference():
  value, locations, weights = core_inputs(seed=1)
  cotangent = np.random.default_rng(2).normal(size=(2, 11, 12)).astype(np.float32)
  f = lambda v, l, w: ms_deform_attn_core(v, LEVELS, l, w)
  got = jax.jit(lambda *args: jax.vjp(f, *args[:3])[1](args[3]))(
      value, locations, weights, cotangent)
  inputs = [torch.from_numpy(a).requires_grad_() for a in (value, locations, weights)]
  out = ref.ms_deform_attn_grid_sample(inputs[0], LEVELS, inputs[1], inputs[2])
  out.backward(torch.from_numpy(cotangent))
  for name, g, t in zip(('value', 'locations', 'weights'), got, inputs):
    assert rel_l2(g, t.grad.numpy()) <= 1e-4, name


def all_eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jcore.ClosedJaxpr):
          yield from all_eqns(sub.jaxpr)
        elif isinstance(sub, jcore.Jaxpr):
          yield from all_eqns(sub)


def test_memory_does_not_grow_with_queries_times_value_map():
  """Forward and backward: no intermediate as large as queries x value map
  (a one-hot or dense-weights formulation would have one)."""
  levels = ((64, 48),)
  value, locations, weights = core_inputs(b=1, lq=64, m=2, d=4, p=2, levels=levels)
  loss = lambda v, l, w: jnp.sum(ms_deform_attn_core(v, levels, l, w) ** 2)
  jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2)))(value, locations, weights)
  largest = max(math.prod(v.aval.shape) for e in all_eqns(jaxpr.jaxpr) for v in e.outvars)
  assert largest <= value.size < 64 * 64 * 48 * 2  # queries x map x heads would be 12x value


def attn_params(module):
  sd = {'attn.' + k: v.numpy() for k, v in module.state_dict().items()}
  return unflatten({path: t.apply(sd[key]) for path, key, t in name_map.DEFORM_ATTN})['attn']


@pytest.mark.parametrize('per_level_reference', [False, True])
def test_module_matches_reference(per_level_reference):
  c, m, p = 32, 4, 3
  torch_attn = ref.MSDeformAttnTorch(c, len(LEVELS), m, p, ratio=0.5)
  ref.randomize_adapter_(torch_attn, seed=4)
  rng = np.random.default_rng(5)
  s = sum(h * w for h, w in LEVELS)
  query = rng.normal(size=(2, 9, c)).astype(np.float32)
  feat = rng.normal(size=(2, s, c)).astype(np.float32)
  points = rng.uniform(0, 1, size=(2, 9, len(LEVELS) if per_level_reference else 1, 2))
  points = points.astype(np.float32)
  with torch.no_grad():
    want = torch_attn(*(torch.from_numpy(a) for a in (query, points, feat)), LEVELS).numpy()
  module = MSDeformAttn(m, len(LEVELS), p, 0.5)
  got = jax.jit(lambda v, *args: module.apply(v, *args, LEVELS))(
      {'params': attn_params(torch_attn)}, query, points, feat)
  assert rel_l2(got, want) <= 1e-5


def test_init_matches_original():
  c, m, levels, p = 64, 8, 3, 4
  module = MSDeformAttn(m, levels, p, ratio=0.25)
  params = jax.jit(lambda key, *args: module.init(key, *args, ((4, 4), (2, 2), (1, 1))))(
      jax.random.key(0), jnp.zeros((1, 5, c)), jnp.zeros((1, 5, 1, 2)),
      jnp.zeros((1, 21, c)))['params']
  want = ref.MSDeformAttnTorch(c, levels, m, p, ratio=0.25)
  np.testing.assert_allclose(params['sampling_offsets']['bias'],
                             want.sampling_offsets.bias.detach().numpy(), rtol=1e-6, atol=1e-7)
  grid = np.asarray(params['sampling_offsets']['bias']).reshape(m, levels, p, 2)
  # Head 1 of 8 points at 45 degrees, max-normalised to (1, 1); point k at k + 1 times it.
  np.testing.assert_allclose(grid[1, 2], [[1, 1], [2, 2], [3, 3], [4, 4]], rtol=1e-6)
  np.testing.assert_allclose(grid[4, 0, 1], [-2, 0], atol=1e-6)
  for name in ('sampling_offsets', 'attention_weights'):
    assert not np.any(params[name]['kernel'])
  assert not np.any(params['attention_weights']['bias'])
  for name, (fan_in, fan_out) in (('value_proj', (c, c // 4)), ('output_proj', (c // 4, c))):
    kernel = np.asarray(params[name]['kernel'])
    bound = math.sqrt(6.0 / (fan_in + fan_out))  # Xavier-uniform
    assert kernel.shape == (fan_in, fan_out) and not np.any(params[name]['bias'])
    assert np.abs(kernel).max() <= bound and abs(kernel.std() / (bound / math.sqrt(3)) - 1) < 0.1


def test_reference_points_are_cell_centres():
  got = reference_points(((2, 3), (1, 1)))
  want = [[1 / 6, 1 / 4], [3 / 6, 1 / 4], [5 / 6, 1 / 4], [1 / 6, 3 / 4], [3 / 6, 3 / 4],
          [5 / 6, 3 / 4], [0.5, 0.5]]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_array_equal(got[None, :, None], ref.cell_centres(((2, 3), (1, 1))).numpy())
