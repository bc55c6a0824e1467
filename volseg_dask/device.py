"""Device choice and mixed precision, shared by training and inference.

``auto`` takes CUDA when present, then Apple's MPS, then the CPU. Autocast is used on CUDA only:
float16 there; on the CPU bfloat16 autocast was many times slower than float32 on the machines we
measured (``benchmarks/README.md``), so CPU runs stay in float32.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from .errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["autocast", "select_device"]


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def select_device(setting: str = "auto") -> torch.device:
    """Resolve a device setting (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``) to a torch device.

    Raises
    ------
    ConfigError
        A device was asked for explicitly and is not present.
    """
    setting = (setting or "auto").lower()
    if setting == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if setting == "cpu":
        return torch.device("cpu")
    if setting.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {setting!r} asked for, but no CUDA device is available here; use "
                              "'auto' or 'cpu'")
        device = torch.device(setting)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device: {setting!r} does not exist; this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s) (cuda:0 ...)")
        return device
    if setting == "mps":
        if not _mps_available():
            raise ConfigError("device: 'mps' asked for, but MPS is not available here; use 'auto' or 'cpu'")
        return torch.device("mps")
    raise ConfigError(f"device: {setting!r} is not a device; use auto, cpu, cuda, cuda:N or mps")


def autocast(device: torch.device, enabled: bool = True) -> Any:
    """Autocast context: float16 on CUDA when ``enabled``, otherwise a no-op."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()
