"""Voxels to fit a fusion on: stratified by class, a bounded number, reproducible by seed, read blockwise.

Two passes over the blocks of a prediction's grid, each a dask task per block holding one block:

1. count the labelled voxels of each class in every block of the truth (``ignore_label`` voxels and
   unknown label values are not counted; unknown values are refused);
2. draw, per class, ``samples / classes`` voxels (or all the class has) uniformly without replacement
   from the whole volume — how many fall in each block is one multivariate hypergeometric draw, and
   which voxels of a block a second draw seeded by the seed and the block's index — and read their
   per-axis probabilities with the context the fusion model needs (:func:`~.fusion.native_probabilities`).

The sample depends only on the seed, the truth and the block grid, not on the scheduler or the order
in which blocks finish; nothing but the sample and one block per task is ever in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr

from ..cluster import compute
from ..errors import VolumeValueError
from ..grid import BlockGrid
from .fusion import native_probabilities

log = logging.getLogger(__name__)

__all__ = ["Samples", "allocate", "class_counts", "sample_voxels"]


@dataclass
class Samples:
    """Sampled voxels: their per-axis probability patches, true class and position."""

    patches: np.ndarray
    """uint8 ``(n, A·C, k, k, k)``: axis-major channels (axis ``a``, class ``c`` at ``a·C + c``), then z, y, x."""
    classes: np.ndarray
    """int64 ``(n,)``: the true class of each voxel."""
    positions: np.ndarray
    """int64 ``(n, 3)``: the voxels (z, y, x) in the volume."""
    class_voxels: np.ndarray
    """int64 ``(C,)``: labelled voxels of each class in the whole truth."""

    @property
    def per_class(self) -> np.ndarray:
        """Samples of each class."""
        return np.bincount(self.classes, minlength=len(self.class_voxels))

    @property
    def weights(self) -> np.ndarray:
        """float64 per-sample weights (mean 1) that restore the truth's class frequencies in a fit."""
        drawn = self.per_class
        share = self.class_voxels / max(1, self.class_voxels.sum())
        per_class = np.where(drawn > 0, share * len(self.classes) / np.maximum(drawn, 1), 0.0)
        return per_class[self.classes]


def _class_map(truth: np.ndarray, label_values: Sequence[int]) -> np.ndarray:
    """int16 class of each voxel; -1 for any value that is not a label value (ignored, or unknown)."""
    classes = np.full(truth.shape, -1, np.int16)
    for c, value in enumerate(label_values):
        classes[truth == value] = c
    return classes


def _count_block(truth: np.ndarray, label_values: list[int], ignore_label: int | None) -> tuple[np.ndarray, list[int]]:
    values, counts = np.unique(np.asarray(truth), return_counts=True)
    index = {int(v): i for i, v in enumerate(label_values)}
    per_class = np.zeros(len(label_values), np.int64)
    unknown = []
    for value, n in zip(values.tolist(), counts.tolist()):
        if value in index:
            per_class[index[value]] = n
        elif value != ignore_label:
            unknown.append(int(value))
    return per_class, unknown


def _blocks(truth: da.Array, grid: BlockGrid) -> list[Any]:
    """The truth's blocks on the prediction's native grid, in the order of ``grid.indices()``."""
    return list(truth.rechunk(grid.native_chunks).to_delayed().ravel())


def class_counts(truth: da.Array, grid: BlockGrid, label_values: Sequence[int], ignore_label: int | None, *,
                 source: str = "truth", progress: bool = False) -> np.ndarray:
    """Labelled voxels per block and class, ``(blocks, C)`` int64, in the order of ``grid.indices()``.

    Raises
    ------
    VolumeValueError
        The truth holds values that are neither label values of the model nor ``ignore_label``.
    """
    task = dask.delayed(_count_block, pure=True)
    values = [int(v) for v in label_values]
    parts = compute(*(task(block, values, ignore_label) for block in _blocks(truth, grid)), progress=progress)
    unknown = sorted({v for _, bad in parts for v in bad})
    if unknown:
        shown = ", ".join(map(str, unknown[:10])) + (" ..." if len(unknown) > 10 else "")
        raise VolumeValueError(f"{source}: holds label values {shown} that the model does not predict (its label "
                               f"values are {values}); give the labels of this model's classes, or mark unlabelled "
                               "voxels with the ignore label (--ignore-label)")
    return np.stack([counts for counts, _ in parts])


def allocate(counts: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """Samples per block and class ``(blocks, C)``: ``samples // classes present`` per class (all of a rarer
    class's voxels when it has fewer), spread over the blocks as a draw without replacement would."""
    totals = counts.sum(axis=0)
    present = int((totals > 0).sum())
    per_class = samples // max(1, present)
    rng = np.random.default_rng(seed)
    quotas = np.zeros_like(counts)
    for c, total in enumerate(totals):
        if total > 0:
            quotas[:, c] = rng.multivariate_hypergeometric(counts[:, c], min(per_class, int(total)))
    return quotas


def _sample_block(truth: np.ndarray, output: str, axes: tuple[str, ...], grid: BlockGrid, index: tuple[int, ...],
                  quotas: np.ndarray, label_values: list[int], seed: int,
                  radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    classes = _class_map(np.asarray(truth), label_values).ravel()
    rng = np.random.default_rng([seed, *index])
    picked, picked_classes = [], []
    for c, quota in enumerate(quotas.tolist()):
        if quota:
            where = np.flatnonzero(classes == c)
            picked.append(where[np.sort(rng.choice(where.size, quota, replace=False))])
            picked_classes.append(np.full(quota, c, np.int64))
    flat = np.concatenate(picked)
    local = np.unravel_index(flat, truth.shape)
    region = grid.native_block(index)
    arrays = [zarr.open_array(store=output, path=f"probabilities/{axis}", mode="r") for axis in axes]
    k = 2 * radius + 1
    patches = []
    for probs in native_probabilities(arrays, region, grid, radius):
        windows = np.lib.stride_tricks.sliding_window_view(probs, (k, k, k), axis=(1, 2, 3))  # (C, z, y, x, k, k, k)
        patches.append(np.moveaxis(windows[:, local[0], local[1], local[2]], 0, 1))  # (n, C, k, k, k)
    positions = np.stack([lo + i for (lo, _), i in zip(region, local)], axis=1).astype(np.int64)
    return np.concatenate(patches, axis=1), np.concatenate(picked_classes), positions


def sample_voxels(output: str, axes: Sequence[str], grid: BlockGrid, truth: da.Array, label_values: Sequence[int],
                  ignore_label: int | None, *, samples: int, seed: int, radius: int, source: str = "truth",
                  progress: bool = False) -> Samples:
    """A stratified sample of the labelled voxels of ``truth`` with their per-axis probabilities in ``output``.

    Parameters
    ----------
    output
        A prediction output whose ``probabilities/{axis}`` are complete (checked by the caller).
    axes
        The per-axis arrays to read, in the order of the patches' channels.
    grid
        The prediction's block grid (native shape = the truth's shape).
    truth
        The labels (original label values), lazily.
    label_values
        The model's label values (class ``c`` is ``label_values[c]``).
    ignore_label
        A truth value left out.
    samples
        Voxels to draw in all; each class present gets ``samples // classes present``.
    seed
        Seed of both draws.
    radius
        Context around each voxel (patches are ``2·radius + 1`` voxels a side).

    Raises
    ------
    VolumeValueError
        Unknown label values in the truth, or fewer than two classes labelled.
    """
    counts = class_counts(truth, grid, label_values, ignore_label, source=source, progress=progress)
    totals = counts.sum(axis=0)
    if int((totals > 0).sum()) < 2:
        raise VolumeValueError(f"{source}: labels {int(totals.sum())} voxels of "
                               f"{int((totals > 0).sum())} class(es); fitting a fusion needs at least two classes "
                               "labelled")
    quotas = allocate(counts, samples, seed)
    task = dask.delayed(_sample_block, pure=True)
    values = [int(v) for v in label_values]
    parts = [task(block, output, tuple(axes), grid, index, quotas[i], values, seed, radius)
             for i, (index, block) in enumerate(zip(grid.indices(), _blocks(truth, grid))) if quotas[i].any()]
    drawn = compute(*parts, progress=progress)
    log.info("sampled %d voxels (per class %s) from %d of %d blocks", int(quotas.sum()), quotas.sum(axis=0).tolist(),
             len(parts), len(quotas))
    return Samples(np.concatenate([p for p, _, _ in drawn]), np.concatenate([c for _, c, _ in drawn]),
                   np.concatenate([q for _, _, q in drawn]), totals)
