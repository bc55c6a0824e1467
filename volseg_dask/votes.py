"""Votes across axes (and test-time variants), blockwise.

Methods, per voxel:

``max``  (default, as Volume Segmantics) the class of the single highest probability over all axes;
         the merged probability vector is that axis's vector.
``mean`` the soft vote: argmax of the mean probability vector.
``vote`` the majority of the per-axis labels; ties go to the highest mean probability.

Besides labels, a merge can write a confidence (merged probability of the chosen class), the
normalised entropy of the merged probability vector, and the number of axes that disagree with the
merged label. All are uint8 and computed in one blockwise pass over the per-axis probability arrays,
which share the labels' chunk grid.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

from . import store
from .errors import IncompleteOutputError, VolsegError, VolumeFormatError, VolumeNotFoundError
from .progress import compute

log = logging.getLogger(__name__)

__all__ = ["EXTRA_OUTPUTS", "METHODS", "combine", "merge", "merge_block"]

METHODS = ("max", "mean", "vote")
EXTRA_OUTPUTS = ("confidence", "entropy", "disagreement")


def combine(probs: Sequence[np.ndarray], method: str = "max", class_axis: int = 0) -> np.ndarray:
    """Combine probability arrays of the same shape into one (``max`` or ``mean``)."""
    stack = np.stack([np.asarray(p, dtype=np.float32) for p in probs])
    if method == "mean":
        return stack.mean(axis=0)
    if method != "max":
        raise ValueError(f"combine: method must be 'max' or 'mean', not {method!r}")
    ca = class_axis + 1
    best = stack.max(axis=ca, keepdims=True).argmax(axis=0)  # variant with the highest top probability
    return np.take_along_axis(stack, best[None], axis=0)[0]


def merge_block(*probs: np.ndarray, method: str, label_values: Sequence[int],
                outputs: Sequence[str] = ()) -> np.ndarray:
    """Merge per-axis uint8 probabilities ``(C, z, y, x)`` into ``(1 + len(outputs), z, y, x)``.

    Row 0 holds the labels (original label values), the next rows the requested ``outputs``
    (``confidence``, ``entropy``, ``disagreement``) as uint8. The dtype is that of the labels.
    """
    stack = np.stack(probs)  # (A, C, z, y, x) uint8
    _n_axes, n_classes = stack.shape[:2]
    per_axis = stack.argmax(axis=1)  # (A, z, y, x)
    if method == "max":
        top = stack.max(axis=1)
        best = top.argmax(axis=0)[None]  # the axis with the most confident prediction
        classes = np.take_along_axis(per_axis, best, axis=0)[0]
        merged = np.take_along_axis(stack, best[:, None], axis=0)[0].astype(np.float32)  # (C, z, y, x)
    elif method == "mean":
        merged = stack.mean(axis=0, dtype=np.float32)
        classes = merged.argmax(axis=0)
    elif method == "vote":
        merged = stack.mean(axis=0, dtype=np.float32)
        counts = np.stack([(per_axis == c).sum(axis=0) for c in range(n_classes)])  # (C, z, y, x)
        # most votes; among tied classes the highest mean probability (< 256 keeps the order of counts)
        classes = (counts.astype(np.float32) * 256.0 + merged).argmax(axis=0)
    else:
        raise ValueError(f"merge: method must be one of {', '.join(METHODS)}, not {method!r}")
    lut = np.asarray(label_values)
    dtype = np.uint8 if lut.max(initial=0) <= 255 else np.uint16
    out = np.empty((1 + len(outputs), *classes.shape), dtype=dtype)
    out[0] = lut[classes]
    for i, name in enumerate(outputs, start=1):
        if name == "confidence":
            out[i] = np.rint(np.take_along_axis(merged, classes[None], axis=0)[0])
        elif name == "entropy":
            p = merged / 255.0
            p = p / np.maximum(p.sum(axis=0, keepdims=True), 1e-12)
            with np.errstate(divide="ignore", invalid="ignore"):
                h = -(np.where(p > 0, p * np.log(p), 0.0)).sum(axis=0)
            out[i] = np.rint(np.clip(h / np.log(max(n_classes, 2)), 0, 1) * 255.0)
        elif name == "disagreement":
            out[i] = (per_axis != classes[None]).sum(axis=0)
        else:
            raise ValueError(f"merge: unknown output {name!r}; choose from {', '.join(EXTRA_OUTPUTS)}")
    return out


def merged_arrays(probs: Sequence[da.Array], *, method: str, label_values: Sequence[int],
                  outputs: Sequence[str] = ()) -> da.Array:
    """Lazy blockwise merge of per-axis probability dask arrays (identical chunks, class axis whole)."""
    first = probs[0]
    for p in probs[1:]:
        if p.shape != first.shape or p.chunks != first.chunks:
            raise VolsegError(f"merge: per-axis arrays differ in shape or chunks ({p.shape} vs {first.shape})")
    dtype = np.uint8 if max(label_values, default=0) <= 255 else np.uint16
    return da.map_blocks(
        merge_block, *probs, method=method, label_values=list(label_values), outputs=tuple(outputs),
        chunks=((1 + len(outputs),), *first.chunks[1:]), dtype=dtype,
        meta=np.empty((0, 0, 0, 0), dtype=dtype),
    )


def merge(
    output: str | os.PathLike[str],
    *,
    method: str | None = None,
    outputs: Sequence[str] | None = None,
    keep_probabilities: bool = True,
    progress: bool = False,
) -> Path:
    """Merge the per-axis probabilities of a prediction output into ``labels`` (and extras).

    Parameters
    ----------
    output
        A prediction output folder (``OUT.zarr``) whose ``probabilities/{z,y,x}`` are complete.
    method
        ``max``, ``mean`` or ``vote``; default: the one recorded by ``predict``.
    outputs
        Extra arrays to write (``confidence``, ``entropy``, ``disagreement``); default: as recorded.
    keep_probabilities
        Delete the per-axis arrays after a successful merge when False.
    progress
        Show a progress bar.

    Returns
    -------
    pathlib.Path
        The output folder; labels at ``OUT.zarr/labels``.
    """
    out = Path(output)
    if not (out / "zarr.json").exists():
        raise VolumeNotFoundError(f"{out}: not a prediction output (no zarr.json); run `volseg predict` first")
    with store.OutputLock(out):
        group = zarr.open(store=str(out), mode="r+")
        info = (store.status(group) or {}) if isinstance(group, zarr.Group) else {}
        if not isinstance(group, zarr.Group) or info.get("kind") != "prediction":
            raise VolumeFormatError(f"{out}: holds no per-axis probabilities (not a prediction output); give the "
                                    "folder `volseg predict` wrote")
        axes = info.get("axes_done") or info.get("axes")
        if not axes or "probabilities" not in group:
            raise IncompleteOutputError(f"{out}: holds no per-axis probabilities to merge (fused outputs have "
                                        "labels only); rerun `volseg predict` without --fused")
        method = method or info.get("merge", "max")
        if method not in METHODS:
            raise VolsegError(f"merge: method must be one of {', '.join(METHODS)}, not {method!r}")
        outputs = tuple(info.get("outputs", ()) if outputs is None else outputs)
        arrays = []
        for axis in axes:
            node = group.get(f"probabilities/{axis}")
            if node is None:
                raise IncompleteOutputError(f"{out}: probabilities/{axis} is missing; rerun `volseg predict` with "
                                            "the same settings to finish it")
            store.require_complete(node, out / "probabilities" / axis)
            arrays.append(da.from_zarr(node))
        write_merged(group, arrays, method=method, label_values=info["label_values"], outputs=outputs,
                     attrs={"merge": method, "axes": list(axes)}, voxel_size=info.get("voxel_size"),
                     progress=progress)
        store.set_status(group, merge=method, outputs=list(outputs))
        if not keep_probabilities:
            import shutil

            shutil.rmtree(out / "probabilities", ignore_errors=True)
            store.set_status(group, probabilities_deleted=True)
    return out


def write_merged(group: zarr.Group, probs: Sequence[da.Array], *, method: str, label_values: Sequence[int],
                 outputs: Sequence[str], attrs: dict[str, Any], voxel_size: Sequence[float] | None = None,
                 progress: bool = False) -> None:
    """Compute the merge blockwise into ``group`` as OME-Zarr multiscales (labels and extras)."""
    from .ngff import create_multiscale, finish_multiscale

    stacked = merged_arrays(probs, method=method, label_values=label_values, outputs=outputs)
    shape, chunks = stacked.shape[1:], tuple(c[0] for c in stacked.chunks[1:])
    names = ("labels", *outputs)
    targets = [create_multiscale(group, name, shape=shape, dtype=stacked.dtype if name == "labels" else np.uint8,
                                 chunks=chunks, attrs=store.provenance(kind=name, **attrs), replace=True)
               for name in names]
    sources = [stacked[i] if i == 0 else stacked[i].astype(np.uint8) for i in range(len(targets))]
    compute(da.store(sources, targets, lock=False, compute=False), progress=progress)  # type: ignore[arg-type]
    for name in names:
        finish_multiscale(group, name, voxel_size=voxel_size, progress=progress)
