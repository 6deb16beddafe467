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


# ----------------------------------------------------------------------------- Hugging Face layout

def hf_name(pth: str) -> str:
  """A .pth name -> InternVisionModel's (InternVL's modeling_intern_vit.py),
  written out from its modules (embeddings.*, encoder.layers.{i}.*, ls1/ls2
  plain parameters)."""
  top = {'cls_token': 'embeddings.class_embedding',
         'pos_embed': 'embeddings.position_embedding',
         'patch_embed.proj.weight': 'embeddings.patch_embedding.weight',
         'patch_embed.proj.bias': 'embeddings.patch_embedding.bias'}
  if pth in top:
    return top[pth]
  _, i, leaf = pth.split('.', 2)
  leaf = {'ls1.gamma': 'ls1', 'ls2.gamma': 'ls2'}.get(leaf, leaf)
  return f'encoder.layers.{i}.{leaf}'


def intern_vision_config(width: int, depth: int, heads: int, image_size: int) -> dict:
  """config.json of an InternViT repository (InternVisionConfig's fields)."""
  return dict(architectures=['InternVisionModel'], model_type='intern_vit_6b',
              hidden_size=width, intermediate_size=4 * width, num_attention_heads=heads,
              num_hidden_layers=depth, image_size=image_size, patch_size=14, qkv_bias=False,
              qk_normalization=True, norm_type='rms_norm', layer_norm_eps=1e-6,
              hidden_act='gelu', torch_dtype='bfloat16', use_flash_attn=True)


def save_pretrained(folder, tensors: dict, config: dict, max_shard_bytes: int):
  """Writes torch `tensors` as Hugging Face's save_pretrained does: shards filled
  in order up to `max_shard_bytes` (model-0000k-of-0000n.safetensors, metadata
  {'format': 'pt'}), model.safetensors.index.json and config.json. Returns the
  shard paths."""
  import json
  import pathlib
  from safetensors.torch import save_file
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  shards, current, size = [], {}, 0
  for name, tensor in tensors.items():
    nbytes = tensor.numel() * tensor.element_size()
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name], size = tensor.contiguous(), size + nbytes
  shards.append(current)
  weight_map = {}
  for k, shard in enumerate(shards, 1):
    filename = f'model-{k:05d}-of-{len(shards):05d}.safetensors'
    save_file(shard, str(folder / filename), metadata={'format': 'pt'})
    weight_map.update(dict.fromkeys(shard, filename))
  total = sum(t.numel() * t.element_size() for t in tensors.values())
  (folder / 'model.safetensors.index.json').write_text(json.dumps(
      {'metadata': {'total_size': total}, 'weight_map': weight_map}, indent=2, sort_keys=True))
  (folder / 'config.json').write_text(json.dumps(config, indent=2, sort_keys=True))
  return [folder / f for f in sorted(set(weight_map.values()))]
