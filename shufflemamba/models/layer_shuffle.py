"""LayerShuffle (arXiv:2407.04513): the execution order of whole blocks, randomised.

A regulariser beside the token shuffle (:mod:`.shuffle`), and the two compose: in training, one
random permutation of the blocks per forward (per batch; every block runs exactly once; the
embeddings, the final norm and the head stay where they are), so the network learns to tolerate
arbitrary order, pruning and merging. Three variants (``model.layer_shuffle``):

- ``plain``: only the order;
- ``position``: each block first adds ``GELU(Linear(LayerNorm([x ; e_slot])))`` to its input,
  ``e_slot`` a learned embedding of the execution slot (not the block's identity). The slot
  embedding and the adapters' last linear layer start at zero, so the variant starts equal to
  ``plain`` (a zero embedding alone would not: the adapter would still add a function of x);
- ``predict``: each block's token-averaged output goes through ``LayerNorm -> Linear(D ->
  blocks)`` and an auxiliary cross-entropy against its slot (mean over blocks and samples),
  added to the training loss and logged apart; unused at inference.

At inference the order is sequential unless ``eval.layer_order=random`` (one seeded order per
batch), which is how the paper measures robustness; that works on any model of a family with
blocks to reorder, trained with LayerShuffle or not. Families: ours (Vim, ShuffleMamba, Reg) and
timm's ViT / DeiT, attached after creation by :func:`with_layer_shuffle` (state-dict names of the
blocks unchanged; the variants' own weights under ``layer_shuffle.``). The permutation is drawn
from torch's CPU generator: in the checkpointed RNG state (exact resume) and no device sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ..errors import UserError

LAYER_SHUFFLE_MODES = ("none", "plain", "position", "predict")
LAYER_ORDERS = ("sequential", "random")  # eval.layer_order
POSITION_DIM = 32  # the slot embedding's width (the paper's)


class SlotAdapter(nn.Module):
    """``position``: what a block adds to its input, from the input and its execution slot."""

    def __init__(self, dim: int, position_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim + position_dim)
        self.proj = nn.Linear(dim + position_dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, slot_embedding: Tensor) -> Tensor:
        e = slot_embedding.to(x.dtype).expand(*x.shape[:-1], -1)
        return F.gelu(self.proj(self.norm(torch.cat([x, e], dim=-1))))


class LayerShuffle(nn.Module):
    """The block order of one forward, and the variants' per-block extras."""

    def __init__(self, num_blocks: int, dim: int, mode: str = "plain") -> None:
        super().__init__()
        if mode not in LAYER_SHUFFLE_MODES:
            raise UserError(f"model.layer_shuffle={mode!r} is not a valid choice; use one of: "
                            f"{', '.join(LAYER_SHUFFLE_MODES)}")  # fmt: skip
        self.mode, self.num_blocks = mode, num_blocks
        self.random_order = False  # eval.layer_order=random: permute at inference too
        self.aux_loss: Tensor | None = None  # predict: the last training forward's slot loss
        if mode == "position":
            self.slot_embed = nn.Embedding(num_blocks, POSITION_DIM)
            nn.init.zeros_(self.slot_embed.weight)
            self.adapters = nn.ModuleList(SlotAdapter(dim, POSITION_DIM) for _ in range(num_blocks))
        if mode == "predict":
            self.predictors = nn.ModuleList(
                nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_blocks)) for _ in range(num_blocks)
            )

    def order(self, num_blocks: int | None = None) -> list[int]:
        """The execution order of this forward: a permutation in training (with a mode) or with
        ``random_order``, else sequential. ``num_blocks``: fewer blocks after pruning."""
        n = self.num_blocks if num_blocks is None else num_blocks
        self.aux_loss = None
        if (self.training and self.mode != "none") or self.random_order:
            return torch.randperm(n).tolist()
        return list(range(n))

    def enter(self, block: int, slot: int, x: Tensor) -> Tensor | None:
        """What block ``block`` adds to its input ``x`` when run at ``slot`` (None: nothing)."""
        if self.mode != "position":
            return None
        return self.adapters[block](x, self.slot_embed.weight[slot])

    def leave(self, block: int, slot: int, x: Tensor) -> None:
        """``predict``, training: block ``block``'s output ``x`` should tell its slot."""
        if self.mode != "predict" or not self.training:
            return
        logits = self.predictors[block](x.mean(dim=1).to(self.predictors[block][0].weight.dtype))
        target = torch.full((x.shape[0],), slot, dtype=torch.long, device=x.device)
        loss = F.cross_entropy(logits.float(), target) / self.num_blocks
        self.aux_loss = loss if self.aux_loss is None else self.aux_loss + loss

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, num_blocks={self.num_blocks}"


class ShuffledBlocks(nn.Sequential):
    """timm ViT's ``blocks`` (an ``nn.Sequential``, names unchanged) run in the model's
    LayerShuffle order. The LayerShuffle is the model's (``model.layer_shuffle``); kept here as a
    plain reference, not a child, so the blocks' state-dict names stay ``blocks.{i}``."""

    def forward(self, x: Tensor) -> Tensor:
        shuffle: LayerShuffle = self.__dict__["_layer_shuffle"]
        for slot, block in enumerate(shuffle.order(len(self))):
            extra = shuffle.enter(block, slot, x)
            if extra is not None:
                x = x + extra
            x = self[block](x)
            shuffle.leave(block, slot, x)
        return x


def supports_layer_shuffle(model: nn.Module) -> bool:
    from .vim import VisionMamba

    return isinstance(model, VisionMamba | VisionTransformer)


def with_layer_shuffle(model: nn.Module, mode: str) -> nn.Module:
    """``model`` with a LayerShuffle of ``mode`` over its blocks (``model.layer_shuffle``); the
    weights it already has are untouched. A family without a stack of blocks to reorder is one
    line of error."""
    from .vim import VisionMamba

    if not supports_layer_shuffle(model):
        raise UserError(
            f"LayerShuffle reorders the blocks of the plain models (Vim, ShuffleMamba, timm's ViT / DeiT); "
            f"{type(model).__name__} has stages, not one stack: use model.layer_shuffle=none / eval.layer_order="
            f"sequential"
        )
    if isinstance(model, VisionMamba):
        blocks, dim = len(model.layers), model.embed_dim
    else:
        if not isinstance(model.blocks, nn.Sequential):
            raise UserError("LayerShuffle: this ViT's blocks are not an nn.Sequential")
        blocks, dim = len(model.blocks), model.embed_dim
    reference = next(model.parameters())
    shuffle = LayerShuffle(blocks, dim, mode).to(device=reference.device, dtype=reference.dtype)
    shuffle.train(model.training)
    model.layer_shuffle = shuffle
    if isinstance(model, VisionTransformer):
        model.blocks.__class__ = ShuffledBlocks
        model.blocks.__dict__["_layer_shuffle"] = shuffle
    return model


def layer_shuffles(model: nn.Module) -> list[LayerShuffle]:
    return [m for m in model.modules() if isinstance(m, LayerShuffle)]


def layer_order_loss(model: nn.Module) -> Tensor | None:
    """The ``predict`` variant's auxiliary loss of the last training forward (None otherwise)."""
    losses = [m.aux_loss for m in layer_shuffles(model) if m.aux_loss is not None]
    return sum(losses[1:], losses[0]) if losses else None
