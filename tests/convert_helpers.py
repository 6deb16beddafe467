"""Test (and benchmark) helpers around the converter: in-memory state dicts
straight to our numpy variables, without files."""
import jax

from convert import backbone, lazy_stack
from convert.pth_to_orbax import build_variables
from convert.tensors import TensorInfo, TensorSource
from convert.torch_io import numpy_dtype, to_numpy


class StateDictSource(TensorSource):
  """An in-memory PyTorch state dict as a TensorSource."""

  def __init__(self, state_dict, path: str = '<state dict>'):
    self.state_dict = state_dict
    tensors = {k: TensorInfo(tuple(v.shape), numpy_dtype(v.dtype)) for k, v in state_dict.items()}
    super().__init__(path, tensors, files=[], meta=dict(format='memory'))

  def read(self, name):
    return to_numpy(self.state_dict[name].detach())


def materialize(tree):
  """The same tree with every LazyStack read into one numpy array."""
  return jax.tree.map(lazy_stack.materialize, tree, is_leaf=lazy_stack.is_lazy)


def state_dict_to_variables(sd, config=None):
  """An in-memory state dict (backbone or segmentor) -> our variables as numpy."""
  return materialize(build_variables(StateDictSource(sd), config)[0])


def state_dict_to_params(sd, num_heads: int | None = None, img_size: int | None = None):
  """An in-memory backbone state dict -> our {'backbone': ...} numpy tree."""
  source = StateDictSource(sd)
  arch = backbone.detect(source)
  num_heads = num_heads or max(1, arch['embed_dim'] // 128)
  ours = backbone.expected_shapes(arch, num_heads)
  tree = backbone.build_tree(source, arch, ours, img_size=img_size or arch['pretrain_size'],
                             patch_size=arch['patch_size'])
  return {'backbone': materialize(tree)}


def original_init_weights(sd, img_size: int, patch_size: int = 14):
  """What the original does to a pretrained state dict when it loads one
  (InternViT6B.init_weights, InternVL-MMDetSeg intern_vit_6b.py): unwrap
  'module', then resize pos_embed (its patch part as a (1, C, g, g) view) and
  the patch kernel with F.interpolate(bicubic, align_corners=False) on the
  file's own tensors (bf16 stays bf16)."""
  import torch
  import torch.nn.functional as F
  sd = dict(sd.get('module', sd))
  pos = sd['pos_embed']
  g = int(round((pos.shape[1] - 1) ** 0.5))
  grid = img_size // patch_size
  image = pos[:, 1:, :].reshape(1, g, g, -1).permute(0, 3, 1, 2)
  image = F.interpolate(image, size=(grid, grid), mode='bicubic', align_corners=False)
  sd['pos_embed'] = torch.cat([pos[:, :1, :], image.reshape(1, -1, grid * grid).permute(0, 2, 1)],
                              dim=1)
  sd['patch_embed.proj.weight'] = F.interpolate(
      sd['patch_embed.proj.weight'], size=(patch_size, patch_size), mode='bicubic',
      align_corners=False)
  return sd
