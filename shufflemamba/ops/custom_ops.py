"""The scans as ``torch.library`` custom ops (namespace ``shufflemamba``), so that autograd and
``torch.compile`` see each scan as one opaque op with a known output shape: the model compiles
whole (``fullgraph=True``) without tracing the recurrence's Python loop or breaking the graph
at mamba-ssm's extension call.

- ``shufflemamba::selective_scan_torch`` / ``..._torch_bwd``: the pure-PyTorch scan
  (:mod:`.scan_torch`); the forward also returns what its backward needs (the ungated output
  and the chunk-start states), so nothing is recomputed twice. Its (b, d, L) results and
  gradients are stored token-major, (b, L, d), the layout of the mixer around it on CPU.
- ``shufflemamba::selective_scan_torch_inference``: the same forward keeping nothing (no grad).
- ``shufflemamba::selective_scan_cuda`` / ``..._cuda_bwd``: mamba-ssm's ``selective_scan_cuda``
  kernels, called exactly as its ``SelectiveScanFn`` calls them.

VMamba's four directions and Vim's fused two directions are one call of the same ops (grouped
B/C). Inputs the kernels do not support fail here, at the op boundary, with one clear message.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import scan_torch
from .cuda import require_cuda_kernels

__all__ = ["check_scan_inputs", "selective_scan_cuda_op", "selective_scan_torch", "selective_scan_torch_op"]

_CUDA_CHUNK = 2048  # mamba-ssm's kernel saves one state per 2048 steps


def check_scan_inputs(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D, z, delta_bias) -> None:
    """Shapes and dtypes the scans support, or a ValueError that names the input and the fix."""
    if u.dim() != 3:
        raise ValueError(f"selective scan: u must be (batch, dim, length), got {tuple(u.shape)}")
    batch, dim, length = u.shape
    if A.is_complex() or any(t is not None and t.is_complex() for t in (u, delta, B, C, D, z, delta_bias)):
        raise ValueError("selective scan: complex inputs are not supported (only real A / B / C), got a complex tensor")
    if tuple(delta.shape) != (batch, dim, length):
        raise ValueError(f"selective scan: delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective scan: A must be (dim, d_state) = ({dim}, N), got {tuple(A.shape)}")
    d_state = A.shape[1]
    for name, mat in (("B", B), ("C", C)):
        if mat.dim() not in (3, 4) or mat.shape[0] != batch or mat.shape[-2:] != (d_state, length):
            raise ValueError(
                f"selective scan: {name} must be input-dependent, (batch, N, length) = ({batch}, {d_state}, "
                f"{length}) or grouped (batch, G, N, length); got {tuple(mat.shape)} (a constant (dim, N) "
                f"{name} is not supported)"
            )
        if mat.dim() == 4 and dim % mat.shape[1]:
            raise ValueError(f"selective scan: dim {dim} is not divisible by the {mat.shape[1]} groups of {name}")
    for name, vec in (("D", D), ("delta_bias", delta_bias)):
        if vec is not None and tuple(vec.shape) != (dim,):
            raise ValueError(f"selective scan: {name} must be ({dim},), got {tuple(vec.shape)}")
    if z is not None and tuple(z.shape) != (batch, dim, length):
        raise ValueError(f"selective scan: z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")


def _groups(B: Tensor) -> int:
    return B.shape[1] if B.dim() == 4 else 1


def _empty(like: Tensor) -> Tensor:
    """A placeholder output for an absent input (custom ops return tensors, never None)."""
    return like.new_empty((0,))


def _grads_like(u: Tensor, *inputs: Tensor | None) -> tuple[Tensor, ...]:
    """Fake gradients: one contiguous tensor per input (u included), empty for absent ones."""
    return tuple(
        torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else u.new_empty((0,))
        for t in (u, *inputs)
    )


# ---- the torch path ---------------------------------------------------------------------------
@torch.library.custom_op("shufflemamba::selective_scan_torch", mutates_args=())
def _scan_torch(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    out, ungated, states, _ = scan_torch.scan_forward(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, for_backward=True
    )
    return out, (ungated if ungated is not None else _empty(out)), states


@_scan_torch.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    batch, dim, length = u.shape
    d_state, groups, cd = A.shape[1], _groups(B), scan_torch.compute_dtype(u)
    chunks = scan_torch.num_chunks(batch, dim, d_state, length)
    ungated = u.new_empty((length, batch, dim), dtype=cd) if z is not None else u.new_empty((0,))
    states = u.new_empty((chunks, batch, groups, d_state, dim // groups), dtype=cd)
    return scan_torch.token_major_empty(u, u.shape), ungated, states


@torch.library.custom_op("shufflemamba::selective_scan_torch_bwd", mutates_args=())
def _scan_torch_bwd(
    g_out: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    ungated: Tensor,
    states: Tensor,
    delta_softplus: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = scan_torch.scan_backward(
        g_out, u, delta, A, B, C, D, z, delta_bias, ungated if z is not None else None, states, delta_softplus
    )
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias = grads
    return (
        du,
        ddelta,
        dA,
        dB,
        dC,
        dD if dD is not None else _empty(u),
        dz if dz is not None else _empty(u),
        ddelta_bias if ddelta_bias is not None else _empty(u),
    )


@_scan_torch_bwd.register_fake
def _(g_out, u, delta, A, B, C, D, z, delta_bias, ungated, states, delta_softplus):
    def vector(t: Tensor | None) -> Tensor:
        return torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else u.new_empty((0,))

    return (
        scan_torch.token_major_empty(u, u.shape),
        scan_torch.token_major_empty(delta, delta.shape),
        vector(A),
        scan_torch.bc_grad_empty(B, B.shape),
        scan_torch.bc_grad_empty(C, C.shape),
        vector(D),
        scan_torch.token_major_empty(z, z.shape) if z is not None else u.new_empty((0,)),
        vector(delta_bias),
    )


@torch.library.custom_op("shufflemamba::selective_scan_torch_inference", mutates_args=())
def _scan_torch_inference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
) -> Tensor:
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    return scan_torch.scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, for_backward=False)[0]


@_scan_torch_inference.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    return scan_torch.token_major_empty(u, u.shape)


# ---- the mamba-ssm CUDA path ----------------------------------------------------------------
def _with_group_axis(mat: Tensor) -> Tensor:
    """The kernel takes input-dependent B / C as (batch, G, N, length); G = 1 for (batch, N, length)."""
    return (mat.unsqueeze(1) if mat.dim() == 3 else mat).contiguous()


def _cuda_module():
    require_cuda_kernels()
    import selective_scan_cuda  # the extension mamba-ssm built; importable once require_cuda_kernels passed

    return selective_scan_cuda


@torch.library.custom_op("shufflemamba::selective_scan_cuda", mutates_args=())
def _scan_cuda(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(output, the kernel's saved states x, the ungated output when z is given)."""
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    z_c = z.contiguous() if z is not None else None
    d_c = D.contiguous() if D is not None else None
    out, x, *rest = _cuda_module().fwd(
        u.contiguous(), delta.contiguous(), A, _with_group_axis(B), _with_group_axis(C), d_c, z_c, delta_bias,
        delta_softplus,
    )  # fmt: skip
    if z is None:
        return out, x, _empty(out)
    return rest[0], x, out  # with z the kernel returns the ungated out first and the gated out_z


@_scan_cuda.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    batch, dim, length = u.shape
    chunks = -(-length // _CUDA_CHUNK)
    x = u.new_empty((batch, dim, chunks, 2 * A.shape[1]), dtype=A.dtype)
    return u.new_empty(u.shape), x, (u.new_empty(u.shape) if z is not None else u.new_empty((0,)))


@torch.library.custom_op("shufflemamba::selective_scan_cuda_bwd", mutates_args=())
def _scan_cuda_bwd(
    g_out: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    x: Tensor,
    ungated: Tensor,
    delta_softplus: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    z_c = z.contiguous() if z is not None else None
    d_c = D.contiguous() if D is not None else None
    du, ddelta, dA, dB, dC, dD, ddelta_bias, *rest = _cuda_module().bwd(
        u.contiguous(), delta.contiguous(), A, _with_group_axis(B), _with_group_axis(C), d_c, z_c, delta_bias,
        g_out.contiguous(), x, ungated if z is not None else None, None, delta_softplus, False,
    )  # fmt: skip
    dB = dB if B.dim() == 4 else dB.squeeze(1)
    dC = dC if C.dim() == 4 else dC.squeeze(1)
    return (
        du,
        ddelta,
        dA,
        dB.to(B.dtype).contiguous(),
        dC.to(C.dtype).contiguous(),
        dD if D is not None else _empty(u),
        rest[0] if z is not None else _empty(u),
        ddelta_bias if delta_bias is not None else _empty(u),
    )


@_scan_cuda_bwd.register_fake
def _(g_out, u, delta, A, B, C, D, z, delta_bias, x, ungated, delta_softplus):
    return _grads_like(u, delta, A, B, C, D, z, delta_bias)


# ---- autograd ---------------------------------------------------------------------------------
_INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _setup_context(ctx, inputs, output) -> None:
    """Both ops return (out, and two tensors their backward needs): save the inputs and those two."""
    u, delta, A, B, C, D, z, delta_bias, delta_softplus = inputs
    _, saved, extra = output
    ctx.delta_softplus = delta_softplus
    ctx.present = [t is not None for t in (D, z, delta_bias)]
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, saved, extra)


def _grads(ctx, grads: tuple[Tensor, ...]) -> tuple[Tensor | None, ...]:
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias = grads
    has_d, has_z, has_bias = ctx.present
    return du, ddelta, dA, dB, dC, dD if has_d else None, dz if has_z else None, ddelta_bias if has_bias else None, None


def _backward_torch(ctx, g_out, _g_ungated, _g_states):
    u, delta, A, B, C, D, z, delta_bias, ungated, states = ctx.saved_tensors
    grads = _scan_torch_bwd(g_out, u, delta, A, B, C, D, z, delta_bias, ungated, states, ctx.delta_softplus)
    return _grads(ctx, grads)


def _backward_cuda(ctx, g_out, _g_x, _g_ungated):
    u, delta, A, B, C, D, z, delta_bias, x, ungated = ctx.saved_tensors
    grads = _scan_cuda_bwd(g_out, u, delta, A, B, C, D, z, delta_bias, x, ungated, ctx.delta_softplus)
    return _grads(ctx, grads)


_scan_torch.register_autograd(_backward_torch, setup_context=_setup_context)
_scan_cuda.register_autograd(_backward_cuda, setup_context=_setup_context)


# ---- entry points -------------------------------------------------------------------------------
def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def selective_scan_torch_op(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False) -> Tensor:
    """The torch path: the training op when a gradient is needed, else the inference op."""
    args = (u, delta, A, B, C, D, z, delta_bias)
    if _needs_grad(*args):
        return _scan_torch(*args, delta_softplus)[0]
    return _scan_torch_inference(*args, delta_softplus)


def selective_scan_cuda_op(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False) -> Tensor:
    """mamba-ssm's kernels (inputs already cast: u / delta / B / C / z one dtype; A, D, bias fp32)."""
    return _scan_cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus)[0]


def selective_scan_torch(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The torch path with mamba-ssm's ``selective_scan_fn`` signature and results;
    ``return_last_state`` (no gradient through it) also returns the final state (b, d, N)."""
    if return_last_state:
        check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
        with torch.no_grad():
            out, _, _, last = scan_torch.scan_forward(
                u, delta, A, B, C, D, z, delta_bias, delta_softplus, for_backward=False
            )
        return out, last
    return selective_scan_torch_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
