"""Blockwise confusion matrix of two label volumes -> Dice, IoU, accuracy per class.

Each block contributes the counts of its (truth, prediction) value pairs; the counts are summed in
a tree, so neither volume is ever held whole. Label values may be any integers.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np

from .cluster import compute
from .errors import VolsegError, VolumeFormatError
from .io.volume import open_volume
from .outputs import unchanged_while_reading

log = logging.getLogger(__name__)

__all__ = ["Evaluation", "confusion_matrix", "dice_per_class", "evaluate", "scores"]


def _pair_counts(truth: np.ndarray, pred: np.ndarray) -> dict[tuple[int, int], int]:
    t = truth.astype(np.int64, copy=False).ravel()
    p = pred.astype(np.int64, copy=False).ravel()
    tu, ti = np.unique(t, return_inverse=True)
    pu, pi = np.unique(p, return_inverse=True)
    codes, counts = np.unique(ti * len(pu) + pi, return_counts=True)
    return {(int(tu[c // len(pu)]), int(pu[c % len(pu)])): int(n) for c, n in zip(codes, counts)}


def _add(*parts: dict[tuple[int, int], int]) -> dict[tuple[int, int], int]:
    total: dict[tuple[int, int], int] = {}
    for part in parts:
        for key, n in part.items():
            total[key] = total.get(key, 0) + n
    return total


def confusion_matrix(truth: da.Array, pred: da.Array, *, progress: bool = False) -> tuple[list[int], np.ndarray]:
    """Label values and the confusion matrix ``cm[i, j]`` = voxels of truth value i predicted as j."""
    if truth.shape != pred.shape:
        raise VolsegError(f"shapes differ: truth {truth.shape}, prediction {pred.shape}")
    pred = pred.rechunk(truth.chunks)
    parts = [dask.delayed(_pair_counts)(t, p) for t, p in zip(truth.to_delayed().ravel(), pred.to_delayed().ravel())]
    while len(parts) > 1:  # a tree of sums keeps every task small
        parts = [dask.delayed(_add)(*parts[i:i + 8]) for i in range(0, len(parts), 8)]
    (pairs,) = compute(parts[0], progress=progress)
    values = sorted({v for pair in pairs for v in pair})
    index = {v: i for i, v in enumerate(values)}
    cm = np.zeros((len(values), len(values)), np.int64)
    for (t, p), n in pairs.items():
        cm[index[t], index[p]] = n
    return values, cm


@dataclass
class Evaluation:
    """Per-class scores of a segmentation against a reference."""

    values: list[int]
    confusion: np.ndarray
    dice: dict[int, float]
    iou: dict[int, float]
    accuracy: float
    ignored: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "label_values": self.values,
            "dice": {str(k): v for k, v in self.dice.items()},
            "iou": {str(k): v for k, v in self.iou.items()},
            "mean_dice": float(np.mean(list(self.dice.values()))) if self.dice else float("nan"),
            "accuracy": self.accuracy,
            "ignore_label": self.ignored,
            "confusion_matrix": self.confusion.tolist(),
        }

    def table(self) -> str:
        """A plain-text table: one row per class."""
        lines = [f"{'label':>6}  {'dice':>6}  {'iou':>6}  {'truth voxels':>13}  {'predicted':>13}"]
        for i, v in enumerate(self.values):
            if v == self.ignored:
                continue
            lines.append(f"{v:>6}  {self.dice[v]:6.4f}  {self.iou[v]:6.4f}  {int(self.confusion[i].sum()):>13,}  "
                         f"{int(self.confusion[:, i].sum()):>13,}")
        lines.append(f"accuracy {self.accuracy:.4f}, mean Dice {np.mean(list(self.dice.values())):.4f}")
        return "\n".join(lines)


def dice_per_class(confusion: np.ndarray, empty: float | None = None) -> list[float | None]:
    """Dice of each class from a confusion matrix (rows truth, columns prediction).

    ``empty`` is the score of a class neither in the truth nor in the prediction (undefined: None
    during training, 1.0 in :func:`scores`, where nothing to find was found).
    """
    cm = np.asarray(confusion)
    tp = np.diag(cm).astype(float)
    denom = cm.sum(0) + cm.sum(1)
    return [float(2 * t / d) if d else empty for t, d in zip(tp, denom)]


def scores(values: list[int], cm: np.ndarray, ignore_label: int | None = None) -> Evaluation:
    """Dice, IoU and accuracy from a confusion matrix; voxels whose truth is ``ignore_label`` are left out."""
    keep = np.array([v != ignore_label for v in values])
    cm = cm.copy()
    cm[~keep, :] = 0  # truth unlabelled: not scored, whatever was predicted there
    per_class = dice_per_class(cm, empty=1.0)
    dice, iou = {}, {}
    for i, v in enumerate(values):
        if v == ignore_label:
            continue
        tp, union = cm[i, i], cm[i].sum() + cm[:, i].sum() - cm[i, i]
        dice[v] = float(per_class[i])  # type: ignore[arg-type]
        iou[v] = float(tp / union) if union else 1.0
    total = cm.sum()
    accuracy = float(np.trace(cm) / total) if total else float("nan")
    return Evaluation(values, cm, dice, iou, accuracy, ignore_label)


def evaluate(
    prediction: str | os.PathLike[str] | da.Array,
    truth: str | os.PathLike[str] | da.Array,
    *,
    ignore_label: int | None = None,
    json_path: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> Evaluation:
    """Per-class Dice and IoU and the accuracy of ``prediction`` against ``truth``, blockwise.

    Parameters
    ----------
    prediction, truth
        Label volumes: paths :func:`volseg_dask.io.open_volume` reads, or dask arrays. An incomplete
        volseg_dask output is refused.
    ignore_label
        Truth value left out of every score (unlabelled voxels).
    json_path
        Also write the scores as JSON here.
    progress
        Show a progress bar.

    Raises
    ------
    VolumeFormatError
        Shapes differ, non-integer labels, or label sets that share nothing but the background.
    """
    pred = prediction if isinstance(prediction, da.Array) else open_volume(prediction)
    ref = truth if isinstance(truth, da.Array) else open_volume(truth)
    names = (str(prediction) if not isinstance(prediction, da.Array) else "prediction",
             str(truth) if not isinstance(truth, da.Array) else "truth")
    if pred.shape != ref.shape:
        raise VolumeFormatError(f"{names[0]} has shape {pred.shape} but {names[1]} has {ref.shape}; evaluate a "
                                "prediction of the same region as the reference")
    for arr, name in ((pred, names[0]), (ref, names[1])):
        if arr.dtype.kind not in "biu":
            raise VolumeFormatError(f"{name}: labels must be integers, found {arr.dtype}")
    with unchanged_while_reading(*(p for p in (prediction, truth) if not isinstance(p, da.Array))):
        values, cm = confusion_matrix(ref, pred, progress=progress)
    in_truth = {v for i, v in enumerate(values) if cm[i].sum()} - {ignore_label}
    in_pred = {v for i, v in enumerate(values) if cm[:, i].sum()}
    if in_truth and in_pred and len(in_truth & in_pred) <= 1 < len(in_truth | in_pred) and in_truth != in_pred:
        raise VolumeFormatError(
            f"label sets barely overlap: {names[1]} has {sorted(in_truth)}, {names[0]} has {sorted(in_pred)}; "
            "do both use the same label values?"
        )
    result = scores(values, cm, ignore_label)
    if json_path is not None:
        with open(json_path, "w") as fh:
            json.dump(result.to_dict(), fh, indent=2)
    return result
