"""Config files: the original's recipe for every config x variant, one source
per value, arguments, and clear errors for typos and impossible values."""
import pytest

from configs import features
from internseg_jax import config as config_lib
from internseg_jax.errors import ConfigError
from tests.reference.original_configs import COMMON, CONFIGS


@pytest.mark.parametrize('name,variant', sorted(CONFIGS))
def test_every_config_and_variant_has_the_original_recipe(name, variant):
  want = CONFIGS[(name, variant)]
  path, _, fraction = name.partition(':')
  arg = ','.join(filter(None, [fraction, variant]))
  c = config_lib.load_config(f'configs/{path}.py:{arg}')
  bb, t, ev = c.model.backbone, c.train, c.eval
  assert (bb.depth, bb.pretrain_size, bb.embed_dim, bb.num_heads) == (
      want['depth'], want['pretrain_size'], 3200, 25)
  adapter = want.get('adapter')
  if adapter is None:
    assert list(bb.out_indices) == want['out_indices'] and c.model.adapter is None
  else:  # our out_indices for the adapter: the last block of each interaction
    assert c.model.adapter.to_dict() == adapter
    assert list(bb.out_indices) == [last for _, last in adapter['interaction_indexes']]
    assert bb.init_values == want['vit_init_values']
  assert bb.drop_path_rate == want['drop_path'] and bb.freeze == want['freeze']
  assert (t.lr, t.weight_decay, t.layer_decay) == (COMMON['lr'], want['weight_decay'],
                                                   want['layer_decay'])
  assert (t.steps, t.warmup_steps, t.warmup_ratio) == (want['steps'], want['warmup'], 1e-6)
  assert (t.b1, t.b2, t.eps, t.batch_size) == (0.9, 0.999, 1e-8, COMMON['batch'])
  assert (t.eval_every, t.checkpoint_every, t.max_to_keep) == (
      COMMON['eval_every'], COMMON['checkpoint_every'], COMMON['max_keep'])
  crop, scale = want.get('crop', COMMON['crop']), want.get('scale', COMMON['scale'])
  assert (ev.mode, ev.crop_size, ev.stride, tuple(ev.scale)) == (
      'slide', crop, want.get('stride', COMMON['stride']), scale)
  assert ev.resize == want['resize'] and ev.size_divisor == want.get('size_divisor', 14)
  assert (c.data.crop_size, bb.img_size, tuple(c.data.scale)) == (crop, crop, scale)
  assert bb.patch_size == want.get('patch', 14)
  assert c.model.decode_head.type == want['head'] and c.model.decode_head.num_classes == 150
  aux = c.model.auxiliary_head
  assert (None if aux is None else aux.in_index) == want['aux']
  if want['head'] == 'uper':
    assert bb.with_fpn == want.get('with_fpn', True)
    assert c.model.decode_head.channels == 1536 and aux.loss_weight == 0.4
  assert c.data.fraction == want.get('fraction', 1)
  config_lib.validate(c)


@pytest.mark.parametrize('variant', ['448_v1_0', '448_v2_5'])
@pytest.mark.parametrize('config', ['fewshot.py:1of8,', 'upernet_adapter.py:'])
def test_no_448px_few_shot_or_adapter_in_the_original(config, variant):
  with pytest.raises(ConfigError, match='no 448'):
    config_lib.load_config(f'configs/{config}{variant}')


def test_tiny_adapter():
  c = config_lib.load_config('configs/upernet_adapter.py:tiny')
  bb, ad = c.model.backbone, c.model.adapter
  assert (bb.embed_dim, bb.num_heads, bb.depth, bb.patch_size, bb.img_size) == (64, 4, 8, 16, 64)
  assert ad.interaction_indexes == [[0, 1], [2, 3], [4, 5], [6, 7]] and ad.deform_num_heads == 4
  assert list(bb.out_indices) == [1, 3, 5, 7] and not bb.with_fpn
  assert c.eval.crop_size == c.data.crop_size == 64 and c.eval.size_divisor == 0
  assert c.data.synthetic is not None and c.predict.after_train > 0
  config_lib.validate(c)


@pytest.mark.parametrize('key,value,match', [
    ('eval.mode', 'whole', "eval.mode='whole': must be 'slide' with model.adapter"),
    ('eval.resize', 'fit', "eval.resize='fit': must be 'short_side' with model.adapter"),
    ('model.backbone.patch_size', 14, 'must be 16 with model.adapter'),
    ('model.backbone.with_fpn', True, 'must be False with model.adapter'),
    ('data.crop_size', 496, 'must be a multiple of 32 with model.adapter'),
    ('model.adapter.interaction_indexes', [[0, 11], [12, 23], [24, 35], [36, 48]],
     'pairs within 0..47'),
    ('model.adapter.interaction_indexes', [[0, 11], [11, 23], [24, 35], [36, 47]],
     'non-overlapping'),
    ('model.backbone.out_indices', [11, 23, 35, 46], 'last block of each interaction'),
    ('model.adapter.deform_num_heads', 7, 'multiple of model.adapter.deform_num_heads'),
    ('model.auxiliary_head.in_index', 4, 'must index one of the 4 feature maps'),
])
def test_validate_adapter(key, value, match):
  assert_refused('configs/upernet_adapter.py', key, value, match)


def assert_refused(config_name, key, value, match):
  """The config with `key` (dotted) set to `value` fails validation with `match`."""
  c = config_lib.load_config(config_name)
  *parents, leaf = key.split('.')
  node = c
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ConfigError, match=match):
    config_lib.validate(c)


def test_one_source_per_value():
  c = config_lib.load_config('configs/upernet_full.py:224,tiny')
  c.data.crop_size = 70
  assert c.eval.crop_size == c.model.backbone.img_size == 70
  c.eval.scale = (280, 70)
  assert tuple(c.data.scale) == (280, 70)
  c.model.decode_head.num_classes = 9
  assert c.data.num_classes == 9


@pytest.mark.parametrize('variant,depth,pretrain', [
    ('224', 48, 224), ('448_v1_0', 45, 448), ('448_v1_2', 45, 448), ('448_v1_5', 45, 448),
    ('448_v2_5', 45, 448)])
def test_variants(variant, depth, pretrain):
  bb = features.get_config(variant).model.backbone
  assert (bb.depth, bb.pretrain_size, bb.embed_dim, bb.num_heads) == (depth, pretrain, 3200, 25)
  assert bb.out_indices == [depth - 1]


def test_arguments_and_tiny_mode():
  config = config_lib.load_config('configs/features.py:448_v2_5,tiny,img_size=70')
  bb = config.model.backbone
  assert (bb.img_size, bb.depth, bb.embed_dim, bb.pretrain_size) == (70, 4, 64, 448)


@pytest.mark.parametrize('arg,match', [('depht=3', 'unknown config argument'),
                                       ('variant=999', 'unknown variant')])
def test_bad_arguments_are_errors(arg, match):
  with pytest.raises(ConfigError, match=match):
    features.get_config(arg)


def test_misspelt_key_is_an_error():
  config = features.get_config('224')
  with pytest.raises(AttributeError):
    config.model.backbone.embed_dims = 3  # ConfigDicts from get_config are locked


def test_missing_config_file():
  with pytest.raises(ConfigError, match='not found'):
    config_lib.load_config('configs/nope.py')


@pytest.mark.parametrize('key,value,match', [
    ('model.decode_head.type', 'upernet', "must be one of 'linear', 'uper'"),
    ('eval.mode', 'sliding', "eval.mode='sliding': must be one of 'slide', 'whole'"),
    ('data.source', 'tfrecord', 'data.source'),
    ('model.backbone.remat', 'some', 'model.backbone.remat'),
    ('model.backbone.out_indices', [48], 'block indices in 0..47'),
    ('model.auxiliary_head.in_index', 4, 'must index one of the 4 feature maps'),
    ('eval.stride', 0, 'eval.stride=0'),
    ('train.accumulate', 3, 'must divide train.batch_size'),
    ('mesh.fsdp', 0, 'mesh.fsdp=0'),
    ('data.crop_size', 500, 'multiple of model.backbone.patch_size'),
])
def test_validate_names_the_key_and_allowed_values(key, value, match):
  assert_refused('configs/upernet_frozen.py:224', key, value, match)


# The config keys that users and acceptance checks call (docs/reference.md, "Contract").
CONTRACT_KEYS = (
    'model.backbone.embed_dim', 'model.backbone.depth', 'model.backbone.num_heads',
    'model.backbone.mlp_ratio', 'model.backbone.patch_size', 'model.backbone.img_size',
    'model.backbone.pretrain_size', 'model.backbone.qkv_bias',
    'model.backbone.qk_normalization', 'model.backbone.init_values',
    'model.backbone.drop_path_rate', 'model.backbone.out_indices', 'model.backbone.with_fpn',
    'model.backbone.freeze', 'model.decode_head.type', 'model.decode_head.channels',
    'model.decode_head.num_classes', 'model.auxiliary_head', 'model.dtype', 'init.pretrained',
    'init.checkpoint', 'data.root', 'eval.mode', 'eval.crop_size', 'eval.stride', 'eval.scale',
    'eval.resize', 'eval.flip', 'eval.scales', 'train.batch_size', 'train.steps', 'train.lr',
    'train.checkpoint_every', 'train.eval_every', 'train.log_every', 'train.seed', 'mesh.data',
    'mesh.fsdp', 'predict.input')


@pytest.mark.parametrize('name', [
    'demo.py', 'features.py', 'linear_frozen.py:448_v2_5', 'fewshot.py:1of8',
    'upernet_frozen.py:tiny', 'upernet_full.py', 'upernet_adapter.py:tiny'])
def test_every_config_has_the_contract_keys(name):
  c = config_lib.load_config(f'configs/{name}')
  for key in CONTRACT_KEYS:
    node = c
    for part in key.split('.'):
      assert part in node, key
      node = node[part]
  aux = c.model.auxiliary_head
  assert aux is None or {'channels', 'in_index', 'loss_weight'} <= set(aux)
  assert c.model.dtype in ('bfloat16', 'float32') and c.eval.flip is False
  assert c.eval.mode in ('slide', 'whole') and c.eval.resize in ('short_side', 'fit')
  assert c.model.decode_head.type in ('linear', 'uper')
