"""Analytic model FLOPs (2 x multiply-adds of the learned layers) per image.

Counted: every convolution, transposed convolution and dense layer, the two
attention products of the ViT blocks and the weighted sum of the deformable
attention. Not counted: norms, activations, softmax, pooling, bilinear resizes,
the deformable sampling's gather and the loss (elementwise or memory-bound work,
as MFU conventions leave out). tests/test_bench_flops.py checks each function
against the convolutions and matmuls in the traced program of the module.

Training multiplies the forward count by the passes it makes (`train_flops`):
x3 (forward, input gradients, weight gradients) for trained parts; x1 for a
frozen backbone that is not differentiated (linear probing, head tuning); x2
for the adapter's frozen ViT blocks, which are differentiated with respect to
their inputs only (the injectors before them are trained). Remat's recomputed
forward is not counted (model FLOPs, not hardware FLOPs).
"""
from internseg_jax.models.intern_vit import forward_flops


def conv_flops(height: int, width: int, kernel: int, c_in: int, c_out: int,
               groups: int = 1) -> float:
  """A kernel x kernel convolution producing a height x width map."""
  return 2.0 * height * width * kernel * kernel * (c_in // groups) * c_out


def dense_flops(tokens: int, c_in: int, c_out: int) -> float:
  return 2.0 * tokens * c_in * c_out


def vit_block_flops(embed_dim: int, tokens: int, mlp_ratio: float = 4.0) -> float:
  """qkv, proj, fc1, fc2 and the two attention products of one block."""
  return (2.0 * tokens * embed_dim * embed_dim * (4 + 2 * mlp_ratio)
          + 4.0 * tokens * tokens * embed_dim)


def neck_flops(embed_dim: int, grid: int) -> float:
  """PyramidNeck on a grid x grid ViT map: up1 = ConvT(2,2) twice, up2 = ConvT(2,2);
  each ConvT is a matmul C -> 4C per input pixel."""
  convt = lambda g: dense_flops(g * g, embed_dim, 4 * embed_dim)
  return convt(grid) + convt(2 * grid) + convt(grid)


def uper_flops(in_channels: int, sizes, channels: int = 1536, pool_scales=(1, 2, 3, 6),
               num_classes: int = 150) -> float:
  """UPerHead on four maps of `in_channels` with (h, w) `sizes`, finest first."""
  (h0, w0), top = sizes[0], sizes[-1]
  flops = sum(conv_flops(s, s, 1, in_channels, channels) for s in pool_scales)   # PPM 1x1
  flops += conv_flops(*top, 3, in_channels + len(pool_scales) * channels, channels)  # bottleneck
  for h, w in sizes[:-1]:
    flops += conv_flops(h, w, 1, in_channels, channels)     # lateral
    flops += conv_flops(h, w, 3, channels, channels)        # fpn conv
  flops += conv_flops(h0, w0, 3, len(sizes) * channels, channels)  # fpn_bottleneck
  return flops + conv_flops(h0, w0, 1, channels, num_classes)      # conv_seg


def fcn_flops(in_channels: int, size, channels: int = 1536, num_classes: int = 150) -> float:
  """Auxiliary FCNHead: one 3x3 ConvModule and the 1x1 classifier."""
  return conv_flops(*size, 3, in_channels, channels) + conv_flops(*size, 1, channels, num_classes)


def linear_head_flops(in_channels: int, size, num_classes: int = 150) -> float:
  return conv_flops(*size, 1, in_channels, num_classes)


def msdeform_flops(queries: int, values: int, embed_dim: int, n_heads: int, n_levels: int,
                   n_points: int, ratio: float) -> float:
  """MSDeformAttn: value / offset / weight / output projections and the
  weighted sum over 4 bilinear neighbours of every sampling point."""
  value_dim = int(embed_dim * ratio)
  samples = n_heads * n_levels * n_points
  return (dense_flops(values, embed_dim, value_dim)
          + dense_flops(queries, embed_dim, 2 * samples)
          + dense_flops(queries, embed_dim, samples)
          + dense_flops(queries, value_dim, embed_dim)
          + 2.0 * queries * samples * 4 * (value_dim // n_heads))


def adapter_flops(embed_dim: int = 3200, depth: int = 48, img_size: int = 512,
                  mlp_ratio: float = 4.0, conv_inplane: int = 64, deform_heads: int = 25,
                  n_points: int = 4, cffn_ratio: float = 0.25, deform_ratio: float = 0.25,
                  interactions: int = 4, extra_extractors: int = 2) -> dict:
  """InternViTAdapter forward per image: {'vit': patch embedding + blocks,
  'adapter': SPM, injectors, extractors (+ ConvFFN), the 2x up-sampling}."""
  c, n = embed_dim, conv_inplane
  g = img_size // 16
  levels = [(img_size // 8,) * 2, (g, g), (img_size // 32,) * 2]
  vit_tokens, level_tokens = g * g, sum(h * w for h, w in levels)
  vit = depth * vit_block_flops(c, vit_tokens, mlp_ratio) + conv_flops(g, g, 16, 3, c)

  s2, s4 = img_size // 2, img_size // 4
  spm = (conv_flops(s2, s2, 3, 3, n) + 2 * conv_flops(s2, s2, 3, n, n)
         + conv_flops(*levels[0], 3, n, 2 * n) + conv_flops(*levels[1], 3, 2 * n, 4 * n)
         + conv_flops(*levels[2], 3, 4 * n, 4 * n)
         + conv_flops(s4, s4, 1, n, c) + conv_flops(*levels[0], 1, 2 * n, c)
         + conv_flops(*levels[1], 1, 4 * n, c) + conv_flops(*levels[2], 1, 4 * n, c))
  deform = lambda q, v, n_levels: msdeform_flops(q, v, c, deform_heads, n_levels, n_points,
                                                 deform_ratio)
  injector = deform(vit_tokens, level_tokens, 3)
  hidden = int(c * cffn_ratio)
  ffn = (dense_flops(level_tokens, c, hidden) + dense_flops(level_tokens, hidden, c)
         + sum(conv_flops(h, w, 3, hidden, hidden, groups=hidden) for h, w in levels))
  extractor = deform(level_tokens, vit_tokens, 1) + ffn
  up = dense_flops(levels[0][0] * levels[0][1], c, 4 * c)
  adapter = (spm + interactions * injector + (interactions + extra_extractors) * extractor + up)
  return dict(vit=vit, adapter=adapter)


def blocks_run(backbone_config) -> int:
  return max(int(i) % backbone_config.depth for i in backbone_config.out_indices) + 1


def train_flops(config, adapter=None) -> dict:
  """Model FLOPs of one image under `config` (a segmentation config;
  `adapter`: the InternViTAdapter module that replaces its backbone, or None). Returns the forward counts of
  the parts, the backbone's pass multiplier, 'total' = the training step's sum
  of forward x passes, and 'inference' = one forward without the auxiliary head."""
  bb, head, aux = config.model.backbone, config.model.decode_head, config.model.auxiliary_head
  c, crop = bb.embed_dim, config.data.crop_size
  if adapter is not None:
    a = adapter
    parts = adapter_flops(a.embed_dim, a.depth, a.img_size, a.mlp_ratio, a.conv_inplane,
                          a.deform_num_heads, a.n_points, a.cffn_ratio, a.deform_ratio,
                          len(a.interaction_indexes))
    sizes = [(crop // s,) * 2 for s in (4, 8, 16, 32)]
    neck = 0.0
    passes = dict(backbone=2, adapter=3)
    backbone = parts['vit']
  else:
    g = crop // bb.patch_size
    backbone = forward_flops(c, blocks_run(bb), crop, patch_size=bb.patch_size,
                             mlp_ratio=bb.mlp_ratio)
    parts = dict(adapter=0.0)
    neck = neck_flops(c, g) if bb.with_fpn else 0.0
    sizes = ([(4 * g,) * 2, (2 * g,) * 2, (g, g), (g // 2,) * 2] if bb.with_fpn
             else [(g, g)] * len(bb.out_indices))
    passes = dict(backbone=1 if bb.freeze else 3, adapter=3)
  if head.type == 'uper':
    heads = uper_flops(c, sizes, head.channels, tuple(head.pool_scales), head.num_classes)
  else:
    heads = linear_head_flops(c, sizes[-1], head.num_classes)
  aux_flops = 0.0 if aux is None else fcn_flops(c, sizes[aux.in_index], aux.channels,
                                                  head.num_classes)
  out = dict(backbone=backbone, adapter=parts['adapter'], neck=neck, heads=heads, aux=aux_flops,
             backbone_passes=passes['backbone'])
  # Inference (Segmentor.logits): the auxiliary head is not run (its output is unused).
  out['inference'] = backbone + parts['adapter'] + neck + heads
  out['total'] = (backbone * passes['backbone'] + parts['adapter'] * passes['adapter']
                  + 3 * (neck + heads + aux_flops))
  return out
