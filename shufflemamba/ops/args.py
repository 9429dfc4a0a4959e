"""The one argument bundle of a selective scan, with its layout written in the shapes.

Every backend takes a :class:`ScanArgs`. Its tensors have **logical** token-major shapes, one
axis per meaning; their strides are free (a backend copies what it must, and views cost
nothing):

- ``u``      (batch, L, Ku, E): the input; Ku = K, or 1 when all K directions read the same u
- ``delta``  (batch, L, K, E)
- ``A``      (K, E, N)
- ``B``, ``C`` (batch, L, K, N): input-dependent, one (B, C) per direction
- ``D``      (K, E) or None;  ``delta_bias`` (K, E) or None
- ``z``      (batch, L, Kz, E) or None, Kz = K or 1 (shared): the output is gated by silu(z)

Direction k is a scan of its E channels over the L tokens in the order ``directions[k]``:
``forward`` (0, 1, ..., L-1), ``reverse``, ``columns`` (column-major over a row-major
``grid`` = (H, W) map, as VMamba's second scan) or ``columns_reverse``. Step s of a direction
reads token ``order[s]`` and writes its output at that token, so every output is in token
order whatever the direction. ``combine`` folds the K outputs: ``none`` keeps them,
(batch, L, K, E); ``sum`` / ``mean`` return one (batch, L, E) — Vim's ``(y_f + y_b) / 2``
and VMamba's four-direction merge, without any flipped or transposed copy.

mamba-ssm's channel-first call (``u`` (batch, dim, L), ``B`` (batch, [G,] N, L)) is
:meth:`ScanArgs.from_channel_first`: G groups become G forward directions of dim / G channels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

DIRECTIONS = ("forward", "reverse", "columns", "columns_reverse")
COMBINES = ("none", "sum", "mean")
# The scan's arguments in every custom op schema (shufflemamba::selective_scan_*), in the order of
# ScanArgs' fields: each op's Python side receives them as ``*scan`` and bundles them, ScanArgs(*scan).
SCAN_SCHEMA = (
    "Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
    "bool delta_softplus"
)
GRADIENTS_SCHEMA = (
    "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"  # d(u, delta, A, B, C, D, z, bias)
)

__all__ = ["COMBINES", "DIRECTIONS", "GRADIENTS_SCHEMA", "SCAN_SCHEMA", "ScanArgs", "token_order"]


def token_order(direction: str, length: int, grid: tuple[int, int] | None = None, device=None) -> Tensor:
    """Positions read by a direction's steps: ``order[s]`` is the token of step s."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown scan direction {direction!r}; choose from {', '.join(DIRECTIONS)}")
    steps = torch.arange(length, device=device)
    if direction.startswith("columns"):
        if grid is None or grid[0] * grid[1] != length:
            raise ValueError(f"direction {direction!r} needs grid=(H, W) with H * W = {length}, got {grid}")
        height, width = grid
        steps = (steps % height) * width + steps // height  # step s -> row s % H, column s // H
    return steps.flip(0) if direction.endswith("reverse") else steps


@dataclass(frozen=True)
class ScanArgs:
    """A selective scan: h_s = exp(dt_s A) h_{s-1} + dt_s B_s u_s, y_s = C_s h_s + D u_s, with
    dt = softplus(delta + delta_bias) (``delta_softplus``) and y gated by silu(z), per direction;
    see the module docstring for shapes, directions and ``combine``."""

    u: Tensor
    delta: Tensor
    A: Tensor
    B: Tensor
    C: Tensor
    D: Tensor | None = None
    z: Tensor | None = None
    delta_bias: Tensor | None = None
    delta_softplus: bool = False
    directions: tuple[str, ...] | None = None  # None: every direction forward
    grid: tuple[int, int] | None = None  # (H, W) of the token map, for the columns orders
    combine: str = "none"

    # ---- sizes ------------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.delta.shape[0]

    @property
    def length(self) -> int:
        return self.delta.shape[1]

    @property
    def num_directions(self) -> int:
        return self.delta.shape[2]

    @property
    def channels(self) -> int:
        return self.delta.shape[3]

    @property
    def d_state(self) -> int:
        return self.A.shape[-1]

    @property
    def direction_names(self) -> tuple[str, ...]:
        return self.directions if self.directions is not None else ("forward",) * self.num_directions

    @property
    def all_forward(self) -> bool:
        return all(d == "forward" for d in self.direction_names)

    @property
    def shares_u(self) -> bool:
        return self.u.shape[2] == 1 and self.num_directions > 1

    @property
    def shares_z(self) -> bool:
        return self.z is not None and self.z.shape[2] == 1 and self.num_directions > 1

    def output_shape(self) -> tuple[int, ...]:
        if self.combine == "none":
            return (self.batch, self.length, self.num_directions, self.channels)
        return (self.batch, self.length, self.channels)

    def tensors(self) -> tuple[Tensor | None, ...]:
        """(u, delta, A, B, C, D, z, delta_bias): the order of every op schema and gradient tuple."""
        return self.u, self.delta, self.A, self.B, self.C, self.D, self.z, self.delta_bias

    def flat(self) -> tuple:
        """The :data:`SCAN_SCHEMA` arguments: the tensors and ``delta_softplus``."""
        return (*self.tensors(), self.delta_softplus)

    def grads_for(self, grads: tuple[Tensor, ...]) -> tuple[Tensor | None, ...]:
        """An op's eight gradients (empty placeholders for absent inputs) as autograd wants them: one per
        :data:`SCAN_SCHEMA` argument (None for the absent ones and ``delta_softplus``)."""
        return (*(g if t is not None else None for g, t in zip(grads, self.tensors(), strict=True)), None)

    def replace(self, **changes) -> ScanArgs:
        return dataclasses.replace(self, **changes)

    # ---- validation ---------------------------------------------------------------------------
    def check(self) -> None:
        """Shapes, dtypes and options the scans support, or one ValueError naming the input and the fix."""
        tensors = dict(zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), self.tensors(), strict=True))
        if any(t is not None and t.is_complex() for t in tensors.values()):
            raise ValueError(
                "selective scan: complex inputs are not supported (only real A / B / C), got a complex tensor"
            )
        if self.delta.dim() != 4:
            raise ValueError(f"selective scan: delta must be (batch, L, K, E), got {tuple(self.delta.shape)}")
        batch, length, k, channels = self.delta.shape
        n = self.d_state
        expect = {
            "u": [(batch, length, k, channels), (batch, length, 1, channels)],
            "A": [(k, channels, n)],
            "B": [(batch, length, k, n)],
            "C": [(batch, length, k, n)],
            "D": [(k, channels)],
            "z": [(batch, length, k, channels), (batch, length, 1, channels)],
            "delta_bias": [(k, channels)],
        }
        for name, shapes in expect.items():
            t = tensors[name]
            if t is not None and tuple(t.shape) not in shapes:
                wanted = " or ".join(str(s) for s in shapes)
                raise ValueError(f"selective scan: {name} must be {wanted} (delta is {tuple(self.delta.shape)}), "
                                 f"got {tuple(t.shape)}")  # fmt: skip
        if self.combine not in COMBINES:
            raise ValueError(f"selective scan: combine must be one of {', '.join(COMBINES)}, got {self.combine!r}")
        if len(self.direction_names) != k:
            raise ValueError(f"selective scan: {len(self.direction_names)} directions given for K = {k}")
        for direction in self.direction_names:
            if direction not in DIRECTIONS:
                raise ValueError(
                    f"selective scan: unknown direction {direction!r}; choose from {', '.join(DIRECTIONS)}"
                )
            if direction.startswith("columns") and (self.grid is None or self.grid[0] * self.grid[1] != length):
                raise ValueError(f"selective scan: direction {direction!r} needs grid=(H, W) with H * W = {length}, "
                                 f"got {self.grid}")  # fmt: skip
        if not (self.u.is_floating_point() and self.delta.is_floating_point()):
            raise ValueError(
                f"selective scan: u and delta must be floating point, got {self.u.dtype}, {self.delta.dtype}"
            )

    # ---- mamba-ssm's channel-first convention ------------------------------------------------
    @classmethod
    def from_channel_first(
        cls,
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor | None = None,
        z: Tensor | None = None,
        delta_bias: Tensor | None = None,
        delta_softplus: bool = False,
    ) -> ScanArgs:
        """mamba-ssm's ``selective_scan_fn`` arguments as views, checked: u / delta / z (b, dim, L), A (dim, N),
        B / C (b, N, L) or grouped (b, G, N, L) (channel d reads group d // (dim / G)), D / bias (dim,)."""
        if u.dim() != 3:
            raise ValueError(f"selective scan: u must be (batch, dim, length), got {tuple(u.shape)}")
        batch, dim, length = u.shape
        if tuple(delta.shape) != (batch, dim, length):
            raise ValueError(f"selective scan: delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
        if A.dim() != 2 or A.shape[0] != dim:
            raise ValueError(f"selective scan: A must be (dim, d_state) = ({dim}, N), got {tuple(A.shape)}")
        d_state = A.shape[1]
        groups = 1
        for name, mat in (("B", B), ("C", C)):
            if mat.dim() not in (3, 4) or mat.shape[0] != batch or tuple(mat.shape[-2:]) != (d_state, length):
                raise ValueError(
                    f"selective scan: {name} must be input-dependent, (batch, N, length) = ({batch}, {d_state}, "
                    f"{length}) or grouped (batch, G, N, length); got {tuple(mat.shape)} (a constant (dim, N) "
                    f"{name} is not supported)"
                )
            if mat.dim() == 4:
                if dim % mat.shape[1]:
                    raise ValueError(
                        f"selective scan: dim {dim} is not divisible by the {mat.shape[1]} groups of {name}"
                    )
                groups = mat.shape[1]
        if B.dim() == 4 and C.dim() == 4 and B.shape[1] != C.shape[1]:
            raise ValueError(f"selective scan: B has {B.shape[1]} groups and C {C.shape[1]}; they must agree")
        channels = dim // groups

        def seq(x: Tensor | None, name: str) -> Tensor | None:
            if x is None:
                return None
            if tuple(x.shape) != (batch, dim, length):
                raise ValueError(f"selective scan: {name} must have u's shape {tuple(u.shape)}, got {tuple(x.shape)}")
            return x.view(batch, groups, channels, length).permute(0, 3, 1, 2)

        def bc(x: Tensor) -> Tensor:
            x = x.unsqueeze(1) if x.dim() == 3 else x
            return x.expand(batch, groups, d_state, length).permute(0, 3, 1, 2)

        def vec(x: Tensor | None, name: str) -> Tensor | None:
            if x is None:
                return None
            if tuple(x.shape) != (dim,):
                raise ValueError(f"selective scan: {name} must be ({dim},), got {tuple(x.shape)}")
            return x.view(groups, channels)

        args = cls(
            u=seq(u, "u"),
            delta=seq(delta, "delta"),
            A=A.view(groups, channels, d_state),
            B=bc(B),
            C=bc(C),
            D=vec(D, "D"),
            z=seq(z, "z"),
            delta_bias=vec(delta_bias, "delta_bias"),
            delta_softplus=delta_softplus,
        )
        args.check()  # dtypes (no complex A / B / C) the views above do not see
        return args

    @staticmethod
    def to_channel_first(out: Tensor) -> Tensor:
        """A (batch, L, K, E) result back to mamba-ssm's (batch, K * E, L) (a view when it can be)."""
        batch, length, k, channels = out.shape
        return out.permute(0, 2, 3, 1).reshape(batch, k * channels, length)

    # ---- directions materialised (for backends that scan forward only) ----------------------
    def orders(self) -> list[Tensor]:
        return [token_order(d, self.length, self.grid, self.delta.device) for d in self.direction_names]

    def in_scan_order(self) -> ScanArgs:
        """The same scan with every direction's tokens gathered into its scan order and every
        shared input repeated per direction: all directions forward, ``combine='none'``. Its output
        goes back to token order (and is combined) by :meth:`from_scan_order`."""
        if self.all_forward and not self.shares_u and not self.shares_z and self.combine == "none":
            return self
        orders = self.orders()

        def gather(x: Tensor | None) -> Tensor | None:
            if x is None:
                return None
            return torch.stack([x[:, order, 0 if x.shape[2] == 1 else i] for i, order in enumerate(orders)], dim=2)

        return self.replace(
            u=gather(self.u), delta=gather(self.delta), B=gather(self.B), C=gather(self.C), z=gather(self.z),
            directions=None, combine="none",
        )  # fmt: skip

    def from_scan_order(self, out: Tensor) -> Tensor:
        """The (batch, L, K, E) output of :meth:`in_scan_order`'s scan in token order, combined."""
        if not self.all_forward:
            out = torch.stack([out[:, torch.argsort(order), i] for i, order in enumerate(self.orders())], dim=2)
        if self.combine == "sum":
            return out.sum(2)
        if self.combine == "mean":
            return out.mean(2)
        return out
