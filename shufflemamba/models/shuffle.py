"""Stochastic layer-wise token shuffle (ShuffleMamba, arXiv:2408.17081).

A regulariser for plain Vision Mamba: in training, block ``i`` of ``depth`` is run on
a randomly permuted token sequence with probability ``p_max * i / (depth - 1)``; the
order is restored right after the block, so position embeddings, the class-token
readout and every other block see the original order. It owns no weights and
does nothing at inference or with ``p_max == 0`` (not even an RNG draw), so a
model trained with it evaluates exactly like one trained without.

Randomness comes from torch's generators, so seeding torch (and checkpointing its
RNG state) makes the shuffle reproducible and exactly resumable. The draw whether to shuffle
stays on the tensor's device and selects between the permutation and the identity with
``torch.where``: no host sync per block, and no data-dependent branch, so ``torch.compile``
traces the whole model once and the per-step draws never recompile it. For FX (timm's feature
extraction) the draw and the two gathers are leaf functions: nodes, not traced Python.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from timm.layers import register_notrace_function
from torch import Tensor, nn


class LayerwiseShuffle(nn.Module):
    """Decides, per block and per training step, whether and how to permute the tokens."""

    def __init__(self, shuffle_rate: float, depth: int, per_sample: bool = False) -> None:
        super().__init__()
        if not 0.0 <= shuffle_rate <= 1.0:
            raise ValueError(f"shuffle_rate must be in [0, 1], got {shuffle_rate}")
        self.shuffle_rate = float(shuffle_rate)
        self.depth = depth
        self.per_sample = per_sample

    def probability(self, layer_idx: int) -> float:
        """p_i = p_max * i / (depth - 1): the first block never shuffles, the last uses p_max."""
        if self.depth <= 1:
            return 0.0
        return self.shuffle_rate * layer_idx / (self.depth - 1)

    @property
    def active(self) -> bool:
        return self.training and self.shuffle_rate > 0.0

    def sample(self, layer_idx: int, hidden: Tensor) -> Tensor | None:
        """One draw for block ``layer_idx``: the token order to run it in, (L,) shared by the
        batch or (B, L) with ``per_sample``; the identity with probability 1 - p. None where the
        block never shuffles (inference, rate 0, the first block): nothing is drawn then."""
        if not self.active:
            return None
        p = self.probability(layer_idx)
        if p <= 0.0:
            return None
        return draw_token_order(hidden, p, self.per_sample)

    def extra_repr(self) -> str:
        return f"shuffle_rate={self.shuffle_rate}, depth={self.depth}, per_sample={self.per_sample}"


@contextlib.contextmanager
def token_shuffle_at_inference(model: nn.Module) -> Iterator[int]:
    """The model's training-time token shuffle switched on while everything else stays as it is
    (eval mode: no dropout, no drop path): Monte-Carlo averaging over token orders at test time.
    Yields how many shuffles are active (0: the model has none with a rate above 0)."""
    shuffles = [m for m in model.modules() if isinstance(m, LayerwiseShuffle) and m.shuffle_rate > 0]
    modes = [m.training for m in shuffles]
    for m in shuffles:
        m.train(True)
    try:
        yield len(shuffles)
    finally:
        for m, mode in zip(shuffles, modes, strict=True):
            m.train(mode)


@register_notrace_function
def draw_token_order(hidden: Tensor, p: float, per_sample: bool) -> Tensor:
    """A random order of hidden's tokens with probability p, else the identity ((L,) or (B, L))."""
    batch, length = hidden.shape[:2]
    device = hidden.device
    if per_sample:
        perm = torch.rand(batch, length, device=device).argsort(dim=1)
    else:
        perm = torch.randperm(length, device=device)
    keep_order = torch.rand((), device=device) >= p
    return torch.where(keep_order, torch.arange(length, device=device), perm)


torch.fx.wrap("draw_token_order")  # a leaf for any FX trace (sample() calls it from this module)


@register_notrace_function
def permute_tokens(x: Tensor, perm: Tensor) -> Tensor:
    """Gather tokens (dim 1) of x (B, L, D) in the order ``perm`` ((L,) or (B, L))."""
    if perm.dim() == 1:
        return x.index_select(1, perm)
    return torch.gather(x, 1, perm.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


@register_notrace_function
def restore_tokens(x: Tensor, perm: Tensor) -> Tensor:
    """Exact inverse of :func:`permute_tokens` (scatter back = gather with argsort(perm))."""
    return permute_tokens(x, perm.argsort(dim=-1))
