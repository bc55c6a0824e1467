"""One optimisation step, and where tensors and modules go (the one place the GPU path is mocked in tests)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..device import autocast
from ..labels import IGNORE_INDEX

__all__ = ["make_scaler", "to_device", "train_step"]


def to_device(t: Any, device: torch.device) -> Any:
    """Move a tensor or module to ``device`` (the one place that does; tests of the GPU path mock it)."""
    if isinstance(t, torch.Tensor):
        return t.to(device, non_blocking=True)
    return t.to(device)


def make_scaler(device: torch.device, amp: bool) -> Any:
    """GradScaler for float16 autocast on CUDA; a pass-through everywhere else."""
    return torch.amp.GradScaler("cuda", enabled=bool(amp and device.type == "cuda"))



def train_step(model: nn.Module, loss_fn: nn.Module, batch: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer,
               scaler: Any, *, device: torch.device, amp: bool = False,
               memory_format: torch.memory_format = torch.contiguous_format) -> float | None:
    """One optimisation step; the loss, or None when the batch holds no labelled voxel.

    A non-finite loss is returned without a step (the caller decides what to do about it).
    """
    x, y = batch
    if not bool((y != IGNORE_INDEX).any()):
        return None
    x = to_device(x, device).contiguous(memory_format=memory_format)
    y = to_device(y, device)
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, amp):
        logits = model(x)
    loss = loss_fn(logits.float(), y)
    value = float(loss.detach())
    if not math.isfinite(value):
        return value
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return value

