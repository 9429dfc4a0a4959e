"""GPU parity: the triton kernels against the torch path and mamba-ssm / causal-conv1d, at the
shapes of the real models, fp32 and bf16; compiled models on the GPU backends. Skipped without
CUDA; the mamba-ssm comparisons also skip without its kernels."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import make_scan_args, make_scan_inputs, scan_leaves

import shufflemamba  # noqa: F401
from shufflemamba import ops
from shufflemamba.ops import ScanArgs, cuda_kernels_available, set_scan_backend

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
needs_mamba_ssm = pytest.mark.skipif(not cuda_kernels_available(), reason="needs mamba-ssm and causal-conv1d")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _backends() -> list[str]:
    return ["torch", "triton"] + (["cuda"] if cuda_kernels_available() else [])


def _cuda(args: ScanArgs, dtype=torch.float32) -> ScanArgs:
    """On the GPU; u / delta / B / C / z in ``dtype`` (A / D / bias stay fp32, as the mixers pass them)."""
    low = ("u", "delta", "B", "C", "z")
    return args.replace(**{n: t.detach().cuda().to(dtype if n in low else t.dtype).requires_grad_()
                           for n, t in scan_leaves(args).items()})  # fmt: skip


# (batch, L, K, E, N, ScanArgs options): the scan calls of Vim-S and ShuffleMamba-B at 224 px (both
# directions by index, z shared) and of VMamba-T's first and third stages (four orders, u shared).
MODEL_SHAPES = {
    "vim_s_224": (4, 197, 2, 768, 16, dict(directions=("forward", "reverse"), shared_z=True, combine="mean")),
    "shufflemamba_b_224": (2, 197, 2, 1536, 16, dict(directions=("forward", "reverse"), shared_z=True, combine="mean")),
    "vim_s_1024": (1, 4097, 2, 768, 16, dict(directions=("forward", "reverse"), shared_z=True, combine="mean")),
    "vmamba_t_stage1": (2, 56 * 56, 4, 96, 1, dict(directions=("forward", "columns", "reverse", "columns_reverse"),
                                                  grid=(56, 56), shared_u=True, combine="sum", optional=False)),
    "vmamba_t_stage3": (4, 14 * 14, 4, 384, 1, dict(directions=("forward", "columns", "reverse", "columns_reverse"),
                                                   grid=(14, 14), shared_u=True, combine="sum", optional=False)),
}  # fmt: skip


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", list(MODEL_SHAPES))
def test_triton_scan_matches_torch_and_mamba_ssm_at_model_shapes(shape, dtype, tol):
    """Output and every input gradient, each backend against the torch path (fp32 state everywhere;
    bf16 rounds each input, so agreement is ~1e-2 there)."""
    b, length, k, channels, n, options = MODEL_SHAPES[shape]
    args = _cuda(make_scan_args(b, length, k, channels, n, **options), dtype)
    leaves = scan_leaves(args)
    grad = None
    results = {}
    for backend in _backends():
        y = ops.selective_scan(args, backend)
        grad = torch.randn_like(y) if grad is None else grad
        results[backend] = (y, torch.autograd.grad(y, list(leaves.values()), grad))
    ref_y, ref_grads = results.pop("torch")
    for backend, (y, grads) in results.items():
        assert _rel(y, ref_y) < tol, backend
        for name, g, g_ref in zip(leaves, grads, ref_grads, strict=True):
            assert _rel(g, g_ref) < tol, f"{backend}: grad of {name}"


@needs_mamba_ssm
@pytest.mark.parametrize("groups", [None, 2])
def test_scan_cuda_matches_torch_fp32(groups):
    inputs = {k: v.detach().cuda().requires_grad_() for k, v in make_scan_inputs(2, 64, 197, 16, groups).items()}
    outs = {}
    for backend in ("cuda", "torch", "triton"):
        y = ScanArgs.to_channel_first(ops.selective_scan(ScanArgs.from_channel_first(**inputs, delta_softplus=True),
                                                         backend))  # fmt: skip
        outs[backend] = (y, torch.autograd.grad(y, list(inputs.values()), torch.ones_like(y)))
    for backend in ("cuda", "triton"):
        assert _rel(outs[backend][0], outs["torch"][0]) < 1e-4
        for a, b in zip(outs[backend][1], outs["torch"][1], strict=True):
            assert _rel(a, b) < 1e-4


def test_triton_conv_matches_the_reference_on_cuda():
    x = torch.randn(4, 197, 1536, device="cuda", requires_grad=True)
    w = torch.randn(2, 768, 4, device="cuda", requires_grad=True)
    b = torch.randn(2, 768, device="cuda", requires_grad=True)
    xv = x[..., :768]  # a view of in_proj's output, as the mixer passes it
    out = ops.causal_conv1d(xv, w, b, "silu", ("forward", "reverse"), "triton")
    ref = ops.causal_conv1d(xv, w, b, "silu", ("forward", "reverse"), "reference")
    grad = torch.randn_like(ref)
    assert _rel(out, ref) < 1e-5
    for g, g_ref in zip(torch.autograd.grad(out, [x, w, b], grad), torch.autograd.grad(ref, [x, w, b], grad),
                        strict=True):  # fmt: skip
        assert _rel(g, g_ref) < 1e-5


def _assert_backends_agree(model, x, dtype, tol):
    """Output within tol and every parameter gradient within 10 x tol of the torch path, per backend."""
    results = {}
    for backend in _backends():
        set_scan_backend(model, backend)
        model.zero_grad()
        torch.manual_seed(0)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out = model(x)
        out.float().square().mean().backward()
        results[backend] = (out.detach(), [p.grad.clone() for p in model.parameters()])
    ref_out, ref_grads = results.pop("torch")
    for backend, (out, grads) in results.items():
        assert _rel(out, ref_out) < tol, backend
        for a, b in zip(grads, ref_grads, strict=True):
            assert _rel(a, b) < 10 * tol, backend


def _model(fused=True, **kw):
    torch.manual_seed(0)
    return timm.create_model(
        "shufflemamba_tiny_patch16_224",
        img_size=64,
        patch_size=8,
        embed_dim=64,
        depth=3,
        num_classes=10,
        drop_path_rate=0.0,  # stochastic depth would draw differently in the runs compared
        fused_directions=fused,
        **kw,
    ).cuda()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_model_gpu_backends_match_torch_forward_and_backward(dtype, tol):
    """bf16: inputs to the kernels are rounded to 8 mantissa bits (~4e-3 relative per op), so a
    3-block model agrees to a few 1e-2; fp32 is held to 1e-4."""
    _assert_backends_agree(_model(shuffle_rate=0.0), torch.randn(4, 3, 64, 64, device="cuda"), dtype, tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_vmamba_gpu_backends_match_torch_forward_and_backward(dtype, tol):
    """SS2D's four directions: read by index on triton, one grouped mamba-ssm call on cuda (d_state 1)."""
    torch.manual_seed(0)
    # drop_path_rate=0: vmamba_tiny's default 0.2 drops different samples in the runs compared
    model = timm.create_model("vmamba_tiny", dims=32, depths=(1, 2, 1, 1), num_classes=10, drop_path_rate=0.0).cuda()
    x = torch.randn(4, 3, 64, 48, device="cuda")  # non-square: row- and column-major scans differ
    _assert_backends_agree(model, x, dtype, tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_msvmamba_gpu_backends_match_torch_forward_and_backward(dtype, tol):
    """MS2D's two scans (full-resolution forward; the stride-2 map's three concatenated orders)."""
    torch.manual_seed(0)
    model = timm.create_model("msvmamba_nano", dims=32, depths=(1, 2, 1, 1), num_classes=10, drop_path_rate=0.0)
    _assert_backends_agree(model.cuda(), torch.randn(4, 3, 64, 48, device="cuda"), dtype, tol)


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=needs_mamba_ssm)])
def test_fused_equals_unfused(backend):
    x = torch.randn(4, 3, 64, 64, device="cuda")
    fused, unfused = _model(True).eval(), _model(False).eval()
    unfused.load_state_dict(fused.state_dict())
    with torch.no_grad():
        assert _rel(set_scan_backend(fused, backend)(x), set_scan_backend(unfused, backend)(x)) < 1e-5


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=needs_mamba_ssm)])
def test_shuffle_on_gpu_trains(backend):
    model = set_scan_backend(_model(shuffle_rate=1.0).train(), backend)
    x = torch.randn(4, 3, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x).float().logsumexp(1).mean()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


@needs_mamba_ssm
@pytest.mark.parametrize("groups", [None, 2])
def test_the_cuda_scan_custom_ops_pass_opcheck(groups):
    inputs = {k: v.detach().cuda() for k, v in make_scan_inputs(2, 64, 197, 16, groups).items()}
    if groups is None:
        inputs["B"], inputs["C"] = inputs["B"].unsqueeze(1), inputs["C"].unsqueeze(1)
    args = (*inputs.values(), True)
    assert set(torch.library.opcheck(torch.ops.shufflemamba.selective_scan_cuda.default, args).values()) == {"SUCCESS"}
    out, x, ungated = torch.ops.shufflemamba.selective_scan_cuda(*args)
    bwd = (torch.randn_like(out), x, ungated, *args)
    assert set(torch.library.opcheck(torch.ops.shufflemamba.selective_scan_cuda_bwd.default, bwd).values()) == {
        "SUCCESS"
    }


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=needs_mamba_ssm)])
def test_a_compiled_model_on_a_gpu_backend_is_one_graph_equal_to_eager(backend):
    torch._dynamo.reset()
    model = set_scan_backend(_model(shuffle_rate=0.0), backend)
    x = torch.randn(4, 3, 64, 64, device="cuda")
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)(x)
    assert _rel(compiled, eager) < 1e-4
    grads = torch.autograd.grad(compiled.square().mean(), list(model.parameters()))
    grads_eager = torch.autograd.grad(eager.square().mean(), list(model.parameters()))
    for a, b in zip(grads, grads_eager, strict=True):
        assert _rel(a, b) < 1e-4
