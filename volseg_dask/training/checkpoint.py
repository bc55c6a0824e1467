"""Checkpoints that make training resumable after a kill, and the run key that says whose they are.

Every ``train.checkpoint_every`` epochs rank 0 writes ``MODEL.ckpt`` beside the model file
(atomically: temporary name, then rename) with all a rerun needs to continue exactly where the run
left off: the weights and the best weights, the optimizer, the phase's progress through its
schedule, the grad scaler, the chosen learning rates and range tests, the RNG states (python,
numpy, torch, CUDA; the sampler's draws are a function of the seed and the epoch), the epoch, the
history and the time spent. Rerunning the same command resumes from it; on the CPU the resumed run's
weights are bit-identical to an uninterrupted run's (``tests/test_train_hpc.py``). The model file
is still written only at the end, and the checkpoint is removed once it is.

The run key (as ``predict``'s) is a hash of what decides the result: the inputs' fingerprints, the
settings that change the fit, the parent model's hash, the number of processes. A checkpoint with
another key is refused, naming what differs; ``--restart`` deletes it and starts afresh. The
checkpoint's format marker is not a model file's, so nothing that reads models mistakes one for the
other (:func:`~volseg_dask.models.read_model_file` says what it is).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Settings
from ..errors import ModelFileError, OutputExistsError
from ..models import CHECKPOINT_FORMAT, atomic_save
from ..outputs import read_stamp
from .loop import PhaseState, Runner
from .lr_finder import LRFinderResult

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_VERSION", "load_checkpoint", "remove_checkpoint", "require_same_run", "restore", "run_key",
           "run_key_fields", "save_checkpoint"]

CHECKPOINT_VERSION = 1

NOT_IN_KEY = {"train.max_minutes", "train.num_workers", "train.torch_threads", "train.device", "train.amp",
              "train.checkpoint_every", "train.distributed_timeout", "model.init_from"}
"""Settings that do not change what a run computes on one machine (or are keyed otherwise: the parent
model by its hash), so a resumed run may differ in them. ``max_minutes`` counts all attempts."""


def _fingerprint(source: Any) -> Any:
    """What identifies an input: its absolute path and a stamp that changes when it is rewritten, or an
    in-memory array's hash."""
    if isinstance(source, np.ndarray):
        return {"array_sha256": hashlib.sha256(np.ascontiguousarray(source).tobytes()).hexdigest(),
                "shape": list(source.shape), "dtype": str(source.dtype)}
    text = os.fspath(source)
    return {"path": os.path.abspath(text), "stamp": read_stamp(text)}


def run_key_fields(pairs: Sequence[tuple[Any, Any]], validation: Sequence[tuple[Any, Any]] | None,
                   settings: Settings, *, world_size: int, parent_sha256: str | None) -> dict[str, Any]:
    """The fields a run key hashes, flat and named for messages (``train.epochs``, ``training volume 1 labels``)."""
    fields: dict[str, Any] = {}
    for what, group in (("training", pairs), ("validation", validation or [])):
        for n, (image, labels) in enumerate(group, 1):
            fields[f"{what} volume {n} image"] = _fingerprint(image)
            fields[f"{what} volume {n} labels"] = _fingerprint(labels)
    raw = settings.to_dict()
    for section in ("model", "data", "augment", "train"):
        for key, value in raw[section].items():
            if f"{section}.{key}" not in NOT_IN_KEY:
                fields[f"{section}.{key}"] = value
    fields["parent model sha256"] = parent_sha256
    fields["processes"] = world_size
    return json.loads(json.dumps(fields, default=str))  # as stored: tuples become lists


def run_key(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _describe_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    out = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        if not key.endswith((" image", " labels")):
            out.append(f"{key}: {json.dumps(old)} -> {json.dumps(new)}")
        elif old is None or new is None:
            out.append(f"{key} ({'not in the checkpoint' if old is None else 'not given now'})")
        else:
            out.append(f"{key} (another file, or rewritten since)")
    return "; ".join(out) or "unknown"


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint (``weights_only``: nothing in it is executed).

    Raises
    ------
    ModelFileError
        Unreadable, not a checkpoint, or of a newer version.
    """
    fix = "pass --restart to start afresh (it deletes the checkpoint)"
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (zipfile.BadZipFile, EOFError, RuntimeError, OSError) as exc:
        raise ModelFileError(f"{path}: not a readable training checkpoint ({exc}); {fix}") from None
    except Exception as exc:  # the weights_only unpickler refusing code, or garbage
        raise ModelFileError(f"{path}: not a volseg_dask training checkpoint ({type(exc).__name__}); {fix}") from None
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        raise ModelFileError(f"{path}: not a volseg_dask training checkpoint; {fix}")
    if int(raw.get("format_version", 0)) > CHECKPOINT_VERSION:
        raise ModelFileError(f"{path}: checkpoint version {raw.get('format_version')} is newer than this "
                             f"volseg_dask's ({CHECKPOINT_VERSION}); upgrade volseg_dask or {fix}")
    return raw


def require_same_run(record: Mapping[str, Any], key: str, fields: Mapping[str, Any], path: Path) -> None:
    """Refuse a checkpoint of another run (other inputs or settings), naming what differs.

    Raises
    ------
    OutputExistsError
        The checkpoint's run key is not ``key``.
    """
    if record.get("run_key") == key:
        return
    raise OutputExistsError(
        f"{path}: this checkpoint is of a training with other inputs or settings (differs in: "
        f"{_describe_changes(record.get('key_fields') or {}, fields)}); rerun with the original ones to resume it, "
        "or pass --restart to start afresh (the checkpoint is deleted)"
    )


def _rng_states() -> dict[str, Any]:
    # numpy's legacy global generator: none of ours draws from it, a library we call might
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    states: dict[str, Any] = {
        "python": random.getstate(), "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: Mapping[str, Any]) -> None:
    random.setstate(states["python"])
    n = states["numpy"]
    legacy = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    np.random.set_state(legacy)  # noqa: NPY002
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path: Path, runner: Runner, state: PhaseState, *, key: str, fields: Mapping[str, Any],
                    seed: int, seconds: float, attempts: int, finished: str | None) -> None:
    """Write the run's state after an epoch to ``path``, atomically.

    ``finished``: the stop reason when this epoch ended the fit (a rerun then only writes the model).
    """
    assert runner.optimizer is not None
    record = {
        "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "run_key": key, "key_fields": dict(fields),
        "seed": seed, "epoch": runner.epoch, "phase": state.to_dict(), "finished": finished,
        "weights": {k: v.detach().cpu() for k, v in runner.net.state_dict().items()},
        "best_weights": runner.best_state, "best_epoch": runner.best_epoch, "best_loss": runner.best_loss,
        "best_dice": runner.best_dice, "history": runner.history, "learning_rates": runner.learning_rates,
        "lr_results": [vars(r) for r in runner.lr_results],
        "optimizer": runner.optimizer.state_dict(), "scaler": runner.scaler.state_dict(),
        "seconds": seconds, "attempts": attempts, "rng": _rng_states(),
    }
    atomic_save(record, path)
    log.debug("checkpoint of epoch %d written to %s", runner.epoch, path)


def restore(runner: Runner, record: Mapping[str, Any]) -> tuple[PhaseState, dict[str, Any], dict[str, Any]]:
    """Put a checkpoint's state into ``runner`` and the RNGs; return what :func:`run_phase` resumes from."""
    runner.net.load_state_dict(record["weights"])
    runner.best_state = record["best_weights"]
    runner.best_epoch, runner.best_loss = record["best_epoch"], float(record["best_loss"])
    runner.best_dice = list(record["best_dice"])
    runner.history = list(record["history"])
    runner.learning_rates = list(record["learning_rates"])
    runner.lr_results = [LRFinderResult(**r) for r in record["lr_results"]]
    runner.epoch = int(record["epoch"])
    _set_rng_states(record["rng"])
    return PhaseState(**record["phase"]), record["optimizer"], record["scaler"]


def remove_checkpoint(path: Path) -> None:
    """Delete the checkpoint once the model file it led to is written."""
    try:
        path.unlink()
    except FileNotFoundError:
        return
    log.info("removed the checkpoint %s", path)
