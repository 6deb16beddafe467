"""Tiny PyTorch reference segmentors, their configs, and mmseg-style .pth files."""
import numpy as np
import torch

from configs import common
from tests.reference import intern_vit_torch as ref_vit
from tests.reference import seg_torch as ref_seg

WIDTH, HEADS, DEPTH, CHANNELS, CLASSES, CROP = 32, 2, 4, 16, 7, 56


def tiny_config(kind: str, aux_in_index: int = 2):
  """Our config for the tiny segmentor of `kind` ('linear' or 'uper')."""
  config = common.base_config('224')
  bb = config.model.backbone
  bb.embed_dim, bb.num_heads, bb.depth = WIDTH, HEADS, DEPTH
  bb.img_size, bb.pretrain_size, bb.attention = CROP, CROP, 'xla'
  config.model.dtype = 'float32'
  head = config.model.decode_head
  head.num_classes, head.channels = CLASSES, CHANNELS
  if kind == 'uper':
    bb.out_indices, bb.with_fpn = [0, 1, 2, 3], True
    head.type, head.dropout = 'uper', 0.1
    config.model.auxiliary_head = dict(channels=CHANNELS, in_index=aux_in_index, loss_weight=0.4,
                                       dropout=0.1)
  else:
    bb.out_indices = [DEPTH - 2]
  config.eval.crop_size, config.eval.stride = CROP, 42
  config.eval.scale = (4 * CROP, CROP)
  config.lock()
  return config


def torch_segmentor(kind: str, seed: int = 0, aux_in_index: int = 2):
  """A randomized float32 reference segmentor in eval mode."""
  if kind == 'uper':
    backbone = ref_vit.InternViTTorch(embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
                                      pretrain_size=CROP, out_indices=(0, 1, 2, 3))
    model = ref_seg.SegmentorTorch(
        backbone, True, ref_seg.UPerHeadTorch(WIDTH, CHANNELS, CLASSES),
        ref_seg.FCNAuxHeadTorch(WIDTH, CHANNELS, CLASSES, in_index=aux_in_index))
  else:
    backbone = ref_vit.InternViTTorch(embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
                                      pretrain_size=CROP, out_indices=(DEPTH - 2,))
    model = ref_seg.SegmentorTorch(backbone, False, ref_seg.LinearHeadTorch(WIDTH, CLASSES))
  return ref_seg.randomize_seg_(model, seed).eval()


def save_mmseg(model, path, dtype=None):
  """torch.save in the released mmseg layout: {'meta', 'state_dict'}; the
  backbone optionally in `dtype` (the released files hold bf16 backbones)."""
  sd = {k: (v.to(dtype) if dtype is not None and k.startswith('backbone.') and v.is_floating_point()
            else v) for k, v in model.state_dict().items()}
  torch.save({'meta': {'mmseg_version': '0.27.0', 'iter': 80000}, 'state_dict': sd}, path)
  return path


def variables_from_torch(model, config):
  """Our variables (numpy) of a reference segmentor, through the converter's map."""
  from tests.convert_helpers import state_dict_to_variables
  return state_dict_to_variables(model.state_dict(), config)


def torch_logits(model, images_nhwc: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = model.encode_decode(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2))
  return out.permute(0, 2, 3, 1).numpy()


def rel_l2(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.linalg.norm(got - want) / np.linalg.norm(want)
