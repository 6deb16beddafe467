"""Config files: variants, arguments and clear errors for typos."""
import pytest

from configs import common, features
from internseg_jax import api


@pytest.mark.parametrize('variant,depth,pretrain', [
    ('224', 48, 224), ('448_v1_0', 45, 448), ('448_v1_2', 45, 448), ('448_v1_5', 45, 448),
    ('448_v2_5', 45, 448)])
def test_variants(variant, depth, pretrain):
  bb = features.get_config(variant).model.backbone
  assert (bb.depth, bb.pretrain_size, bb.embed_dim, bb.num_heads) == (depth, pretrain, 3200, 25)
  assert bb.out_indices == [depth - 1]


def test_arguments_and_tiny_mode():
  config = api.load_config('configs/features.py:448_v2_5,tiny,img_size=70')
  bb = config.model.backbone
  assert (bb.img_size, bb.depth, bb.embed_dim, bb.pretrain_size) == (70, 4, 64, 448)


@pytest.mark.parametrize('arg,match', [('depht=3', 'unknown config argument'),
                                       ('variant=999', 'unknown variant')])
def test_bad_arguments_are_errors(arg, match):
  with pytest.raises(ValueError, match=match):
    features.get_config(arg)


def test_misspelt_key_is_an_error():
  config = features.get_config('224')
  with pytest.raises(AttributeError):
    config.model.backbone.embed_dims = 3  # ConfigDicts from get_config are locked


def test_missing_config_file():
  with pytest.raises(FileNotFoundError, match='not found'):
    api.load_config('configs/nope.py')
