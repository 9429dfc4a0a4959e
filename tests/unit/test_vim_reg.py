"""ShuffleMamba-Reg: register placement and readout recomputed from the equations, official names
and shapes, strict loading of official-format files, resolution changes, the shuffle."""

import argparse

import pytest
import timm
import torch
import torch.nn.functional as F

import shufflemamba  # noqa: F401  (registers the models)
from shufflemamba.checkpoint import load_weights
from shufflemamba.models.vim_reg import register_layout


def tiny_reg(n=4, r=2, **kw):
    kw = {"img_size": 40, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_classes": 7, **kw}
    return timm.create_model("shufflemamba_reg_base_patch16_224", num_cls_tokens=n, cls_reduce=r, **kw)


def _rms(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _by_the_equations(model, images):
    """The forward written from the published description, not from the model's code: patch conv,
    + pos_embed; register i (+ pos_embed_cls) inserted after every L = HW // (n + 1) patches;
    the blocks; final add + RMSNorm; the n register outputs -> neck -> flatten -> RMSNorm -> head."""
    n, dim = model.cls_token.shape[1], model.embed_dim
    patches = F.conv2d(images, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=8)
    patches = patches.flatten(2).transpose(1, 2) + model.pos_embed
    hw = patches.shape[1]
    gap = hw // (n + 1)
    pieces, positions = [], []
    for i in range(n):
        pieces.append(patches[:, i * gap : (i + 1) * gap])
        positions.append(sum(p.shape[1] for p in pieces))
        pieces.append((model.cls_token[:, i] + model.pos_embed_cls[:, i]).expand(images.shape[0], 1, dim))
    pieces.append(patches[:, n * gap :])
    hidden, residual = torch.cat(pieces, 1), None
    for layer in model.layers:
        hidden, residual = layer(hidden, residual)
    out = _rms(residual + hidden, model.norm_f.weight)
    regs = out[:, positions]  # (B, n, D)
    assert positions == [(i + 1) * gap + i for i in range(n)]
    if hasattr(model, "neck"):
        regs = _rms((regs @ model.neck.weight.T).flatten(1), model.norm_neck.weight)
    else:
        regs = regs.flatten(1)
    return regs @ model.head.weight.T + model.head.bias


@pytest.mark.parametrize(("n", "r"), [(4, 2), (3, 1), (12, 4)])
def test_register_model_matches_its_equations(n, r):
    torch.manual_seed(0)
    model = tiny_reg(n, r).eval()  # 40 px / 8 = 5 x 5 = 25 patches
    images = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(model(images), _by_the_equations(model, images), rtol=1e-5, atol=1e-5)
    assert model.head.in_features == 32 * (n // r) and hasattr(model, "neck") == (r > 1)


def test_register_layout_at_224_px():
    """n = 12: L = 15, 16 leftover patches; n = 16: L = 11, 20 leftover (reference doc, section 5)."""
    for n, gap, leftover in ((12, 15, 16), (16, 11, 20)):
        order, positions = register_layout(196, n)
        assert positions.tolist() == [(i + 1) * gap + i for i in range(n)]
        assert sorted(order.tolist()) == list(range(196 + n)) and (order[positions] >= 196).all()
        assert (order[-leftover:] == torch.arange(196 - leftover, 196)).all()


def test_official_names_and_shapes_and_strict_loading(tmp_path):
    with torch.device("meta"):
        model = timm.create_model("shufflemamba_reg_base_patch16_224")
    sd = model.state_dict()
    expect = {
        "cls_token": (1, 12, 768),
        "pos_embed_cls": (1, 12, 768),
        "pos_embed": (1, 196, 768),
        "neck.weight": (192, 768),
        "norm_neck.weight": (2304,),
        "head.weight": (1000, 2304),
        "layers.0.mixer.A_b_log": (1536, 16),
        "layers.23.mixer.conv1d_b.weight": (1536, 1, 4),
    }
    assert {k: tuple(sd[k].shape) for k in expect} == expect
    src = tiny_reg().eval()
    args = argparse.Namespace(model="mambar_base_patch16_224", num_cls_tokens=4)
    torch.save({"model": src.state_dict(), "args": args, "epoch": 19}, tmp_path / "mambar.pth")
    dst = tiny_reg()
    load_weights(dst, tmp_path / "mambar.pth")  # strict
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(dst.eval()(x), src(x), rtol=0, atol=0)


def test_a_resolution_change_resizes_patch_embeddings_and_keeps_the_registers(tmp_path):
    src = tiny_reg()
    torch.save({"model": src.state_dict()}, tmp_path / "w.pth")
    dst = tiny_reg(img_size=56)  # 7 x 7
    load_weights(dst, tmp_path / "w.pth")
    assert dst.pos_embed.shape == (1, 49, 32)
    torch.testing.assert_close(dst.pos_embed_cls, src.pos_embed_cls)
    expect = F.interpolate(
        src.pos_embed.detach().reshape(1, 5, 5, 32).permute(0, 3, 1, 2), size=(7, 7), mode="bicubic"
    ).permute(0, 2, 3, 1)
    torch.testing.assert_close(dst.pos_embed.detach().reshape(1, 7, 7, 32), expect, rtol=1e-5, atol=1e-6)
    assert dst(torch.randn(1, 3, 56, 56)).shape == (1, 7)


def test_the_shuffle_moves_the_registers_too_and_inference_ignores_it():
    torch.manual_seed(0)
    model = tiny_reg(shuffle_rate=1.0, depth=3, drop_path_rate=0.0)
    x = torch.randn(2, 3, 40, 40)
    plain = tiny_reg(shuffle_rate=0.0, depth=3, drop_path_rate=0.0)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        reference = model.eval()(x)
        assert torch.equal(plain.eval()(x), reference)  # inference never shuffles
        torch.manual_seed(1)
        trained = model.train()(x)
        assert torch.equal(plain.train()(x), reference)  # no drop path: only the shuffle differs
    assert not torch.allclose(trained, reference)  # blocks 1 and 2 ran on a permuted sequence


def test_forward_intermediates_split_the_registers_off():
    model = tiny_reg().eval()
    maps = model.forward_intermediates(torch.randn(2, 3, 40, 40), return_prefix_tokens=True, intermediates_only=True)
    assert [(m.shape, p.shape) for m, p in maps] == [((2, 32, 5, 5), (2, 4, 32))] * 2
