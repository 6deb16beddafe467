r"""A pretrained InternViT-6B as a feature extractor (no head).

Convert and extract (ARG: 224 | 448_v1_0 | 448_v1_2 | 448_v1_5 | 448_v2_5, plus
`tiny` for a small random model and `img_size=N` for the input grid):

  python -m convert.pth_to_orbax --src=pretrained/intern_vit_6b_224px.pth \
      --dst=converted/intern_vit_6b_224px --config=configs/features.py:224

  from internseg_jax import api
  model = api.init_model('configs/features.py:224', 'converted/intern_vit_6b_224px')
  feats = api.extract_features(model, images)  # [(B, 36, 36, 3200)] for 504x504 input
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, variant='224', tiny=False, img_size=504)
  config = common.base_config(args.variant)
  if args.tiny:
    common.tiny_backbone(config)
  config.model.backbone.img_size = args.img_size  # also the crop and window size
  config.eval.stride = min(config.eval.stride, args.img_size)
  config.lock()  # a misspelt key is an error, here and in --config.KEY=VALUE overrides
  return config
