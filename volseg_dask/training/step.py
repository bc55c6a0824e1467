"""One optimisation step, and where tensors and modules go (the one place the GPU path is mocked in tests)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..device import autocast
from ..labels import IGNORE_INDEX

if TYPE_CHECKING:
    from .distributed import DistContext

__all__ = ["make_scaler", "step_seconds", "to_device", "train_step"]


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
               memory_format: torch.memory_format = torch.contiguous_format,
               dist: DistContext | None = None) -> float | None:
    """One optimisation step; the loss, or None when the batch holds no labelled voxel.

    A non-finite loss is returned without a step (the caller decides what to do about it).

    Under torch.distributed (``dist`` of several ranks) every rank runs the forward and backward
    pass, so that DistributedDataParallel's gradient all-reduce always meets all ranks; a rank
    whose batch has no labelled voxel contributes zero gradients. Whether to step is decided for
    all ranks together: no step when any rank's loss is not finite (all return NaN) or no rank has
    a labelled voxel (all return None). The loss returned is the mean over the ranks that had one,
    the same on every rank.
    """
    if dist is not None and dist.enabled:
        return _distributed_step(model, loss_fn, batch, optimizer, scaler, device, amp, memory_format, dist)
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


def _distributed_step(model: nn.Module, loss_fn: nn.Module, batch: Sequence[torch.Tensor],
                      optimizer: torch.optim.Optimizer, scaler: Any, device: torch.device, amp: bool,
                      memory_format: torch.memory_format, dist: DistContext) -> float | None:
    x, y = batch
    labelled = bool((y != IGNORE_INDEX).any())
    x = to_device(x, device).contiguous(memory_format=memory_format)
    y = to_device(y, device)
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, amp):
        logits = model(x)
    loss = loss_fn(logits.float(), y) if labelled else None
    value = float(loss.detach()) if loss is not None else 0.0
    useful = loss is not None and math.isfinite(value)
    # zero gradients (unless the logits are not finite) where there is nothing to learn
    target = loss if loss is not None and useful else logits.float().sum() * 0.0
    finite = math.isfinite(value) and math.isfinite(float(target.detach()))
    # over the ranks: the sum of the usable losses, how many there are, how many ranks saw non-finite values
    stats = dist.all_sum(torch.tensor([value if useful else 0.0, float(useful), float(not finite)],
                                      dtype=torch.float64))
    scaler.scale(target).backward()
    if stats[2] > 0:
        optimizer.zero_grad(set_to_none=True)
        return math.nan
    if stats[1] == 0:
        return None
    scaler.step(optimizer)
    scaler.update()
    return float(stats[0] / stats[1])


def step_seconds(model: nn.Module, loss_fn: nn.Module, batch: Sequence[torch.Tensor], *, device: torch.device,
                 memory_format: torch.memory_format = torch.contiguous_format) -> float:
    """Wall time of one forward and backward pass over ``batch``, leaving the model as it was.

    The pass runs in eval mode (batch-norm statistics untouched) and its gradients are dropped, so
    timing a step changes neither the weights nor what a resumed run computes.
    """
    import time

    x, y = batch
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    logits = model(to_device(x, device).contiguous(memory_format=memory_format))
    loss_fn(logits.float(), to_device(y, device)).backward()
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return seconds
