"""How a model runs on a device: precision and memory format, chosen for speed and checked for accuracy.

On CPUs with native bfloat16 instructions (AVX512-BF16 or AMX), bfloat16 autocast with the
channels-last memory format is the fastest eager path for convolutional networks; elsewhere
float32 with channels-last is. On CUDA, float16 or bfloat16 autocast (automatic mixed
precision) is used. Predictions of the low-precision paths are checked against float32 in the
tests (``BF16_TOLERANCE``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Precision = Literal["auto", "float32", "bfloat16", "float16"]

# Largest difference in the probability of ALL allowed between bfloat16 autocast and float32;
# bfloat16 keeps 8 bits of mantissa, so logits move by about 1 % of their size.
BF16_TOLERANCE = 0.03


def cpu_supports_bfloat16() -> bool:
    """Return whether this CPU has native bfloat16 matrix instructions (AVX512-BF16 or AMX)."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


def resolve_device(device: str = "auto") -> torch.device:
    """Return CUDA when available for "auto", else the named device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True)
class Engine:
    """A device, a precision and a memory format for running models in inference."""

    device: torch.device
    precision: Precision
    channels_last: bool = True

    @classmethod
    def create(cls, device: str = "auto", precision: Precision = "auto", channels_last: bool = True) -> "Engine":
        """Resolve "auto" to the fastest correct choice for the device."""
        resolved_device = resolve_device(device)
        if precision == "auto":
            if resolved_device.type == "cuda":
                precision = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
            else:
                precision = "bfloat16" if cpu_supports_bfloat16() else "float32"
        if precision == "float16" and resolved_device.type == "cpu":
            raise ValueError("float16 inference is for CUDA devices; use bfloat16 or float32 on a CPU")
        return cls(resolved_device, precision, channels_last)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move the model to the device and memory format, in eval mode."""
        model = model.to(self.device).eval()
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def prepare_batch(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device, non_blocking=True)
        if self.channels_last and batch.ndim == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def autocast(self) -> contextlib.AbstractContextManager:
        """Return the autocast context for the precision (a no-op for float32)."""
        if self.precision == "float32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bfloat16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"
