"""VMamba: cross-scan, SS2D against a plain per-direction loop, sizes, official names, timm surface."""

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import tiny_vmamba
from timm.optim import create_optimizer_v2

import shufflemamba  # noqa: F401  (registers the models)
from shufflemamba.models.vmamba import SS2D
from shufflemamba.ops import set_scan_backend
from shufflemamba.ops.reference import selective_scan_reference

PUBLISHED_PARAMS = {  # 1000 classes; published 30.2M / 50.1M / 88.6M
    "vmamba_tiny": 30_249_064,
    "vmamba_small": 50_147_752,
    "vmamba_base": 88_557_800,
}


# ---- cross-scan ------------------------------------------------------------------------------


# ---- SS2D against a plain loop -----------------------------------------------------------------
def ss2d_scan_reference(op: SS2D, x: torch.Tensor) -> torch.Tensor:
    """Each direction on its own: gather the sequence by explicit index lists, run the
    sequential reference scan with that direction's parameters, scatter back, sum."""
    B, E, H, W = x.shape
    rows = [h * W + w for h in range(H) for w in range(W)]
    cols = [h * W + w for w in range(W) for h in range(H)]
    flat = x.flatten(2)
    out = torch.zeros_like(flat)
    R, N = op.dt_rank, op.d_state
    for k, order in enumerate([rows, cols, rows[::-1], cols[::-1]]):
        idx = torch.tensor(order)
        seq = flat[:, :, idx]
        x_dbl = torch.einsum("cd,bdl->bcl", op.x_proj_weight[k], seq)
        dt, Bk, Ck = x_dbl.split([R, N, N], dim=1)
        delta = torch.einsum("dr,brl->bdl", op.dt_projs_weight[k], dt)
        channels = slice(k * E, (k + 1) * E)
        y = selective_scan_reference(
            seq,
            delta,
            -torch.exp(op.A_logs[channels]),
            Bk,
            Ck,
            op.Ds[channels],
            None,
            op.dt_projs_bias[k],
            delta_softplus=True,
        )
        out = out.index_add(2, idx, y)
    return out


@pytest.mark.parametrize(("hw", "d_state", "dtype"), [((5, 7), 1, torch.float64), ((6, 6), 4, torch.float32)])
def test_ss2d_torch_path_matches_the_per_direction_loop(hw, d_state, dtype):
    torch.manual_seed(0)
    op = SS2D(d_model=12, d_state=d_state, ssm_ratio=2.0).to(dtype)
    with torch.no_grad():  # non-trivial A / D / bias so every term matters
        op.A_logs.add_(torch.randn_like(op.A_logs) * 0.3)
        op.Ds.add_(torch.randn_like(op.Ds))
    x = torch.randn(2, op.d_inner, *hw, dtype=dtype, requires_grad=True)
    params = [op.x_proj_weight, op.dt_projs_weight, op.dt_projs_bias, op.A_logs, op.Ds]
    y_ref = ss2d_scan_reference(op, x)
    grad = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad(y_ref, [x, *params], grad)
    y = set_scan_backend(op, "torch").scan_2d(x)
    g = torch.autograd.grad(y, [x, *params], grad)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y, y_ref, **tol)
    for name, a, b in zip(["x", "x_proj", "dt_proj", "dt_bias", "A_logs", "Ds"], g, g_ref, strict=True):
        torch.testing.assert_close(a, b, **tol, msg=f"grad of {name}")


def test_ss2d_block_is_the_published_v05_noz_composition():
    """out = out_proj(LN(merge(scan(silu(dwconv3x3(in_proj(x))))))), no gate, on (B, H, W, C)."""
    torch.manual_seed(1)
    op = SS2D(d_model=8, d_state=1, ssm_ratio=1.0).double()
    x = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    u = F.silu(op.conv2d(op.in_proj(x).permute(0, 3, 1, 2)))
    y = ss2d_scan_reference(op, u).transpose(1, 2).reshape(2, 4, 5, op.d_inner)
    expected = op.out_proj(F.layer_norm(y, (op.d_inner,), op.out_norm.weight, op.out_norm.bias))
    torch.testing.assert_close(set_scan_backend(op, "torch")(x), expected, rtol=1e-10, atol=1e-10)
    assert op.conv2d.bias is None and op.in_proj.out_features == op.d_inner  # conv_bias False, "noz"


# ---- registered sizes, names, checkpoints ----------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_registered_sizes_have_the_published_parameter_counts(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]
    assert (model.pretrained_cfg["crop_pct"], model.pretrained_cfg["interpolation"]) == (0.875, "bicubic")


def test_state_dict_uses_the_official_vmamba_names_and_shapes():
    """Names/shapes of MzeroMiko/VMamba's VSSM(forward_type="v05_noz", norm_layer="ln2d",
    downsample_version="v3", patchembed_version="v2", ssm_d_state=1, ssm_conv_bias=False)."""
    with torch.device("meta"):
        sd = timm.create_model("vmamba_tiny").state_dict()
    E, R, K = 96, 6, 4
    expected = {
        "patch_embed.0.weight": (48, 3, 3, 3),
        "patch_embed.2.weight": (48,),
        "patch_embed.5.weight": (96, 48, 3, 3),
        "patch_embed.7.bias": (96,),
        "layers.0.blocks.0.norm.weight": (96,),
        "layers.0.blocks.0.op.in_proj.weight": (E, 96),
        "layers.0.blocks.0.op.conv2d.weight": (E, 1, 3, 3),
        "layers.0.blocks.0.op.x_proj_weight": (K, R + 2, E),
        "layers.0.blocks.0.op.dt_projs_weight": (K, E, R),
        "layers.0.blocks.0.op.dt_projs_bias": (K, E),
        "layers.0.blocks.0.op.A_logs": (K * E, 1),
        "layers.0.blocks.0.op.Ds": (K * E,),
        "layers.0.blocks.0.op.out_norm.weight": (E,),
        "layers.0.blocks.0.op.out_proj.weight": (96, E),
        "layers.0.blocks.1.norm2.bias": (96,),
        "layers.0.blocks.1.mlp.fc1.weight": (384, 96),
        "layers.0.blocks.1.mlp.fc2.bias": (96,),
        "layers.0.downsample.1.weight": (192, 96, 3, 3),
        "layers.0.downsample.3.weight": (192,),
        "layers.2.blocks.7.op.A_logs": (4 * 384, 1),
        "classifier.norm.weight": (768,),
        "classifier.head.weight": (1000, 768),
    }
    for name, shape in expected.items():
        assert tuple(sd[name].shape) == shape, name
    assert "layers.3.downsample.1.weight" not in sd and not any(".op.conv2d.bias" in k for k in sd)
    assert len([k for k in sd if k.startswith("layers.2.blocks.") and k.endswith(".op.Ds")]) == 8


def test_any_input_size_and_the_timm_surface():
    model = tiny_vmamba().eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 48)).shape == (2, 5)
        assert model(torch.randn(1, 3, 33, 70)).shape == (1, 5)  # odd sizes: padded stride-2 convs
        feats = model.forward_features(torch.randn(1, 3, 64, 64))
        assert feats.shape == (1, 2, 2, 64)  # channels-last, /32, dims 8 -> 64
        assert model.forward_head(feats, pre_logits=True).shape == (1, 64)
    # weight decay as the official optimizer: 1-D tensors skip it, the 2-D A_logs / dt_projs_bias do not
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    op = "layers.0.blocks.0.op."
    assert {op + "A_logs", op + "dt_projs_bias", op + "x_proj_weight", op + "in_proj.weight"} <= decayed
    assert not {op + "Ds", op + "out_norm.weight", "classifier.head.bias"} & decayed
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert len(scales) > 5 and scales[-1] == 1.0  # stem, each block, downsamplings, head
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3
    model.set_grad_checkpointing(True)
    model.train()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and model.layers[0].blocks[0].op.x_proj_weight.grad is not None


def test_forward_intermediates_are_the_stage_maps_before_downsampling():
    model = tiny_vmamba().eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert [tuple(m.shape) for m in maps] == [(2, 8, 16, 12), (2, 16, 8, 6), (2, 32, 4, 3), (2, 64, 2, 2)]
        torch.testing.assert_close(final, model.forward_features(x))
        torch.testing.assert_close(maps[-1].permute(0, 2, 3, 1), final)  # the last stage has no downsampling
        normed = model.forward_intermediates(x, indices=1, norm=True, output_fmt="NHWC", intermediates_only=True)
        torch.testing.assert_close(normed[0], model.classifier["norm"](final))
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], maps[1])
    assert model.prune_intermediate_layers(indices=[1]) == [1] and len(model.layers) == 2
    with torch.no_grad():
        assert model.forward_features(x).shape == (2, 8, 6, 16)  # stage 2's map, no downsampling after it
