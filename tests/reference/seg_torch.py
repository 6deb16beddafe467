"""Independent float32 PyTorch reference of the InternViT-6B segmentation necks and heads.

Mirrors OpenGVLab/InternVL ``segmentation/`` (mmseg 0.27 semantics) without mmcv/mmseg:
the ``with_fpn`` pyramid (up1..up4), mmcv-style ConvModule (conv without bias, BN, ReLU),
the linear-probing head (InternVL's FCNHead with num_convs=0, with_norm=True), the UPerNet
head (PPM + FPN), the auxiliary FCN head and an EncoderDecoder-like segmentor whose
state-dict keys match released mmseg checkpoints.  Every bilinear resize is
``F.interpolate(mode='bilinear', align_corners=False)``.  Heads run in float32; the
backbone (and the pyramid, which lives inside it) may run in bfloat16.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.reference.intern_vit_torch import InternViTTorch, randomize_

__all__ = ["LayerNorm2dTorch", "PyramidNeckTorch", "ConvModuleTorch", "PPMTorch",
           "LinearHeadTorch", "UPerHeadTorch", "FCNAuxHeadTorch", "SegmentorTorch",
           "randomize_seg_", "seg_ce_loss", "bilinear_resize", "torch_adaptive_avg_pool_bins"]

IGNORE_INDEX = 255


def bilinear_resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """mmseg ``resize`` as used by the heads: bilinear, align_corners=False, no antialias."""
    return F.interpolate(x, size=tuple(int(s) for s in size), mode="bilinear",
                         align_corners=False)


def torch_adaptive_avg_pool_bins(n: int, s: int) -> List[Tuple[int, int]]:
    """Bins of ``AdaptiveAvgPool`` along one axis of length n to s outputs: [start, end)."""
    return [((i * n) // s, -((-(i + 1) * n) // s)) for i in range(s)]


class LayerNorm2dTorch(nn.Module):
    """InternVL's ``LayerNorm(data_format='channels_first')`` on NCHW maps.

    Normalizes over axis 1 (channels) with the biased variance, eps 1e-6, always computing
    in float32 (weight and bias cast to float32 too), result cast back to the input dtype.
    Numerically the same function as a channels-last ``F.layer_norm`` over C.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        mu = xf.mean(dim=1, keepdim=True)
        var = (xf - mu).pow(2).mean(dim=1, keepdim=True)
        y = (xf - mu) / torch.sqrt(var + self.eps)
        y = self.weight.float()[:, None, None] * y + self.bias.float()[:, None, None]
        return y.to(x.dtype)


class PyramidNeckTorch(nn.Module):
    """The ``with_fpn`` layers of InternViT6B (with_final_norm=False).

    up1 = ConvT(2,2) -> LayerNorm2d -> GELU -> ConvT(2,2) -> Identity   (x4)
    up2 = ConvT(2,2) -> Identity                                        (x2)
    up3 = Identity -> Identity                                          (x1)
    up4 = MaxPool2d(2, 2) -> Identity                                   (/2)
    The trailing Identity slots stand where InternVL puts its optional final norm, so the
    parameter keys are ``up1.0.*``, ``up1.1.*``, ``up1.3.*``, ``up2.0.*``.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.up1 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), LayerNorm2dTorch(dim),
                                 nn.GELU(), nn.ConvTranspose2d(dim, dim, 2, 2), nn.Identity())
        self.up2 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.Identity())
        self.up3 = nn.Sequential(nn.Identity(), nn.Identity())
        self.up4 = nn.Sequential(nn.MaxPool2d(kernel_size=2, stride=2), nn.Identity())

    @staticmethod
    def apply(owner: nn.Module, feats: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Run ``owner.up1..up4`` (a neck, or a backbone carrying them) on 4 NCHW maps."""
        assert len(feats) == 4, "the pyramid needs exactly 4 feature maps"
        return [getattr(owner, f"up{i + 1}")(f) for i, f in enumerate(feats)]

    def forward(self, feats: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        return PyramidNeckTorch.apply(self, feats)


class ConvModuleTorch(nn.Module):
    """mmcv ConvModule with BN and ReLU: conv (no bias) -> BatchNorm2d(eps 1e-5) -> ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=1e-5, momentum=0.1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class _DecodeHeadBase(nn.Module):
    """mmseg BaseDecodeHead's classifier: optional Dropout2d then 1x1 ``conv_seg``."""

    def _init_cls(self, channels: int, num_classes: int, dropout: float):
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else None

    def cls_seg(self, feat: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            feat = self.dropout(feat)
        return self.conv_seg(feat)


class LinearHeadTorch(_DecodeHeadBase):
    """InternVL FCNHead(num_convs=0, concat_input=False, with_norm=True, dropout 0).

    BatchNorm2d(C) (SyncBN in training; eps 1e-5) -> 1x1 conv C->num_classes, on
    ``inputs[in_index]`` (mmseg default in_index -1; the linear configs have one map).
    """

    def __init__(self, in_channels: int, num_classes: int, in_index: int = -1,
                 dropout: float = 0.0):
        super().__init__()
        self.in_index = in_index
        self.norm = nn.BatchNorm2d(in_channels, eps=1e-5, momentum=0.1)
        self._init_cls(in_channels, num_classes, dropout)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.cls_seg(self.norm(inputs[self.in_index]))


class PPMTorch(nn.ModuleList):
    """mmseg PPM: per scale AdaptiveAvgPool2d(s) -> 1x1 ConvModule -> bilinear back."""

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int):
        super().__init__([nn.Sequential(nn.AdaptiveAvgPool2d(int(s)),
                                        ConvModuleTorch(in_channels, channels, 1))
                          for s in pool_scales])

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return [bilinear_resize(m(x), x.shape[2:]) for m in self]


class UPerHeadTorch(_DecodeHeadBase):
    """mmseg 0.27 UPerHead (input_transform='multiple_select', in_index 0..3)."""

    def __init__(self, in_channels: Union[int, Sequence[int]], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        in_chs = [int(in_channels)] * 4 if isinstance(in_channels, int) else list(in_channels)
        self.in_channels = in_chs
        self.in_index = tuple(range(len(in_chs)))
        self.psp_modules = PPMTorch(pool_scales, in_chs[-1], channels)
        self.bottleneck = ConvModuleTorch(in_chs[-1] + len(pool_scales) * channels, channels,
                                          3, padding=1)
        self.lateral_convs = nn.ModuleList([ConvModuleTorch(c, channels, 1)
                                            for c in in_chs[:-1]])
        self.fpn_convs = nn.ModuleList([ConvModuleTorch(channels, channels, 3, padding=1)
                                        for _ in in_chs[:-1]])
        self.fpn_bottleneck = ConvModuleTorch(len(in_chs) * channels, channels, 3, padding=1)
        self._init_cls(channels, num_classes, dropout)

    def psp_forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        x = inputs[-1]
        return self.bottleneck(torch.cat([x] + self.psp_modules(x), dim=1))

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        inputs = [inputs[i] for i in self.in_index]
        laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.psp_forward(inputs))
        n = len(laterals)
        for i in range(n - 1, 0, -1):  # top-down: coarse added into the next finer level
            laterals[i - 1] = laterals[i - 1] + bilinear_resize(laterals[i],
                                                                laterals[i - 1].shape[2:])
        fpn_outs = [self.fpn_convs[i](laterals[i]) for i in range(n - 1)]
        fpn_outs.append(laterals[-1])  # the PSP level gets no fpn conv
        for i in range(n - 1, 0, -1):
            fpn_outs[i] = bilinear_resize(fpn_outs[i], fpn_outs[0].shape[2:])
        out = self.fpn_bottleneck(torch.cat(fpn_outs, dim=1))
        return self.cls_seg(out)


class FCNAuxHeadTorch(_DecodeHeadBase):
    """mmseg FCNHead(num_convs=1, kernel 3, concat_input=False, dropout 0.1) on one map."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, in_index: int = 2,
                 dropout: float = 0.1):
        super().__init__()
        self.in_index = in_index
        self.convs = nn.Sequential(ConvModuleTorch(in_channels, channels, 3, padding=1))
        self._init_cls(channels, num_classes, dropout)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.cls_seg(self.convs(inputs[self.in_index]))


def seg_ce_loss(logits: torch.Tensor, label: torch.Tensor,
                ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """mmseg 0.27 decode-head loss with the default CrossEntropyLoss.

    Logits (N,K,h,w) are resized bilinearly to the label size, per-pixel CE with
    ``ignore_index`` (ignored pixels give 0), then the mean over ALL N*H*W pixels
    (``avg_non_ignore=False``).  Computed in float32.  Label: (N,H,W) or (N,1,H,W).
    """
    if label.dim() == 4:
        label = label.squeeze(1)
    logits = bilinear_resize(logits.float(), label.shape[-2:])
    loss = F.cross_entropy(logits, label.long(), reduction="none", ignore_index=ignore_index)
    return loss.mean()


class SegmentorTorch(nn.Module):
    """mmseg EncoderDecoder over ``InternViTTorch`` (whole-image inference only).

    With ``with_fpn`` the pyramid layers are registered on the backbone module itself
    (``backbone.up1.*`` ...), as InternVL does; pass ``neck`` to reuse existing layers.
    Backbone features are cast to float32 before the heads.
    """

    def __init__(self, backbone: InternViTTorch, with_fpn: bool, decode_head: nn.Module,
                 auxiliary_head: Optional[nn.Module] = None, aux_weight: float = 0.4,
                 neck: Optional[PyramidNeckTorch] = None, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.with_fpn = bool(with_fpn)
        if self.with_fpn:
            neck = neck if neck is not None else PyramidNeckTorch(backbone.embed_dim)
            for name in ("up1", "up2", "up3", "up4"):
                backbone.add_module(name, getattr(neck, name))
        self.backbone = backbone
        self.decode_head = decode_head
        if auxiliary_head is not None:
            self.auxiliary_head = auxiliary_head
        self.aux_weight = float(aux_weight)
        self.ignore_index = ignore_index

    @property
    def with_auxiliary_head(self) -> bool:
        return hasattr(self, "auxiliary_head")

    def extract_feat(self, img: torch.Tensor) -> List[torch.Tensor]:
        bb = self.backbone
        feats = bb(img.to(bb.patch_embed.proj.weight.dtype))
        if self.with_fpn:
            feats = PyramidNeckTorch.apply(bb, feats)
        return [f.contiguous().float() for f in feats]

    def encode_decode(self, img: torch.Tensor) -> torch.Tensor:
        """Logits of the decode head, bilinearly resized to the input image size."""
        out = self.decode_head(self.extract_feat(img))
        return bilinear_resize(out, img.shape[2:])

    def forward_train_loss(self, img: torch.Tensor,
                           label: torch.Tensor) -> Dict[str, torch.Tensor]:
        """{'loss_decode', 'loss_aux' (already times aux_weight, only with an aux head)}.

        Uses the current train/eval mode of the modules (BN statistics, Dropout2d).
        """
        feats = self.extract_feat(img)
        losses = {"loss_decode": seg_ce_loss(self.decode_head(feats), label,
                                             self.ignore_index)}
        if self.with_auxiliary_head:
            losses["loss_aux"] = self.aux_weight * seg_ce_loss(self.auxiliary_head(feats),
                                                               label, self.ignore_index)
        return losses

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.encode_decode(img)


_NECK_NAMES = ("up1", "up2", "up3", "up4")


@torch.no_grad()
def randomize_seg_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter and BN running statistic with non-trivial random values.

    Takes a SegmentorTorch or a bare neck/head.  The InternViT part of a segmentor uses
    ``randomize_(backbone, seed)``.  The rest (generator seeded
    with ``seed + 1``): BN/LayerNorm weight ~ 1 + 0.2 N, biases ~ 0.02 N, BN running_mean
    ~ 0.1 N, running_var ~ U(0.5, 2); Conv2d weights ~ N / sqrt(in*kh*kw); ConvTranspose2d
    (stride = kernel, so each output sees ``in`` inputs) ~ N / sqrt(in).
    ``num_batches_tracked`` is left as is.  Unhandled parameters raise.
    """
    bb = getattr(model, "backbone", None)
    extra, done = {}, set()
    if isinstance(bb, InternViTTorch):
        extra = {k: bb._modules.pop(k) for k in _NECK_NAMES if k in bb._modules}
        try:
            randomize_(bb, seed)
            done = {id(p) for p in bb.parameters()}
        finally:
            bb._modules.update(extra)
        roots = list(extra.values()) + [m for n, m in model.named_children() if n != "backbone"]
    else:  # a bare neck or head
        roots = [model]
    g = torch.Generator().manual_seed(int(seed) + 1)

    def fill(t: torch.Tensor, val: torch.Tensor):
        t.copy_(val.to(t.dtype))
        done.add(id(t))

    def randn(shape):
        return torch.randn(tuple(shape), generator=g)

    for mod in (m for r in roots for m in r.modules()):
        if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)):
            w = mod.weight
            fan_in = w.shape[0] if isinstance(mod, nn.ConvTranspose2d) else math.prod(w.shape[1:])
            fill(w, randn(w.shape) / math.sqrt(fan_in))
            if mod.bias is not None:
                fill(mod.bias, 0.02 * randn(mod.bias.shape))
        elif isinstance(mod, (nn.BatchNorm2d, LayerNorm2dTorch)):
            fill(mod.weight, 1.0 + 0.2 * randn(mod.weight.shape))
            fill(mod.bias, 0.02 * randn(mod.bias.shape))
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(0.1 * randn(mod.running_mean.shape))
                mod.running_var.copy_(0.5 + 1.5 * torch.rand(mod.running_var.shape,
                                                             generator=g))
    missing = [n for n, p in model.named_parameters() if id(p) not in done]
    if missing:
        raise ValueError(f"randomize_seg_: unhandled parameters {missing!r}")
    return model
