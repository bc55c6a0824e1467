"""``train``: a 2D smp network fitted on slices sampled lazily from labelled volumes, saved as one file.

:func:`train` runs these steps:

1. open and check the image/label pairs (:mod:`~volseg_dask.training.volumes`), map the label values
   to classes, measure the intensity window on the training images (:mod:`~volseg_dask.normalize`);
2. hold out validation slabs (:mod:`~volseg_dask.training.split`, or use the validation volumes
   given) and build the data loaders (:mod:`~volseg_dask.training.dataset`);
3. build the network (:mod:`~volseg_dask.models`), or take it from a parent model file to fine-tune
   (``model.init_from``, :mod:`~volseg_dask.training.finetune`), and the loss
   (:mod:`~volseg_dask.training.losses`), all skipping ignored voxels;
4. unless ``train.learning_rate`` is set, run the learning-rate range test
   (:mod:`~volseg_dask.training.lr_finder`);
5. fit (:mod:`~volseg_dask.training.loop`) with AdamW under a one-cycle, cosine or constant schedule,
   validating every epoch (loss and per-class Dice), keeping the best weights, stopping early when the
   validation loss stops improving, when ``train.max_minutes`` is spent, or on Ctrl-C. With pretrained
   encoder weights the encoder is first frozen for ``train.frozen_epochs``, then fine-tuned at
   ``encoder_lr_factor`` of the decoder's rate, with the range test rerun in between;
6. write the best model (one file, atomically) and, beside it, the training curves, sample
   validation slices, the metrics as CSV and JSON, and the range-test plot
   (:mod:`~volseg_dask.training.reports`).

Several processes. Started by torchrun or srun, every process runs this same function
(:mod:`~volseg_dask.training.distributed`): each draws its own share of every epoch's slices and
validates its share of the validation slices; rank 0 alone takes the output lock and writes the
model file, plots, metrics and checkpoints.

Interruptions. The model file is written only at the end, by a rename, so a killed run never
leaves a model file that looks finished. Every ``train.checkpoint_every`` epochs a checkpoint
(:mod:`~volseg_dask.training.checkpoint`) is written beside it; rerunning the same command resumes
from it (``restart`` starts afresh), and it is removed once the model file is written. Ctrl-C (or
SIGTERM) stops training, saves the best model so far with ``meta.training["stop_reason"] ==
"interrupted"``, keeps the checkpoint and says how to resume.
"""

from __future__ import annotations

import contextlib
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

from ..config import ModelSettings, Settings
from ..device import select_device
from ..errors import ConfigError, TrainingError, VolumeValueError
from ..labels import LabelMapping, label_mapping
from ..models import ModelMeta, build_model, pad_multiple, save_model
from ..normalize import Normalization, compute_normalization
from ..outputs import OutputLock, check_output_path
from .augment import Augmenter
from .checkpoint import (
    load_checkpoint,
    remove_checkpoint,
    require_same_run,
    restore,
    run_key,
    run_key_fields,
    save_checkpoint,
)
from .dataset import EpochSampler, SliceDataset, worker_init
from .distributed import DistContext, collective_failure, describe_failure, process_group
from .finetune import Parent, load_parent_weights, read_parent, settings_from_parent
from .loop import PhaseState, Runner, StopTraining, format_duration, make_phases, run_phase
from .losses import make_loss
from .reports import output_paths, plot_curves, plot_samples, write_metrics
from .split import TRAIN, VAL, make_split, split_summary
from .step import step_seconds, to_device
from .volumes import TrainingVolume, open_training_volumes

log = logging.getLogger(__name__)

__all__ = ["TrainResult", "train"]

PathLike = str | os.PathLike[str]


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
    attempts: int = 1
    """Runs that made this model: 1, plus one per resume from a checkpoint."""

    @property
    def metrics(self) -> dict[str, Any]:
        """The summary as plain values (as stored in the model file's ``meta["training"]``)."""
        return {
            "epochs_run": self.epochs_run, "best_epoch": self.best_epoch, "best_val_loss": self.best_val_loss,
            "val_dice": self.val_dice, "learning_rates": self.learning_rates, "seconds": round(self.seconds, 2),
            "stop_reason": self.stop_reason, "attempts": self.attempts,
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


def train(pairs: Sequence[tuple[Any, Any]], output: PathLike, settings: Settings | None = None, *,
          validation: Sequence[tuple[Any, Any]] | None = None, overwrite: bool = False,
          progress: bool = False, restart: bool = False) -> TrainResult:
    """Train a 2D segmentation network on slices of labelled volumes and save it as one file.

    Parameters
    ----------
    pairs
        ``(image, labels)`` pairs: paths of any format :func:`~volseg_dask.io.open_volume` reads
        (or in-memory 3D numpy arrays). Labels may hold any integer values.
    output
        Model file to write (``.pt``); plots and metrics are written beside it
        (``NAME.curves.png``, ``NAME.samples.png``, ``NAME.metrics.csv``, ``NAME.metrics.json``,
        ``NAME.lr_finder.png``), and while training runs, its checkpoint ``NAME.ckpt``.
    settings
        All settings (defaults when None); ``model``, ``data``, ``augment`` and ``train`` apply.
        ``model.init_from`` fine-tunes a model file.
    validation
        Optional ``(image, labels)`` pairs used only for validation; without them, slabs of the
        training volumes are held out (``data.validation_fraction``).
    overwrite
        Replace an existing model file (only once the new one is complete).
    progress
        Show tqdm bars per epoch.
    restart
        Delete a checkpoint of an unfinished run instead of resuming from it.

    Returns
    -------
    TrainResult
        Model path, epochs run, best epoch and validation loss, per-class Dice, learning rates,
        time (of every attempt), stop reason and the per-epoch history.

    Raises
    ------
    OutputExistsError
        ``output`` exists and ``overwrite`` is false (and no checkpoint of this run is beside it),
        or the checkpoint beside it is of other inputs or settings.
    ModelFileError
        ``model.init_from`` is not a readable model file; the checkpoint is unreadable.
    ConfigError
        Model settings that conflict with ``model.init_from``'s network.
    VolumeFormatError, VolumeValueError
        Mismatched shapes, unusable label values (NaN, fractions, one class, > 255 classes, none
        labelled), NaN/Inf in an image.
    TrainingError
        The loss diverged before a first epoch finished; another process of a distributed run
        failed or was lost.
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    settings = settings or Settings()
    output = Path(output)
    device = select_device(settings.train.device)
    with process_group(device, settings.train.distributed_timeout) as dist, contextlib.ExitStack() as stack, \
            _torch_threads(settings.train.torch_threads):
        device = dist.device(device)  # before any collective: NCCL needs each rank on its own GPU
        checkpoint = output_paths(output)["checkpoint"]
        try:
            # no collective inside a `together` block: a rank that fails there must not leave the others in one
            with dist.together("checking the inputs"):
                setup = _prepare(pairs, validation, output, settings, overwrite, restart, dist)
                if dist.primary:
                    stack.enter_context(OutputLock(output))
            resuming = dist.from_primary(setup.record is not None)
            with dist.together("reading the checkpoint"):
                if resuming and not dist.primary:
                    setup.record = _checkpoint_of_rank_0(setup, dist)
            return _train(setup, pairs, validation, device, dist, progress)
        except RuntimeError as exc:
            if not collective_failure(exc, dist):
                raise
            resume = f"; rerun the same command to resume from {checkpoint}" if checkpoint.exists() else ""
            raise TrainingError(f"{output}: {dist}: another process of this run stopped or hung "
                                f"({describe_failure(exc)}); training ended{resume}") from None


@dataclass
class _Setup:
    """A run checked before any work: its settings (with a parent's network), run key and checkpoint."""

    output: Path
    settings: Settings
    paths: dict[str, Path]
    key: str
    key_fields: dict[str, Any]
    parent: Parent | None
    record: dict[str, Any] | None  # the checkpoint resumed from

    @property
    def checkpoint(self) -> Path:
        return self.paths["checkpoint"]


def _prepare(pairs: Sequence[tuple[Any, Any]], validation: Sequence[tuple[Any, Any]] | None, output: Path,
             settings: Settings, overwrite: bool, restart: bool, dist: DistContext) -> _Setup:
    """Check the output, the parent model and the checkpoint before any work; decide between resume and afresh."""
    paths = output_paths(output)
    ckpt = paths["checkpoint"]
    parent = None
    if settings.model.init_from:
        parent = read_parent(settings.model.init_from)
        settings = settings_from_parent(settings, parent)
    fields = run_key_fields(pairs, validation, settings, world_size=dist.world_size,
                            parent_sha256=parent.sha256 if parent else None)
    key = run_key(fields)
    record = None
    if dist.primary:
        if restart and ckpt.exists():
            ckpt.unlink()
            log.warning("--restart: deleted the checkpoint %s; training starts afresh", ckpt)
        if ckpt.exists():
            record = load_checkpoint(ckpt)
            require_same_run(record, key, fields, ckpt)
        # resuming may replace the model file the interrupted attempt saved
        check_output_path(output, overwrite or record is not None)
    if settings.train.samples_per_epoch is not None and settings.train.samples_per_epoch < dist.world_size:
        raise ConfigError(f"train.samples_per_epoch: {settings.train.samples_per_epoch} is fewer than the "
                          f"{dist.world_size} processes; give at least one slice per process")
    return _Setup(output, settings, paths, key, fields, parent, record)


def _checkpoint_of_rank_0(setup: _Setup, dist: DistContext) -> dict[str, Any]:
    """The checkpoint rank 0 resumes from, read by another rank (all read it; rank 0 alone writes it)."""
    if not setup.checkpoint.exists():
        raise TrainingError(f"{setup.checkpoint}: rank 0 resumes from this checkpoint but {dist} cannot see it; put "
                            "the output on a filesystem every node sees")
    record = load_checkpoint(setup.checkpoint)
    require_same_run(record, setup.key, setup.key_fields, setup.checkpoint)
    return record


def _train(setup: _Setup, pairs: Sequence[tuple[Any, Any]], validation: Sequence[tuple[Any, Any]] | None,
           device: torch.device, dist: DistContext, progress: bool) -> TrainResult:
    settings, output, paths, record = setup.settings, setup.output, setup.paths, setup.record
    t = settings.train
    t0 = time.monotonic()
    before = float(record["seconds"]) if record else 0.0  # time spent by earlier attempts
    attempts = int(record["attempts"]) + 1 if record else 1
    deadline = t0 + 60 * t.max_minutes - before if t.max_minutes is not None else None
    if record:
        seed = int(record["seed"])  # a run with seed null keeps the one it drew
    else:
        seed = dist.from_primary(int(np.random.default_rng().integers(2**31)) if t.seed is None else t.seed)
    torch.manual_seed(seed)
    n_slices = settings.model.n_slices
    volumes = open_training_volumes(pairs, settings.data)
    values = np.unique(np.concatenate([v.scan.values for v in volumes]))
    mapping = label_mapping(values, settings.data.ignore_label, ", ".join(v.labels_path for v in volumes))
    val_volumes = _validation_volumes(volumes, validation, mapping, settings, n_slices, seed)
    parent = setup.parent
    if parent is not None and settings.data.normalization_from == "model":
        norm = parent.meta.normalization
    else:
        norm = _normalization(volumes, settings, seed)
    if dist.primary:
        log.info("training on %d volume(s), classes %s (label values %s), intensity window [%g, %g]%s",
                 len(volumes), mapping.classes, list(mapping.values), norm.low, norm.high,
                 f" (from {parent.path})" if parent is not None and norm is parent.meta.normalization else "")

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
    sampler = EpochSampler(n_train, dist.rank, dist.world_size, t.batch_size)
    train_loader, val_loader = _loaders(train_ds, val_ds, sampler, settings, device, dist)

    model = build_model(settings.model, classes=mapping.classes, in_channels=n_slices, load_weights=parent is None)
    if parent is not None and record is None:
        reused = load_parent_weights(model, parent, mapping.values)
        if dist.primary:
            log.info("fine-tuning %s: %s", parent.path, reused)
    model = to_device(model, device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    loss_fn = make_loss(t.loss)
    if dist.primary and device.type == "cpu" and _gpu_sized(settings):
        _warn_cpu_epoch(model, loss_fn, train_ds, settings, len(train_loader), device)

    def checkpoint(runner: Runner, state: PhaseState, reason: str | None) -> None:
        every = t.checkpoint_every
        if dist.primary and every and (reason is not None or runner.epoch % every == 0):
            save_checkpoint(setup.checkpoint, runner, state, key=setup.key, fields=setup.key_fields, seed=seed,
                            seconds=before + time.monotonic() - t0, attempts=attempts, finished=reason)

    runner = Runner(model, loss_fn, device, settings, train_loader, sampler, val_loader, progress=progress,
                    deadline=deadline, classes=mapping.classes, dist=dist,
                    label_names=[str(v) for v in mapping.values], on_epoch_end=checkpoint)
    if dist.primary:
        log.info("device %s%s; %d training slices per epoch (from %d positions), %d validation slices; %s", device,
                 f" x {dist.world_size} processes ({dist.backend})" if dist.enabled else "", n_train, positions,
                 len(val_ds) if val_ds is not None else 0,
                 "held-out slabs" if validation is None else "separate validation volumes")
    phases = make_phases(settings)
    start, resume, finished = 0, None, None
    if record is not None:
        start, resume, finished = _resume_point(runner, record, phases)
        if dist.primary:
            log.warning("resumed from epoch %d of %d (%s, attempt %d, %s spent before)", runner.epoch, t.epochs,
                        setup.checkpoint, attempts, format_duration(before))
    stop_reason = finished or "completed"
    try:
        for i in range(start, len(phases) if finished is None else start):
            epochs_left = sum(p.epochs for p in phases[i:])
            reason = run_phase(runner, phases[i], i, epochs_left, paths, resume=resume if i == start else None)
            if reason is not None:
                stop_reason = reason
                break
    except StopTraining as stop:
        stop_reason = str(stop.args[0])
        if runner.best_state is None:
            raise TrainingError(f"{output}: the training loss became infinite or NaN before the first epoch "
                                "ended; lower train.learning_rate (or narrow train.lr_finder_range)") from None
    except KeyboardInterrupt:
        stop_reason = "interrupted"
        if runner.best_state is None:
            if dist.primary:
                log.warning("interrupted before the first epoch ended: no model written to %s", output)
            raise
    finally:
        train_loader = val_loader = None  # shuts the DataLoader workers down
        runner.train_loader = runner.val_loader = None
    assert runner.best_state is not None
    model.load_state_dict(runner.best_state)
    seconds = before + time.monotonic() - t0
    result = TrainResult(
        model_path=output, epochs_run=runner.epoch, best_epoch=runner.best_epoch,
        best_val_loss=runner.best_loss if val_ds is not None and math.isfinite(runner.best_loss) else None,
        val_dice={str(v): d for v, d in zip(mapping.values, runner.best_dice)},
        learning_rates=runner.learning_rates, seconds=seconds, stop_reason=stop_reason,
        history=runner.history, attempts=attempts,
    )
    if not dist.primary:
        return result
    meta = _meta(settings, mapping, norm, model, volumes, val_volumes if validation is not None else [], runner,
                 result, parent)
    save_model(output, model.cpu(), meta)
    if stop_reason == "interrupted":
        resume_hint = (f"; rerun the same command to resume from {setup.checkpoint} (--restart starts afresh)"
                       if setup.checkpoint.exists() else "")
        log.warning("interrupted: saved the best model so far (epoch %s of %d) to %s%s", runner.best_epoch,
                    runner.epoch, output, resume_hint)
    else:
        remove_checkpoint(setup.checkpoint)
        log.info("saved %s (best epoch %s, stop: %s, %.0f s)", output, runner.best_epoch, stop_reason, seconds)
    _write_reports(result, runner, model, val_ds, mapping, paths)
    return result


def _loaders(train_ds: SliceDataset, val_ds: SliceDataset | None, sampler: EpochSampler, settings: Settings,
             device: torch.device, dist: DistContext) -> tuple[Any, Any]:
    """The training loader (this rank's share of every epoch) and the validation one (this rank's share)."""
    t = settings.train
    loader_kw: dict[str, Any] = {"batch_size": t.batch_size, "pin_memory": device.type == "cuda"}
    workers: dict[str, Any] = {"num_workers": t.num_workers}
    if t.num_workers:
        workers.update(worker_init_fn=worker_init, persistent_workers=True, prefetch_factor=2)
    train_loader = torch.utils.data.DataLoader(train_ds, sampler=sampler, **loader_kw, **workers)
    val_loader = None
    if val_ds is not None:
        shard = range(dist.rank, len(val_ds), dist.world_size) if dist.enabled else None
        val_loader = torch.utils.data.DataLoader(val_ds, shuffle=False, sampler=shard, **loader_kw)
    return train_loader, val_loader


def _resume_point(runner: Runner, record: dict[str, Any], phases: Sequence[Any]) -> tuple[int, Any, str | None]:
    """Put a checkpoint into ``runner``: (the phase to go on with, what it resumes from, the stop reason if the
    checkpointed epoch ended the fit)."""
    state, optimizer_state, scaler_state = restore(runner, record)
    if state.epochs_done >= phases[state.index].epochs:  # the phase was over: the next one starts afresh
        return state.index + 1, None, record["finished"]
    return state.index, (state, optimizer_state, scaler_state), record["finished"]


def _write_reports(result: TrainResult, runner: Runner, model: torch.nn.Module, val_ds: SliceDataset | None,
                   mapping: LabelMapping, paths: dict[str, Path]) -> None:
    """Metrics, curves, sample slices beside the model file (which is complete whatever happens here)."""
    result.outputs = {"model": result.model_path}
    try:
        write_metrics(runner.history, runner.lr_results, paths, classes=runner.classes, final=True,
                      summary=result.metrics, mapping=mapping)
        plot_curves(runner.history, mapping, paths["curves"])
        result.outputs.update(curves=paths["curves"], metrics_csv=paths["metrics_csv"],
                              metrics_json=paths["metrics_json"])
        if val_ds is not None:
            plot_samples(model.eval(), val_ds, paths["samples"], mapping)
            result.outputs["samples"] = paths["samples"]
        for i in range(len(runner.lr_results)):
            result.outputs[f"lr_finder_{i}"] = paths[f"lr_finder_{i}"]
    except KeyboardInterrupt:
        log.warning("interrupted while writing the plots; the model %s is complete", result.model_path)


def _gpu_sized(settings: Settings) -> bool:
    """Settings of the size the defaults give (a resnet34 U-Net on 256-px slices), which suit a GPU."""
    model, defaults = settings.model, ModelSettings()
    return (model.architecture, model.encoder, model.decoder_channels) == \
        (defaults.architecture, defaults.encoder, defaults.decoder_channels) and settings.data.image_size >= 256


def _warn_cpu_epoch(model: torch.nn.Module, loss_fn: torch.nn.Module, dataset: SliceDataset, settings: Settings,
                    steps: int, device: torch.device) -> None:
    """Say once how long an epoch takes on this CPU with GPU-sized settings, and where the lighter ones are."""
    t = settings.train
    batch = torch.utils.data.default_collate([dataset[i] for i in range(min(t.batch_size, len(dataset)))])
    seconds = min(step_seconds(model, loss_fn, batch, device=device) for _ in range(2))
    log.warning("no GPU here: with these GPU-sized settings (%s U-Net on %d-px slices) an epoch of %d steps takes "
                "about %s on this CPU (%.1f s a step, before validation); on a machine without a GPU start from "
                "`volseg config write-defaults train.yaml --preset cpu` (a light encoder on 128-px slices)",
                settings.model.encoder, settings.data.image_size, steps, format_duration(steps * seconds), seconds)


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


def _meta(settings: Settings, mapping: LabelMapping, norm: Normalization, model: torch.nn.Module,
          volumes: Sequence[TrainingVolume], val_volumes: Sequence[TrainingVolume], runner: Runner,
          result: TrainResult, parent: Parent | None) -> ModelMeta:
    return ModelMeta(
        model=settings.model, label_values=mapping.values, normalization=norm, in_channels=settings.model.n_slices,
        ignore_label=mapping.ignore_label, downsample=settings.data.downsample,
        pad_multiple=pad_multiple(model, settings.model), settings=settings.to_dict(),
        training={**result.metrics, "lr_finder": [r.to_dict() for r in runner.lr_results], "history": runner.history},
        train_data=[{"image": v.image_path, "labels": v.labels_path, "shape": list(v.shape), "split": s}
                    for v, s in zip(volumes, split_summary(volumes))],
        validation_data=[{"image": v.image_path, "labels": v.labels_path, "shape": list(v.shape)}
                         for v in val_volumes],
        parent_path=parent.path if parent is not None else None,
        parent_sha256=parent.sha256 if parent is not None else None,
    )
