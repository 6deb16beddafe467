"""benchmarks/flops.py against the program: the analytic counts must equal the
FLOPs of the convolutions and matmuls in the traced forward of each module.

The reference counter walks the jaxpr (into pjit, remat and scan bodies, a scan
body counted `length` times) and adds 2 x output elements x contracted size for
every `dot_general` and `conv_general_dilated`. Pooling and bilinear resizes
are matmuls with fixed matrices in our code, which the model-FLOP convention
(and benchmarks/flops.py) leaves out: the tests swap them for gather-based
nearest resizes while counting. Everything is exact (integer arithmetic).
"""
import math

import jax
import jax.numpy as jnp
import pytest

from benchmarks import flops
from internseg_jax import api
from internseg_jax.models import adapter as adapter_module
from internseg_jax.models import heads
from internseg_jax.models.adapter import InternViTAdapter
from internseg_jax.models.build import build_segmentor
from internseg_jax.models.intern_vit import InternViT, forward_flops


def _sub_jaxprs(value):
  if hasattr(value, 'eqns'):
    yield value
  elif hasattr(value, 'jaxpr') and hasattr(value.jaxpr, 'eqns'):
    yield value.jaxpr
  elif isinstance(value, (list, tuple)):
    for v in value:
      yield from _sub_jaxprs(v)


def _count(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      (contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
    elif name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape
      spec = eqn.params['dimension_numbers'].rhs_spec   # (out, in, *spatial)
      per_output = rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * per_output
    inner = sum(_count(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
    total += inner * (eqn.params['length'] if name == 'scan' else 1)
  return total


def counted(fn, *args) -> int:
  return _count(jax.make_jaxpr(fn)(*args).jaxpr)


def _nearest(x, size):
  return jax.image.resize(x, (x.shape[0], *size, x.shape[3]), 'nearest')


@pytest.fixture
def no_fixed_matmuls(monkeypatch):
  """Pooling and resizes as gathers while counting (not model FLOPs)."""
  monkeypatch.setattr(heads, 'resize_bilinear', _nearest)
  monkeypatch.setattr(heads, 'adaptive_avg_pool', lambda x, s: _nearest(x, (s, s)))
  monkeypatch.setattr(adapter_module, 'resize_bilinear', _nearest)


def apply_count(module, *inputs, **kwargs) -> int:
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs, **kwargs))
  return counted(lambda v: module.apply(v, *inputs, **kwargs), variables)


def maps(c, sizes):
  return [jnp.zeros((1, h, w, c)) for h, w in sizes]


def test_uper_fcn_linear_heads(no_fixed_matmuls):
  c, sizes = 24, [(16, 16), (8, 8), (4, 4), (2, 2)]
  uper = heads.UPerHead(channels=16, num_classes=5, pool_scales=(1, 2, 3, 6))
  assert apply_count(uper, maps(c, sizes)) == flops.uper_flops(c, sizes, 16, (1, 2, 3, 6), 5)
  fcn = heads.FCNHead(channels=16, num_classes=5)
  assert apply_count(fcn, jnp.zeros((1, 8, 6, c))) == flops.fcn_flops(c, (8, 6), 16, 5)
  linear = heads.LinearHead(num_classes=5)
  assert apply_count(linear, maps(c, [(7, 7)])) == flops.linear_head_flops(c, (7, 7), 5)


def test_neck():
  c, g = 24, 4
  neck = heads.PyramidNeck()
  assert apply_count(neck, maps(c, [(g, g)] * 4)) == flops.neck_flops(c, g)


def test_vit_backbone():
  vit = InternViT(embed_dim=64, depth=3, num_heads=2, img_size=56, out_indices=(2,),
                  attention='xla')
  assert apply_count(vit, jnp.zeros((1, 56, 56, 3))) == forward_flops(64, 3, 56)
  assert flops.vit_block_flops(64, 17) * 3 + 2 * 16 * 3 * 14 * 14 * 64 == forward_flops(64, 3, 56)


def test_adapter(no_fixed_matmuls):
  kwargs = dict(embed_dim=64, depth=4, img_size=64, conv_inplane=8, deform_heads=2)
  model = InternViTAdapter(embed_dim=64, depth=4, num_heads=2, img_size=64, conv_inplane=8,
                           deform_num_heads=2, attention='xla',
                           interaction_indexes=((0, 0), (1, 1), (2, 2), (3, 3)))
  parts = flops.adapter_flops(**kwargs)
  assert apply_count(model, jnp.zeros((1, 64, 64, 3))) == parts['vit'] + parts['adapter']


@pytest.mark.parametrize('spec', ['upernet_full', 'upernet_frozen', 'linear_frozen'])
def test_train_flops_matches_segmentor(spec, no_fixed_matmuls):
  """Whole tiny segmentors: backbone, neck, decode and auxiliary heads."""
  config = api.load_config(f'configs/{spec}.py:tiny')
  segmentor = build_segmentor(config.model, attention='xla')
  crop = config.data.crop_size
  x = jnp.zeros((1, crop, crop, 3))
  variables = jax.eval_shape(lambda: segmentor.init(jax.random.key(0), x))
  count = flops.train_flops(config)
  assert counted(lambda v: segmentor.apply(v, x), variables) == count['inference'] + count['aux']
  assert (count['aux'] == 0) == (config.model.auxiliary_head is None)
  assert count['total'] == (count['backbone'] * count['backbone_passes']
                            + 3 * (count['neck'] + count['heads'] + count['aux']))
  assert count['backbone_passes'] == (1 if config.model.backbone.freeze else 3)


def test_train_flops_adapter(no_fixed_matmuls):
  """The adapter experiment of the benchmarks (benchmarks/adapter_setup.py)."""
  from benchmarks import adapter_setup
  config = adapter_setup.adapter_config(tiny=True)
  segmentor = adapter_setup.adapter_segmentor(config)
  crop = config.data.crop_size
  x = jnp.zeros((1, crop, crop, 3))
  variables = jax.eval_shape(lambda: segmentor.init(jax.random.key(0), x))
  count = flops.train_flops(config, adapter=segmentor.backbone)
  assert counted(lambda v: segmentor.apply(v, x), variables) == count['inference'] + count['aux']
  assert count['backbone_passes'] == 2
