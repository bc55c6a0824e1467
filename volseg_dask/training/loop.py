"""The fit loop: phases (frozen encoder, fine-tune), the time-aware schedule, epochs, validation, early stopping.

The learning-rate schedule is a function of training progress, where progress is the larger of
the share of steps done and the share of the time budget spent: a run cut short by
``max_minutes`` still anneals its learning rate instead of stopping at the peak.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import Settings
from ..device import autocast
from ..labels import IGNORE_INDEX
from ..metrics import dice_per_class
from .dataset import EpochSampler
from .lr_finder import LRFinderResult, lr_range_test
from .reports import plot_lr_finder, write_metrics
from .step import make_scaler, to_device, train_step

log = logging.getLogger(__name__)

__all__ = ["Phase", "Runner", "StopTraining", "lr_at", "make_phases", "run_phase"]


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



class StopTraining(Exception):
    """Internal: end the fit (reason in args[0])."""



class Runner:
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
                x = to_device(x, self.device).contiguous(memory_format=self.memory_format)
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
        return (total / weight if weight else math.nan), dice_per_class(confusion.numpy())



@dataclass
class Phase:
    name: str
    epochs: int
    freeze_encoder: bool
    encoder_factor: float  # encoder LR = factor x decoder LR
    early_stopping: bool


def make_phases(settings: Settings) -> list[Phase]:
    t = settings.train
    pretrained = bool(settings.model.encoder_weights)
    if not pretrained:
        return [Phase("train", t.epochs, False, 1.0, True)]
    frozen = min(t.frozen_epochs, t.epochs)
    phases = []
    if frozen:
        phases.append(Phase("frozen encoder", frozen, True, 0.0, frozen == t.epochs))
    if t.epochs - frozen:
        phases.append(Phase("fine-tune", t.epochs - frozen, False, t.encoder_lr_factor, True))
    return phases


def optimizer_factory(model: nn.Module, phase: Phase, weight_decay: float) -> Any:
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


def run_phase(runner: Runner, phase: Phase, phase_index: int, epochs_left: int,
               paths: dict[str, Path]) -> str | None:
    """Train one phase; return a stop reason that ends the whole fit, or None to go on."""
    settings = runner.settings
    t = settings.train
    make_optimizer = optimizer_factory(runner.model, phase, t.weight_decay)
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
    scaler = make_scaler(runner.device, runner.amp)
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
                        raise StopTraining("diverged")
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
        write_metrics(runner.history, runner.lr_results, paths, classes=runner.classes, final=False)
        if timed_out or runner.time_left() <= runner.val_seconds + 1.0:
            return "time limit"
        if phase.early_stopping and stale >= t.patience:
            return "early stopping"
    return None


