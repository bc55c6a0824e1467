"""The learning-rate range test: an exponential sweep of the rate, and the rate it suggests."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import TrainingError
from .step import make_scaler, train_step

if TYPE_CHECKING:
    from .distributed import DistContext

log = logging.getLogger(__name__)

__all__ = ["FALLBACK_LR", "LRFinderResult", "lr_range_test"]


@dataclass
class LRFinderResult:
    """The learning-rate range test: the sweep, the smoothed loss and the chosen rate."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    steepest: float | None
    minimum: float | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"suggestion": self.suggestion, "steepest": self.steepest, "minimum": self.minimum,
                "reason": self.reason, "steps": len(self.lrs)}



def lr_range_test(model: nn.Module, loss_fn: nn.Module, batches: Iterator[Sequence[torch.Tensor]],
                  make_optimizer: Any, lr_range: Sequence[float], steps: int, *,
                  device: torch.device | None = None, amp: bool = False, progress: bool = False,
                  time_budget: float = math.inf, dist: DistContext | None = None) -> LRFinderResult:
    """Exponential sweep of the learning rate over ``steps`` batches; the model is restored after.

    Parameters
    ----------
    model, loss_fn
        The network (in training mode for the sweep) and the loss.
    batches
        Iterator of ``(image, target)`` batches; a batch without labelled voxels is skipped.
    make_optimizer
        ``callable(lr) -> optimizer``; a param group's ``"lr_scale"`` (default 1) scales the swept
        rate for that group (the encoder's lower rate when fine-tuning).
    lr_range, steps
        First and last rate of the sweep, and its number of steps.
    device, amp, progress
        Where the model runs; autocast on CUDA; a tqdm bar.
    time_budget
        Seconds after which the sweep stops, keeping what it has.
    dist
        Under torch.distributed: the ranks sweep together (``model`` wrapped in DDP, each rank on
        its own batches), every step's loss is the mean over the ranks and rank 0's clock decides
        the time budget, so every rank takes the same decisions and suggests the same rate.

    Notes
    -----
    The sweep ends early once the loss (as an exponential moving average) exceeds 4× its minimum or
    is not finite. The suggestion comes from the loss smoothed without lag (a centred Gaussian over
    the steps; a moving average lags and shifts every feature to higher rates): the rate of its
    steepest descent against log(lr) before its minimum, kept between 1/30 and 1/3 of the rate at
    the minimum; when the loss never falls, 1/10 of the rate at the minimum. A sweep cut short by
    ``time_budget`` before its minimum gives its steepest descent, or :data:`FALLBACK_LR` when it
    stopped below that rate or never descended.
    """
    device = device or torch.device("cpu")
    saved = copy.deepcopy(model.state_dict())
    lo, hi = float(lr_range[0]), float(lr_range[1])
    lrs = [lo * (hi / lo) ** (i / max(1, steps - 1)) for i in range(steps)]
    optimizer = make_optimizer(lo)
    scales = [g.get("lr_scale", 1.0) for g in optimizer.param_groups]
    scaler = make_scaler(device, amp)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    beta = min(0.98, max(0.7, 1 - 4 / steps))
    t0 = time.monotonic()
    done_lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    avg = 0.0
    cut = False
    model.train()
    with tqdm(total=steps, desc="learning-rate range test", disable=not progress, leave=False) as bar:
        for lr in lrs:
            for group, scale in zip(optimizer.param_groups, scales):
                group["lr"] = lr * scale
            loss = None
            for _ in range(100):
                loss = train_step(model, loss_fn, next(batches), optimizer, scaler, device=device, amp=amp,
                                  memory_format=memory_format, dist=dist)
                if loss is not None:
                    break
            if loss is None:
                raise TrainingError("learning-rate range test: 100 batches in a row held no labelled voxel; check "
                                    "data.ignore_label and the labels")
            bar.update()
            done_lrs.append(lr)
            losses.append(loss)
            if not math.isfinite(loss):
                break
            avg = beta * avg + (1 - beta) * loss
            smoothed.append(avg / (1 - beta ** len(losses)))
            if len(smoothed) > 5 and smoothed[-1] > 4 * min(smoothed):
                break
            out_of_time = time.monotonic() - t0 > time_budget
            if dist is not None and dist.enabled:
                out_of_time = dist.from_primary(out_of_time)
            if out_of_time:
                log.warning("learning-rate range test stopped after %d of %d steps (time budget)", len(losses), steps)
                cut = True
                break
    model.load_state_dict(saved)
    n = len(smoothed)  # the finite losses
    if n >= 3:
        from scipy.ndimage import gaussian_filter1d

        smoothed = gaussian_filter1d(np.asarray(losses[:n], float), sigma=max(1.0, n / 25), mode="nearest").tolist()
    return _suggest(done_lrs[:n], losses, smoothed, lo, hi, cut)


FALLBACK_LR = 1e-3
"""Rate used when a range test cut short by the time budget shows no descent, or stopped before
reaching this rate (a common AdamW rate)."""


def _suggest(lrs: list[float], losses: list[float], smoothed: list[float], lo: float, hi: float,
             cut: bool = False) -> LRFinderResult:
    fallback = float(np.clip(FALLBACK_LR, lo, hi))
    if len(smoothed) < 3:
        if cut:
            return LRFinderResult(lrs, losses, smoothed, fallback, None, None,
                                  f"sweep cut short by the time budget; {fallback:g}")
        return LRFinderResult(lrs, losses, smoothed, lo * 10, None, None,
                              "too few finite losses; 10x the start of the range")
    s = np.asarray(smoothed)
    i_min = int(np.argmin(s))
    lr_min = lrs[i_min]
    if cut and i_min >= len(s) - 2:  # the minimum was not reached: only the descent can be trusted
        if lrs[-1] < fallback:  # a few steps at the lowest rates: their slope is noise, not a choice
            return LRFinderResult(lrs, losses, smoothed, fallback, None, None,
                                  f"sweep cut short by the time budget at {lrs[-1]:.2g}, below {fallback:g}; "
                                  f"{fallback:g}")
        skip = max(1, len(s) // 20)
        grad = np.gradient(s[skip:], np.log(lrs[skip:])) if len(s) - skip >= 3 else np.zeros(1)
        if grad.min() < 0:
            rate = lrs[skip + int(np.argmin(grad))]
            return LRFinderResult(lrs, losses, smoothed, rate, rate, None,
                                  "steepest descent of a sweep cut short by the time budget")
        return LRFinderResult(lrs, losses, smoothed, fallback, None, None,
                              f"sweep cut short by the time budget before the loss fell; {fallback:g}")
    skip = max(1, len(s) // 20)
    steep: float | None = None
    if i_min - skip >= 2:
        grad = np.gradient(s[skip:i_min + 1], np.log(lrs[skip:i_min + 1]))
        j = int(np.argmin(grad))
        if grad[j] < 0:
            steep = lrs[skip + j]
    if steep is None:
        return LRFinderResult(lrs, losses, smoothed, lr_min / 10, None, lr_min,
                              "no descent before the minimum; minimum / 10")
    choice = float(np.clip(steep, lr_min / 30, lr_min / 3))
    reason = "steepest descent" if choice == steep else "steepest descent, clipped to [minimum/30, minimum/3]"
    return LRFinderResult(lrs, losses, smoothed, choice, steep, lr_min, reason)


