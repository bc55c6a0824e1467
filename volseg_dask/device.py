"""Device choice and mixed precision, shared by training and inference.

``auto`` takes CUDA when present, then Apple's MPS, then the CPU. One GPU per process: its current
device, or GPU ``k`` in worker ``k`` of a local cluster started with ``--workers N`` on a node that
shows it several GPUs (workers started by hand or by dask-jobqueue see one, through
``CUDA_VISIBLE_DEVICES``). Autocast is used on CUDA only:
float16 there; on the CPU bfloat16 autocast was many times slower than float32 on the machines we
measured (``benchmarks/README.md``), so CPU runs stay in float32.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any

import torch

from .errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["autocast", "select_device"]


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _worker_gpu() -> int:
    """The GPU of this process: the current device, or, in worker ``k`` of a ``distributed.LocalCluster``
    (``volseg predict --workers N --device cuda``) on a node with several visible GPUs, GPU ``k`` of them."""
    count = torch.cuda.device_count()
    if count > 1 and "distributed" in sys.modules:
        try:
            from distributed import get_worker

            name = get_worker().name
        except ValueError:  # not in a worker
            name = None
        if isinstance(name, int):
            return name % count
    return int(torch.cuda.current_device())


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
            return torch.device("cuda", _worker_gpu())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if setting == "cpu":
        return torch.device("cpu")
    if setting.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {setting!r} asked for, but no CUDA device is available here; use "
                              "'auto' or 'cpu'")
        if setting == "cuda":
            return torch.device("cuda", _worker_gpu())
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


def autocast(device: torch.device, enabled: bool = True, dtype: str = "float16") -> Any:
    """Autocast context: ``dtype`` (float16 or bfloat16) on CUDA when ``enabled``, otherwise a no-op."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=getattr(torch, dtype))
    return contextlib.nullcontext()
