"""Quick sanity checks of the PyTorch InternViT reference itself (tiny configs, CPU)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.reference.intern_vit_torch import (
    InternViTTorch, randomize_, torch_bicubic_resize_pos_embed)

TINY = dict(embed_dim=64, depth=3, num_heads=4, mlp_ratio=4.0, patch_size=14,
            pretrain_size=56, out_indices=(2,))


def _model(seed=0, **kw):
    cfg = dict(TINY, **kw)
    return randomize_(InternViTTorch(**cfg), seed).eval()


def _img(h, w, b=2, seed=1):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _expected_shapes(c=64, depth=3, g=4, mlp=256, qkv_bias=False):
    exp = {"cls_token": (1, 1, c), "pos_embed": (1, 1 + g * g, c),
           "patch_embed.proj.weight": (c, 3, 14, 14), "patch_embed.proj.bias": (c,)}
    for i in range(depth):
        p = f"blocks.{i}."
        exp.update({p + "norm1.weight": (c,), p + "attn.qkv.weight": (3 * c, c),
                    p + "attn.q_norm.weight": (c,), p + "attn.k_norm.weight": (c,),
                    p + "attn.proj.weight": (c, c), p + "attn.proj.bias": (c,),
                    p + "ls1.gamma": (c,), p + "norm2.weight": (c,),
                    p + "mlp.fc1.weight": (mlp, c), p + "mlp.fc1.bias": (mlp,),
                    p + "mlp.fc2.weight": (c, mlp), p + "mlp.fc2.bias": (c,),
                    p + "ls2.gamma": (c,)})
        if qkv_bias:
            exp[p + "attn.qkv.bias"] = (3 * c,)
    return exp


def test_output_shapes_and_order():
    m = _model(out_indices=(2, 0))
    with torch.no_grad():
        outs = m(_img(56, 84))
    assert [tuple(o.shape) for o in outs] == [(2, 64, 4, 6)] * 2
    assert all(torch.isfinite(o).all() for o in outs)
    assert not torch.allclose(outs[0], outs[1])
    with torch.no_grad():
        last = _model(out_indices=(2,))(_img(56, 84))[0]
    torch.testing.assert_close(outs[0], last)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_state_dict_keys_and_shapes(qkv_bias):
    sd = InternViTTorch(**dict(TINY, qkv_bias=qkv_bias)).state_dict()
    got = {k: tuple(v.shape) for k, v in sd.items()}
    assert got == _expected_shapes(qkv_bias=qkv_bias)
    assert len(list(InternViTTorch(**TINY).buffers())) == 0


def test_default_config_key_shapes_without_allocation():
    with torch.device("meta"):
        m = InternViTTorch(depth=2, out_indices=(1,))
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert got == _expected_shapes(c=3200, depth=2, g=16, mlp=12800)
    assert m.blocks[0].attn.head_dim == 128


def test_randomize_nontrivial_and_deterministic():
    m = _model(seed=3)
    for k, v in m.state_dict().items():
        assert v.std() > 0, k
        if "norm" in k:
            assert (v != 1).all(), k
        if k.endswith("gamma"):
            assert (v.abs() >= 0.05).all() and (v != 0.1).any() and (v < 0).any(), k
        if k.endswith("bias"):
            assert (v != 0).all(), k
    assert all(torch.equal(a, b) for a, b in
               zip(m.state_dict().values(), _model(seed=3).state_dict().values()))
    assert not torch.equal(m.pos_embed, _model(seed=4).pos_embed)


def test_activations_stay_order_one_through_depth():
    m = _model(depth=12, out_indices=(0, 11))
    with torch.no_grad():
        outs = m(_img(56, 56))
    for o in outs:
        rms = o.pow(2).mean().sqrt().item()
        assert 0.05 < rms < 20, rms


def test_sdpa_matches_explicit_softmax():
    m = _model(seed=5, qkv_bias=True)
    m_sdpa = InternViTTorch(**dict(TINY, qkv_bias=True, use_sdpa=True)).eval()
    m_sdpa.load_state_dict(m.state_dict())
    x = _img(70, 56)
    with torch.no_grad():
        torch.testing.assert_close(m_sdpa(x)[0], m(x)[0], rtol=1e-5, atol=1e-5)


def test_block_matches_handwritten_math():
    """One block against plain tensor ops: full-width QK RMSNorm, heads head-major."""
    m = _model(seed=6, depth=1, out_indices=(0,))
    blk, sd = m.blocks[0], {k[len("blocks.0."):]: v for k, v in m.state_dict().items()
                            if k.startswith("blocks.0.")}
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(0))

    def rms(t, w):
        return w * t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)

    h = rms(x, sd["norm1.weight"])
    q, k, v = (h @ sd["attn.qkv.weight"].T).split(64, dim=-1)
    q, k = rms(q, sd["attn.q_norm.weight"]), rms(k, sd["attn.k_norm.weight"])
    q, k, v = (t.reshape(2, 9, 4, 16) for t in (q, k, v))
    a = torch.einsum("bqhd,bkhd->bhqk", q, k) / 4.0
    o = torch.einsum("bhqk,bkhd->bqhd", a.softmax(-1), v).reshape(2, 9, 64)
    x1 = x + sd["ls1.gamma"] * (o @ sd["attn.proj.weight"].T + sd["attn.proj.bias"])
    h = rms(x1, sd["norm2.weight"]) @ sd["mlp.fc1.weight"].T + sd["mlp.fc1.bias"]
    h = F.gelu(h) @ sd["mlp.fc2.weight"].T + sd["mlp.fc2.bias"]
    with torch.no_grad():
        torch.testing.assert_close(blk(x), x1 + sd["ls2.gamma"] * h, rtol=1e-5, atol=1e-5)


def test_pos_embed_interp_identity_and_numpy_torch_agree():
    pe = _model().pos_embed.detach()
    torch.testing.assert_close(torch_bicubic_resize_pos_embed(pe, 4), pe, rtol=0, atol=1e-6)
    r_t = torch_bicubic_resize_pos_embed(pe, (5, 7))
    r_n = torch_bicubic_resize_pos_embed(pe.numpy(), (5, 7))
    assert isinstance(r_n, np.ndarray) and r_n.dtype == np.float32 and r_n.shape == (1, 36, 64)
    np.testing.assert_array_equal(r_t.numpy(), r_n)
    torch.testing.assert_close(r_t[:, 0], pe[:, 0], rtol=0, atol=0)
    assert torch_bicubic_resize_pos_embed(pe[0].numpy(), 6).shape == (37, 64)


def test_forward_uses_resized_pos_embed():
    m = _model(seed=7)
    m5 = InternViTTorch(**dict(TINY, pretrain_size=70)).eval()
    sd = dict(m.state_dict(), pos_embed=torch_bicubic_resize_pos_embed(m.pos_embed.detach(), 5))
    m5.load_state_dict(sd)
    x = _img(70, 70)
    with torch.no_grad():
        torch.testing.assert_close(m(x)[0], m5(x)[0], rtol=1e-6, atol=1e-6)


def test_drop_path_schedule_and_modes():
    m = _model(drop_path_rate=0.3)
    rates = [b.drop_path1.p for b in m.blocks]
    np.testing.assert_allclose(rates, [0.0, 0.15, 0.3], rtol=1e-6)
    ref = _model(drop_path_rate=0.0)
    x = _img(56, 56, b=8)
    with torch.no_grad():
        torch.testing.assert_close(m(x)[0], ref(x)[0])
        torch.manual_seed(0)
        assert not torch.allclose(m.train()(x)[0], ref(x)[0])


def test_bfloat16_runs_and_is_close():
    m = _model(seed=8)
    x = _img(56, 70)
    with torch.no_grad():
        ref = m(x)[0]
        out = m.to(torch.bfloat16)(x.to(torch.bfloat16))[0]
    assert out.dtype == torch.bfloat16
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.05, err
