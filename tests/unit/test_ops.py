"""The torch scan path against the sequential reference; backend dispatch."""

import pytest
import torch
from conftest import make_scan_inputs

from shufflemamba import ops
from shufflemamba.ops import scan_fused, scan_torch, selective_scan_torch
from shufflemamba.ops.cross_scan import cross_merge, cross_scan, cross_unscan
from shufflemamba.ops.reference import causal_conv1d_reference, selective_scan_reference
from shufflemamba.ops.scan_torch import softplus

SHAPES = [  # (batch, dim, length, d_state, groups)
    (2, 8, 7, 4, None),
    (2, 16, 33, 16, None),  # d_state 16, odd length
    (3, 12, 197, 16, 2),  # Vim-like length, grouped B/C (the fused bidirectional layout)
    (1, 6, 1, 3, None),  # a single step
]


@pytest.mark.parametrize("shape", SHAPES)
def test_torch_scan_matches_reference_forward_and_gradients(shape, monkeypatch):
    monkeypatch.setattr("shufflemamba.ops.scan_torch._CHUNK_ELEMENTS", 700)  # several chunks
    inputs = make_scan_inputs(*shape)
    names = list(inputs)
    y_ref = selective_scan_reference(**inputs, delta_softplus=True)
    grad_out = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad(y_ref, list(inputs.values()), grad_out)
    y = selective_scan_torch(**inputs, delta_softplus=True)
    g = torch.autograd.grad(y, list(inputs.values()), grad_out)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(names, g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"grad of {name}")


def test_torch_scan_float64_exact_and_optional_args():
    inputs = make_scan_inputs(2, 8, 19, 5, dtype=torch.float64)
    for drop in ([], ["D", "z", "delta_bias"]):
        kw = {k: v for k, v in inputs.items() if k not in drop}
        for softplus_flag in (True, False):
            y_ref = selective_scan_reference(**kw, delta_softplus=softplus_flag)
            y = selective_scan_torch(**kw, delta_softplus=softplus_flag)
            torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)


def test_torch_scan_gradcheck():
    inputs = make_scan_inputs(1, 3, 5, 2, dtype=torch.float64, seed=3)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    assert torch.autograd.gradcheck(lambda *a: selective_scan_torch(*a, delta_softplus=True), args)


def test_last_state_and_inference_path_agree_with_reference():
    inputs = {k: v.detach() for k, v in make_scan_inputs(2, 8, 23, 16).items()}
    y_ref, h_ref = selective_scan_reference(**inputs, delta_softplus=True, return_last_state=True)
    with torch.no_grad():
        y, h = selective_scan_torch(**inputs, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)


def test_bf16_inputs_accumulate_in_fp32_and_return_bf16():
    inputs = {k: v.detach() for k, v in make_scan_inputs(2, 8, 40, 16).items()}
    low = {k: v.bfloat16() if k in ("u", "delta", "B", "C", "z") else v for k, v in inputs.items()}
    y = selective_scan_torch(**low, delta_softplus=True)
    y_ref = selective_scan_reference(**{k: v.float() for k, v in low.items()}, delta_softplus=True)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref, rtol=2e-2, atol=2e-2)


def test_fast_softplus_matches_float64():
    x = torch.linspace(-80, 80, 100_001)
    ref = torch.nn.functional.softplus(x.double())
    assert ((softplus(x).double() - ref).abs() / ref.clamp_min(1e-30)).max() < 1e-6


def test_causal_conv_is_causal_and_matches_manual():
    x = torch.randn(2, 5, 9)
    w = torch.randn(5, 4)
    bias = torch.randn(5)
    out = causal_conv1d_reference(x, w, bias, "silu")
    padded = torch.nn.functional.pad(x, (3, 0))
    manual = sum(padded[..., k : k + 9] * w[:, k, None] for k in range(4)) + bias[:, None]
    torch.testing.assert_close(out, torch.nn.functional.silu(manual))
    x2 = x.clone()
    x2[..., 5:] = 0  # the future never changes the past
    torch.testing.assert_close(
        causal_conv1d_reference(x2, w, bias)[..., :5], causal_conv1d_reference(x, w, bias)[..., :5]
    )


def test_backend_dispatch_and_clear_errors(monkeypatch):
    x = torch.zeros(1, 2, 3)
    assert ops.resolve_backend("auto", x) == "torch"
    assert ops.resolve_backend("reference", x) == "reference"
    with ops.use_backend("reference"):
        assert ops.resolve_backend("torch", x) == "reference"
    monkeypatch.setenv("SHUFFLEMAMBA_SCAN_BACKEND", "reference")
    assert ops.resolve_backend("torch", x) == "reference"
    monkeypatch.delenv("SHUFFLEMAMBA_SCAN_BACKEND")
    with pytest.raises(ValueError, match="unknown scan backend 'tpu'"):
        ops.resolve_backend("tpu", x)
    if not torch.cuda.is_available():
        with pytest.raises(ops.CudaKernelsUnavailable, match="needs a CUDA GPU"):
            ops.resolve_backend("cuda", x)


@pytest.mark.parametrize("hw", [(4, 5), (3, 3), (1, 6)])
def test_cross_scan_orders_and_exact_inverses(hw):
    H, W = hw
    x = torch.randn(2, 3, H, W)
    xs = cross_scan(x)
    assert xs.shape == (2, 4, 3, H * W)
    row_major = [x[:, :, h, w] for h in range(H) for w in range(W)]
    col_major = [x[:, :, h, w] for w in range(W) for h in range(H)]
    for k, order in enumerate([row_major, col_major, row_major[::-1], col_major[::-1]]):
        assert torch.equal(xs[:, k], torch.stack(order, dim=-1)), f"direction {k}"
    unscanned = cross_unscan(xs, H, W)
    for k in range(4):
        assert torch.equal(unscanned[:, k], x.flatten(2))
    assert torch.equal(cross_merge(xs, H, W), 4 * x.flatten(2))
    # merge is the adjoint of scan (so autograd's backward of one is the other)
    ys = torch.randn_like(xs)
    torch.testing.assert_close((xs * ys).sum(), (x.flatten(2) * cross_merge(ys, H, W)).sum())
    with pytest.raises(ValueError, match="expected"):
        cross_merge(xs, H + 1, W)


@pytest.mark.parametrize(("groups", "optional"), [(None, True), (2, True), (None, False)])
def test_the_scan_custom_ops_pass_opcheck(groups, optional):
    """Schema, fake (meta) implementation, autograd registration, AOT dispatch: all four checks."""
    inputs = make_scan_inputs(2, 8, 11, 4, groups)
    if not optional:
        inputs.update(D=None, z=None, delta_bias=None)
    args = (*inputs.values(), True)
    ops_ = torch.ops.shufflemamba
    detached = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in args)
    for op, op_args in ((ops_.selective_scan_torch, args), (ops_.selective_scan_torch_inference, detached)):
        result = torch.library.opcheck(op.default, op_args)
        assert set(result.values()) == {"SUCCESS"}, result
    out, ungated, states = ops_.selective_scan_torch(*detached)
    grad = torch.randn_like(out)
    bwd_args = (grad, *detached[:8], ungated, states, True)
    assert set(torch.library.opcheck(ops_.selective_scan_torch_bwd.default, bwd_args).values()) == {"SUCCESS"}


def test_unsupported_scan_inputs_fail_at_the_op_boundary_with_a_clear_message():
    inputs = make_scan_inputs(2, 8, 11, 4)
    complex_a = {**inputs, "A": torch.complex(inputs["A"].detach(), inputs["A"].detach())}
    with pytest.raises(ValueError, match="complex inputs are not supported"):
        ops.selective_scan(**complex_a, backend="torch")
    constant_b = {**inputs, "B": torch.randn(8, 4)}
    with pytest.raises(ValueError, match=r"B must be input-dependent.*got \(8, 4\) \(a constant \(dim, N\) B"):
        ops.selective_scan(**constant_b, backend="torch")
    with pytest.raises(ValueError, match="dim 8 is not divisible by the 3 groups of C"):
        ops.selective_scan(**{**inputs, "C": torch.randn(2, 3, 4, 11)}, backend="torch")


def test_the_inductor_compiled_chunks_match_the_reference(monkeypatch):
    """SHUFFLEMAMBA_SCAN_FUSED=1 forces the compiled chunk path (auto uses it for large scans only)."""
    monkeypatch.setenv("SHUFFLEMAMBA_SCAN_FUSED", "1")
    monkeypatch.setattr(scan_torch, "_CHUNK_ELEMENTS", 2 * 16 * 4 * 3)  # chunks of 3 steps: 4 chunks over 11
    monkeypatch.setattr(scan_fused, "MAX_PIECE_STEPS", 2)  # each chunk in compiled pieces of 2 + 1 steps
    assert scan_fused.pieces(0, 3) == [(0, 2), (2, 3)] and scan_fused.pieces(9, 11) == [(9, 11)]
    inputs = make_scan_inputs(2, 16, 11, 4, groups=2)
    y = selective_scan_torch(**inputs, delta_softplus=True)
    grads = torch.autograd.grad(y, list(inputs.values()), torch.ones_like(y))
    detached = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    y_ref = selective_scan_reference(**detached, delta_softplus=True)
    grads_ref = torch.autograd.grad(y_ref, list(detached.values()), torch.ones_like(y_ref))
    assert not scan_fused._state["broken"]
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _token_major(t: torch.Tensor) -> torch.Tensor:
    """The same (b, d, L) values stored (b, L, d), as the Vim mixer keeps them on CPU."""
    return t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(t.requires_grad)


def test_token_major_inputs_give_the_same_conv_and_scan_and_stay_token_major():
    """The torch backend's conv and scan read any layout; their (b, d, L) results and gradients are
    stored token-major (the layout the mixer computes in), whatever the inputs' layout."""
    x, weight, bias = torch.randn(2, 12, 9), torch.randn(12, 4), torch.randn(12)
    conv_tm = ops.causal_conv1d(_token_major(x), weight, bias, "silu", backend="torch")
    assert ops.is_token_major(conv_tm) and not ops.is_token_major(x)
    torch.testing.assert_close(conv_tm, causal_conv1d_reference(x, weight, bias, "silu"), rtol=1e-5, atol=1e-6)

    inputs = make_scan_inputs(2, 12, 9, 4, groups=2)
    moved = {k: _token_major(v) if k in ("u", "delta", "z") else v.detach().requires_grad_() for k, v in inputs.items()}
    grad_out = torch.randn(2, 12, 9)
    results = []
    for args in (inputs, moved):
        y = selective_scan_torch(**args, delta_softplus=True)
        grads = torch.autograd.grad(y, list(args.values()), grad_out)
        assert ops.is_token_major(y)
        assert all(ops.is_token_major(grads[i]) for i in (0, 1, 6))  # u, delta, z
        results.append((y, grads))
    (y, grads), (y_tm, grads_tm) = results
    torch.testing.assert_close(y_tm, y, rtol=0, atol=0)
    for a, b in zip(grads_tm, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(y, selective_scan_reference(**inputs, delta_softplus=True), rtol=1e-5, atol=1e-5)
