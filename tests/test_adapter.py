"""InternViT-Adapter (Flax) vs the float32 PyTorch reference (tests/reference/adapter_torch.py),
alone and under our Segmentor with UPerHead + FCNHead vs seg_torch's UperNet, with the
weights moved from the reference's state dict by the name-map rows (convert.adapter).

Tolerances: relative L2 <= 1e-5 in float32 (each of the four backbone outputs, decode
and auxiliary logits); <= 3e-2 for bf16 compute (float32 params) vs the float32
reference. Tiny model: width 64, 4 ViT heads, 4 deformable heads (deform ratio 0.25:
4 channels per head), 8 blocks in 4 interactions, SPM width 16, 64x64 input (levels
16x16, 8x8, 4x4, 2x2).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert import name_map
from convert.adapter import adapter_params
from convert.torch_io import ConversionError
from internseg_jax.models.adapter import (Extractor, Injector, InternViTAdapter,
                                          SpatialPriorModule, Upsample2x)
from internseg_jax.models.heads import FCNHead, UPerHead
from internseg_jax.models.segmentor import Segmentor
from internseg_jax.weights import flatten, unflatten
from tests.reference import adapter_torch as ref
from tests.reference import seg_torch as ref_seg

WIDTH, SIZE, CHANNELS, CLASSES = 64, 64, 16, 7
ARCH = dict(embed_dim=WIDTH, depth=8, num_heads=4, img_size=SIZE, conv_inplane=16,
            deform_num_heads=4, interaction_indexes=((0, 1), (2, 3), (4, 5), (6, 7)))


def rel_l2(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.linalg.norm(got - want) / np.linalg.norm(want)


def nhwc(t):
  return t.permute(0, 2, 3, 1).numpy()


def images(seed=0, n=2):
  return np.random.default_rng(seed).normal(size=(n, SIZE, SIZE, 3)).astype(np.float32)


def segmentor():
  backbone = InternViTAdapter(**ARCH, attention='xla')
  return Segmentor(backbone, UPerHead(CHANNELS, CLASSES), None, FCNHead(CHANNELS, CLASSES),
                   aux_in_index=2)


def head_variables(sd):
  """decode_head./auxiliary_head. tensors through the existing head rows."""
  flat = {}
  for key, value in sd.items():
    if key.startswith(('decode_head.', 'auxiliary_head.')):
      mapped = name_map.head_path(key)
      if mapped is not None:
        flat[mapped[0]] = np.array(mapped[1].apply(value.numpy()))
  return unflatten(flat)


@pytest.fixture(scope='module')
def converted():
  """(torch segmentor in eval mode, its state dict, our variables, their shapes)."""
  adapter = ref.randomize_adapter_(ref.InternViTAdapterTorch(**ARCH), seed=1)
  decode = ref_seg.randomize_seg_(ref_seg.UPerHeadTorch(WIDTH, CHANNELS, CLASSES), seed=2)
  aux = ref_seg.randomize_seg_(ref_seg.FCNAuxHeadTorch(WIDTH, CHANNELS, CLASSES, in_index=2), 3)
  torch_model = ref_seg.SegmentorTorch(adapter, False, decode, aux).eval()
  sd = torch_model.state_dict()
  shapes = jax.eval_shape(lambda: segmentor().init(jax.random.key(0), images()))
  variables = head_variables(sd)
  variables['params']['backbone'] = adapter_params(
      sd, segmentor().backbone, expected=flatten(shapes['params']['backbone']))
  return torch_model, sd, variables, shapes


def convert(sd, shapes):
  return adapter_params(sd, segmentor().backbone, expected=flatten(shapes['params']['backbone']))


def test_state_dict_has_the_original_keys(converted):
  keys = set(converted[1])
  for key in ('backbone.spm.stem.0.weight', 'backbone.spm.stem.7.bias', 'backbone.spm.fc1.bias',
              'backbone.level_embed', 'backbone.interactions.0.injector.gamma',
              'backbone.interactions.2.extractor.ffn.dwconv.dwconv.weight',
              'backbone.interactions.3.extra_extractors.1.attn.sampling_offsets.bias',
              'backbone.up.weight', 'backbone.norm4.weight', 'backbone.pos_embed',
              'backbone.blocks.7.ls2.gamma'):
    assert key in keys, key
  assert 'backbone.cls_token' not in keys
  assert not any(k.startswith('backbone.interactions.2.extra_extractors') for k in keys)
  backbone_keys = {k for k in keys if k.startswith('backbone.')}
  used = {key for _, key, _, _ in name_map.adapter_rows(8, 4)}
  assert backbone_keys <= used  # the rows cover every key; only rows of absent options remain
  assert all(k.endswith('attn.qkv.bias') for k in used - backbone_keys)


def test_converted_tree_is_exactly_our_init(converted):
  _, _, variables, shapes = converted
  got = {k: v.shape for k, v in flatten(variables).items()}
  assert got == {k: v.shape for k, v in flatten(shapes).items()}


def test_features_and_logits_match_reference(converted):
  torch_model, _, variables, _ = converted
  x = images(seed=4)
  run = jax.jit(lambda v, x: segmentor().apply(
      v, x, method=lambda m, x: (m.features(x), m(x))))
  feats, out = run(variables, x)
  with torch.no_grad():
    want_feats = torch_model.extract_feat(torch.from_numpy(x).permute(0, 3, 1, 2))
    want_logits = nhwc(torch_model.decode_head(want_feats))
    want_aux = nhwc(torch_model.auxiliary_head(want_feats))
  sizes = [SIZE // 4, SIZE // 8, SIZE // 16, SIZE // 32]
  for level, (got, want) in enumerate(zip(feats, want_feats)):
    assert got.dtype == jnp.float32 and got.shape == (2, sizes[level], sizes[level], WIDTH)
    assert rel_l2(got, nhwc(want)) <= 1e-5, level
  assert out['logits'].shape == want_logits.shape == (2, SIZE // 4, SIZE // 4, CLASSES)
  assert rel_l2(out['logits'], want_logits) <= 1e-5
  assert rel_l2(out['aux_logits'], want_aux) <= 1e-5


def test_bf16_compute_is_close_to_the_float32_reference():
  arch = dict(ARCH, depth=2, interaction_indexes=((0, 0), (1, 1)))
  torch_model = ref.randomize_adapter_(ref.InternViTAdapterTorch(**arch), seed=6).eval()
  sd = {'backbone.' + k: v for k, v in torch_model.state_dict().items()}
  model = InternViTAdapter(**arch, attention='xla', dtype=jnp.bfloat16)
  x = images(seed=5)
  feats = jax.jit(model.apply)({'params': adapter_params(sd, model)}, x)
  with torch.no_grad():
    want = torch_model(torch.from_numpy(x).permute(0, 3, 1, 2))
  for level, (got, w) in enumerate(zip(feats, want)):
    assert got.dtype == jnp.float32
    assert rel_l2(got, nhwc(w)) <= 3e-2, level


@pytest.mark.parametrize('mutate,match', [
    (lambda sd: sd.pop('backbone.interactions.1.extractor.attn.value_proj.bias'),
     'missing: backbone.interactions.1.extractor.attn.value_proj.bias'),
    (lambda sd: sd.__setitem__('backbone.interactions.0.extra_extractors.0.ffn_norm.weight',
                               torch.ones(WIDTH)),
     'unexpected: backbone.interactions.0.extra_extractors.0.ffn_norm.weight'),
    (lambda sd: sd.__setitem__('backbone.spm.fc3.weight', torch.zeros(WIDTH, 64, 3, 3)),
     r'wrong shape: backbone.spm.fc3.weight is \(64, 64, 3, 3\), expected \(64, 64, 1, 1\)'),
])
def test_conversion_rejects_bad_state_dicts(converted, mutate, match):
  sd = dict(converted[1])
  mutate(sd)
  with pytest.raises(ConversionError, match=match):
    convert(sd, converted[3])


def test_conversion_drops_a_cls_token(converted):
  _, sd, variables, shapes = converted
  got = convert(dict(sd, **{'backbone.cls_token': torch.zeros(1, 1, WIDTH)}), shapes)
  assert flatten(got).keys() == flatten(variables['params']['backbone']).keys()


def test_input_must_be_img_size():
  model = InternViTAdapter(**ARCH)
  with pytest.raises(ValueError, match='exactly img_size'):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, SIZE, 2 * SIZE, 3))))


def rows_to_params(module, rows, prefix=''):
  sd = {prefix + k: v.detach().numpy() for k, v in module.state_dict().items()}
  return unflatten({path: np.array(t.apply(sd[key])) for path, key, t in rows})


def test_injector_and_extractor_match_reference():
  """A non-square ViT grid (2x4: levels 4x8, 2x4, 1x2), inputs of std 0.003, so
  that the LayerNorms' eps (1e-5) shows: relative L2 <= 1e-5."""
  c, vit, levels = 32, ((2, 4),), ((4, 8), (2, 4), (1, 2))
  rng = np.random.default_rng(7)
  x = (0.003 * rng.normal(size=(2, 8, c))).astype(np.float32)
  tokens = (0.003 * rng.normal(size=(2, 42, c))).astype(np.float32)
  torch_inj = ref.randomize_adapter_(ref.InjectorTorch(c, 2, 3, 3, 0.5, 0.0), seed=8)
  torch_ext = ref.randomize_adapter_(ref.ExtractorTorch(c, 2, 3, 0.5, 0.25), seed=9)
  inj = Injector(2, 3, 0.5, 0.0, vit, levels)
  ext = Extractor(2, 3, 0.5, 0.25, levels, vit)
  got_x = jax.jit(inj.apply)({'params': rows_to_params(torch_inj, name_map.ADAPTER_INJECTOR)},
                             x, tokens)
  got_c = jax.jit(ext.apply)({'params': rows_to_params(torch_ext, name_map.ADAPTER_EXTRACTOR)},
                             tokens, x)
  (ref_vit, _), (ref_levels, _) = ref.deform_inputs_torch(32, 64)
  tx, tc = torch.from_numpy(x), torch.from_numpy(tokens)
  with torch.no_grad():
    want_x = torch_inj(tx, ref_vit, tc, levels).numpy()
    want_c = torch_ext(tc, ref_levels, tx, vit, 2, 4).numpy()
  assert rel_l2(got_x - x, want_x - x) <= 1e-5  # the injected part (x + gamma * attn)
  assert rel_l2(got_c, want_c) <= 1e-5


def test_spatial_prior_module_matches_reference():
  """Images of std 0.001 so that the LayerNorms' eps (1e-6) shows; 64x96 input."""
  torch_spm = ref.randomize_adapter_(ref.SpatialPriorModuleTorch(8, 32), seed=10)
  x = (0.001 * np.random.default_rng(11).normal(size=(2, 64, 96, 3))).astype(np.float32)
  got = jax.jit(SpatialPriorModule(8, 32).apply)(
      {'params': rows_to_params(torch_spm, name_map.ADAPTER_SPM, 'spm.')['spm']}, x)
  with torch.no_grad():
    c1, *tokens = torch_spm(torch.from_numpy(x).permute(0, 3, 1, 2))
  assert rel_l2(got[0], nhwc(c1)) <= 1e-5
  for level, (g, t) in enumerate(zip(got[1:], tokens), start=2):
    assert rel_l2(g.reshape(2, -1, 32), t.numpy()) <= 1e-5, level


def init_params(*modules_and_shapes):
  """Flat params of each (module, input shapes...), initialised in one jit."""
  def init_all(key):
    return [module.init(jax.random.fold_in(key, i), *[jnp.zeros(s) for s in shapes])['params']
            for i, (module, *shapes) in enumerate(modules_and_shapes)]
  return [flatten(p) for p in jax.jit(init_all)(jax.random.key(0))]


def test_init_follows_the_original():
  """Injector gamma = injector_init_values (0); deformable attention as
  MSDeformAttn._reset_parameters; conv kernels N(0, 2 / fan_out) with fan_out =
  k*k*out/groups; ConvFFN linears N(0, 0.02); norms 1 / 0."""
  c, levels, vit = 128, ((4, 4), (2, 2), (1, 1)), ((2, 2),)
  injector, extractor, spm, up = init_params(
      (Injector(4, 4, 0.25, 0.0, vit, levels), (1, 4, c), (1, 21, c)),
      (Extractor(4, 4, 0.25, 0.25, levels, vit), (1, 21, c), (1, 4, c)),
      (SpatialPriorModule(32, c), (1, 32, 32, 3)),
      (Upsample2x(), (1, 2, 2, c)))
  assert not np.any(injector['gamma']) and not np.any(up['bias'])
  for params in (injector, extractor):
    assert not np.any(params['attn/attention_weights/kernel'])
    assert not np.any(params['attn/sampling_offsets/kernel'])
    np.testing.assert_array_equal(params['query_norm/scale'], 1.0)
    assert not np.any(params['feat_norm/bias'])
  np.testing.assert_allclose(injector['attn/sampling_offsets/bias'],
                             ref.MSDeformAttnTorch(c, 3, 4, 4).sampling_offsets.bias.detach(),
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(spm['stem_4/scale'], 1.0)
  expected_std = [(spm, 'conv3_0/kernel', (2 / (9 * 128)) ** 0.5),
                  (spm, 'fc1/kernel', (2 / c) ** 0.5),
                  (extractor, 'ffn/dwconv/kernel', (2 / 9) ** 0.5),
                  (extractor, 'ffn/fc1/kernel', 0.02),
                  (up, 'kernel', (2 / (4 * c)) ** 0.5)]
  for params, path, want in expected_std:
    assert abs(np.std(params[path]) / want - 1) < 0.15, (path, np.std(params[path]), want)


def test_extractor_drop_path_drops_whole_samples():
  """Stochastic depth on the ConvFFN branch (rate 0.5): each sample's output is
  either the attention-only result or it plus the FFN branch / 0.5."""
  levels, vit = ((4, 4), (2, 2), (1, 1)), ((2, 2),)
  make = functools.partial(Extractor, 2, 2, 0.5, 0.25, levels, vit)
  rng = np.random.default_rng(0)
  query = jnp.asarray(rng.normal(size=(16, 21, 32)), jnp.float32)
  feat = jnp.asarray(rng.normal(size=(16, 4, 32)), jnp.float32)
  shapes = jax.eval_shape(make().init, jax.random.key(0), query, feat)['params']
  params = jax.tree.map(  # random: a non-zero attention and FFN
      lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), jnp.float32), shapes)
  no_ffn = jax.tree.map(lambda p: p, params)
  no_ffn['ffn']['fc2'] = jax.tree.map(jnp.zeros_like, params['ffn']['fc2'])
  apply = jax.jit(make().apply)
  attn_only, full = apply({'params': no_ffn}, query, feat), apply({'params': params}, query, feat)
  dropped = jax.jit(make(drop_path=0.5).apply)({'params': params}, query, feat,
                                               rngs={'dropout': jax.random.key(3)})
  kept = jnp.all(jnp.isclose(dropped, attn_only + (full - attn_only) / 0.5, atol=1e-5), (1, 2))
  gone = jnp.all(jnp.isclose(dropped, attn_only, atol=1e-5), (1, 2))
  assert bool(jnp.all(kept ^ gone)) and 3 <= int(kept.sum()) <= 13
