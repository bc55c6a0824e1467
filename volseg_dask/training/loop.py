"""The fit loop: phases (frozen encoder, fine-tune), the time-aware schedule, epochs, validation, early stopping.

The learning-rate schedule is a function of training progress, where progress is the larger of
the share of steps done and the share of the time budget spent: a run cut short by
``max_minutes`` still anneals its learning rate instead of stopping at the peak.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
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
from .distributed import DistContext
from .lr_finder import LRFinderResult, lr_range_test
from .reports import plot_lr_finder, write_metrics
from .step import make_scaler, to_device, train_step

log = logging.getLogger(__name__)
progress_log = logging.getLogger("volseg_dask.training.progress")
"""One line per epoch; the CLI shows it without ``-v`` when stderr is not a terminal (batch jobs)."""

__all__ = ["Phase", "PhaseState", "Runner", "StopTraining", "epoch_line", "lr_at", "make_phases", "run_phase"]


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
    """Model, loss, loaders and the bookkeeping of one training run.

    ``net`` is the network itself; ``model`` is what the steps run, the same module or, under
    torch.distributed, ``net`` wrapped in DistributedDataParallel (see :meth:`wrap`). Everything a
    resumed run needs to continue where a checkpoint left it lives here or in :class:`PhaseState`.
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module, device: torch.device, settings: Settings,
                 train_loader: Any, sampler: EpochSampler, val_loader: Any | None, *, progress: bool,
                 deadline: float | None, classes: int, dist: DistContext | None = None,
                 label_names: Sequence[str] | None = None,
                 on_epoch_end: Callable[[Runner, PhaseState, str | None], None] | None = None) -> None:
        self.model, self.loss_fn, self.device, self.settings = model, loss_fn, device, settings
        self.net = model
        self.train_loader, self.sampler, self.val_loader = train_loader, sampler, val_loader
        self.progress, self.deadline, self.classes = progress, deadline, classes
        self.dist = dist or DistContext()
        self.label_names = list(label_names) if label_names is not None else [str(c) for c in range(classes)]
        self.on_epoch_end = on_epoch_end
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
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler: Any = None
        self.epoch_seconds: list[float] = []  # of this attempt, for the ETA

    def wrap(self) -> None:
        """(Re)wrap ``net`` for the ranks (DDP) once a phase has set which parameters train."""
        self.model = self.dist.wrap(self.net, self.device)

    # one optimisation step; returns the loss or None (nothing labelled in the batch)
    def step(self, batch: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer, scaler: Any) -> float | None:
        return train_step(self.model, self.loss_fn, batch, optimizer, scaler, device=self.device, amp=self.amp,
                          memory_format=self.memory_format, dist=self.dist)

    def batches(self, epoch: int) -> Iterator[Sequence[torch.Tensor]]:
        while True:
            self.sampler.set_epoch(epoch)
            yield from self.train_loader
            epoch += 1

    def time_left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def out_of_time(self, margin: float) -> bool:
        """At most ``margin`` seconds left, by rank 0's clock on every rank."""
        return self.dist.from_primary(self.time_left() <= margin)

    def clock(self, have_model: bool, t_phase: float, budget: float) -> tuple[bool, float]:
        """(out of time, share of the phase's time budget spent), by rank 0's clock on every rank.

        Out of time keeps the last validation's duration in hand; a run without a model to save
        yet (``have_model`` false) is never out of time, so the first epoch makes at least one step.
        """
        timed_out = have_model and self.time_left() < self.val_seconds + 1.0
        spent = (time.monotonic() - t_phase) / budget if budget > 0 else 0.0
        return self.dist.from_primary((timed_out, spent))

    # validation: loss and per-class Dice over all held-out slices (each rank its share, summed over the ranks)
    def validate(self) -> tuple[float, list[float | None]]:
        assert self.val_loader is not None
        t0 = time.monotonic()
        self.net.eval()
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
                    logits = self.net(x)
                logits = logits.float().cpu()
                total += float(self.loss_fn(logits, y)) * n
                weight += n
                pred = logits.argmax(1)[labelled]
                confusion += torch.bincount(y[labelled] * self.classes + pred,
                                            minlength=self.classes ** 2).reshape(self.classes, self.classes)
        if self.dist.enabled:
            sums = self.dist.all_sum(torch.tensor([total, weight], dtype=torch.float64))
            total, weight = float(sums[0]), int(sums[1])
            confusion = self.dist.all_sum(confusion.double()).round().long()
        self.net.train()
        self.val_seconds = time.monotonic() - t0
        return (total / weight if weight else math.nan), dice_per_class(confusion.numpy())


@dataclass
class PhaseState:
    """Where a phase stands after an epoch: what a checkpoint keeps to continue it (optimizer aside)."""

    index: int
    peak: float
    budget: float
    """Seconds of the time budget this phase may spend (inf without ``train.max_minutes``)."""
    epochs_done: int = 0
    step: int = 0
    stale: int = 0
    bad_steps: int = 0
    elapsed: float = 0.0
    """Seconds spent in this phase so far, over all attempts (the time-aware schedule's clock)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


def run_phase(runner: Runner, phase: Phase, phase_index: int, epochs_left: int, paths: dict[str, Path],
              resume: tuple[PhaseState, dict[str, Any], dict[str, Any]] | None = None) -> str | None:
    """Train one phase; return a stop reason that ends the whole fit, or None to go on.

    ``resume``: the phase's state, optimizer and grad-scaler state from a checkpoint; the phase
    then continues after its last finished epoch, with neither a range test nor a new schedule.
    """
    settings = runner.settings
    t = settings.train
    make_optimizer = optimizer_factory(runner.net, phase, t.weight_decay)
    runner.wrap()
    scaler = make_scaler(runner.device, runner.amp)
    if resume is None:
        peak = _peak_rate(runner, phase, phase_index, make_optimizer, paths)
        runner.learning_rates.append(peak)
        # this phase's share of the remaining time, for the time-aware schedule
        state = PhaseState(phase_index, peak, runner.time_left() * phase.epochs / max(1, epochs_left))
        optimizer = make_optimizer(peak)
    else:
        state, optimizer_state, scaler_state = resume
        optimizer = make_optimizer(state.peak)
        optimizer.load_state_dict(optimizer_state)
        scaler.load_state_dict(scaler_state)
    runner.optimizer, runner.scaler = optimizer, scaler
    peak = state.peak
    scales = [g["lr_scale"] for g in optimizer.param_groups]
    steps_per_epoch = len(runner.train_loader)
    total_steps = max(1, phase.epochs * steps_per_epoch)
    t_phase = time.monotonic() - state.elapsed
    for _ in range(state.epochs_done, phase.epochs):
        runner.sampler.set_epoch(runner.epoch)
        runner.model.train()
        t_epoch = time.monotonic()
        losses: list[float] = []
        timed_out = False
        lr = peak
        with tqdm(total=steps_per_epoch, desc=f"epoch {runner.epoch + 1}/{t.epochs}", disable=not runner.progress,
                  leave=False, unit="batch") as bar:
            for batch in runner.train_loader:
                timed_out, spent = runner.clock(bool(losses) or runner.best_state is not None, t_phase, state.budget)
                if timed_out:
                    break
                lr = lr_at(t.schedule, max(state.step / total_steps, spent), peak)
                for group, scale in zip(optimizer.param_groups, scales):
                    group["lr"] = lr * scale
                loss = runner.step(batch, optimizer, scaler)
                state.step += 1
                bar.update()
                if loss is None:
                    continue
                if not math.isfinite(loss):
                    state.bad_steps += 1
                    if state.bad_steps >= 3:
                        raise StopTraining("diverged")
                    continue
                state.bad_steps = 0
                losses.append(loss)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if not losses:
            return "time limit" if timed_out else "no labelled training voxels"
        row = _end_epoch(runner, phase, state, losses, lr, t_epoch)
        state.elapsed = time.monotonic() - t_phase
        reason: str | None = None
        if timed_out or runner.out_of_time(runner.val_seconds + 1.0):
            reason = "time limit"
        elif phase.early_stopping and state.stale >= t.patience:
            reason = "early stopping"
        if runner.on_epoch_end is not None:  # the checkpoint: once an epoch's line is in the log, it is safe
            runner.on_epoch_end(runner, state, reason)
        if runner.dist.primary:
            progress_log.info("%s", epoch_line(runner, row))
            write_metrics(runner.history, runner.lr_results, paths, classes=runner.classes, final=False)
        if reason is not None:
            return reason
    return None


def _peak_rate(runner: Runner, phase: Phase, phase_index: int, make_optimizer: Any, paths: dict[str, Path]) -> float:
    """The phase's peak learning rate: ``train.learning_rate``, or the range test's (run once, by all ranks)."""
    t = runner.settings.train
    if t.learning_rate is not None:
        return t.learning_rate
    result = lr_range_test(runner.model, runner.loss_fn, runner.batches(10_000 * (phase_index + 1)),
                           make_optimizer, t.lr_finder_range, t.lr_finder_steps, device=runner.device,
                           amp=runner.amp, progress=runner.progress, time_budget=runner.time_left() / 4,
                           dist=runner.dist)
    peak = runner.dist.from_primary(result.suggestion)
    runner.lr_results.append(result)
    if runner.dist.primary:
        plot_lr_finder(result, paths[f"lr_finder_{phase_index}"], title=f"range test ({phase.name})")
        log.info("learning rate for %s: %.3g (%s; minimum of the loss at %s)", phase.name, peak, result.reason,
                 f"{result.minimum:.3g}" if result.minimum else "n/a")
    return float(peak)


def _end_epoch(runner: Runner, phase: Phase, state: PhaseState, losses: list[float], lr: float,
               t_epoch: float) -> dict[str, Any]:
    """Validate, keep the best weights; the epoch's row of the history."""
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
    runner.epoch_seconds.append(row["seconds"])
    improved = math.isfinite(monitored) and monitored < runner.best_loss - 1e-6 * abs(runner.best_loss)
    if improved or runner.best_state is None:
        runner.best_loss = monitored if math.isfinite(monitored) else runner.best_loss
        runner.best_epoch = runner.epoch
        runner.best_state = {k: v.detach().to("cpu", copy=True) for k, v in runner.net.state_dict().items()}
        runner.best_dice = dice
        state.stale = 0
    else:
        state.stale += 1
    state.epochs_done += 1
    return row


def epoch_line(runner: Runner, row: dict[str, Any]) -> str:
    """One line per epoch for logs: epoch/total, losses, per-class Dice by label value, lr, seconds, ETA."""
    total = runner.settings.train.epochs
    dice = row.get("dice") or []
    dice_text = ", ".join(f"{name}: {'-' if d is None else f'{d:.3f}'}" for name, d in zip(runner.label_names, dice))
    recent = runner.epoch_seconds[-5:]
    eta = min((total - runner.epoch) * float(np.mean(recent)) if recent else 0.0, max(0.0, runner.time_left()))
    val = f"{row['val_loss']:.4f}" if "val_loss" in row else "n/a"
    best = " (best)" if runner.best_epoch == runner.epoch else ""
    return (f"epoch {runner.epoch}/{total} ({row['phase']}): train loss {row['train_loss']:.4f}, val loss {val}, "
            f"Dice [{dice_text or 'n/a'}], lr {row['lr']:.2e}, {row['seconds']:.1f} s, "
            f"ETA {format_duration(eta)}{best}")


def format_duration(seconds: float) -> str:
    """``1 h 05 min``, ``4 min 10 s``, ``12 s``."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"
