"""The pure-PyTorch scan (:mod:`.scan_torch`) as ``torch.library`` custom ops, so autograd and
``torch.compile`` see each scan as one opaque op with a known output (a model compiles whole,
``fullgraph=True``, without tracing the recurrence's Python loop):

- ``shufflemamba::selective_scan_torch`` / ``..._bwd``: the training pair; the forward also
  returns what its backward needs (the ungated output and the chunk-start states) and the last
  state, whose gradient is not propagated (as in mamba-ssm);
- ``shufflemamba::selective_scan_torch_inference``: the same forward keeping nothing.

Tensors are in :class:`~shufflemamba.ops.args.ScanArgs`'s logical shapes, all directions
forward; every result is contiguous in its shape. The chunk length and the fused-chunk choice are
arguments, decided by the caller from :class:`~shufflemamba.ops.settings.ScanSettings`, so the
fakes know every shape.

:func:`selective_scan_torch` is the drop-in for mamba-ssm's ``selective_scan_fn`` (channel-first
signature and results, ``return_last_state`` included).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import scan_fused, scan_torch
from .args import GRADIENTS_SCHEMA, SCAN_SCHEMA, ScanArgs
from .settings import ScanSettings

__all__ = ["scan_torch_op", "selective_scan_torch"]

_FWD, _BWD, _INFERENCE = (f"shufflemamba::selective_scan_torch{s}" for s in ("", "_bwd", "_inference"))
torch.library.define(_FWD, f"(int chunk, bool fused, {SCAN_SCHEMA}) -> (Tensor, Tensor, Tensor, Tensor)")
torch.library.define(
    _BWD, f"(Tensor g_out, Tensor ungated, Tensor states, int chunk, bool fused, {SCAN_SCHEMA}) -> {GRADIENTS_SCHEMA}"
)
torch.library.define(_INFERENCE, f"(int chunk, bool fused, {SCAN_SCHEMA}) -> (Tensor, Tensor)")


def _empty(like: Tensor) -> Tensor:
    """A placeholder output for an absent input (ops return tensors, never None)."""
    return like.new_empty((0,))


@torch.library.impl(_FWD, "default")
def _scan(chunk: int, fused: bool, *scan) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(output, ungated output (with z), chunk-start states, last state)."""
    out, ungated, states, last = scan_torch.scan_forward(ScanArgs(*scan), chunk, fused, for_backward=True)
    return out, (ungated if ungated is not None else _empty(out)), states, last


@torch.library.impl(_INFERENCE, "default")
def _scan_inference(chunk: int, fused: bool, *scan) -> tuple[Tensor, Tensor]:
    """(output, last state)."""
    out, _, _, last = scan_torch.scan_forward(ScanArgs(*scan), chunk, fused, for_backward=False)
    return out, last


@torch.library.impl(_BWD, "default")
def _scan_bwd(g_out: Tensor, ungated: Tensor, states: Tensor, chunk: int, fused: bool, *scan) -> tuple[Tensor, ...]:
    args = ScanArgs(*scan)
    grads = scan_torch.scan_backward(g_out, args, ungated if args.z is not None else None, states, chunk, fused)
    return tuple(g if g is not None else _empty(args.u) for g in grads)


def _fake_forward(args: ScanArgs, chunk: int, for_backward: bool) -> tuple[Tensor, ...]:
    u = args.u
    batch, length, k, channels = args.delta.shape
    d_state, cd = args.d_state, scan_torch.compute_dtype(u)
    out = u.new_empty((batch, length, k, channels))
    last = u.new_empty((batch, k, channels, d_state), dtype=cd)
    if not for_backward:
        return out, last
    ungated = u.new_empty((length, batch, k, channels), dtype=cd) if args.z is not None else _empty(u)
    states = u.new_empty((scan_torch.num_chunks(length, chunk), batch, k, d_state, channels), dtype=cd)
    return out, ungated, states, last


@torch.library.register_fake(_FWD)
def _(chunk, fused, *scan):
    return _fake_forward(ScanArgs(*scan), chunk, True)


@torch.library.register_fake(_INFERENCE)
def _(chunk, fused, *scan):
    return _fake_forward(ScanArgs(*scan), chunk, False)


@torch.library.register_fake(_BWD)
def _(g_out, ungated, states, chunk, fused, *scan):
    u = scan[0]
    return tuple(t.new_empty(t.shape) if t is not None else _empty(u) for t in ScanArgs(*scan).tensors())


def _setup_context(ctx, inputs, output) -> None:
    chunk, fused, *scan = inputs
    args = ScanArgs(*scan)
    _, ungated, states, _ = output
    ctx.options = (chunk, fused, args.delta_softplus)
    ctx.save_for_backward(*args.tensors(), ungated, states)


def _backward(ctx, g_out, _g_ungated, _g_states, _g_last):
    *tensors, ungated, states = ctx.saved_tensors
    chunk, fused, softplus = ctx.options
    args = ScanArgs(*tensors, softplus)
    grads = torch.ops.shufflemamba.selective_scan_torch_bwd(
        g_out.contiguous(), ungated, states, chunk, fused, *args.flat()
    )
    return None, None, *args.grads_for(grads)


torch.library.register_autograd(_FWD, _backward, setup_context=_setup_context)


def _plan(args: ScanArgs, settings: ScanSettings) -> tuple[int, bool]:
    """(chunk length, fused chunks) for this call."""
    batch, length, k, channels = args.delta.shape
    dim, n = k * channels, args.d_state
    chunk = scan_torch.chunk_len(batch, dim, n, length, settings.chunk_elements)
    return chunk, scan_fused.enabled(settings.fused, batch, dim, n, length, args.u.device)


def scan_torch_op(args: ScanArgs, settings: ScanSettings, return_last_state: bool = False):
    """The torch path on all-forward ``args``: (batch, L, K, E); with ``return_last_state`` also the
    last state (batch, K, E, N), without gradient. The training op when a gradient is needed."""
    chunk, fused = _plan(args, settings)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args.tensors()):
        out, _, _, last = torch.ops.shufflemamba.selective_scan_torch(chunk, fused, *args.flat())
        last = last.detach()
    else:
        out, last = torch.ops.shufflemamba.selective_scan_torch_inference(chunk, fused, *args.flat())
    return (out, last) if return_last_state else out


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
    """The torch path with mamba-ssm's ``selective_scan_fn`` signature and results: out (b, dim, L),
    and with ``return_last_state`` the final state (b, dim, N) (no gradient through it; out keeps
    its gradient). Settings from the environment (:meth:`ScanSettings.resolve`)."""
    args = ScanArgs.from_channel_first(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    out, last = scan_torch_op(args, ScanSettings.resolve("torch"), return_last_state=True)
    out = ScanArgs.to_channel_first(out)
    return (out, last.reshape(u.shape[0], u.shape[1], -1)) if return_last_state else out
