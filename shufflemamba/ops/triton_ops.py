"""The Triton kernels (:mod:`.triton_kernels`) as ``torch.library`` custom ops with fakes and
autograd formulas, so ``torch.compile(model, fullgraph=True)`` sees each as one opaque op:

- ``shufflemamba::selective_scan_triton`` / ``..._bwd``: the multi-direction scan of a
  :class:`~shufflemamba.ops.args.ScanArgs` (directions as token orders, the combined output
  written in place);
- ``shufflemamba::conv1d_triton`` / ``..._bwd``: the depthwise conv + SiLU, one causal or
  anti-causal conv per direction from one shared input.

Outputs and gradients are contiguous in their logical shapes (no stride contract with the
fakes). The kernels run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .args import DIRECTIONS, GRADIENTS_SCHEMA, SCAN_SCHEMA, ScanArgs
from .settings import TritonConfig

__all__ = ["TritonUnavailable", "conv1d_triton", "require_triton", "selective_scan_triton", "triton_available"]


class TritonUnavailable(RuntimeError):
    """The triton scan backend was asked for but cannot run here."""


_KERNELS: list = []  # the kernel module, imported once (a plain memo torch.compile can read)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels():
    if not _KERNELS:
        try:
            from . import triton_kernels
        except ImportError as exc:  # no triton wheel for this platform
            raise TritonUnavailable(
                f"scan backend 'triton' needs the triton package ({exc}); it ships with torch on Linux"
            ) from exc
        _KERNELS.append(triton_kernels)
    return _KERNELS[0]


def triton_available(device: torch.device | str = "cuda") -> bool:
    try:
        require_triton(torch.device(device))
    except TritonUnavailable:
        return False
    return True


def require_triton(device: torch.device) -> None:
    """Raise a one-line TritonUnavailable unless the kernels can run on ``device``."""
    if device.type == "cpu" and not _interpreting():
        raise TritonUnavailable(
            "scan backend 'triton' got CPU tensors: move the model to a CUDA GPU, use backend 'torch', or set "
            "TRITON_INTERPRET=1 (before starting Python) to run the kernels on the CPU, slowly, as the tests do"
        )
    if device.type not in ("cpu", "cuda"):
        raise TritonUnavailable(f"scan backend 'triton' runs on CUDA tensors, got {device.type} tensors")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TritonUnavailable("scan backend 'triton' needs a CUDA GPU, but torch sees none")
    _kernels()


def _codes(directions: tuple[str, ...]) -> int:
    """Directions packed two bits each (bit 0: reversed, bit 1: column-major), as the kernels read them."""
    code = 0
    for k, name in enumerate(directions):
        code |= DIRECTIONS.index(name) << (2 * k)
    return code


def _unit_inner(t: Tensor | None) -> Tensor | None:
    """The kernels read channels (and states) at stride 1: any other innermost stride is copied once."""
    if t is None or t.stride(-1) == 1 or t.shape[-1] == 1:
        return t
    return t.contiguous()


def _strides3(t: Tensor | None) -> tuple[int, int, int]:
    """(batch, token, direction) strides of a (batch, L, K, .) tensor; a size-1 (shared) direction axis reads 0."""
    if t is None:
        return (0, 0, 0)
    sb, sl, sk, _ = t.stride()
    return sb, sl, (0 if t.shape[2] == 1 else sk)


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _num_saved(length: int, chunk: int) -> int:
    return -(-length // chunk) - 1


def _together(args: ScanArgs) -> bool:
    """Whether one program runs every direction of its channels: needed to combine the outputs, or
    to sum a shared u's / z's gradient over the directions, in place."""
    return args.combine != "none" or args.shares_u or args.shares_z


def _parameters(args: ScanArgs) -> tuple[Tensor, Tensor, Tensor]:
    """A as (K, N, E) (channels contiguous, as the kernels' tiles), D and the bias contiguous; A stands
    in for an absent D / bias (the kernel never reads it then)."""
    A_t = args.A.transpose(1, 2).contiguous()
    D = args.D.contiguous() if args.D is not None else A_t
    return A_t, D, args.delta_bias.contiguous() if args.delta_bias is not None else A_t


def _as4(t: Tensor) -> Tensor:
    """A combined (batch, L, E) tensor as (batch, L, 1, E)."""
    return t.unsqueeze(2) if t.dim() == 3 else t


# ---- the scan -----------------------------------------------------------------------------------
# Options of both ops: directions (2 bits each, see _codes), the (H, W) map of the column orders,
# combine (none | sum | mean) and the TritonConfig as a list.
_OPTIONS = "int directions, int height, int width, str combine, int[] config"
_FWD, _BWD = "shufflemamba::selective_scan_triton", "shufflemamba::selective_scan_triton_bwd"
torch.library.define(_FWD, f"({_OPTIONS}, bool save_states, {SCAN_SCHEMA}) -> (Tensor, Tensor)")
torch.library.define(_BWD, f"(Tensor g_out, Tensor states, {_OPTIONS}, {SCAN_SCHEMA}) -> {GRADIENTS_SCHEMA}")


@torch.library.impl(_FWD, "default")
def _scan(
    directions: int, height: int, width: int, combine: str, config: list[int], save_states: bool, *scan
) -> tuple[Tensor, Tensor]:
    """(output in u's dtype, the states kept for the backward: (batch, K, chunks - 1, N, E) fp32)."""
    kern = _kernels()
    cfg = TritonConfig.from_list(config)
    args = ScanArgs(*scan, combine=combine)
    batch, length, k, channels = args.delta.shape
    d_state = args.d_state
    together, accumulate = _together(args), combine != "none" and k > 1
    out = args.u.new_empty(args.output_shape())
    n_saved = _num_saved(length, cfg.chunk)
    keep = save_states and n_saved > 0
    f32 = torch.float32
    states = args.u.new_empty((batch, k, n_saved, d_state, channels), dtype=f32) if save_states else _empty(out)
    block_d = cfg.channel_block(channels, batch * (1 if together else k), args.u.device)
    out4 = _as4(out)
    u, delta, B, C, z = (_unit_inner(t) for t in (args.u, args.delta, args.B, args.C, args.z))
    A_t, D, bias = _parameters(args)
    grid = (triton_cdiv(channels, block_d), batch, 1 if together else k)
    kern.scan_fwd_kernel[grid](
        u, delta, A_t, B, C, D, z if z is not None else u, bias, out4, states if keep else out,
        length, channels, d_state, k, height, width, directions, (1.0 / k) if combine == "mean" else 1.0,
        *_strides3(u), *_strides3(delta), *_strides3(B), *_strides3(C), *_strides3(z), *_strides3(out4),
        max(n_saved, 0),
        HAS_D=args.D is not None, HAS_Z=z is not None, HAS_BIAS=args.delta_bias is not None,
        SOFTPLUS=args.delta_softplus, ALL_DIRECTIONS=together, ACCUMULATE=accumulate, SAVE_STATES=keep,
        CHUNK=cfg.chunk, BLOCK_D=block_d, BLOCK_N=_pow2(d_state), NUM_STAGES=cfg.num_stages, **cfg.launch_options(),
    )  # fmt: skip
    return out, states


@torch.library.register_fake(_FWD)
def _(directions, height, width, combine, config, save_states, *scan):
    args = ScanArgs(*scan, combine=combine)
    batch, length, k, channels = args.delta.shape
    out = args.u.new_empty(args.output_shape())
    if not save_states:
        return out, _empty(out)
    n_saved = _num_saved(length, TritonConfig.from_list(config).chunk)
    return out, args.u.new_empty((batch, k, n_saved, args.d_state, channels), dtype=torch.float32)


@torch.library.impl(_BWD, "default")
def _scan_bwd(
    g_out: Tensor, states: Tensor, directions: int, height: int, width: int, combine: str, config: list[int], *scan
) -> tuple[Tensor, ...]:
    kern = _kernels()
    cfg = TritonConfig.from_list(config)
    args = ScanArgs(*scan, combine=combine)
    batch, length, k, channels = args.delta.shape
    d_state = args.d_state
    together = _together(args)
    k_programs = 1 if together else k
    block_d = cfg.channel_block(channels, batch * k_programs, args.u.device)
    block_n = _pow2(d_state)
    n_dblocks = triton_cdiv(channels, block_d)
    n_tiles = n_dblocks * batch * k_programs
    if args.u.device.type == "cuda":
        sms = torch.cuda.get_device_properties(args.u.device).multi_processor_count
        programs = min(n_tiles, sms * cfg.programs_per_sm)
    else:
        programs = min(n_tiles, 4)
    n_saved = _num_saved(length, cfg.chunk)
    f32 = torch.float32
    new = args.u.new_empty
    scratch = new((programs, cfg.chunk, block_n, block_d), dtype=f32)
    du = new(args.u.shape)
    ddelta = args.delta.new_empty(args.delta.shape)
    dA = new((batch, k, d_state, channels), dtype=f32)
    dB = new((n_dblocks, batch, length, k, d_state), dtype=f32)
    dC = new((n_dblocks, batch, length, k, d_state), dtype=f32)
    dD = new((batch, k, channels), dtype=f32) if args.D is not None else None
    dbias = new((batch, k, channels), dtype=f32) if args.delta_bias is not None else None
    dz = args.z.new_empty(args.z.shape) if args.z is not None else None
    u, delta, B, C, z, g4 = (_unit_inner(t) for t in (args.u, args.delta, args.B, args.C, args.z, _as4(g_out)))
    A_t, D, bias = _parameters(args)
    kern.scan_bwd_kernel[(programs,)](
        u, delta, A_t, B, C, D, z if z is not None else u, bias, g4, states if n_saved > 0 else scratch, scratch,
        du, ddelta, dA, dB, dC, dD if dD is not None else dA, dz if dz is not None else du,
        dbias if dbias is not None else dA,
        length, channels, d_state, k, height, width, directions, (1.0 / k) if combine == "mean" else 1.0,
        *_strides3(u), *_strides3(delta), *_strides3(B), *_strides3(C), *_strides3(z), *_strides3(g4),
        *_strides3(du), *_strides3(dz),
        max(n_saved, 0), n_tiles, n_dblocks, k_programs, batch,
        HAS_D=args.D is not None, HAS_Z=z is not None, HAS_BIAS=args.delta_bias is not None,
        SOFTPLUS=args.delta_softplus, ALL_DIRECTIONS=together, ACC_DU=args.shares_u, ACC_DZ=args.shares_z,
        CHUNK=cfg.chunk, BLOCK_D=block_d, BLOCK_N=block_n, NUM_STAGES=cfg.num_stages, **cfg.launch_options(),
    )  # fmt: skip
    return (
        du,
        ddelta,
        dA.sum(0).transpose(1, 2).to(args.A.dtype).contiguous(),
        (dB[0] if n_dblocks == 1 else dB.sum(0)).to(args.B.dtype),
        (dC[0] if n_dblocks == 1 else dC.sum(0)).to(args.C.dtype),
        dD.sum(0).to(args.D.dtype) if dD is not None else _empty(u),
        dz if dz is not None else _empty(u),
        dbias.sum(0).to(args.delta_bias.dtype) if dbias is not None else _empty(u),
    )


@torch.library.register_fake(_BWD)
def _(g_out, states, directions, height, width, combine, config, *scan):
    u = scan[0]
    return tuple(t.new_empty(t.shape) if t is not None else _empty(u) for t in ScanArgs(*scan).tensors())


def _scan_setup(ctx, inputs, output) -> None:
    *options, _save_states = inputs[:6]
    args = ScanArgs(*inputs[6:])
    ctx.options = (*options, args.delta_softplus)
    ctx.save_for_backward(*args.tensors(), output[1])


def _scan_backward(ctx, g_out, _g_states):
    *tensors, states = ctx.saved_tensors
    *options, softplus = ctx.options
    args = ScanArgs(*tensors, softplus)
    grads = torch.ops.shufflemamba.selective_scan_triton_bwd(g_out.contiguous(), states, *options, *args.flat())
    return None, None, None, None, None, None, *args.grads_for(grads)


torch.library.register_autograd(_FWD, _scan_backward, setup_context=_scan_setup)


def selective_scan_triton(args: ScanArgs, config: TritonConfig | None = None) -> Tensor:
    """The scan of ``args`` on the Triton kernels (inputs already checked by the entry point)."""
    config = config or TritonConfig()
    if args.u.dtype == torch.float64:
        raise ValueError("scan backend 'triton' computes in float32; use backend 'torch' for float64 inputs")
    height, width = args.grid if args.grid is not None else (args.length, 1)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args.tensors())
    codes = _codes(args.direction_names)
    out, _ = torch.ops.shufflemamba.selective_scan_triton(
        codes, height, width, args.combine, config.as_list(), needs_grad, *args.flat()
    )
    return out


# ---- the conv -------------------------------------------------------------------------------------
@torch.library.custom_op("shufflemamba::conv1d_triton", mutates_args=())
def _conv(x: Tensor, weight: Tensor, bias: Tensor | None, directions: int, silu: bool, config: list[int]) -> Tensor:
    """x (batch, L, E) -> (batch, L, K, E) for weight (K, E, W): direction k's conv, causal or anti-causal."""
    kern = _kernels()
    cfg = TritonConfig.from_list(config)
    batch, length, channels = x.shape
    k, _, width = weight.shape
    out = x.new_empty((batch, length, k, channels))
    w_c = weight.contiguous()
    grid = (triton_cdiv(length, cfg.conv_block_l), triton_cdiv(channels, cfg.conv_block_e), batch)
    kern.conv_fwd_kernel[grid](
        x, w_c, bias.contiguous() if bias is not None else w_c, out, length, channels, k, directions, *x.stride(),
        HAS_BIAS=bias is not None, SILU=silu, WIDTH=width, BLOCK_L=cfg.conv_block_l, BLOCK_E=cfg.conv_block_e,
        num_warps=cfg.conv_warps,
    )  # fmt: skip
    return out


@_conv.register_fake
def _(x, weight, bias, directions, silu, config):
    return x.new_empty((x.shape[0], x.shape[1], weight.shape[0], x.shape[2]))


@torch.library.custom_op("shufflemamba::conv1d_triton_bwd", mutates_args=())
def _conv_bwd(
    g: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, directions: int, silu: bool, config: list[int]
) -> tuple[Tensor, Tensor, Tensor]:
    kern = _kernels()
    cfg = TritonConfig.from_list(config)
    batch, length, channels = x.shape
    k, _, width = weight.shape
    n_lblocks = triton_cdiv(length, cfg.conv_block_l)
    grid = (n_lblocks, triton_cdiv(channels, cfg.conv_block_e), batch)
    f32 = torch.float32
    w_c = weight.contiguous()
    gpre = x.new_empty((batch, length, k, channels), dtype=f32)
    dw = x.new_empty((batch * n_lblocks, k, channels, width), dtype=f32)
    dbias = x.new_empty((batch * n_lblocks, k, channels), dtype=f32) if bias is not None else None
    kern.conv_bwd_pre_kernel[grid](
        x, w_c, bias.contiguous() if bias is not None else w_c, g, gpre, dw, dbias if dbias is not None else dw,
        length, channels, k, directions, n_lblocks, *x.stride(), *g.stride(),
        HAS_BIAS=bias is not None, SILU=silu, WIDTH=width, BLOCK_L=cfg.conv_block_l, BLOCK_E=cfg.conv_block_e,
        num_warps=cfg.conv_warps,
    )  # fmt: skip
    dx = x.new_empty((batch, length, channels))
    kern.conv_bwd_x_kernel[grid](
        gpre, w_c, dx, length, channels, k, directions,
        WIDTH=width, BLOCK_L=cfg.conv_block_l, BLOCK_E=cfg.conv_block_e, num_warps=cfg.conv_warps,
    )  # fmt: skip
    return (
        dx,
        dw.sum(0).to(weight.dtype),
        dbias.sum(0).to(bias.dtype) if dbias is not None else _empty(x),
    )


@_conv_bwd.register_fake
def _(g, x, weight, bias, directions, silu, config):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), (bias.new_empty(bias.shape) if bias is not None
                                                                  else x.new_empty((0,)))  # fmt: skip


def _conv_setup(ctx, inputs, output) -> None:
    x, weight, bias, directions, silu, config = inputs
    ctx.options = (directions, silu, config)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, bias)


def _conv_backward(ctx, g):
    x, weight, bias = ctx.saved_tensors
    dx, dw, dbias = _conv_bwd(g, x, weight, bias, *ctx.options)
    return dx, dw, (dbias if ctx.has_bias else None), None, None, None


_conv.register_autograd(_conv_backward, setup_context=_conv_setup)


def conv1d_triton(
    x: Tensor, weight: Tensor, bias: Tensor | None, directions: tuple[str, ...], silu: bool, config: TritonConfig
) -> Tensor:
    """x (batch, L, E) -> (batch, L, K, E): per direction (``forward`` / ``reverse``) a depthwise
    conv with weight[k] (E, W), causal or anti-causal, + bias, then SiLU if asked."""
    return _conv(x, weight, bias, _codes(directions), silu, config.as_list())


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
