"""The optimizer recipe vs mmcv's formulas, written out here from docs/reference.md, "Training recipe"."""
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from convert import name_map
from internseg_jax import optim
from internseg_jax.freeze import FreezePolicy
from tests import seg_fixtures as fx


def mmcv_lr(i, base_lr, max_iters, warmup_iters, warmup_ratio=1e-6, power=1.0, min_lr=0.0):
  regular = (base_lr - min_lr) * (1 - i / max_iters) ** power + min_lr
  if i < warmup_iters:
    k = (1 - i / warmup_iters) * (1 - warmup_ratio)
    return regular * (1 - k)
  return regular


@pytest.mark.parametrize('total,warmup', [(80000, 1500), (5000, 100), (40000, 800), (100, 0)])
def test_schedule_matches_mmcv(total, warmup):
  schedule = optim.lr_schedule(4e-5, total, warmup)
  for i in sorted({0, 1, 2, warmup // 2, max(warmup - 1, 0), warmup, warmup + 1, total // 2,
                   total - 1, total}):
    np.testing.assert_allclose(float(schedule(i)), mmcv_lr(i, 4e-5, total, warmup), rtol=1e-5,
                               atol=1e-15)


def reference_layer_id(torch_name, num_layers):
  """InternVL's get_num_layer_for_vit on the mmseg parameter name."""
  if torch_name in ('backbone.cls_token', 'backbone.mask_token', 'backbone.pos_embed'):
    return 0
  if torch_name.startswith('backbone.patch_embed'):
    return 0
  if torch_name.startswith('backbone.blocks'):
    return int(torch_name.split('.')[2]) + 1
  return num_layers - 1


def reference_decays(torch_name, shape):
  """The reference's no-decay rule (its name check for pos_embed/cls_token never
  matches the prefixed names, so those do decay)."""
  return not (len(shape) == 1 or torch_name.endswith('.bias') or
              torch_name in ('pos_embed', 'cls_token'))


def our_path(torch_name):
  """mmseg name -> (our flat trainable path, block index or None)."""
  for path, key, _ in name_map.NECK:
    if key == torch_name:
      return path.split('/', 1)[1], None
  if torch_name.startswith(('decode_head.', 'auxiliary_head.')):
    return name_map.head_path(torch_name)[0].split('/', 1)[1], None
  name = torch_name[len('backbone.'):]
  for path, key, _, index in name_map.backbone_rows(fx.DEPTH):
    if key == name:
      return 'backbone/' + path, index
  raise KeyError(torch_name)


@pytest.mark.parametrize('depth', [45, 48])
@pytest.mark.parametrize('rate', [0.95, 1.0])
def test_layer_scales_and_decay_mask_match_the_reference(depth, rate):
  torch_model = fx.torch_segmentor('uper')
  params = {n: tuple(p.shape) for n, p in torch_model.named_parameters()}
  # Our trainable flat dict, with the stacked depth axis of the real model.
  ours = {}
  for name, shape in params.items():
    path, index = our_path(name)
    ours[path] = np.zeros((depth,) + shape[::-1] if index is not None else shape[::-1])
  scales = optim.lr_scales(ours, depth, rate)
  mask = optim.decay_mask(ours)
  num_layers = depth + 2
  for name, shape in params.items():
    path, index = our_path(name)
    if index is not None:  # the tiny reference has fx.DEPTH blocks: check them and the last
      got = np.asarray(scales[path]).reshape(-1)
      for i in (index, depth - 1):
        want = rate ** (num_layers - reference_layer_id(f'backbone.blocks.{i}.x', num_layers) - 1)
        np.testing.assert_allclose(got[i], want, rtol=1e-6)
    else:
      want = rate ** (num_layers - reference_layer_id(name, num_layers) - 1)
      np.testing.assert_allclose(np.asarray(scales[path]).reshape(-1), want, rtol=1e-6)
    assert mask[path] == reference_decays(name, shape), name
  if rate == 0.95:
    assert np.isclose(float(scales['backbone/pos_embed']), 0.95 ** (depth + 1))
    assert np.isclose(float(scales['decode_head/conv_seg/kernel']), 1.0)


def original_adapter_segmentor():
  """The tiny reference adapter + UperNet + aux, frozen as the original's
  InternViTAdapter.__init__ does: _freeze_params(blocks), _freeze_params(patch_embed),
  pos_embed.requires_grad = False (freeze_vit froze the cls token, then set to None)."""
  from tests.reference import adapter_torch, seg_torch
  adapter = adapter_torch.InternViTAdapterTorch(
      embed_dim=64, depth=4, num_heads=4, img_size=64, conv_inplane=8, deform_num_heads=4,
      interaction_indexes=((0, 0), (1, 1), (2, 2), (3, 3)))
  model = seg_torch.SegmentorTorch(adapter, False, seg_torch.UPerHeadTorch(64, 16, 5),
                                   seg_torch.FCNAuxHeadTorch(64, 16, 5, in_index=2))
  for module in (adapter.blocks, adapter.patch_embed):
    for p in module.parameters():
      p.requires_grad = False
  adapter.pos_embed.requires_grad = False
  return model


def adapter_path(torch_name, depth=4):
  if torch_name.startswith(('decode_head.', 'auxiliary_head.')):
    return name_map.head_path(torch_name)[0].split('/', 1)[1]
  for path, key, _, _ in name_map.adapter_rows(depth, 4):
    if key == torch_name:
      return 'backbone/' + path
  raise KeyError(torch_name)


@pytest.mark.parametrize('depth', [8, 48])
def test_adapter_freeze_decay_and_layer_scales_match_the_original(depth):
  """Every parameter of the original's adapter segmentor: trained iff requires_grad
  there; weight decay by the original's rule on its names and shapes (level_embed
  (3, C) decays, injector gamma does not); LR scale with layer id L - 1."""
  torch_model = original_adapter_segmentor()
  policy = FreezePolicy(True, jnp.dtype('bfloat16'), 'xla', jnp.dtype('float32'))
  trained = {}
  for name, p in torch_model.named_parameters():
    path = adapter_path(name)
    assert policy.is_trainable(path) == p.requires_grad, name
    if p.requires_grad:
      trained[name] = (path, tuple(p.shape))
  assert 'backbone.level_embed' in trained and 'backbone.interactions.0.injector.gamma' in trained
  ours = {path: np.zeros(1) for path, _ in trained.values()}
  mask = optim.decay_mask(ours)
  scales = optim.lr_scales(ours, depth, 0.95)
  num_layers = depth + 2
  for name, (path, shape) in trained.items():
    assert mask[path] == reference_decays(name, shape), name
    want = 0.95 ** (num_layers - reference_layer_id(name, num_layers) - 1)
    np.testing.assert_allclose(np.asarray(scales[path]).reshape(-1), want, rtol=1e-6)
  assert mask['backbone/level_embed'] and not mask['backbone/interactions_0/injector/gamma']


def test_freeze_policy_keeps_the_neck_adapter_and_heads_trainable():
  frozen = FreezePolicy(True, jnp.dtype('bfloat16'), 'xla', jnp.dtype('float32'))
  trained = FreezePolicy(False, jnp.dtype('bfloat16'), 'xla', jnp.dtype('float32'))
  for path in ('backbone/blocks/attn/qkv/kernel', 'backbone/pos_embed', 'backbone/cls_token',
               'backbone/patch_embed/kernel'):
    assert not frozen.is_trainable(path) and trained.is_trainable(path)
  for path in ('neck/up1_0/kernel', 'decode_head/conv_seg/kernel', 'backbone/spm/stem_0/kernel',
               'backbone/level_embed', 'backbone/interactions_0/injector/gamma'):
    assert frozen.is_trainable(path)
  assert frozen.storage_dtype('params/backbone/blocks/mlp/fc1/kernel', 'float32') == jnp.bfloat16
  assert frozen.storage_dtype('params/neck/up1_0/kernel', 'float32') == jnp.float32
  assert frozen.storage_dtype('batch_stats/decode_head/norm/mean', 'float32') == jnp.float32
  assert trained.storage_dtype('params/backbone/blocks/mlp/fc1/kernel', 'float32') == jnp.float32
  assert frozen.attention_choice(training=True) == ('xla', 0)
  assert not frozen.trained_blocks and trained.trained_blocks


def test_adamw_step_matches_torch():
  """One and two steps of our chain equal torch.optim.AdamW with per-group lr
  scale (layer decay) and decoupled weight decay on kernels only."""
  import torch
  rng = np.random.default_rng(0)
  params = {'backbone/blocks/mlp/fc1/kernel': rng.normal(size=(3, 4, 5)).astype(np.float32),
            'backbone/blocks/norm1/scale': rng.normal(size=(3, 4)).astype(np.float32),
            'decode_head/conv_seg/kernel': rng.normal(size=(1, 1, 4, 2)).astype(np.float32)}
  grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
           for _ in range(2)]
  train = common.base_config().train
  train.update(dict(lr=1e-2, steps=10, warmup_steps=0, weight_decay=0.05, layer_decay=0.9))
  tx, schedule = optim.make_optimizer(train, params, depth=3)
  state = tx.init(params)
  ours = dict(params)
  for g in grads:
    updates, state = tx.update(g, state, ours)
    ours = optax.apply_updates(ours, updates)

  # torch: one group per (param, block) slice with lr scaled by 0.9 ** (L - id - 1).
  groups, tensors = [], {}
  for k, v in params.items():
    for i in range(v.shape[0]) if k.startswith('backbone/blocks') else [None]:
      t = torch.nn.Parameter(torch.tensor(v[i] if i is not None else v))
      layer = i + 1 if i is not None else 4
      groups.append(dict(params=[t], lr=1e-2 * 0.9 ** (5 - layer - 1),
                         weight_decay=0.05 if k.endswith('kernel') else 0.0))
      tensors[(k, i)] = t
  opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
  for step, g in enumerate(grads):
    for (k, i), t in tensors.items():
      t.grad = torch.tensor(g[k][i] if i is not None else g[k])
    for group in opt.param_groups:  # the poly schedule, as mmcv sets it before each step
      group['lr'] = group.setdefault('initial_lr', group['lr']) * float(schedule(step)) / 1e-2
    opt.step()
  for (k, i), t in tensors.items():
    got = np.asarray(ours[k][i] if i is not None else ours[k])
    np.testing.assert_allclose(got, t.detach().numpy(), rtol=1e-5, atol=1e-6)
