"""The scan's argument bundle, settings and dispatch; the torch path against the sequential reference."""

import pytest
import torch
from conftest import make_scan_args, make_scan_inputs, scan_leaves

from shufflemamba import ops
from shufflemamba.ops import ScanArgs, ScanSettings, scan_fused, selective_scan_torch, token_order
from shufflemamba.ops.cross_scan import cross_merge, cross_scan, cross_unscan
from shufflemamba.ops.reference import (
    causal_conv1d_reference,
    conv1d_reference,
    scan_reference,
    selective_scan_reference,
)
from shufflemamba.ops.scan_torch import softplus

SHAPES = [  # (batch, dim, length, d_state, groups)
    (2, 8, 7, 4, None),
    (2, 16, 33, 16, None),  # d_state 16, odd length
    (3, 12, 197, 16, 2),  # Vim-like length, grouped B/C (the fused bidirectional layout)
    (1, 6, 1, 3, None),  # a single step
]


@pytest.mark.parametrize("shape", SHAPES)
def test_torch_scan_matches_reference_forward_and_gradients(shape, monkeypatch):
    monkeypatch.setenv("SHUFFLEMAMBA_SCAN_CHUNK_ELEMENTS", "700")  # several chunks
    inputs = make_scan_inputs(*shape)
    names = list(inputs)
    y_ref = selective_scan_reference(**inputs, delta_softplus=True)
    grad_out = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad(y_ref, list(inputs.values()), grad_out)
    y = selective_scan_torch(**inputs, delta_softplus=True)
    g = torch.autograd.grad(y, list(inputs.values()), grad_out)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(names, g, g_ref, strict=True):
        # atol scaled by the gradient's magnitude: dA sums ~600 fp32 products of up to ~100, so an
        # element near zero differs by ~1e-5 absolutely in any summation order (exactness is the
        # float64 test's and gradcheck's)
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale, msg=f"grad of {name}")


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


def test_return_last_state_keeps_the_output_gradient():
    """mamba-ssm's selective_scan_fn: with return_last_state the output keeps its gradient (only the
    last state's is dropped); its test grid runs every case with return_last_state=True this way."""
    inputs = make_scan_inputs(2, 8, 13, 4, groups=2)
    y, last = selective_scan_torch(**inputs, delta_softplus=True, return_last_state=True)
    assert y.requires_grad and not last.requires_grad
    y_ref, last_ref = selective_scan_reference(**inputs, delta_softplus=True, return_last_state=True)
    grad_out = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, list(inputs.values()), grad_out),
                    torch.autograd.grad(y_ref, list(inputs.values()), grad_out), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, last_ref.detach(), rtol=1e-5, atol=1e-5)


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


def test_a_reverse_conv_reads_the_tokens_after_t():
    """Direction 'reverse' is the causal conv of the reversed sequence, in token order: an anti-causal
    window out[t] = sum_j w[j] x[t + W - 1 - j]; the torch backend gives the reference's numbers."""
    x, w, bias = torch.randn(2, 9, 5), torch.randn(2, 5, 4), torch.randn(2, 5)
    out = conv1d_reference(x, w, bias, None, ("forward", "reverse"))
    padded = torch.nn.functional.pad(x, (0, 0, 0, 3))  # zeros after the end
    manual = sum(padded[:, 3 - j : 3 - j + 9] * w[1, :, j] for j in range(4)) + bias[1]
    torch.testing.assert_close(out[:, :, 1], manual)
    torch.testing.assert_close(out[:, :, 0], causal_conv1d_reference(x.transpose(1, 2), w[0], bias[0]).transpose(1, 2))
    torch_out = ops.causal_conv1d(x, w, bias, "silu", ("forward", "reverse"), "torch")
    torch.testing.assert_close(torch_out, conv1d_reference(x, w, bias, "silu", ("forward", "reverse")))


def test_settings_resolve_once_explicit_beats_environment(monkeypatch):
    x = torch.zeros(1, 2, 3)
    monkeypatch.setenv("SHUFFLEMAMBA_SCAN_BACKEND", "reference")
    monkeypatch.setenv("SHUFFLEMAMBA_SCAN_CHUNK_ELEMENTS", "4096")
    assert ScanSettings.resolve("torch").backend == "torch"  # explicit wins over the environment
    from_env = ScanSettings.resolve(None)  # unset: the environment is the default
    assert from_env.backend == "reference" and from_env.chunk_elements == 4096
    monkeypatch.setenv("SHUFFLEMAMBA_SCAN_BACKEND", "torch")
    assert from_env.backend_for(x) == "reference"  # fixed when resolved, not re-read per call
    monkeypatch.delenv("SHUFFLEMAMBA_SCAN_BACKEND")
    assert ScanSettings.resolve(None).backend_for(x) == "torch"  # auto on CPU
    assert ScanSettings.resolve(None).describe(x.device).startswith("scan backend auto -> torch on cpu")
    with pytest.raises(ValueError, match="unknown scan backend 'tpu'; choose one of auto, cuda, triton, torch"):
        ScanSettings.resolve("tpu")
    monkeypatch.setenv("SHUFFLEMAMBA_SCAN_FUSED", "yes")
    with pytest.raises(ValueError, match="SHUFFLEMAMBA_SCAN_FUSED='yes': use auto, 0 or 1"):
        ScanSettings.resolve(None)
    with pytest.raises(ValueError, match="triton config 'block=3'"):
        ops.TritonConfig.parse("block=3")
    with pytest.raises(ValueError, match="block_d must be a power of two"):
        ops.TritonConfig.parse("block_d=24")


def test_backends_that_cannot_run_say_why_in_one_line(monkeypatch):
    x = torch.zeros(1, 2, 3)
    if not torch.cuda.is_available():
        with pytest.raises(ops.CudaKernelsUnavailable, match="needs a CUDA GPU.*model.scan_backend=triton"):
            ScanSettings.resolve("cuda").backend_for(x)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(
        ops.TritonUnavailable, match="got CPU tensors: move the model to a CUDA GPU.*TRITON_INTERPRET=1"
    ):
        ScanSettings.resolve("triton").backend_for(x)


def test_a_model_is_built_with_one_settings_object_that_set_scan_backend_replaces(monkeypatch):
    import timm

    monkeypatch.setenv("SHUFFLEMAMBA_SCAN_BACKEND", "reference")
    model = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=16, depth=2)
    assert [s.backend for s in ops.scan_settings_of(model)] == ["reference"]
    explicit = timm.create_model("vmamba_tiny", dims=8, depths=(1, 1, 1, 1), scan_backend="torch")
    assert [s.backend for s in ops.scan_settings_of(explicit)] == ["torch"]
    ops.set_scan_backend(model, "torch", fused="0")
    assert [(s.backend, s.fused) for s in ops.scan_settings_of(model)] == [("torch", "0")]
    assert ops.describe_scan(model, torch.device("cpu")).startswith("scan backend torch (chunk elements")


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


def test_token_orders_are_vmamba_cross_scan_orders():
    """The scan directions are VMamba's four sequences: token_order(d)[s] is the row-major index of
    the token cross_scan puts at step s of direction d."""
    H, W = 3, 4
    x = torch.arange(H * W, dtype=torch.float32).view(1, 1, H, W)
    xs = cross_scan(x)[0, :, 0].long()  # (4, L): the row-major index at each step
    for k, direction in enumerate(("forward", "columns", "reverse", "columns_reverse")):
        assert torch.equal(token_order(direction, H * W, (H, W)), xs[k]), direction
    with pytest.raises(ValueError, match="needs grid=\\(H, W\\) with H \\* W = 12"):
        token_order("columns", 12, (3, 3))


def test_directions_and_combine_mean_the_same_scan_on_flipped_copies():
    """A reversed direction is the scan of the flipped sequence, flipped back; combine='mean' is the
    average over directions; a shared z gates both. Checked on the reference against explicit flips."""
    args = make_scan_args(2, 9, 2, 6, 4, shared_z=True, directions=("forward", "reverse"), combine="mean")
    y = scan_reference(args)
    flipped = args.replace(
        u=torch.stack([args.u[:, :, 0], args.u[:, :, 1].flip(1)], 2),
        delta=torch.stack([args.delta[:, :, 0], args.delta[:, :, 1].flip(1)], 2),
        B=torch.stack([args.B[:, :, 0], args.B[:, :, 1].flip(1)], 2),
        C=torch.stack([args.C[:, :, 0], args.C[:, :, 1].flip(1)], 2),
        z=torch.cat([args.z, args.z.flip(1)], 2),
        directions=None,
        combine="none",
    )
    y_flat = scan_reference(flipped)
    torch.testing.assert_close(y, (y_flat[:, :, 0] + y_flat[:, :, 1].flip(1)) / 2)


@pytest.mark.parametrize(
    "kind",
    [
        dict(directions=("forward", "reverse"), shared_z=True, combine="mean"),
        dict(
            directions=("forward", "columns", "reverse", "columns_reverse"),
            grid=(3, 4),
            shared_u=True,
            combine="sum",
            optional=False,
        ),  # fmt: skip
    ],
)
def test_the_torch_backend_runs_any_directions_like_the_reference(kind):
    k = len(kind["directions"])
    args = make_scan_args(2, 12, k, 5, 3, **kind)
    leaves = scan_leaves(args)
    y = ops.selective_scan(args, "torch")
    y_ref = ops.selective_scan(args, "reference")
    grad = torch.randn_like(y_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(leaves.items(), torch.autograd.grad(y_ref, list(leaves.values()), grad), strict=True):
        torch.testing.assert_close(torch.autograd.grad(y, a, grad, retain_graph=True)[0], b, rtol=1e-5, atol=1e-5,
                                   msg=name)  # fmt: skip


@pytest.mark.parametrize(("groups", "optional"), [(None, True), (2, True), (None, False)])
def test_the_scan_custom_ops_pass_opcheck(groups, optional):
    """Schema, fake (meta) implementation, autograd registration, AOT dispatch: all four checks."""
    inputs = make_scan_inputs(2, 8, 11, 4, groups)
    if not optional:
        inputs.update(D=None, z=None, delta_bias=None)
    args = ScanArgs.from_channel_first(**inputs, delta_softplus=True)
    tensors = tuple(t.contiguous() if t is not None else None for t in args.tensors())  # opcheck: no views
    detached = tuple(t.detach() if t is not None else None for t in tensors)
    ops_ = torch.ops.shufflemamba
    for op, op_args in ((ops_.selective_scan_torch, tensors), (ops_.selective_scan_torch_inference, detached)):
        result = torch.library.opcheck(op.default, (4, False, *op_args, True))  # chunks of 4, eager
        assert set(result.values()) == {"SUCCESS"}, result
    out, ungated, states, _ = ops_.selective_scan_torch(4, False, *detached, True)
    bwd_args = (torch.randn_like(out), ungated, states, 4, False, *detached, True)
    assert set(torch.library.opcheck(ops_.selective_scan_torch_bwd.default, bwd_args).values()) == {"SUCCESS"}


def test_unsupported_scan_inputs_fail_at_the_entry_point_with_a_clear_message():
    inputs = make_scan_inputs(2, 8, 11, 4)
    complex_a = {**inputs, "A": torch.complex(inputs["A"].detach(), inputs["A"].detach())}
    with pytest.raises(ValueError, match="complex inputs are not supported"):
        ScanArgs.from_channel_first(**complex_a)
    constant_b = {**inputs, "B": torch.randn(8, 4)}
    with pytest.raises(ValueError, match=r"B must be input-dependent.*got \(8, 4\) \(a constant \(dim, N\) B"):
        ScanArgs.from_channel_first(**constant_b)
    with pytest.raises(ValueError, match="dim 8 is not divisible by the 3 groups of C"):
        ScanArgs.from_channel_first(**{**inputs, "C": torch.randn(2, 3, 4, 11)})
    args = make_scan_args(2, 5, 2, 4, 3)
    with pytest.raises(ValueError, match=r"D must be \(2, 4\) \(delta is \(2, 5, 2, 4\)\), got \(4,\)"):
        ops.selective_scan(args.replace(D=torch.randn(4)), "torch")
    with pytest.raises(ValueError, match="1 directions given for K = 2"):
        ops.selective_scan(args.replace(directions=("reverse",)), "torch")
    with pytest.raises(ValueError, match="combine must be one of none, sum, mean, got 'max'"):
        ops.selective_scan(args.replace(combine="max"), "torch")


def test_the_inductor_compiled_chunks_match_the_reference(monkeypatch):
    """fused='1' forces the compiled chunk path (auto uses it for large scans only)."""
    monkeypatch.setattr(scan_fused, "MAX_PIECE_STEPS", 2)  # each chunk in compiled pieces of 2 + 1 steps
    assert scan_fused.pieces(0, 3) == [(0, 2), (2, 3)] and scan_fused.pieces(9, 11) == [(9, 11)]
    inputs = make_scan_inputs(2, 16, 11, 4, groups=2)
    settings = ScanSettings.resolve("torch", fused="1", chunk_elements=2 * 16 * 4 * 3)  # chunks of 3 steps
    y = ScanArgs.to_channel_first(ops.selective_scan(ScanArgs.from_channel_first(**inputs, delta_softplus=True),
                                                     settings))  # fmt: skip
    grads = torch.autograd.grad(y, list(inputs.values()), torch.ones_like(y))
    detached = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    y_ref = selective_scan_reference(**detached, delta_softplus=True)
    grads_ref = torch.autograd.grad(y_ref, list(detached.values()), torch.ones_like(y_ref))
    assert not scan_fused._state["broken"]
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_layout_is_a_speed_choice_results_are_contiguous_in_their_logical_shape():
    """Token-major or channel-first storage of the same logical tensors gives bitwise the same conv
    and scan results and gradients, and every result is contiguous in its logical shape."""
    x, weight, bias = torch.randn(2, 9, 12), torch.randn(1, 12, 4), torch.randn(1, 12)
    channel_first = x.transpose(1, 2).contiguous().transpose(1, 2)
    conv_tm = ops.causal_conv1d(x, weight, bias, "silu", settings="torch")
    conv_cf = ops.causal_conv1d(channel_first, weight, bias, "silu", settings="torch")
    torch.testing.assert_close(conv_tm, conv_cf, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(conv_tm[:, :, 0], conv1d_reference(x, weight, bias, "silu")[:, :, 0])

    args = make_scan_args(2, 9, 2, 6, 4)
    moved = args.replace(**{
        name: t.detach().permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2).requires_grad_()
        for name, t in (("u", args.u), ("delta", args.delta), ("z", args.z))
    })  # fmt: skip
    grad_out = torch.randn(2, 9, 2, 6)
    results = []
    for a in (args, moved):
        y = ops.selective_scan(a, "torch")
        assert y.is_contiguous()
        grads = torch.autograd.grad(y, list(scan_leaves(a).values()), grad_out)
        assert all(g.is_contiguous() for g in grads)
        results.append((y, grads))
    (y, grads), (y_cf, grads_cf) = results
    torch.testing.assert_close(y_cf, y, rtol=0, atol=0)
    for a, b in zip(grads_cf, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(y, scan_reference(args), rtol=1e-5, atol=1e-5)
