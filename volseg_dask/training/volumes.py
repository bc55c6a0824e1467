"""The labelled volumes training reads: opened lazily, their labels scanned once, their images checked.

Nothing here loads a whole volume: the label scan and the image check are one blockwise pass each.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np

from ..cluster import compute
from ..config import DataSettings
from ..errors import VolumeFormatError, VolumeValueError
from ..io.volume import open_volume
from ..labels import MAX_CLASSES
from ..resample import downsample_array

__all__ = ["LabelScan", "TrainingVolume", "open_training_volumes", "scan_labels"]


def _scan_block(block: np.ndarray, ignore_label: int | None) -> dict[str, Any]:
    """Unique values, validity and per-axis labelled-voxel profiles of one label block."""
    out: dict[str, Any] = {"nan": 0, "fractional": 0, "example": None}
    if block.dtype.kind == "f":
        finite = np.isfinite(block)
        out["nan"] = int(block.size - finite.sum())
        frac = finite & (block != np.rint(np.where(finite, block, 0)))
        out["fractional"] = int(frac.sum())
        if out["fractional"]:
            out["example"] = float(block[frac][0])
        block = np.where(finite, np.rint(block), 0)
    values = np.unique(block)
    out["values"] = values.astype(np.int64) if values.size <= 4 * MAX_CLASSES else values[: 4 * MAX_CLASSES + 1]
    labelled = np.ones(block.shape, bool) if ignore_label is None else block != ignore_label
    out["profiles"] = [labelled.sum(axis=tuple(d for d in range(3) if d != a), dtype=np.int64) for a in range(3)]
    return out


@dataclass
class LabelScan:
    """What one scan of a label volume found."""

    values: np.ndarray
    profiles: list[np.ndarray]  # per axis: labelled (non-ignore) voxels at each position


def scan_labels(labels: da.Array, path: str, ignore_label: int | None = None) -> LabelScan:
    """Read a label volume once, block by block: its values and labelled-voxel profiles.

    Raises
    ------
    VolumeValueError
        Non-numeric labels, float labels with NaN/Inf or non-integer values, or more than
        255 distinct values.
    """
    if labels.dtype.kind not in "biuf":
        raise VolumeValueError(f"{path}: labels of dtype {labels.dtype} are not integers; convert them to an "
                               "integer type (e.g. uint8)")
    parts = [dask.delayed(_scan_block)(labels.blocks[idx], ignore_label) for idx in np.ndindex(*labels.numblocks)]
    results = compute(*parts)
    nan = sum(r["nan"] for r in results)
    if nan:
        raise VolumeValueError(f"{path}: {nan} NaN or infinite label values; labels must be integers (set "
                               "unlabelled voxels to a value and pass it as data.ignore_label)")
    frac = sum(r["fractional"] for r in results)
    if frac:
        example = next(r["example"] for r in results if r["example"] is not None)
        raise VolumeValueError(f"{path}: {frac} label values are not integers (e.g. {example}); labels must be "
                               "whole numbers: give a label volume, not probabilities or an image")
    values = np.unique(np.concatenate([r["values"] for r in results]))
    profiles = []
    for a in range(3):
        profile = np.zeros(labels.shape[a], np.int64)
        for idx, r in zip(np.ndindex(*labels.numblocks), results):
            start = sum(labels.chunks[a][: idx[a]])
            profile[start:start + len(r["profiles"][a])] += r["profiles"][a]
        profiles.append(profile)
    return LabelScan(values=values, profiles=profiles)



def _check_image_values(image: da.Array, path: str) -> None:
    """Refuse NaN or infinite values anywhere in a float image (one blockwise pass)."""
    if image.dtype.kind not in "biuf":
        raise VolumeValueError(f"{path}: dtype {image.dtype} is not numeric; convert it to integers or floats")
    if image.dtype.kind != "f":
        return
    (bad,) = compute(da.map_blocks(lambda b: np.array([[[(~np.isfinite(b)).sum()]]]), image, dtype=np.int64,
                                   chunks=(1, 1, 1)).sum())
    if bad:
        raise VolumeValueError(f"{path}: {int(bad)} NaN or infinite voxels; replace them (e.g. with the "
                               "background value) before training")


@dataclass
class TrainingVolume:
    """One image/label pair: lazy arrays (or in-memory ones), its label scan and split roles."""

    image_path: str
    labels_path: str
    image: Any  # dask array or numpy array
    labels: Any
    scan: LabelScan
    roles: tuple[np.ndarray, np.ndarray, np.ndarray] = field(default_factory=lambda: (np.zeros(0, np.uint8),) * 3)
    factor: int = 1
    from_files: bool = False

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image.shape)  # type: ignore[return-value]

    def downsample(self, factor: int) -> None:
        """See the volume (and its label scan) as averaged over ``factor``-sided cubes (data.downsample)."""
        if factor == 1:
            return
        self.factor = factor
        self.image = downsample_array(self.image, factor)
        self.labels = downsample_array(self.labels, factor, labels=True)
        self.scan = LabelScan(self.scan.values, [np.add.reduceat(p, np.arange(0, len(p), factor))
                                                 for p in self.scan.profiles])

    def reopen(self) -> None:
        """Reopen lazy arrays from their paths (in a fresh DataLoader worker)."""
        if not self.from_files:
            return
        self.image = downsample_array(open_volume(self.image_path), self.factor)
        self.labels = downsample_array(open_volume(self.labels_path), self.factor, labels=True)


def open_training_volumes(pairs: Sequence[tuple[Any, Any]], data: DataSettings) -> list[TrainingVolume]:
    """Open image/label pairs lazily and check them (shape, label values, finite image values).

    Each element of ``pairs`` is ``(image, labels)``, each a path (any format ``open_volume`` reads) or,
    for tests and benchmarks, an in-memory 3D numpy array.

    Raises
    ------
    VolumeFormatError
        No pairs, or image and labels of different shapes.
    VolumeValueError
        Bad label values (see :func:`scan_labels`) or NaN/Inf in a float image.
    """
    if not pairs:
        raise VolumeFormatError("train: no training volumes given; pass at least one (image, labels) pair")
    volumes = []
    for n, pair in enumerate(pairs):
        if len(pair) != 2:
            raise VolumeFormatError(f"train: pair {n + 1} is {pair!r}; give (image, labels)")
        img_src, lab_src = pair
        image, img_path = _open(img_src, f"image {n + 1}")
        labels, lab_path = _open(lab_src, f"labels {n + 1}")
        if tuple(image.shape) != tuple(labels.shape):
            raise VolumeFormatError(f"{lab_path}: labels of shape {tuple(labels.shape)} do not match the image "
                                    f"{img_path} of shape {tuple(image.shape)}; give labels of the same shape (crop "
                                    "the image to the labelled region)")
        _check_image_values(da.asarray(image) if isinstance(image, np.ndarray) else image, img_path)
        lab_dask = da.from_array(labels, chunks=64) if isinstance(labels, np.ndarray) else labels
        scan = scan_labels(lab_dask, lab_path, data.ignore_label)
        vol = TrainingVolume(img_path, lab_path, image, labels, scan,
                             from_files=isinstance(image, da.Array) and isinstance(labels, da.Array))
        vol.downsample(data.downsample)
        volumes.append(vol)
    return volumes


def _open(src: Any, what: str) -> tuple[Any, str]:
    if isinstance(src, np.ndarray):
        if src.ndim != 3:
            raise VolumeFormatError(f"{what}: expected a 3D array (z, y, x), found shape {src.shape}")
        return src, f"<in-memory {what}>"
    return open_volume(src), os.fspath(src)

