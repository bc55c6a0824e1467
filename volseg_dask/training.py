"""The fit loop: a 2D smp network trained on slices sampled lazily from labelled volumes.

:func:`train` runs these steps:

1. open and check the image/label pairs (:mod:`~volseg_dask.sampling`), map the label values to
   classes, measure the intensity window on the training images (:mod:`~volseg_dask.normalize`);
2. hold out validation slabs (or use the validation volumes given) and build the data loaders;
3. build the network (:mod:`~volseg_dask.models`) and the loss (smp's Dice, focal, Tversky,
   Lovász; torch's cross-entropy; Dice + cross-entropy by default), all skipping ignored voxels;
4. unless ``train.learning_rate`` is set, run the learning-rate range test (:func:`lr_range_test`);
5. fit with AdamW under a one-cycle, cosine or constant schedule, validating every epoch (loss and
   per-class Dice), keeping the best weights, stopping early when the validation loss stops
   improving, when ``train.max_minutes`` is spent, or on Ctrl-C. With pretrained encoder weights
   the encoder is first frozen for ``train.frozen_epochs``, then fine-tuned at
   ``encoder_lr_factor`` of the decoder's rate, with the range test rerun in between;
6. write the best model (one file, atomically) and, beside it, the training curves, sample
   validation slices, the metrics as CSV and JSON, and the range-test plot.

The learning-rate schedule is a function of training progress, where progress is the larger of
the share of steps done and the share of the time budget spent: a run cut short by
``max_minutes`` still anneals its learning rate instead of stopping at the peak.

Interruptions. The model file is written only at the end, by a rename, so a killed run never
leaves a model file that looks finished; it leaves at most the plots and metrics of the epochs it
finished. Rerunning the command restarts training from scratch (a clean restart: a run of a few
minutes to hours on a small labelled region is cheaper to repeat than to make resumable).
Ctrl-C is different: it stops training, saves the best model so far with
``meta["training"]["stop_reason"] == "interrupted"`` and says so.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .augment import Augmenter
from .config import Settings
from .device import autocast, select_device
from .errors import TrainingError, VolumeValueError
from .models import build_model, pad_multiple, save_model
from .normalize import Normalization, compute_normalization
from .sampling import (
    AXES,
    IGNORE_INDEX,
    TRAIN,
    VAL,
    EpochSampler,
    LabelMapping,
    SliceDataset,
    TrainingVolume,
    label_mapping,
    make_split,
    open_training_volumes,
    split_summary,
    worker_init,
)
from .store import OutputLock, check_output_path

log = logging.getLogger(__name__)

__all__ = ["LRFinderResult", "TrainResult", "lr_at", "lr_range_test", "make_loss", "train"]

PathLike = str | os.PathLike[str]


# ---- results ------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What :func:`train` produced."""

    model_path: Path
    epochs_run: int
    best_epoch: int | None
    best_val_loss: float | None
    val_dice: dict[str, float | None]
    """Per-class validation Dice of the best epoch, keyed by the original label value."""
    learning_rates: list[float]
    seconds: float
    stop_reason: str
    history: list[dict[str, Any]] = field(default_factory=list)
    outputs: dict[str, Path] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, Any]:
        """The summary as plain values (as stored in the model file's ``meta["training"]``)."""
        return {
            "epochs_run": self.epochs_run, "best_epoch": self.best_epoch, "best_val_loss": self.best_val_loss,
            "val_dice": self.val_dice, "learning_rates": self.learning_rates, "seconds": round(self.seconds, 2),
            "stop_reason": self.stop_reason,
        }


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


# ---- losses ---------------------------------------------------------------------------------------


class _SumLoss(nn.Module):
    def __init__(self, *parts: nn.Module) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum((part(logits, target) for part in self.parts), torch.zeros((), device=logits.device))


def make_loss(name: str, ignore_index: int = IGNORE_INDEX) -> nn.Module:
    """The training loss ``name`` (multiclass, logits in, ``ignore_index`` voxels skipped).

    ``dice_ce`` (default) is smp's Dice loss plus cross-entropy; ``dice``, ``focal``, ``tversky``
    and ``lovasz`` are smp's; ``cross_entropy`` is torch's (its mean runs over labelled voxels only).
    """
    from segmentation_models_pytorch import losses

    mode = "multiclass"
    factories: dict[str, Any] = {
        "dice_ce": lambda: _SumLoss(losses.DiceLoss(mode, ignore_index=ignore_index),
                                    nn.CrossEntropyLoss(ignore_index=ignore_index)),
        "dice": lambda: losses.DiceLoss(mode, ignore_index=ignore_index),
        "cross_entropy": lambda: nn.CrossEntropyLoss(ignore_index=ignore_index),
        "focal": lambda: losses.FocalLoss(mode, ignore_index=ignore_index),
        "tversky": lambda: losses.TverskyLoss(mode, ignore_index=ignore_index),
        "lovasz": lambda: losses.LovaszLoss(mode, ignore_index=ignore_index),
    }
    if name not in factories:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(factories)}")
    return factories[name]()


# ---- schedule -----------------------------------------------------------------------------------


def lr_at(schedule: str, progress: float, peak: float) -> float:
    """Learning rate at ``progress`` (0..1) of a phase peaking at ``peak``.

    ``one_cycle``: cosine warm-up from peak/25 over the first 25 %, then cosine annealing to
    peak/25e4 (the shape of torch's ``OneCycleLR``); ``cosine``: from peak to peak/1e3;
    ``constant``: peak.
    """
    p = min(max(progress, 0.0), 1.0)
    if schedule == "constant":
        return peak
    if schedule == "cosine":
        low = peak / 1e3
        return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * p))
    start, end, warm = peak / 25, peak / 25e4, 0.25
    if p < warm:
        return start + (peak - start) * 0.5 * (1 - math.cos(math.pi * p / warm))
    q = (p - warm) / (1 - warm)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * q))


# ---- device helpers -----------------------------------------------------------------------------


def _to_device(t: Any, device: torch.device) -> Any:
    """Move a tensor or module to ``device`` (the one place that does; tests of the GPU path mock it)."""
    if isinstance(t, torch.Tensor):
        return t.to(device, non_blocking=True)
    return t.to(device)


def _make_scaler(device: torch.device, amp: bool) -> Any:
    """GradScaler for float16 autocast on CUDA; a pass-through everywhere else."""
    return torch.amp.GradScaler("cuda", enabled=bool(amp and device.type == "cuda"))


# ---- the runner -----------------------------------------------------------------------------------


class _Stop(Exception):
    """Internal: end the fit (reason in args[0])."""


def train_step(model: nn.Module, loss_fn: nn.Module, batch: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer,
               scaler: Any, *, device: torch.device, amp: bool = False,
               memory_format: torch.memory_format = torch.contiguous_format) -> float | None:
    """One optimisation step; the loss, or None when the batch holds no labelled voxel.

    A non-finite loss is returned without a step (the caller decides what to do about it).
    """
    x, y = batch
    if not bool((y != IGNORE_INDEX).any()):
        return None
    x = _to_device(x, device).contiguous(memory_format=memory_format)
    y = _to_device(y, device)
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


class _Runner:
    """Model, loss, loaders and the bookkeeping of one training run."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, device: torch.device, settings: Settings,
                 train_loader: Any, sampler: EpochSampler, val_loader: Any | None, *, progress: bool,
                 deadline: float | None, classes: int) -> None:
        self.model, self.loss_fn, self.device, self.settings = model, loss_fn, device, settings
        self.train_loader, self.sampler, self.val_loader = train_loader, sampler, val_loader
        self.progress, self.deadline, self.classes = progress, deadline, classes
        self.amp = bool(settings.train.amp and device.type == "cuda")
        self.memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        self.history: list[dict[str, Any]] = []
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_epoch: int | None = None
        self.best_loss = math.inf
        self.best_dice: list[float | None] = []
        self.epoch = 0
        self.val_seconds = 0.0
        self.lr_results: list[LRFinderResult] = []
        self.learning_rates: list[float] = []

    # one optimisation step; returns the loss or None (nothing labelled in the batch)
    def step(self, batch: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer, scaler: Any) -> float | None:
        return train_step(self.model, self.loss_fn, batch, optimizer, scaler, device=self.device, amp=self.amp,
                          memory_format=self.memory_format)

    def batches(self, epoch: int) -> Iterator[Sequence[torch.Tensor]]:
        while True:
            self.sampler.set_epoch(epoch)
            yield from self.train_loader
            epoch += 1

    def time_left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    # validation: loss and per-class Dice over all held-out slices
    def validate(self) -> tuple[float, list[float | None]]:
        assert self.val_loader is not None
        t0 = time.monotonic()
        self.model.eval()
        confusion = torch.zeros(self.classes, self.classes, dtype=torch.int64)
        total, weight = 0.0, 0
        with torch.inference_mode():
            for x, y in self.val_loader:
                labelled = y != IGNORE_INDEX
                n = int(labelled.sum())
                if not n:
                    continue
                x = _to_device(x, self.device).contiguous(memory_format=self.memory_format)
                with autocast(self.device, self.amp):
                    logits = self.model(x)
                logits = logits.float().cpu()
                total += float(self.loss_fn(logits, y)) * n
                weight += n
                pred = logits.argmax(1)[labelled]
                confusion += torch.bincount(y[labelled] * self.classes + pred,
                                            minlength=self.classes ** 2).reshape(self.classes, self.classes)
        self.model.train()
        self.val_seconds = time.monotonic() - t0
        return (total / weight if weight else math.nan), dice_from_confusion(confusion.numpy())


def dice_from_confusion(confusion: np.ndarray) -> list[float | None]:
    """Per-class Dice from a confusion matrix (rows truth, columns prediction); None when undefined."""
    tp = np.diag(confusion).astype(float)
    denom = confusion.sum(0) + confusion.sum(1)
    return [float(2 * t / d) if d else None for t, d in zip(tp, denom)]


# ---- learning-rate range test ------------------------------------------------------------------


def lr_range_test(model: nn.Module, loss_fn: nn.Module, batches: Iterator[Sequence[torch.Tensor]],
                  make_optimizer: Any, lr_range: Sequence[float], steps: int, *,
                  device: torch.device | None = None, amp: bool = False, progress: bool = False,
                  time_budget: float = math.inf) -> LRFinderResult:
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
    scaler = _make_scaler(device, amp)
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
                                  memory_format=memory_format)
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
            if time.monotonic() - t0 > time_budget:
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


# ---- phases ---------------------------------------------------------------------------------------


@dataclass
class _Phase:
    name: str
    epochs: int
    freeze_encoder: bool
    encoder_factor: float  # encoder LR = factor x decoder LR
    early_stopping: bool


def _phases(settings: Settings) -> list[_Phase]:
    t = settings.train
    pretrained = bool(settings.model.encoder_weights)
    if not pretrained:
        return [_Phase("train", t.epochs, False, 1.0, True)]
    frozen = min(t.frozen_epochs, t.epochs)
    phases = []
    if frozen:
        phases.append(_Phase("frozen encoder", frozen, True, 0.0, frozen == t.epochs))
    if t.epochs - frozen:
        phases.append(_Phase("fine-tune", t.epochs - frozen, False, t.encoder_lr_factor, True))
    return phases


def _optimizer_factory(model: nn.Module, phase: _Phase, weight_decay: float) -> Any:
    encoder = getattr(model, "encoder", None)
    enc_params = list(encoder.parameters()) if encoder is not None else []
    enc_ids = {id(p) for p in enc_params}
    rest = [p for p in model.parameters() if id(p) not in enc_ids]
    for p in enc_params:
        p.requires_grad_(not phase.freeze_encoder)

    def make(lr: float) -> torch.optim.Optimizer:
        groups: list[dict[str, Any]] = [{"params": rest, "lr": lr, "lr_scale": 1.0}]
        if not phase.freeze_encoder and enc_params:
            groups.append({"params": enc_params, "lr": lr * phase.encoder_factor, "lr_scale": phase.encoder_factor})
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)

    return make


def _run_phase(runner: _Runner, phase: _Phase, phase_index: int, epochs_left: int,
               paths: dict[str, Path]) -> str | None:
    """Train one phase; return a stop reason that ends the whole fit, or None to go on."""
    settings = runner.settings
    t = settings.train
    make_optimizer = _optimizer_factory(runner.model, phase, t.weight_decay)
    if t.learning_rate is not None:
        peak = t.learning_rate
    else:
        steps = t.lr_finder_steps
        result = lr_range_test(runner.model, runner.loss_fn, runner.batches(10_000 * (phase_index + 1)),
                               make_optimizer, t.lr_finder_range, steps, device=runner.device, amp=runner.amp,
                               progress=runner.progress, time_budget=runner.time_left() / 4)
        runner.lr_results.append(result)
        peak = result.suggestion
        plot_lr_finder(result, paths[f"lr_finder_{phase_index}"], title=f"range test ({phase.name})")
        log.info("learning rate for %s: %.3g (%s; minimum of the loss at %s)", phase.name, peak, result.reason,
                 f"{result.minimum:.3g}" if result.minimum else "n/a")
    runner.learning_rates.append(peak)
    optimizer = make_optimizer(peak)
    scales = [g["lr_scale"] for g in optimizer.param_groups]
    scaler = _make_scaler(runner.device, runner.amp)
    steps_per_epoch = len(runner.train_loader)
    total_steps = max(1, phase.epochs * steps_per_epoch)
    # this phase's share of the remaining time, for the time-aware schedule
    budget = runner.time_left() * phase.epochs / max(1, epochs_left)
    t_phase = time.monotonic()
    step = 0
    stale = 0
    bad_steps = 0
    for _ in range(phase.epochs):
        runner.sampler.set_epoch(runner.epoch)
        runner.model.train()
        t_epoch = time.monotonic()
        losses: list[float] = []
        timed_out = False
        lr = peak
        with tqdm(total=steps_per_epoch, desc=f"epoch {runner.epoch + 1}/{t.epochs}", disable=not runner.progress,
                  leave=False, unit="batch") as bar:
            for batch in runner.train_loader:
                # out of time (keeping the last validation's duration in hand); the first epoch makes at
                # least one step, so that there is a model to save
                if (losses or runner.best_state is not None) and runner.time_left() < runner.val_seconds + 1.0:
                    timed_out = True
                    break
                progress = max(step / total_steps, (time.monotonic() - t_phase) / budget if budget > 0 else 0.0)
                lr = lr_at(t.schedule, progress, peak)
                for group, scale in zip(optimizer.param_groups, scales):
                    group["lr"] = lr * scale
                loss = runner.step(batch, optimizer, scaler)
                step += 1
                bar.update()
                if loss is None:
                    continue
                if not math.isfinite(loss):
                    bad_steps += 1
                    if bad_steps >= 3:
                        raise _Stop("diverged")
                    continue
                bad_steps = 0
                losses.append(loss)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if not losses:
            return "time limit" if timed_out else "no labelled training voxels"
        train_loss = float(np.mean(losses))
        row: dict[str, Any] = {"epoch": runner.epoch + 1, "phase": phase.name, "lr": lr, "train_loss": train_loss,
                               "steps": len(losses)}
        if runner.val_loader is not None:
            val_loss, dice = runner.validate()
            row["val_loss"] = val_loss
            monitored = val_loss
        else:
            dice, monitored = [], train_loss
        row["dice"] = dice
        row["seconds"] = round(time.monotonic() - t_epoch, 2)
        runner.epoch += 1
        runner.history.append(row)
        improved = math.isfinite(monitored) and monitored < runner.best_loss - 1e-6 * abs(runner.best_loss)
        if improved or runner.best_state is None:
            runner.best_loss = monitored if math.isfinite(monitored) else runner.best_loss
            runner.best_epoch = runner.epoch
            runner.best_state = {k: v.detach().to("cpu", copy=True) for k, v in runner.model.state_dict().items()}
            runner.best_dice = dice
            stale = 0
        else:
            stale += 1
        dice_text = " ".join("-" if d is None else f"{d:.3f}" for d in dice)
        log.info("epoch %d (%s): train loss %.4f, val loss %s, val Dice [%s], lr %.2e, %.1f s%s", runner.epoch,
                 phase.name, train_loss, f"{row['val_loss']:.4f}" if "val_loss" in row else "n/a", dice_text, lr,
                 row["seconds"], " (best)" if runner.best_epoch == runner.epoch else "")
        write_metrics(runner, paths, final=False)
        if timed_out or runner.time_left() <= runner.val_seconds + 1.0:
            return "time limit"
        if phase.early_stopping and stale >= t.patience:
            return "early stopping"
    return None


# ---- the public entry point -----------------------------------------------------------------------


def _output_paths(output: Path) -> dict[str, Path]:
    stem = output.with_suffix("") if output.suffix else output
    base = str(stem)
    return {
        "model": output,
        "curves": Path(base + ".curves.png"),
        "samples": Path(base + ".samples.png"),
        "metrics_csv": Path(base + ".metrics.csv"),
        "metrics_json": Path(base + ".metrics.json"),
        "lr_finder_0": Path(base + ".lr_finder.png"),
        "lr_finder_1": Path(base + ".lr_finder_finetune.png"),
    }


def _normalization(volumes: Sequence[TrainingVolume], settings: Settings, seed: int) -> Normalization:
    """The intensity window of the training images (voxel-weighted mean of each image's window)."""
    import dask.array as da

    norms, weights = [], []
    for vol in volumes:
        arr = vol.image if isinstance(vol.image, da.Array) else da.from_array(vol.image, chunks=64)
        norms.append(compute_normalization(arr, settings.data, source=vol.image_path, seed=seed))
        weights.append(float(np.prod(vol.shape)))
    if len(norms) == 1:
        return norms[0]
    w = np.asarray(weights) / sum(weights)
    return Normalization(low=float(sum(n.low * x for n, x in zip(norms, w))),
                         high=float(sum(n.high * x for n, x in zip(norms, w))), method=norms[0].method,
                         source="; ".join(n.source for n in norms))


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Torch's intra-op threads set to ``n`` for the block (unchanged when None), restored after."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _seed_everything(seed: int | None) -> int:
    if seed is None:
        seed = int(np.random.default_rng().integers(2**31))
    torch.manual_seed(seed)
    return seed


def train(pairs: Sequence[tuple[Any, Any]], output: PathLike, settings: Settings | None = None, *,
          validation: Sequence[tuple[Any, Any]] | None = None, overwrite: bool = False,
          progress: bool = False) -> TrainResult:
    """Train a 2D segmentation network on slices of labelled volumes and save it as one file.

    Parameters
    ----------
    pairs
        ``(image, labels)`` pairs: paths of any format :func:`~volseg_dask.io.open_volume` reads
        (or in-memory 3D numpy arrays). Labels may hold any integer values.
    output
        Model file to write (``.pt``); plots and metrics are written beside it
        (``NAME.curves.png``, ``NAME.samples.png``, ``NAME.metrics.csv``, ``NAME.metrics.json``,
        ``NAME.lr_finder.png``).
    settings
        All settings (defaults when None); ``model``, ``data``, ``augment`` and ``train`` apply.
    validation
        Optional ``(image, labels)`` pairs used only for validation; without them, slabs of the
        training volumes are held out (``data.validation_fraction``).
    overwrite
        Replace an existing model file (only once the new one is complete).
    progress
        Show tqdm bars per epoch.

    Returns
    -------
    TrainResult
        Model path, epochs run, best epoch and validation loss, per-class Dice, learning rates,
        time, stop reason and the per-epoch history.

    Raises
    ------
    OutputExistsError
        ``output`` exists and ``overwrite`` is false.
    VolumeFormatError, VolumeValueError
        Mismatched shapes, unusable label values (NaN, fractions, one class, > 255 classes, none
        labelled), NaN/Inf in an image.
    TrainingError
        The loss diverged before a first epoch finished.
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    settings = settings or Settings()
    output = Path(output)
    check_output_path(output, overwrite)
    t0 = time.monotonic()
    t = settings.train
    deadline = t0 + 60 * t.max_minutes if t.max_minutes is not None else None
    paths = _output_paths(output)
    with OutputLock(output), _torch_threads(t.torch_threads):
        seed = _seed_everything(t.seed)
        n_slices = settings.model.n_slices
        volumes = open_training_volumes(pairs, settings.data)
        values = np.unique(np.concatenate([v.scan.values for v in volumes]))
        mapping = label_mapping(values, settings.data.ignore_label, ", ".join(v.labels_path for v in volumes))
        val_volumes = _validation_volumes(volumes, validation, mapping, settings, n_slices, seed)
        norm = _normalization(volumes, settings, seed)
        log.info("training on %d volume(s), classes %s (label values %s), intensity window [%g, %g]", len(volumes),
                 mapping.classes, list(mapping.values), norm.low, norm.high)

        train_ds = SliceDataset(volumes, mapping, norm, settings.data, role="train", length=1, n_slices=n_slices,
                                augment=Augmenter(settings.augment), seed=seed)
        positions = sum(train_ds.positions().values())
        n_train = t.samples_per_epoch or positions
        train_ds.length = n_train
        val_ds = None
        if val_volumes:
            frac = min(0.5, max(settings.data.validation_fraction, 0.1))
            n_val = max(t.batch_size, round(n_train * frac / (1 - frac)))
            val_ds = SliceDataset(val_volumes, mapping, norm, settings.data, role="val", length=n_val,
                                  n_slices=n_slices, seed=seed)
        device = select_device(t.device)
        loader_kw: dict[str, Any] = {"batch_size": t.batch_size, "pin_memory": device.type == "cuda"}
        sampler = EpochSampler(n_train)
        workers: dict[str, Any] = {"num_workers": t.num_workers}
        if t.num_workers:
            workers.update(worker_init_fn=worker_init, persistent_workers=True, prefetch_factor=2)
        train_loader: Any = torch.utils.data.DataLoader(train_ds, sampler=sampler, **loader_kw, **workers)
        val_loader: Any = None
        if val_ds is not None:
            val_loader = torch.utils.data.DataLoader(val_ds, shuffle=False, **loader_kw)

        model = build_model(settings.model, classes=mapping.classes, in_channels=n_slices)
        model = _to_device(model, device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        runner = _Runner(model, make_loss(t.loss), device, settings, train_loader, sampler, val_loader,
                         progress=progress, deadline=deadline, classes=mapping.classes)
        log.info("device %s; %d training slices per epoch (from %d positions), %d validation slices; %s", device,
                 n_train, positions, len(val_ds) if val_ds is not None else 0,
                 "held-out slabs" if validation is None else "separate validation volumes")
        stop_reason = "completed"
        try:
            phases = _phases(settings)
            for i, phase in enumerate(phases):
                epochs_left = sum(p.epochs for p in phases[i:])
                reason = _run_phase(runner, phase, i, epochs_left, paths)
                if reason is not None:
                    stop_reason = reason
                    break
        except _Stop as stop:
            stop_reason = str(stop.args[0])
            if runner.best_state is None:
                raise TrainingError(f"{output}: the training loss became infinite or NaN before the first epoch "
                                    "ended; lower train.learning_rate (or narrow train.lr_finder_range)") from None
        except KeyboardInterrupt:
            stop_reason = "interrupted"
            if runner.best_state is None:
                log.warning("interrupted before the first epoch ended: no model written to %s", output)
                raise
        finally:
            train_loader = val_loader = None  # shuts the DataLoader workers down
            runner.train_loader = runner.val_loader = None
        assert runner.best_state is not None
        model.load_state_dict(runner.best_state)
        seconds = time.monotonic() - t0
        result = TrainResult(
            model_path=output, epochs_run=runner.epoch, best_epoch=runner.best_epoch,
            best_val_loss=runner.best_loss if val_ds is not None and math.isfinite(runner.best_loss) else None,
            val_dice={str(v): d for v, d in zip(mapping.values, runner.best_dice)},
            learning_rates=runner.learning_rates, seconds=seconds, stop_reason=stop_reason,
            history=runner.history,
        )
        meta = _meta(settings, mapping, norm, model, volumes, val_volumes if validation is not None else [], runner,
                     result)
        save_model(output, model.cpu(), meta)
        if stop_reason == "interrupted":
            log.warning("interrupted: saved the best model so far (epoch %s of %d) to %s", runner.best_epoch,
                        runner.epoch, output)
        else:
            log.info("saved %s (best epoch %s, stop: %s, %.0f s)", output, runner.best_epoch, stop_reason, seconds)
        result.outputs = {"model": output}
        try:
            write_metrics(runner, paths, final=True, summary=result.metrics, mapping=mapping)
            plot_curves(runner.history, mapping, paths["curves"])
            result.outputs.update(curves=paths["curves"], metrics_csv=paths["metrics_csv"],
                                  metrics_json=paths["metrics_json"])
            if val_ds is not None:
                plot_samples(model.eval(), val_ds, paths["samples"], mapping)
                result.outputs["samples"] = paths["samples"]
            for i in range(len(runner.lr_results)):
                result.outputs[f"lr_finder_{i}"] = paths[f"lr_finder_{i}"]
        except KeyboardInterrupt:
            log.warning("interrupted while writing the plots; the model %s is complete", output)
        return result


def _validation_volumes(volumes: list[TrainingVolume], validation: Sequence[tuple[Any, Any]] | None,
                        mapping: LabelMapping, settings: Settings, n_slices: int, seed: int) -> list[TrainingVolume]:
    """Split roles: separate validation volumes (all VAL, training all TRAIN), or held-out slabs."""
    if validation is not None:
        val = open_training_volumes(validation, settings.data)
        for vol in volumes:
            vol.roles = tuple(np.full(n, TRAIN, np.uint8) for n in vol.shape)  # type: ignore[assignment]
        for vol in val:
            unknown = sorted(set(vol.scan.values.tolist()) - set(mapping.values) - {settings.data.ignore_label})
            if unknown:
                raise VolumeValueError(f"{vol.labels_path}: label values {unknown[:10]} do not occur in the training "
                                       f"labels ({list(mapping.values)}); the model cannot learn them")
            vol.roles = tuple(np.full(n, VAL, np.uint8) for n in vol.shape)  # type: ignore[assignment]
        return val
    for n, vol in enumerate(volumes):
        vol.roles = make_split(vol.shape, settings.data, n_slices=n_slices, seed=None if seed is None else seed + n,
                               where=vol.labels_path)
    if settings.data.validation_fraction <= 0:
        return []
    return volumes


def _meta(settings: Settings, mapping: LabelMapping, norm: Normalization, model: nn.Module,
          volumes: Sequence[TrainingVolume], val_volumes: Sequence[TrainingVolume], runner: _Runner,
          result: TrainResult) -> dict[str, Any]:
    return {
        "model": dataclasses.asdict(settings.model),
        "classes": mapping.classes,
        "label_values": list(mapping.values),
        "ignore_label": mapping.ignore_label,
        "in_channels": settings.model.n_slices,
        "n_slices": settings.model.n_slices,
        "downsample": settings.data.downsample,
        "normalization": norm.to_dict(),
        "settings": settings.to_dict(),
        "pad_multiple": pad_multiple(model, settings.model),
        "training": {**result.metrics, "lr_finder": [r.to_dict() for r in runner.lr_results],
                     "history": runner.history},
        "train_data": [{"image": v.image_path, "labels": v.labels_path, "shape": list(v.shape), "split": s}
                       for v, s in zip(volumes, split_summary(volumes))],
        "validation_data": [{"image": v.image_path, "labels": v.labels_path, "shape": list(v.shape)}
                            for v in val_volumes],
    }


# ---- outputs beside the model ---------------------------------------------------------------------


def write_metrics(runner: _Runner, paths: dict[str, Path], *, final: bool, summary: dict[str, Any] | None = None,
                  mapping: LabelMapping | None = None) -> None:
    """Per-epoch metrics as CSV and JSON (rewritten every epoch, so a long run can be watched)."""
    classes = runner.classes
    names = [str(v) for v in mapping.values] if mapping is not None else [str(c) for c in range(classes)]
    header = ["epoch", "phase", "lr", "train_loss", "val_loss", *(f"dice_{n}" for n in names), "mean_dice",
              "seconds"]
    rows = []
    for h in runner.history:
        dice = h.get("dice") or []
        defined = [d for d in dice if d is not None]
        rows.append([h["epoch"], h["phase"], f"{h['lr']:.4g}", f"{h['train_loss']:.5f}",
                     f"{h['val_loss']:.5f}" if "val_loss" in h else "",
                     *("" if i >= len(dice) or dice[i] is None else f"{dice[i]:.4f}" for i in range(len(names))),
                     f"{np.mean(defined):.4f}" if defined else "", h["seconds"]])
    tmp = paths["metrics_csv"].with_name(paths["metrics_csv"].name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, paths["metrics_csv"])
    record = {"complete": final, "summary": summary, "label_values": mapping.values if mapping else None,
              "lr_finder": [r.to_dict() for r in runner.lr_results], "history": runner.history}
    tmp = paths["metrics_json"].with_name(paths["metrics_json"].name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, paths["metrics_json"])


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_lr_finder(result: LRFinderResult, path: Path, *, title: str = "learning-rate range test") -> None:
    """Loss against learning rate (log scale), raw and smoothed, with the chosen rate marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    n = len(result.smoothed)
    ax.plot(result.lrs[:n], result.losses[:n], color="0.75", lw=1, label="loss")
    ax.plot(result.lrs[:n], result.smoothed, color="C0", lw=2, label="smoothed")
    ax.axvline(result.suggestion, color="C3", ls="--", label=f"chosen {result.suggestion:.2g} ({result.reason})")
    if result.minimum:
        ax.axvline(result.minimum, color="0.4", ls=":", label=f"minimum {result.minimum:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    if result.smoothed:
        top = max(result.smoothed[0], min(result.smoothed)) * 1.5
        ax.set_ylim(min(result.smoothed) * 0.9, top)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(history: Sequence[dict[str, Any]], mapping: LabelMapping, path: Path) -> None:
    """Training and validation loss, and per-class validation Dice, per epoch."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    epochs = [h["epoch"] for h in history]
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="training")
    if any("val_loss" in h for h in history):
        ax1.plot(epochs, [h.get("val_loss", np.nan) for h in history], "o-", label="validation")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.set_yscale("log")  # an early validation spike (batch-norm statistics at a high rate) dwarfs the rest
    ax1.legend()
    for c, value in enumerate(mapping.values):
        ys = [np.nan if len(h.get("dice") or []) <= c or h["dice"][c] is None else h["dice"][c] for h in history]
        ax2.plot(epochs, ys, "o-", label=f"label {value}")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation Dice")
    ax2.set_ylim(0, 1)
    ax2.legend(fontsize=8)
    for h0, h1 in itertools.pairwise(history):
        if h0["phase"] != h1["phase"]:
            for ax in (ax1, ax2):
                ax.axvline(h0["epoch"] + 0.5, color="0.6", ls=":")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_samples(model: nn.Module, dataset: SliceDataset, path: Path, mapping: LabelMapping, n: int = 6) -> None:
    """Validation slices as rows of image | truth | prediction (one or more per axis)."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap

    picks: list[int] = []
    by_axis: dict[int, list[int]] = {}
    for i in range(len(dataset)):
        by_axis.setdefault(dataset.spec(i).axis, []).append(i)
    while len(picks) < min(n, len(dataset)):
        for idx in by_axis.values():
            if idx and len(picks) < n:
                picks.append(idx.pop(0))
    device = next(model.parameters()).device
    colours = plt.get_cmap("tab10")(np.arange(max(mapping.classes, 1)) % 10)
    cmap = ListedColormap(colours)
    fig, axes = plt.subplots(len(picks), 3, figsize=(9, 3 * len(picks)), dpi=90, squeeze=False)
    for row, i in zip(axes, picks):
        x, y = dataset[i]
        with torch.inference_mode():
            pred = model(x[None].to(device)).argmax(1)[0].cpu().numpy()
        truth = np.ma.masked_equal(y.numpy(), IGNORE_INDEX)
        spec = dataset.spec(i)
        row[0].imshow(x[x.shape[0] // 2].numpy(), cmap="gray")
        row[0].set_title(f"{AXES[spec.axis]} = {spec.position}", fontsize=9)
        row[1].imshow(truth, cmap=cmap, vmin=-0.5, vmax=mapping.classes - 0.5, interpolation="nearest")
        row[1].set_title("truth", fontsize=9)
        row[2].imshow(pred, cmap=cmap, vmin=-0.5, vmax=mapping.classes - 0.5, interpolation="nearest")
        row[2].set_title("prediction", fontsize=9)
        for ax in row:
            ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
