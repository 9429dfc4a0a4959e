"""The triton backend against the reference: the scan and conv kernels (every gradient), whole
models against the torch backend, the custom ops. Without a GPU the kernels run under Triton's
interpreter (conftest sets TRITON_INTERPRET=1): tiny shapes, since each program step is Python."""

from __future__ import annotations

import pytest
import torch
from conftest import make_scan_args, make_scan_inputs, scan_leaves, tiny_vim, tiny_vmamba

from shufflemamba import ops
from shufflemamba.ops import ScanArgs, TritonConfig, set_scan_backend
from shufflemamba.ops.reference import conv1d_reference, scan_reference

pytestmark = pytest.mark.skipif(not ops.triton_available("cuda" if torch.cuda.is_available() else "cpu"),
                                reason="needs triton (on a GPU, or TRITON_INTERPRET=1)")  # fmt: skip
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# mamba-ssm's tests/ops/test_selective_scan.py tolerances: output (rtol, atol) per input dtype, and the
# weights' (A, D, delta_bias, B, C) at least 1e-3.
TOLERANCES = {torch.float32: (6e-4, 2e-3), torch.float16: (3e-3, 5e-3), torch.bfloat16: (3e-2, 5e-2)}
WEIGHTS = ("A", "B", "C", "D", "delta_bias")


def _to_device(args: ScanArgs) -> ScanArgs:
    moved = {n: t.detach().to(DEVICE).requires_grad_() for n, t in scan_leaves(args).items()}
    return args.replace(**moved)


def _check_against_reference(args: ScanArgs, config: TritonConfig, dtype=torch.float32) -> None:
    args = _to_device(args)
    leaves = scan_leaves(args)
    y = ops.selective_scan(args, ops.ScanSettings.resolve("triton", triton=config))
    y_ref = scan_reference(args)
    assert y.shape == y_ref.shape == args.output_shape() and y.dtype == y_ref.dtype
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    grad = torch.randn_like(y_ref)
    grads = torch.autograd.grad(y, list(leaves.values()), grad)
    grads_ref = torch.autograd.grad(y_ref, list(leaves.values()), grad)
    for (name, leaf), g, g_ref in zip(leaves.items(), grads, grads_ref, strict=True):
        assert g.shape == leaf.shape and g.dtype == leaf.dtype, name
        r, a = (max(rtol, 1e-3), max(atol, 1e-3)) if name in WEIGHTS else (2 * rtol, 2 * atol)
        torch.testing.assert_close(g, g_ref, rtol=r, atol=a, msg=f"grad of {name}")


SMALL = TritonConfig(block_d=8, chunk=4, conv_block_l=8, conv_block_e=8)  # several channel blocks and chunks
CASES = {  # (b, L, K, E, N, ScanArgs options, config)
    "one direction, N 4, D / z / bias": (2, 11, 1, 12, 4, {}, SMALL),
    "vim: forward + reverse, shared z, mean, N 16": (2, 13, 2, 16, 16, dict(
        directions=("forward", "reverse"), shared_z=True, combine="mean"), SMALL),
    "vmamba: 4 orders on a 3 x 4 map, shared u, sum, N 1": (1, 12, 4, 8, 1, dict(
        directions=("forward", "columns", "reverse", "columns_reverse"), grid=(3, 4), shared_u=True, combine="sum",
        optional=False), SMALL),
    "shared u, outputs kept apart": (1, 9, 2, 8, 4, dict(directions=("reverse", "forward"), shared_u=True), SMALL),
    "no softplus, no D / z / bias": (2, 7, 2, 8, 4, dict(softplus=False, optional=False), SMALL),
    "length 64, 32 channels, N 16, default config": (1, 64, 1, 32, 16, {}, TritonConfig()),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_the_triton_scan_matches_the_reference_in_every_gradient(case):
    b, length, k, channels, n, options, config = CASES[case]
    _check_against_reference(make_scan_args(b, length, k, channels, n, **options), config)


@pytest.mark.parametrize("groups", [None, 2, 4])
def test_mamba_ssm_grouped_channel_first_calls_run_on_the_triton_kernels(groups):
    """mamba-ssm's (b, dim, L) layout with grouped B / C: read through strides, no copy."""
    inputs = make_scan_inputs(2, 8, 10, 4, groups)
    _check_against_reference(ScanArgs.from_channel_first(**inputs, delta_softplus=True), SMALL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_compute_in_fp32(dtype):
    args = make_scan_args(2, 9, 2, 8, 4, directions=("forward", "reverse"), shared_z=True, combine="mean")
    low = {n: t.detach().to(dtype) for n, t in scan_leaves(args).items() if n in ("u", "delta", "B", "C", "z")}
    _check_against_reference(args.replace(**low), SMALL, dtype)


@pytest.mark.parametrize(
    ("directions", "bias", "silu", "from_view"),
    [
        (("forward", "reverse"), True, True, True),
        (("reverse",), False, False, False),
        (("forward",), True, True, False),
    ],
)
def test_the_triton_conv_matches_the_reference(directions, bias, silu, from_view):
    """Depthwise causal / anti-causal conv + SiLU, reading x through its strides (a view of in_proj's output)."""
    torch.manual_seed(0)
    k, channels = len(directions), 12
    xz = torch.randn(2, 11, 2 * channels, device=DEVICE, requires_grad=True)
    x = xz[..., :channels] if from_view else xz[..., :channels].detach().contiguous().requires_grad_()
    w = torch.randn(k, channels, 4, device=DEVICE, requires_grad=True)
    b = torch.randn(k, channels, device=DEVICE, requires_grad=True) if bias else None
    act = "silu" if silu else None
    out = ops.causal_conv1d(x, w, b, act, directions, ops.ScanSettings.resolve("triton", triton=SMALL))
    ref = conv1d_reference(x, w, b, act, directions)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    leaves = [t for t in ((xz if from_view else x), w, b) if t is not None]
    grad = torch.randn_like(ref)
    for g, g_ref in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(ref, leaves, grad), strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


def _run(model, x, backend, seed=0):
    set_scan_backend(model, backend)
    model.zero_grad()
    torch.manual_seed(seed)  # the same shuffle draws in both runs
    out = model(x)
    out.float().square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_backends_agree(model, x, tol=1e-4):
    """Logits and every parameter gradient: triton against torch (relative to each tensor's norm)."""
    ref, ref_grads = _run(model, x, "torch")
    out, grads = _run(model, x, "triton")
    assert grads.keys() == ref_grads.keys() == {n for n, p in model.named_parameters()}
    assert ((out - ref).norm() / ref.norm()).item() < tol
    for name, g in grads.items():
        assert ((g - ref_grads[name]).norm() / ref_grads[name].norm().clamp_min(1e-12)).item() < 10 * tol, name


@pytest.mark.parametrize("name", ["vim_tiny_patch16_224", "shufflemamba_tiny_patch16_224"])
def test_vim_and_shufflemamba_on_triton_equal_the_torch_backend(name):
    """Depth 2; ShuffleMamba with the shuffle always on (both blocks permuted: the triton mixer runs on
    shuffled tokens and the order is restored after it)."""
    torch.manual_seed(0)
    model = tiny_vim(name, depth=2, shuffle_rate=1.0 if name.startswith("shuffle") else 0.0).to(DEVICE).train()
    _assert_backends_agree(model, torch.randn(2, 3, 32, 32, device=DEVICE))


def test_vmamba_on_triton_equals_the_torch_backend():
    """Four orders read by index (no cross-scan copies) against the torch path's cross-scan + merge."""
    torch.manual_seed(0)
    model = tiny_vmamba(depths=(1, 1, 1, 1)).to(DEVICE)
    _assert_backends_agree(model, torch.randn(2, 3, 32, 24, device=DEVICE))  # non-square: orders differ


def test_the_triton_custom_ops_pass_opcheck():
    """Schema, fakes, autograd registration and AOT dispatch of the scan and conv ops."""
    args = _to_device(make_scan_args(1, 5, 2, 4, 2, directions=("forward", "reverse"), shared_z=True, combine="mean"))
    tensors = tuple(t.detach().contiguous().requires_grad_() if t is not None else None for t in args.tensors())
    cfg = SMALL.as_list()
    scan = torch.ops.shufflemamba.selective_scan_triton
    code = 1 << 2  # forward, reverse
    options = (code, 5, 1, "mean", cfg)  # directions, (H, W) (unused by these orders), combine, config
    assert set(torch.library.opcheck(scan.default, (*options, True, *tensors, True)).values()) == {"SUCCESS"}
    detached = tuple(t.detach() if t is not None else None for t in tensors)
    out, states = scan(*options, True, *detached, True)
    bwd = (torch.randn_like(out), states, *options, *detached, True)
    assert set(torch.library.opcheck(torch.ops.shufflemamba.selective_scan_triton_bwd.default, bwd).values()) == {
        "SUCCESS"
    }
    x = torch.randn(1, 5, 4, device=DEVICE, requires_grad=True)
    w = torch.randn(2, 4, 3, device=DEVICE, requires_grad=True)
    conv_args = (x, w, None, code, True, cfg)
    assert set(torch.library.opcheck(torch.ops.shufflemamba.conv1d_triton.default, conv_args).values()) == {"SUCCESS"}


def test_float64_is_refused_with_the_backend_to_use():
    args = make_scan_args(1, 3, 1, 4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="computes in float32; use backend 'torch' for float64"):
        ops.selective_scan(_to_device(args), "triton")
