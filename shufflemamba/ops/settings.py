"""How a model's scans run, decided once when the model is built: the backend and each backend's
knobs. Environment variables only fill in what the model was not told.

A model takes ``scan_backend`` (``model.scan_backend`` in the configs). Left unset (None), the
backend is ``$SHUFFLEMAMBA_SCAN_BACKEND`` or else ``auto``; set, it wins over the environment.
``auto`` is a rule, not a guess at run time: mamba-ssm's kernels (``cuda``) for CUDA tensors when
they import, else the ``torch`` path; it is resolved per device and logged
(:func:`describe_scan`). Knobs and their environment defaults:

- torch path: ``SHUFFLEMAMBA_SCAN_CHUNK_ELEMENTS`` (elements of one chunk's state slab, 2^20) and
  ``SHUFFLEMAMBA_SCAN_FUSED`` (``auto`` | ``0`` | ``1``: Inductor-compiled chunks on CPU);
- triton: :class:`TritonConfig` (``SHUFFLEMAMBA_TRITON_CONFIG="block_d=32,chunk=32,..."``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

BACKENDS = ("auto", "cuda", "triton", "torch", "reference")
FUSED_MODES = ("auto", "0", "1")
_ENV_BACKEND = "SHUFFLEMAMBA_SCAN_BACKEND"

__all__ = ["BACKENDS", "ScanSettings", "TritonConfig", "describe_scan", "scan_settings_of", "set_scan_backend"]


@dataclass(frozen=True)
class TritonConfig:
    """Launch parameters of the Triton kernels (the GPU sweep in scripts/benchmarks/kernels.py picks them).

    block_d: channels per program (a power of two; 0: on a GPU the largest that still gives every
        SM ``min_programs_per_sm`` programs, between 8 and 32; under the CPU interpreter up to 128);
    num_warps: warps per program of the scan kernels;
    num_stages: software-pipelining depth of the scan kernels' time loops (1: none);
    chunk: time steps between the states the forward keeps for the backward (the backward's
        per-program scratch holds one chunk of states);
    programs_per_sm: backward programs per SM (each owns a scratch; bounds its memory);
    max_registers: a register cap per thread for the scan kernels (ptxas spills above it; 0: the
        compiler's choice), for trading spills against occupancy;
    min_programs_per_sm: the occupancy target of ``block_d=0``;
    conv_block_l, conv_block_e, conv_warps: tile and warps of the conv kernels.
    """

    block_d: int = 0
    num_warps: int = 4
    num_stages: int = 1
    chunk: int = 32
    programs_per_sm: int = 8
    max_registers: int = 0
    min_programs_per_sm: int = 4
    conv_block_l: int = 32
    conv_block_e: int = 64
    conv_warps: int = 8

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < 0 or (value == 0 and f.name not in ("block_d", "max_registers")):
                raise ValueError(f"TritonConfig.{f.name} must be a positive integer, got {value!r}")
        for name in ("block_d", "conv_block_l", "conv_block_e"):
            value = getattr(self, name)
            if value and value & (value - 1):
                raise ValueError(f"TritonConfig.{name} must be a power of two, got {value}")

    def as_list(self) -> list[int]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    @classmethod
    def from_list(cls, values: list[int]) -> TritonConfig:
        return cls(*values)

    def launch_options(self) -> dict[str, int]:
        """Keyword options of a scan kernel launch."""
        return {"num_warps": self.num_warps, **({"maxnreg": self.max_registers} if self.max_registers else {})}

    @classmethod
    def parse(cls, text: str) -> TritonConfig:
        """``"block_d=32,chunk=64"`` -> a config with those fields changed from the defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        changes = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, _, value = item.partition("=")
            if key not in names or not value.strip().isdigit():
                raise ValueError(f"triton config {item!r}: use name=integer with names {', '.join(sorted(names))}")
            changes[key] = int(value)
        return cls(**changes)

    def channel_block(self, channels: int, programs_without_channels: int, device: torch.device) -> int:
        """BLOCK_D for a launch of ``programs_without_channels`` x ceil(channels / BLOCK_D) programs."""
        if self.block_d:
            return self.block_d
        if device.type != "cuda":  # the interpreter: its cost is per program step, so the fewest programs
            return min(128, 1 << max(3, (channels - 1).bit_length()))
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        block = 32  # at 64 (4 warps) the backward kernel reaches the 255-register cap for sm_90 (docs/benchmarks.md)
        while block > 8 and programs_without_channels * -(-channels // block) < self.min_programs_per_sm * sms:
            block //= 2
        return block


def _env_fused() -> str:
    mode = os.environ.get("SHUFFLEMAMBA_SCAN_FUSED", "auto")
    if mode not in FUSED_MODES:
        raise ValueError(f"SHUFFLEMAMBA_SCAN_FUSED={mode!r}: use auto, 0 or 1")
    return mode


def _env_triton() -> TritonConfig:
    return TritonConfig.parse(os.environ.get("SHUFFLEMAMBA_TRITON_CONFIG", ""))


@dataclass(frozen=True)
class ScanSettings:
    """The backend asked for and every backend's knobs, fixed when the model is built."""

    backend: str = "auto"
    chunk_elements: int = 1 << 20
    fused: str = "auto"
    triton: TritonConfig = field(default_factory=TritonConfig)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown scan backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.fused not in FUSED_MODES:
            raise ValueError(f"scan fused mode must be one of {', '.join(FUSED_MODES)}, got {self.fused!r}")
        if self.chunk_elements < 1:
            raise ValueError(f"scan chunk_elements must be positive, got {self.chunk_elements}")

    @classmethod
    def resolve(cls, backend: str | None = None, **knobs) -> ScanSettings:
        """An explicit backend wins; None takes ``$SHUFFLEMAMBA_SCAN_BACKEND`` or ``auto``. Knobs not
        given come from their environment variables (see the module docstring)."""
        knobs.setdefault("chunk_elements", int(os.environ.get("SHUFFLEMAMBA_SCAN_CHUNK_ELEMENTS", 1 << 20)))
        knobs.setdefault("fused", _env_fused())
        knobs.setdefault("triton", _env_triton())
        return cls(backend=backend or os.environ.get(_ENV_BACKEND) or "auto", **knobs)

    @classmethod
    def of(cls, value: ScanSettings | str | None) -> ScanSettings:
        return value if isinstance(value, ScanSettings) else cls.resolve(value)

    def replace(self, **changes) -> ScanSettings:
        return dataclasses.replace(self, **changes)

    def backend_for(self, x: Tensor | torch.device) -> str:
        """The concrete backend for tensors on this device (``auto`` resolved), or a clear error
        when the asked-for one cannot run there."""
        from .cuda import cuda_kernels_available, require_cuda_kernels
        from .triton_ops import require_triton

        device = x if isinstance(x, torch.device) else x.device
        if self.backend == "auto":
            return "cuda" if device.type == "cuda" and cuda_kernels_available() else "torch"
        if self.backend == "cuda":
            require_cuda_kernels(device)
        elif self.backend == "triton":
            require_triton(device)
        return self.backend

    def describe(self, device: torch.device | None = None) -> str:
        """One line for the run log: what was asked, what runs on ``device``, and the knobs that apply."""
        asked = self.backend
        runs = self.backend_for(device) if device is not None else asked
        text = f"scan backend {asked}" + (f" -> {runs} on {device.type}" if runs != asked else "")
        if runs == "torch":
            text += f" (chunk elements {self.chunk_elements}, fused chunks {self.fused})"
        elif runs == "triton":
            cfg = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self.triton).items())
            text += f" ({cfg})"
        return text


def scan_settings_of(model: nn.Module) -> list[ScanSettings]:
    """The distinct settings of a model's scanning modules (one, for a model built by us)."""
    seen = []
    for module in model.modules():
        settings = getattr(module, "scan_settings", None)
        if isinstance(settings, ScanSettings) and settings not in seen:
            seen.append(settings)
    return seen


def describe_scan(model: nn.Module, device: torch.device) -> str | None:
    """The log line of a model's scan settings on ``device`` (None for a model without scans)."""
    settings = scan_settings_of(model)
    return "; ".join(s.describe(device) for s in settings) if settings else None


def set_scan_backend(model: nn.Module, backend: str, **knobs) -> nn.Module:
    """Switch every scanning module of ``model`` to ``backend`` (benchmarks, backend comparisons);
    the other knobs are kept unless given. Returns the model."""
    for module in model.modules():
        settings = getattr(module, "scan_settings", None)
        if isinstance(settings, ScanSettings):
            module.scan_settings = settings.replace(backend=backend, **knobs)
    return model
