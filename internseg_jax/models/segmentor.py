"""The segmentor (backbone -> optional pyramid neck -> decode/auxiliary heads)
and its training loss, with MMSegmentation's EncoderDecoder semantics."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from internseg_jax.models.heads import FCNHead, PyramidNeck
from internseg_jax.models.intern_vit import InternViT
from internseg_jax.models.resize import resize_bilinear

IGNORE_INDEX = 255


class Segmentor(nn.Module):
  """Returns {'logits': decode head logits, 'aux_logits': auxiliary logits or
  absent}, both (B, h, w, K) float32 at the head's own resolution."""
  backbone: InternViT
  decode_head: nn.Module
  neck: PyramidNeck | None = None      # `with_fpn`
  auxiliary_head: FCNHead | None = None
  aux_in_index: int = 2

  def backbone_features(self, images, train: bool = False):
    return self.backbone(images, train)

  def features(self, images, train: bool = False):
    """Backbone maps at out_indices, passed through the neck when there is one."""
    feats = self.backbone(images, train)
    if self.neck is not None:
      if len(feats) != 4:
        raise ValueError(f'with_fpn needs 4 out_indices, got {len(feats)}')
      feats = self.neck(feats)
    return feats

  def logits(self, images):
    """Decode-head logits upsampled (bilinear) to the input size, float32 (inference)."""
    return upsample_logits(self(images)['logits'], images.shape[1:3])

  def __call__(self, images, train: bool = False):
    feats = self.features(images, train)
    out = {'logits': self.decode_head(feats, train)}
    if self.auxiliary_head is not None:
      out['aux_logits'] = self.auxiliary_head(feats[self.aux_in_index], train)
    return out


def upsample_logits(logits, size):
  """Logits to `size` with PyTorch bilinear (align_corners=False), in float32."""
  return resize_bilinear(logits.astype(jnp.float32), tuple(size))


def cross_entropy(logits, labels, ignore_index: int = IGNORE_INDEX):
  """mmseg 0.27 CrossEntropyLoss: logits upsampled to the label size, per-pixel
  CE with ignored pixels counting as zero, mean over ALL pixels
  (avg_non_ignore=False)."""
  logits = upsample_logits(logits, labels.shape[1:3])
  valid = labels != ignore_index
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(valid, nll, 0.0)) / labels.size


def segmentation_loss(outputs, labels, aux_weight: float = 0.4):
  """Total loss and its parts: decode CE + aux_weight * auxiliary CE."""
  parts = {'loss_decode': cross_entropy(outputs['logits'], labels)}
  if 'aux_logits' in outputs:
    parts['loss_aux'] = aux_weight * cross_entropy(outputs['aux_logits'], labels)
  return sum(parts.values()), parts
