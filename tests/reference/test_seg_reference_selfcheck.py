"""Quick sanity checks of the PyTorch segmentation reference itself (tiny configs, CPU)."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.reference.intern_vit_torch import InternViTTorch
from tests.reference.seg_torch import (
    ConvModuleTorch, FCNAuxHeadTorch, LinearHeadTorch, PPMTorch, PyramidNeckTorch,
    SegmentorTorch, UPerHeadTorch, bilinear_resize, randomize_seg_, seg_ce_loss,
    torch_adaptive_avg_pool_bins)

C, CH, K = 32, 24, 5
VIT = dict(embed_dim=C, depth=4, num_heads=4, mlp_ratio=2.0, patch_size=14,
           pretrain_size=56)
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _linear(seed=0):
    m = SegmentorTorch(InternViTTorch(**VIT, out_indices=(2,)), False, LinearHeadTorch(C, K))
    return randomize_seg_(m, seed).eval()


def _upernet(seed=0, aux_index=2):
    m = SegmentorTorch(InternViTTorch(**VIT, out_indices=(0, 1, 2, 3)), True,
                       UPerHeadTorch(C, CH, K), FCNAuxHeadTorch(C, CH, K, in_index=aux_index))
    return randomize_seg_(m, seed).eval()


def _img(h=56, w=56, b=2, seed=1):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _cm(prefix, cin, cout, k):
    d = {f"{prefix}.conv.weight": (cout, cin, k, k)}
    d.update({f"{prefix}.bn.{n}": ((cout,) if n != "num_batches_tracked" else ())
              for n in BN_KEYS})
    return d


def _vit_keys():
    return {k: tuple(v.shape) for k, v in InternViTTorch(**VIT, out_indices=(3,)).state_dict().items()}


def test_linear_state_dict_layout():
    got = {k: tuple(v.shape) for k, v in _linear().state_dict().items()}
    exp = {f"backbone.{k}": s for k, s in _vit_keys().items()}
    exp.update({f"decode_head.norm.{n}": ((C,) if n != "num_batches_tracked" else ())
                for n in BN_KEYS})
    exp.update({"decode_head.conv_seg.weight": (K, C, 1, 1), "decode_head.conv_seg.bias": (K,)})
    assert got == exp


def test_upernet_aux_state_dict_layout():
    got = {k: tuple(v.shape) for k, v in _upernet().state_dict().items()}
    exp = {f"backbone.{k}": s for k, s in _vit_keys().items()}
    for k in ("up1.0", "up1.3", "up2.0"):  # ConvTranspose2d weights are (in, out, kh, kw)
        exp.update({f"backbone.{k}.weight": (C, C, 2, 2), f"backbone.{k}.bias": (C,)})
    exp.update({"backbone.up1.1.weight": (C,), "backbone.up1.1.bias": (C,)})
    d = "decode_head"
    for j in range(4):
        exp.update(_cm(f"{d}.psp_modules.{j}.1", C, CH, 1))
    exp.update(_cm(f"{d}.bottleneck", C + 4 * CH, CH, 3))
    for k in range(3):
        exp.update(_cm(f"{d}.lateral_convs.{k}", C, CH, 1))
        exp.update(_cm(f"{d}.fpn_convs.{k}", CH, CH, 3))
    exp.update(_cm(f"{d}.fpn_bottleneck", 4 * CH, CH, 3))
    exp.update({f"{d}.conv_seg.weight": (K, CH, 1, 1), f"{d}.conv_seg.bias": (K,)})
    exp.update(_cm("auxiliary_head.convs.0", C, CH, 3))
    exp.update({"auxiliary_head.conv_seg.weight": (K, CH, 1, 1),
                "auxiliary_head.conv_seg.bias": (K,)})
    assert got == exp
    # a standalone neck carries the same keys as the backbone's up* entries
    neck_keys = {f"backbone.{k}" for k in PyramidNeckTorch(C).state_dict()}
    assert neck_keys == {k for k in got if k.startswith("backbone.up")}


def test_upernet_shapes_and_feature_pyramid():
    m = _upernet()
    img = _img(56, 70)  # grid 4x5
    with torch.no_grad():
        feats = m.extract_feat(img)
        assert [tuple(f.shape) for f in feats] == [(2, C, 16, 20), (2, C, 8, 10),
                                                   (2, C, 4, 5), (2, C, 2, 2)]
        assert all(f.dtype == torch.float32 for f in feats)
        logits = m.decode_head(feats)
        assert tuple(logits.shape) == (2, K, 16, 20)  # 4x the patch grid
        assert tuple(m.auxiliary_head(feats).shape) == (2, K, 4, 5)
        out = m.encode_decode(img)
    assert tuple(out.shape) == (2, K, 56, 70)
    torch.testing.assert_close(out, F.interpolate(logits, (56, 70), mode="bilinear",
                                                  align_corners=False))
    assert torch.isfinite(out).all() and out.std() > 1e-3


def test_linear_shapes():
    m = _linear()
    with torch.no_grad():
        out = m.encode_decode(_img(56, 42))
    assert tuple(out.shape) == (2, K, 56, 42)
    assert torch.isfinite(out).all()


def test_neck_layernorm_and_dtypes():
    neck = randomize_seg_(PyramidNeckTorch(C), 3)
    x = torch.randn(2, C, 3, 4) * 3 + 1
    ln = neck.up1[1]
    ref = F.layer_norm(x.permute(0, 2, 3, 1), (C,), ln.weight, ln.bias, 1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(ln(x), ref, atol=1e-5, rtol=1e-5)
    a = neck.up1[0](x)
    assert a.shape == (2, C, 6, 8)
    exp = neck.up1[3](F.gelu(ln(a)))
    outs = neck([x, x, x, x])
    torch.testing.assert_close(outs[0], exp)
    torch.testing.assert_close(outs[2], x)
    torch.testing.assert_close(outs[3], F.max_pool2d(x, 2, 2))
    assert [o.shape[-2:] for o in outs] == [(12, 16), (6, 8), (3, 4), (1, 2)]
    # bf16 neck: LayerNorm computes in float32 and returns bf16
    nb = PyramidNeckTorch(C)
    nb.load_state_dict(neck.state_dict())
    nb = nb.to(torch.bfloat16)
    y = nb.up1[1](a.detach().bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ln(a.detach().bfloat16().float()).detach(),
                               atol=0.05, rtol=0.02)


def test_loss_reduction_by_hand():
    logits = torch.tensor([[[[2.0, 0.0], [1.0, -1.0]],
                            [[0.0, 1.0], [3.0, 0.5]],
                            [[-1.0, 2.0], [0.0, 0.0]]]])  # (1, 3, 2, 2)
    label = torch.tensor([[[0, 255], [1, 255]]])
    lp = torch.log_softmax(logits[0], dim=0)
    by_hand = -(lp[0, 0, 0] + lp[1, 1, 0]) / 4.0  # 2 valid pixels, averaged over all 4
    torch.testing.assert_close(seg_ce_loss(logits, label), by_hand)
    torch.testing.assert_close(seg_ce_loss(logits, label[:, None]), by_hand)
    # logits at a lower resolution are upsampled to the label size first
    lab = torch.tensor([[[0, 1, 2, 255], [2, 255, 1, 0], [1, 1, 255, 2], [0, 2, 1, 1]]])
    up = F.interpolate(logits, (4, 4), mode="bilinear", align_corners=False)
    lp = torch.log_softmax(up[0], dim=0)
    tot = sum(-lp[lab[0, i, j], i, j] for i in range(4) for j in range(4) if lab[0, i, j] != 255)
    torch.testing.assert_close(seg_ce_loss(logits, lab), tot / 16.0)


def test_forward_train_loss_composition():
    m = _upernet(seed=5)
    img = _img(56, 56, seed=2)
    g = torch.Generator().manual_seed(3)
    label = torch.randint(0, K, (2, 56, 56), generator=g)
    label[torch.rand(label.shape, generator=g) < 0.3] = 255
    with torch.no_grad():
        losses = m.forward_train_loss(img, label)
        feats = m.extract_feat(img)
        dec = seg_ce_loss(m.decode_head(feats), label)
        aux = seg_ce_loss(m.auxiliary_head(feats), label)
    assert set(losses) == {"loss_decode", "loss_aux"}
    torch.testing.assert_close(losses["loss_decode"], dec)
    torch.testing.assert_close(losses["loss_aux"], 0.4 * aux)
    assert set(_linear().forward_train_loss(img, label)) == {"loss_decode"}
    # train mode: BN batch stats, dropout active, gradients reach every parameter
    m.train()
    m.zero_grad()
    loss = sum(m.forward_train_loss(img, label).values())
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())
    assert int(m.decode_head.bottleneck.bn.num_batches_tracked) == 1


def test_ppm_non_divisible_sizes():
    assert torch_adaptive_avg_pool_bins(5, 6) == [(0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 5)]
    assert torch_adaptive_avg_pool_bins(7, 3) == [(0, 3), (2, 5), (4, 7)]
    x = torch.randn(2, 4, 5, 7)
    for s in (1, 2, 3, 6):
        bh, bw = torch_adaptive_avg_pool_bins(5, s), torch_adaptive_avg_pool_bins(7, s)
        man = torch.stack([torch.stack([x[:, :, a:b, c:d].mean(dim=(2, 3)) for c, d in bw], -1)
                           for a, b in bh], -2)
        torch.testing.assert_close(F.adaptive_avg_pool2d(x, s), man)
    ppm = randomize_seg_(PPMTorch((1, 2, 3, 6), 4, 3), 0).eval()
    with torch.no_grad():
        outs = ppm(x)
    assert [tuple(o.shape) for o in outs] == [(2, 3, 5, 7)] * 4
    head = randomize_seg_(UPerHeadTorch(C, CH, K), 1).eval()
    maps = [torch.randn(1, C, 20, 28), torch.randn(1, C, 10, 14), torch.randn(1, C, 5, 7),
            torch.randn(1, C, 5, 7)]
    with torch.no_grad():
        assert tuple(head(maps).shape) == (1, K, 20, 28)


def test_randomize_covers_everything_and_is_deterministic():
    a, b, c = _upernet(seed=7), _upernet(seed=7), _upernet(seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    for k, v in sa.items():
        torch.testing.assert_close(v, sb[k])
        if k.endswith("num_batches_tracked"):
            continue
        assert not torch.equal(v, sc[k]), k
        if k.endswith("running_var"):
            assert 0.5 <= float(v.min()) and float(v.max()) <= 2.0
        elif v.numel() > 1:
            assert float(v.std()) > 1e-3, k
    for mod in a.modules():  # no parameter left at a PyTorch default init
        if isinstance(mod, nn.BatchNorm2d):
            assert not torch.equal(mod.running_mean, torch.zeros_like(mod.running_mean))
            assert not torch.equal(mod.weight, torch.ones_like(mod.weight))
    assert isinstance(a.decode_head.lateral_convs[0], ConvModuleTorch)
    assert np.isclose(bilinear_resize(torch.ones(1, 1, 2, 3), (5, 4)).mean().item(), 1.0)


def test_bf16_backbone_feeds_float32_heads():
    m32 = _upernet(seed=4)
    m16 = _upernet(seed=4)
    m16.backbone.to(torch.bfloat16)  # ViT and pyramid in bf16, heads stay float32
    img = _img(56, 56, seed=6)
    with torch.no_grad():
        f16 = m16.extract_feat(img)
        o32, o16 = m32.encode_decode(img), m16.encode_decode(img)
    assert all(f.dtype == torch.float32 for f in f16)
    assert m16.decode_head.conv_seg.weight.dtype == torch.float32
    assert o16.dtype == torch.float32
    rel = (o16 - o32).norm() / o32.norm()
    assert 0 < float(rel) < 0.1


@pytest.mark.parametrize("aux_index", [1, 2])
def test_aux_index(aux_index):
    m = _upernet(aux_index=aux_index)
    with torch.no_grad():
        feats = m.extract_feat(_img(56, 56))
        out = m.auxiliary_head(feats)
    assert out.shape[-2:] == feats[aux_index].shape[-2:]
