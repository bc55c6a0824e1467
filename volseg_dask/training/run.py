"""``train``: a 2D smp network fitted on slices sampled lazily from labelled volumes, saved as one file.

:func:`train` runs these steps:

1. open and check the image/label pairs (:mod:`~volseg_dask.training.volumes`), map the label values
   to classes, measure the intensity window on the training images (:mod:`~volseg_dask.normalize`);
2. hold out validation slabs (:mod:`~volseg_dask.training.split`, or use the validation volumes
   given) and build the data loaders (:mod:`~volseg_dask.training.dataset`);
3. build the network (:mod:`~volseg_dask.models`) and the loss (:mod:`~volseg_dask.training.losses`),
   all skipping ignored voxels;
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

Interruptions. The model file is written only at the end, by a rename, so a killed run never
leaves a model file that looks finished; it leaves at most the plots and metrics of the epochs it
finished. Ctrl-C stops training, saves the best model so far with
``meta.training["stop_reason"] == "interrupted"`` and says so.
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

from ..config import Settings
from ..device import select_device
from ..errors import TrainingError, VolumeValueError
from ..labels import LabelMapping, label_mapping
from ..models import ModelMeta, build_model, pad_multiple, save_model
from ..normalize import Normalization, compute_normalization
from ..outputs import OutputLock, check_output_path
from .augment import Augmenter
from .dataset import EpochSampler, SliceDataset, worker_init
from .loop import Runner, StopTraining, make_phases, run_phase
from .losses import make_loss
from .reports import output_paths, plot_curves, plot_samples, write_metrics
from .split import TRAIN, VAL, make_split, split_summary
from .step import to_device
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

    @property
    def metrics(self) -> dict[str, Any]:
        """The summary as plain values (as stored in the model file's ``meta["training"]``)."""
        return {
            "epochs_run": self.epochs_run, "best_epoch": self.best_epoch, "best_val_loss": self.best_val_loss,
            "val_dice": self.val_dice, "learning_rates": self.learning_rates, "seconds": round(self.seconds, 2),
            "stop_reason": self.stop_reason,
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
    paths = output_paths(output)
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
        model = to_device(model, device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        runner = Runner(model, make_loss(t.loss), device, settings, train_loader, sampler, val_loader,
                         progress=progress, deadline=deadline, classes=mapping.classes)
        log.info("device %s; %d training slices per epoch (from %d positions), %d validation slices; %s", device,
                 n_train, positions, len(val_ds) if val_ds is not None else 0,
                 "held-out slabs" if validation is None else "separate validation volumes")
        stop_reason = "completed"
        try:
            phases = make_phases(settings)
            for i, phase in enumerate(phases):
                epochs_left = sum(p.epochs for p in phases[i:])
                reason = run_phase(runner, phase, i, epochs_left, paths)
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


def _meta(settings: Settings, mapping: LabelMapping, norm: Normalization, model: torch.nn.Module,
          volumes: Sequence[TrainingVolume], val_volumes: Sequence[TrainingVolume], runner: Runner,
          result: TrainResult) -> ModelMeta:
    return ModelMeta(
        model=settings.model, label_values=mapping.values, normalization=norm, in_channels=settings.model.n_slices,
        ignore_label=mapping.ignore_label, downsample=settings.data.downsample,
        pad_multiple=pad_multiple(model, settings.model), settings=settings.to_dict(),
        training={**result.metrics, "lr_finder": [r.to_dict() for r in runner.lr_results], "history": runner.history},
        train_data=[{"image": v.image_path, "labels": v.labels_path, "shape": list(v.shape), "split": s}
                    for v, s in zip(volumes, split_summary(volumes))],
        validation_data=[{"image": v.image_path, "labels": v.labels_path, "shape": list(v.shape)}
                         for v in val_volumes],
    )
