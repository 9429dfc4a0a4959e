"""GPU parity: the mamba-ssm / causal-conv1d path against the torch path. Skipped without CUDA kernels."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import make_scan_inputs

import shufflemamba  # noqa: F401
from shufflemamba.ops import cuda_kernels_available, selective_scan, use_backend

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not cuda_kernels_available(), reason="needs a CUDA GPU with mamba-ssm and causal-conv1d"),
]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("groups", [None, 2])
def test_scan_cuda_matches_torch_fp32(groups):
    inputs = {k: v.detach().cuda().requires_grad_() for k, v in make_scan_inputs(2, 64, 197, 16, groups).items()}
    outs = {}
    for backend in ("cuda", "torch"):
        y = selective_scan(**inputs, delta_softplus=True, backend=backend)
        grads = torch.autograd.grad(y, list(inputs.values()), torch.ones_like(y))
        outs[backend] = (y, grads)
    assert _rel(outs["cuda"][0], outs["torch"][0]) < 1e-4
    for a, b in zip(outs["cuda"][1], outs["torch"][1], strict=True):
        assert _rel(a, b) < 1e-4


def _assert_backends_agree(model, x, dtype, tol):
    """Output within tol and every parameter gradient within 10 x tol, cuda vs torch path."""
    results = {}
    for backend in ("cuda", "torch"):
        model.zero_grad()
        with use_backend(backend), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out = model(x)
        out.float().square().mean().backward()
        results[backend] = (out.detach(), [p.grad.clone() for p in model.parameters()])
    assert _rel(results["cuda"][0], results["torch"][0]) < tol
    for a, b in zip(results["cuda"][1], results["torch"][1], strict=True):
        assert _rel(a, b) < 10 * tol


def _model(fused, **kw):
    torch.manual_seed(0)
    return timm.create_model(
        "shufflemamba_tiny_patch16_224",
        img_size=64,
        patch_size=8,
        embed_dim=64,
        depth=3,
        num_classes=10,
        drop_path_rate=0.0,  # stochastic depth would draw differently in the two runs compared
        fused_directions=fused,
        **kw,
    ).cuda()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_model_cuda_matches_torch_forward_and_backward(dtype, tol):
    """bf16: inputs to the kernel are rounded to 8 mantissa bits (~4e-3 relative per op), so a
    3-block model agrees to a few 1e-2; fp32 is held to 1e-4."""
    _assert_backends_agree(_model(True, shuffle_rate=0.0), torch.randn(4, 3, 64, 64, device="cuda"), dtype, tol)


def test_fused_equals_unfused_on_cuda():
    x = torch.randn(4, 3, 64, 64, device="cuda")
    fused, unfused = _model(True).eval(), _model(False).eval()
    unfused.load_state_dict(fused.state_dict())
    with torch.no_grad(), use_backend("cuda"):
        assert _rel(fused(x), unfused(x)) < 1e-5


def test_shuffle_on_cuda_trains():
    model = _model(True, shuffle_rate=1.0).train()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    with use_backend("cuda"), torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x).float().logsumexp(1).mean()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_vmamba_cuda_matches_torch_forward_and_backward(dtype, tol):
    """SS2D's four directions in one grouped mamba-ssm call (d_state 1) against the torch path."""
    torch.manual_seed(0)
    # drop_path_rate=0: vmamba_tiny's default 0.2 drops different samples in the two runs compared
    model = timm.create_model("vmamba_tiny", dims=32, depths=(1, 2, 1, 1), num_classes=10, drop_path_rate=0.0).cuda()
    x = torch.randn(4, 3, 64, 48, device="cuda")  # non-square: row- and column-major scans differ
    _assert_backends_agree(model, x, dtype, tol)


@pytest.mark.parametrize("groups", [None, 2])
def test_the_cuda_scan_custom_ops_pass_opcheck(groups):
    inputs = {k: v.detach().cuda() for k, v in make_scan_inputs(2, 64, 197, 16, groups).items()}
    args = (*inputs.values(), True)
    assert set(torch.library.opcheck(torch.ops.shufflemamba.selective_scan_cuda.default, args).values()) == {"SUCCESS"}
    out, x, ungated = torch.ops.shufflemamba.selective_scan_cuda(*args)
    bwd = (torch.randn_like(out), *args[:8], x, ungated, True)
    assert set(torch.library.opcheck(torch.ops.shufflemamba.selective_scan_cuda_bwd.default, bwd).values()) == {
        "SUCCESS"
    }


def test_a_compiled_model_on_the_cuda_kernels_is_one_graph_equal_to_eager():
    torch._dynamo.reset()
    model = _model(True, shuffle_rate=0.0)
    x = torch.randn(4, 3, 64, 64, device="cuda")
    with use_backend("cuda"):
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    assert _rel(compiled, eager) < 1e-4
