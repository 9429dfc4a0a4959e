"""MSVMamba: the published sizes (parameter counts, the official names and shapes), a tiny
model's forward against one written from the equations, gradients, and the scan backends."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from shufflemamba.models import MSVMAMBA_SIZES
from shufflemamba.ops import ScanSettings

PUBLISHED_PARAMS = {"msvmamba_nano": 6_864_136, "msvmamba_micro": 11_879_272, "msvmamba_tiny": 33_046_312}


@pytest.mark.parametrize("name", sorted(MSVMAMBA_SIZES))
def test_the_sizes_have_the_published_parameter_counts_and_the_official_names(name):
    model = timm.create_model(name, device="meta")
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]
    c = MSVMAMBA_SIZES[name].dims
    di, r = 2 * c, -(-c // 16)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    block = "layers.0.blocks.0."
    assert {k[len(block):]: v for k, v in shapes.items() if k.startswith(block + "op.")} == {
        "op.x_proj_weight": (2, r + 2, di), "op.dt_projs_weight": (2, di, r), "op.dt_projs_bias": (2, di),
        "op.A_logs": (2 * di, 1), "op.Ds": (2 * di,), "op.in_proj.weight": (2 * di, c),
        "op.conv2d.weight": (di, 1, 3, 3), "op.conv2d.bias": (di,), "op.conv2d_b1.weight": (di, 1, 7, 7),
        "op.conv2d_b1.bias": (di,), "op.out_norm.weight": (di,), "op.out_norm.bias": (di,),
        "op.se.fc.0.weight": (di // 8, di), "op.se.fc.2.weight": (di, di // 8), "op.out_proj.weight": (c, di),
    }  # fmt: skip
    assert shapes[block + "convFFN.linear1.weight"] == (2 * c, c, 1, 1) and shapes[block + "convFFN.dwc.weight"] == (
        2 * c, 1, 3, 3)  # fmt: skip
    assert shapes["patch_embed.0.weight"] == (c, 3, 4, 4) and shapes["patch_embed.2.weight"] == (c,)
    assert shapes["layers.0.downsample.norm.weight"] == (4 * c,)
    assert (
        shapes["layers.0.downsample.reduction.weight"] == (2 * c, 4 * c)
        and "layers.3.downsample.norm.weight" not in shapes
    )
    assert shapes["classifier.norm.weight"] == (8 * c,) and shapes["classifier.head.weight"] == (1000, 8 * c)


# ---- the forward, written again from the equations (float64, loops, flips and transposes) ------------


def _scan(u, delta, A, B, C, D):
    """Sequential selective scan: u, delta (L, E); A (E, N); B, C (L, N); D (E,) -> (L, E)."""
    h = torch.zeros(A.shape, dtype=u.dtype)
    out = []
    for t in range(u.shape[0]):
        h = torch.exp(delta[t, :, None] * A) * h + delta[t, :, None] * B[t] * u[t, :, None]
        out.append(h @ C[t] + D * u[t])
    return torch.stack(out)


def _branch(op, seq, k):
    """One parameter set's scan over a (L, E) sequence, as the paper writes it."""
    inner = op.d_inner
    x_dbl = seq @ op.x_proj_weight[k].T
    dt, B, C = x_dbl.split([op.dt_rank, op.d_state, op.d_state], dim=-1)
    delta = F.softplus(dt @ op.dt_projs_weight[k].T + op.dt_projs_bias[k])
    A = -torch.exp(op.A_logs[k * inner : (k + 1) * inner])
    return _scan(seq, delta, A, B, C, op.Ds[k * inner : (k + 1) * inner])


def _ms2d(op, x):  # x (H, W, C) of one image
    height, width, _ = x.shape
    xz = x @ op.in_proj.weight.T
    xin, z = xz.chunk(2, dim=-1)
    xc = xin.permute(2, 0, 1)[None]
    full = F.silu(op.conv2d(xc))[0]  # (E, H, W)
    low = F.silu(op.conv2d_b1(xc))[0]  # (E, h, w)
    e, h, w = low.shape
    norm = lambda y: F.layer_norm(y, (e,), op.out_norm.weight, op.out_norm.bias)  # noqa: E731
    y_full = norm(_branch(op, full.reshape(e, -1).T, 1)).reshape(height, width, e)
    rows = low.reshape(e, -1).T  # row-major
    cols = low.transpose(1, 2).reshape(e, -1).T  # column-major
    seq = torch.cat([rows.flip(0), cols, cols.flip(0)])
    y = norm(_branch(op, seq, 0))
    n = h * w
    y0 = y[:n].flip(0).reshape(h, w, e)
    y1 = y[n : 2 * n].reshape(w, h, e).transpose(0, 1)
    y2 = y[2 * n :].flip(0).reshape(w, h, e).transpose(0, 1)
    low_sum = (y0 + y1 + y2).permute(2, 0, 1)[None]
    up = F.interpolate(low_sum, size=(height, width), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    y = y_full + up
    gate = torch.sigmoid(op.se.fc[2].weight @ torch.relu(op.se.fc[0].weight @ y.mean(dim=(0, 1))))
    return ((y * gate) * F.silu(z)) @ op.out_proj.weight.T


def _reference(model, images):
    outs = []
    for image in images:
        x = model.patch_embed[0](image[None])[0].permute(1, 2, 0)
        x = F.layer_norm(x, x.shape[-1:], model.patch_embed[2].weight, model.patch_embed[2].bias)
        for stage in model.layers:
            for block in stage.blocks:
                ln = lambda t, m: F.layer_norm(t, t.shape[-1:], m.weight, m.bias)  # noqa: E731
                x = x + _ms2d(block.op, ln(x, block.norm))
                ffn = block.convFFN
                hidden = ffn.linear1(ln(x, block.norm2).permute(2, 0, 1)[None])
                x = x + ffn.linear2(F.gelu(hidden + ffn.dwc(hidden)))[0].permute(1, 2, 0)
            if not isinstance(stage.downsample, torch.nn.Identity):
                height, width = x.shape[:2]
                x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
                x = torch.cat([x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]], dim=-1)
                x = ln(x, stage.downsample.norm) @ stage.downsample.reduction.weight.T
        x = F.layer_norm(x, x.shape[-1:], model.classifier["norm"].weight, model.classifier["norm"].bias)
        outs.append(model.classifier["head"](x.mean(dim=(0, 1))))
    return torch.stack(outs)


def _tiny(**kw):
    return timm.create_model("msvmamba_nano", dims=8, depths=(1, 2, 1, 1), num_classes=5, drop_path_rate=0.0, **kw)


def test_a_tiny_models_forward_equals_one_written_from_the_equations():
    torch.manual_seed(0)
    model = _tiny().double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # away from the init's zeros and ones
            if "A_logs" not in name:
                p.add_(torch.randn_like(p) * 0.1)
    images = torch.randn(2, 3, 40, 36, dtype=torch.float64)  # odd maps on the way: 10x9 -> 5x5 -> 3x3 -> 2x2
    with torch.no_grad():
        ours, reference = model(images), _reference(model, images)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_parameter():
    model = _tiny().train()
    model(torch.randn(2, 3, 32, 32)).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing and all(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_every_scan_backend_gives_the_torch_paths_output_and_gradients(backend):
    torch.manual_seed(0)
    model = _tiny(scan_backend="torch")
    other = _tiny(scan_backend=backend)
    other.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    a, b = model(x), other(x)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert isinstance(other.layers[0].blocks[0].op.scan_settings, ScanSettings)
