"""Test (and benchmark) helpers around the converter: in-memory state dicts
straight to our numpy variables, without files."""
import os

import jax
import numpy as np

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


# ----------------------------------------------------------------------------- tiny InternViT files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH, HEADS, DEPTH, PRETRAIN, PATCH = 64, 2, 4, 56, 14
OUT = (1, 3)


def torch_model(depth=DEPTH, width=WIDTH, heads=HEADS, seed=0, pretrain=PRETRAIN, patch=PATCH):
  """The float32 PyTorch reference InternViT (tests/reference), randomized."""
  from tests.reference.intern_vit_torch import InternViTTorch, randomize_
  model = InternViTTorch(embed_dim=width, depth=depth, num_heads=heads, pretrain_size=pretrain,
                         patch_size=patch, out_indices=[i for i in OUT if i < depth])
  return randomize_(model, seed=seed).eval()


def tiny_config(img_size=PRETRAIN, depth=DEPTH, patch=PATCH):
  from internseg_jax import api
  config = api.load_config(os.path.join(ROOT, f'configs/features.py:tiny,img_size={img_size}'))
  bb = config.model.backbone
  bb.pretrain_size, bb.depth, bb.out_indices, bb.patch_size = PRETRAIN, depth, list(OUT), patch
  config.model.dtype = 'float32'
  return config


def stored(dst):
  """The converted variables' stored shapes and dtypes (no data read)."""
  from internseg_jax import weights
  return weights.params_metadata(weights.find_params_dir(dst))


def restored(dst):
  from internseg_jax import weights
  params_dir = weights.find_params_dir(dst)
  return weights.restore_params(params_dir, weights.params_metadata(params_dir))


def as_numpy(tensor):
  return to_numpy(tensor.contiguous())


def rel_l2(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def reference_features(sd, images, pretrain=PRETRAIN, patch=PATCH):
  """The float32 torch reference on `sd` (cast to float32), as NHWC numpy."""
  import torch
  model = torch_model(pretrain=pretrain, patch=patch)
  model.load_state_dict({k: v.float() for k, v in sd.items()})
  with torch.no_grad():
    feats = model(torch.from_numpy(images).permute(0, 3, 1, 2))
  return [f.permute(0, 2, 3, 1).numpy() for f in feats]


def check_features(sd, dst, img_size, patch=PATCH, reference_pretrain=PRETRAIN):
  """Our features from the converted `dst` vs the reference on `sd`: relative
  L2 error <= 1e-5 (float32 on both sides)."""
  from internseg_jax import api
  model = api.init_model(tiny_config(img_size, patch=patch), str(dst))
  images = np.random.default_rng(img_size).standard_normal((2, img_size, img_size, 3),
                                                            np.float32)
  ours = api.extract_features(model, images)
  ref = reference_features(sd, images, reference_pretrain, patch)
  assert len(ours) == len(ref) == len(OUT)
  grid = img_size // patch
  for a, b in zip(ours, ref):
    assert a.shape == b.shape == (2, grid, grid, WIDTH)
    assert rel_l2(np.asarray(a), b) <= 1e-5
  return model


def run_main(*args):
  """`python -m convert.pth_to_orbax ARGS` in this process -> its exit code."""
  import pytest
  from convert import pth_to_orbax
  pth_to_orbax.FLAGS(['convert', *args])
  try:
    with pytest.raises(SystemExit) as e:
      pth_to_orbax.main([])
  finally:
    pth_to_orbax.FLAGS.unparse_flags()
  return e.value.code


def with_stored_resizes(sd, dst):
  """`sd` with our stored pos_embed and patch kernel, in the PyTorch layout (so
  the features compare the model, not the one-step bf16 differences above)."""
  import torch
  back = restored(dst)['params']['backbone']
  kernel = np.asarray(back['patch_embed']['kernel'], np.float32).transpose(3, 2, 0, 1)
  return dict(sd, pos_embed=torch.from_numpy(np.asarray(back['pos_embed'], np.float32)),
              **{'patch_embed.proj.weight': torch.from_numpy(kernel.copy())})


def bf16_steps(got, want):
  """Elements that differ, and the largest difference in bf16 steps (ulps)."""
  import ml_dtypes
  got = np.asarray(got, ml_dtypes.bfloat16).astype(np.float32)
  want = np.asarray(want, ml_dtypes.bfloat16).astype(np.float32)
  ulp = np.spacing(np.abs(want).astype(ml_dtypes.bfloat16)).astype(np.float32)
  steps = np.abs(got - want) / np.maximum(ulp, np.finfo(np.float32).tiny)
  return int((got != want).sum()), float(steps.max())
