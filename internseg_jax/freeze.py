"""The one freeze policy: what `model.backbone.freeze` means everywhere.

Computed once from the config, it decides
- which parameters are trained (differentiated, with optimizer state),
- the storage dtype of the frozen ones (bf16 halves their memory),
- how the backbone scans its blocks (one scan emitting every block's output
  when they are differentiated: see InternViT.trained_blocks),
- the attention implementation (cuDNN flash attention on GPU; a trained
  backbone pads its tokens so that the cuDNN backward pass exists).
Frozen means "the ViT itself": its blocks, patch and position embeddings and
cls token. The pyramid neck, an adapter's own layers and the heads always train.
"""
import dataclasses
import re

import jax.numpy as jnp

from internseg_jax.models.build import build_segmentor
from internseg_jax.models.intern_vit import attention_implementation

# Parameter paths (under 'params/') of the ViT proper. For the adapter these are
# exactly what the original freezes (InternViTAdapter.__init__: _freeze_params on
# blocks and patch_embed, pos_embed.requires_grad = False; its cls_token is None).
VIT_PARAMS = re.compile(r'^backbone/(blocks|patch_embed|pos_embed|cls_token)(/|$)')

# cuDNN's flash attention has no backward pass for sequence lengths that are not
# a multiple of 64 (1 + 36 * 36 = 1297 tokens at 504 px; seen on an H200 with
# jax 0.11): a trained backbone on cuDNN pads to the next multiple and masks the
# padded keys, which leaves the real tokens' outputs unchanged.
CUDNN_TRAIN_PAD = 64


@dataclasses.dataclass(frozen=True)
class FreezePolicy:
  frozen_backbone: bool
  frozen_dtype: jnp.dtype
  attention: str            # the config's choice: 'auto' | 'xla' | 'cudnn'
  compute_dtype: jnp.dtype

  @classmethod
  def from_config(cls, config) -> 'FreezePolicy':
    return cls(bool(config.model.backbone.freeze), jnp.dtype(config.train.frozen_dtype),
               config.model.backbone.attention, jnp.dtype(config.model.dtype))

  def is_trainable(self, path: str) -> bool:
    """`path` below 'params' ('backbone/blocks/attn/qkv/kernel')."""
    return not (self.frozen_backbone and VIT_PARAMS.match(path))

  def split(self, flat_params: dict) -> tuple[dict, dict]:
    """Flat params -> (trainable, frozen), both flat dicts."""
    trainable = {k: v for k, v in flat_params.items() if self.is_trainable(k)}
    return trainable, {k: v for k, v in flat_params.items() if k not in trainable}

  def storage_dtype(self, variable_path: str, dtype) -> jnp.dtype:
    """Storage dtype of a variable ('params/...' or 'batch_stats/...')."""
    collection, _, path = variable_path.partition('/')
    if collection == 'params' and not self.is_trainable(path):
      return self.frozen_dtype
    return jnp.dtype(dtype)

  @property
  def trained_blocks(self) -> bool:
    return not self.frozen_backbone

  def attention_choice(self, training: bool) -> tuple[str, int]:
    """(implementation, pad tokens to a multiple of this or 0)."""
    name = attention_implementation(self.attention, self.compute_dtype)
    trained = training and not self.frozen_backbone
    return name, CUDNN_TRAIN_PAD if name == 'cudnn' and trained else 0

  def segmentor(self, model_config, training: bool = False):
    """The Flax segmentor of `model_config` under this policy."""
    attention, pad = self.attention_choice(training)
    return build_segmentor(model_config, attention=attention, pad_tokens_to=pad,
                           trained_blocks=self.trained_blocks and training)
