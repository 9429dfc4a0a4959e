"""Registered sizes, official names, equations, checkpoints, and the timm model surface."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import tiny_vim as tiny

import shufflemamba  # noqa: F401  (registers the models)
from shufflemamba.models import REG_SIZES, VIM_SIZES
from shufflemamba.ops import set_scan_backend

PUBLISHED_PARAMS = {  # 1000 classes; exact counts of the official architectures
    "vim_tiny_patch16_224": 7_148_008,  # 7.15M
    "vim_small_patch16_224": 25_796_584,  # 25.80M
    "vim_base_patch16_224": 97_598_440,  # 97.60M
    "shufflemamba_tiny_patch16_224": 7_148_008,
    "shufflemamba_small_patch16_224": 25_796_584,
    "shufflemamba_middle_patch16_224": 74_236_456,  # 74.24M
    "shufflemamba_base_patch16_224": 97_598_440,  # 97.60M
    "shufflemamba_large_patch16_224": 340_034_536,  # 340.03M
    "vim_tiny_patch16_stride8_224": 7_250_344,  # Vim-T†, 729 patches
    "vim_small_patch16_stride8_224": 26_001_256,  # Vim-S†
    "shufflemamba_reg_base_patch16_224": 99_301_096,  # 12 registers, reduce 4
    "shufflemamba_reg_large_patch16_224": 341_222_376,  # 16 registers, reduce 8
}


@pytest.mark.parametrize("name", sorted([*VIM_SIZES, *REG_SIZES]))
def test_every_registered_size_has_the_published_parameter_count(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]
    assert model.pretrained_cfg["crop_pct"] == (1.0 if name in REG_SIZES else 0.875)
    assert model.pretrained_cfg["interpolation"] == "bicubic"


def test_state_dict_uses_the_official_names_and_shapes():
    model = timm.create_model("vim_tiny_patch16_224")
    sd = model.state_dict()
    E, N, R = 384, 16, 12
    expected = {
        "patch_embed.proj.weight": (192, 3, 16, 16),
        "cls_token": (1, 1, 192),
        "pos_embed": (1, 197, 192),
        "layers.0.norm.weight": (192,),
        "layers.0.mixer.in_proj.weight": (2 * E, 192),
        "layers.0.mixer.conv1d.weight": (E, 1, 4),
        "layers.0.mixer.conv1d_b.bias": (E,),
        "layers.0.mixer.x_proj.weight": (R + 2 * N, E),
        "layers.0.mixer.x_proj_b.weight": (R + 2 * N, E),
        "layers.0.mixer.dt_proj.weight": (E, R),
        "layers.0.mixer.dt_proj_b.bias": (E,),
        "layers.0.mixer.A_log": (E, N),
        "layers.0.mixer.A_b_log": (E, N),
        "layers.0.mixer.D": (E,),
        "layers.0.mixer.D_b": (E,),
        "layers.0.mixer.out_proj.weight": (192, E),
        "norm_f.weight": (192,),
        "head.weight": (1000, 192),
        "head.bias": (1000,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    per_layer = {k.split(".", 2)[2] for k in sd if k.startswith("layers.0.")}
    assert len(per_layer) == 17  # 16 mixer tensors + norm.weight (RMSNorm has no bias)
    assert len(sd) == 24 * 17 + 7
    middle = timm.create_model("shufflemamba_middle_patch16_224", depth=1).state_dict()
    assert "layers.0.norm.bias" in middle and "norm_f.bias" in middle  # LayerNorm variant


# ---- an independent implementation of the published equations --------------------------------
def _ssm_direction(x, z, p, sfx, d_state, dt_rank):
    """x, z: (B, L, E). One direction of bimamba v2, step by step, in float64."""
    L = x.shape[1]
    A_log = p[f"A{'_b' if sfx else ''}_log"]
    w, b = p[f"conv1d{sfx}.weight"][:, 0], p[f"conv1d{sfx}.bias"]
    u = torch.stack(
        [sum(w[:, k] * (x[:, t - 3 + k] if t - 3 + k >= 0 else 0) for k in range(4)) + b for t in range(L)], 1
    )
    u = F.silu(u)
    dbl = u @ p[f"x_proj{sfx}.weight"].T
    dt, Bm, Cm = dbl.split([dt_rank, d_state, d_state], -1)
    delta = F.softplus(dt @ p[f"dt_proj{sfx}.weight"].T + p[f"dt_proj{sfx}.bias"])
    A = -torch.exp(A_log)
    h = torch.zeros(x.shape[0], x.shape[2], d_state, dtype=x.dtype)
    ys = []
    for t in range(L):
        h = torch.exp(delta[:, t, :, None] * A) * h + delta[:, t, :, None] * Bm[:, t, None, :] * u[:, t, :, None]
        ys.append((h * Cm[:, t, None, :]).sum(-1) + p[f"D{sfx}"] * u[:, t])
    return torch.stack(ys, 1) * F.silu(z)


def vim_equations(p, images, depth, d_state, cls_middle, eps=1e-5, patch=8):
    """Vim forward from the paper's equations and the state dict alone (RMSNorm, no drop path)."""
    p = {k: v.double() for k, v in p.items()}
    x = F.conv2d(images.double(), p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    M = x.shape[1]
    idx = M // 2 if cls_middle else 0
    cls = p["cls_token"].expand(x.shape[0], -1, -1)
    x = torch.cat([x[:, :idx], cls, x[:, idx:]], 1) + p["pos_embed"]
    rms = lambda v, w: v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * w
    residual, hidden = None, x
    D = x.shape[-1]
    dt_rank = math.ceil(D / 16)
    for i in range(depth):
        residual = hidden if residual is None else residual + hidden
        q = {k.split(f"layers.{i}.mixer.", 1)[1]: v for k, v in p.items() if k.startswith(f"layers.{i}.mixer.")}
        h = rms(residual, p[f"layers.{i}.norm.weight"])
        xz = h @ q["in_proj.weight"].T
        xi, z = xz.chunk(2, -1)
        y_f = _ssm_direction(xi, z, q, "", d_state, dt_rank)
        y_b = _ssm_direction(xi.flip(1), z.flip(1), q, "_b", d_state, dt_rank).flip(1)
        hidden = ((y_f + y_b) / 2) @ q["out_proj.weight"].T
    out = rms(residual + hidden, p["norm_f.weight"])
    return out[:, idx] @ p["head.weight"].T + p["head.bias"]


@pytest.mark.parametrize("name", ["vim_tiny_patch16_224", "shufflemamba_tiny_patch16_224"])
@pytest.mark.parametrize("fused", [True, False])
def test_model_matches_the_published_equations(name, fused):
    torch.manual_seed(0)
    model = tiny(name, fused_directions=fused).eval()
    with torch.no_grad():  # move every parameter off its init so nothing is accidentally symmetric
        for prm in model.parameters():
            prm.add_(torch.randn_like(prm) * 0.02)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model(images)
    ref = vim_equations(model.state_dict(), images, depth=3, d_state=16, cls_middle=name.startswith("vim"))
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-5)


def test_torch_and_reference_backends_agree_on_a_model_forward_and_backward():
    """Also the mixer's two layouts: token-major on the torch backend, channel-first (the CUDA
    kernels' layout) on the reference one."""
    torch.manual_seed(1)
    model = tiny("shufflemamba_tiny_patch16_224", shuffle_rate=0.0)
    images = torch.randn(2, 3, 32, 32)
    grads = []
    for backend in ("torch", "reference"):
        model.zero_grad()
        out = set_scan_backend(model, backend)(images)
        out.square().sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_dynamic_img_size_resizes_on_the_fly():
    model = tiny(dynamic_img_size=True).eval()
    assert model(torch.randn(1, 3, 48, 40)).shape == (1, 7)


def test_timm_surface_optimizer_groups_and_checkpointing():
    from timm.optim import create_optimizer_v2

    model = tiny()
    nwd = model.no_weight_decay()
    assert {"pos_embed", "cls_token", "layers.0.mixer.A_log", "layers.2.mixer.A_b_log"} <= nwd
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert not any(
        n.endswith(("A_log", "A_b_log", "D", "D_b", "pos_embed", "cls_token")) for i, n in names.items() if i in decayed
    )
    assert "layers.0.mixer.in_proj.weight" in {names[i] for i in decayed}
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert len(scales) == 5 and math.isclose(scales[-1], 1.0)  # stem, 3 blocks, head/final norm
    model.reset_classifier(3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert model.forward_head(model.forward_features(torch.randn(2, 3, 32, 32)), pre_logits=True).shape == (2, 32)

    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    model.train()
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(ckpt)
        model(images).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_stride8_grid_class_index_and_names_match_the_stride16_model():
    """Vim-T†: kernel 16, stride 8 -> a 27 x 27 grid at 224 px, class token at 364 of 730."""
    with torch.device("meta"):
        fine, coarse = timm.create_model("vim_tiny_patch16_stride8_224"), timm.create_model("vim_tiny_patch16_224")
    assert fine.patch_embed.grid_size == (27, 27) and fine.patch_embed.num_patches == 729
    assert fine.pos_embed.shape == (1, 730, 192) and fine.patch_embed.proj.stride == (8, 8)
    assert fine.token_positions(729).tolist() == [364]
    sd_fine, sd_coarse = fine.state_dict(), coarse.state_dict()
    assert sd_fine.keys() == sd_coarse.keys()  # the official names; only pos_embed's length differs
    assert [k for k in sd_fine if sd_fine[k].shape != sd_coarse[k].shape] == ["pos_embed"]
    small = tiny("vim_tiny_patch16_stride8_224", img_size=40, patch_size=16, stride=8)  # (40 - 16) // 8 + 1 = 4
    tokens = small.forward_features(torch.randn(2, 3, 40, 40))
    assert tokens.shape == (2, 17, 32) and small(torch.randn(2, 3, 40, 40)).shape == (2, 7)


@pytest.mark.parametrize("name", ["vim_tiny_patch16_224", "shufflemamba_tiny_patch16_224"])
def test_forward_intermediates_shapes_and_consistency_with_forward(name):
    model = tiny(name, depth=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)  # all blocks, NCHW patch maps, prefix dropped
        assert len(maps) == 4 and all(m.shape == (2, 32, 4, 4) for m in maps)
        torch.testing.assert_close(final, model.forward_features(x))
        last = model.forward_intermediates(x, indices=[3], norm=True, intermediates_only=True)[0]
        cls = model.token_positions(16).item()
        patches = torch.cat([final[:, :cls], final[:, cls + 1 :]], 1)  # eval: norm of the same stream
        torch.testing.assert_close(last.flatten(2).transpose(1, 2), patches)
        seq = model.forward_intermediates(x, indices=2, output_fmt="NLC", return_prefix_tokens=True, stop_early=True)
        ((early, prefix),) = seq[1][1:]
        assert early.shape == (2, 16, 32) and prefix.shape == (2, 1, 32)
        torch.testing.assert_close(seq[1][0][0].transpose(1, 2).reshape(2, 32, 4, 4), maps[2])
    kept = model.prune_intermediate_layers(indices=[1])
    assert kept == [1] and len(model.layers) == 2 and isinstance(model.head, torch.nn.Identity)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")
