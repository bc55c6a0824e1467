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
from .memory import trim_memory
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


#: voxels merged at a time inside a block: the temporaries (a few bytes per voxel each) stay in the
#: CPU cache and a task holds little beyond its inputs and output, whatever the block size
SLAB_VOXELS = 1 << 17


def merge_block(*probs: np.ndarray, method: str, label_values: Sequence[int],
                outputs: Sequence[str] = ()) -> np.ndarray:
    """Merge per-axis uint8 probabilities ``(C, z, y, x)`` into ``(1 + len(outputs), z, y, x)``.

    Row 0 holds the labels (original label values), the next rows the requested ``outputs``
    (``confidence``, ``entropy``, ``disagreement``) as uint8. The dtype is that of the labels.

    The block is merged in slabs of about :data:`SLAB_VOXELS` voxels along its first spatial axis with
    elementwise uint8 operations (ties go to the first class and the first axis, as ``argmax``), so
    the temporaries are a few bytes per slab voxel, not tens of bytes per block voxel.
    """
    if method not in METHODS:
        raise ValueError(f"merge: method must be one of {', '.join(METHODS)}, not {method!r}")
    for name in outputs:
        if name not in EXTRA_OUTPUTS:
            raise ValueError(f"merge: unknown output {name!r}; choose from {', '.join(EXTRA_OUTPUTS)}")
    arrays = [np.asarray(p) for p in probs]
    first = arrays[0]
    for p in arrays[1:]:
        if p.shape != first.shape:
            raise ValueError(f"merge: per-axis blocks differ in shape ({p.shape} vs {first.shape})")
    lut = np.asarray(label_values)
    dtype = np.uint8 if lut.max(initial=0) <= 255 else np.uint16
    out = np.empty((1 + len(outputs), *first.shape[1:]), dtype=dtype)
    if first.ndim < 2 or first.shape[1] == 0:
        return out
    plane = max(1, int(np.prod(first.shape[2:])))
    step = max(1, SLAB_VOXELS // plane)
    for start in range(0, first.shape[1], step):
        part = slice(start, start + step)
        _merge_slab([p[:, part] for p in arrays], method, lut, tuple(outputs), out[:, part])
    return out


def _maximum(arrays: Sequence[np.ndarray]) -> np.ndarray:
    top = arrays[0].copy()
    for a in arrays[1:]:
        np.maximum(top, a, out=top)
    return top


def _first_index(arrays: Sequence[np.ndarray], top: np.ndarray, values: Sequence[int] | None = None) -> np.ndarray:
    """Per voxel, ``values[i]`` (default ``i``) of the first ``i`` with ``arrays[i] == top``: ``argmax``'s
    tie rule when ``top`` is their maximum.

    Branch-free: each array votes ``((n - i) << bits) | values[i]`` where it equals ``top`` and the
    largest vote wins (masked copies are many times slower on scattered masks).
    """
    n = len(arrays)
    values = list(range(n)) if values is None else [int(v) for v in values]
    bits = max(1, max(values).bit_length())
    total = bits + n.bit_length()
    dtype = np.uint8 if total <= 8 else np.uint16 if total <= 16 else np.uint32
    code = np.zeros(top.shape, dtype)
    term = np.empty(top.shape, dtype)
    equal = np.empty(top.shape, bool)
    for i, a in enumerate(arrays):
        np.equal(a, top, out=equal)
        np.multiply(equal, dtype((n - i) << bits | values[i]), out=term)
        np.maximum(code, term, out=code)
    code &= (1 << bits) - 1
    return code.astype(np.uint8 if bits <= 8 else np.uint16, copy=False)


def _pick(index: np.ndarray, arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Per voxel, ``arrays[index]`` (exact: one term of the sum is not zero)."""
    picked = np.zeros_like(arrays[0])
    equal = np.empty(index.shape, bool)
    for i, a in enumerate(arrays):
        np.equal(index, i, out=equal)
        picked += equal * a
    return picked


def _merge_slab(probs: Sequence[np.ndarray], method: str, lut: np.ndarray, outputs: tuple[str, ...],
                out: np.ndarray) -> None:
    """:func:`merge_block` on one slab; writes into ``out`` (``(1 + len(outputs), ...)``)."""
    n_axes, n_classes = len(probs), probs[0].shape[0]
    shape = probs[0].shape[1:]
    per_axis = [_first_index(list(p), _maximum(list(p))) for p in probs] \
        if method == "vote" or "disagreement" in outputs else []
    merged: list[np.ndarray] = []  # the merged probability vector, float32 per class, when needed
    if method == "max":
        # the single highest probability over all axes; its class is that of the first (axis, class) holding it,
        # i.e. argmax within the first axis whose top probability is the highest
        flat = [p[c] for p in probs for c in range(n_classes)]
        confidence = _maximum(flat)
        classes = _first_index(flat, confidence, [c for _ in probs for c in range(n_classes)])
        if "entropy" in outputs:
            axis = _first_index(flat, confidence, [a for a in range(n_axes) for _ in range(n_classes)])
            merged = [_pick(axis, [p[c] for p in probs]).astype(np.float32) for c in range(n_classes)]
    else:
        zero = np.zeros(shape, np.uint16 if n_axes <= 257 else np.uint32)
        sums = [sum((p[c] for p in probs), zero) for c in range(n_classes)]  # exact integers
        # the mean as numpy computes it: float32 sum of integers (exact), divided by the count in float32
        if method == "vote" or "entropy" in outputs:
            merged = [s.astype(np.float32) / n_axes for s in sums]
        if method == "mean":  # integer sums have the float means' order and ties
            top = _maximum(sums)
            classes = _first_index(sums, top)
            confidence = np.rint(top.astype(np.float32) / n_axes)
        else:  # vote: most votes; among tied classes the highest mean probability (< 256 keeps the vote order)
            counts = [sum((a == c for a in per_axis), np.zeros(shape, np.uint16)) for c in range(n_classes)]
            keys = [n.astype(np.float32) * 256.0 + m for n, m in zip(counts, merged)]
            classes = _first_index(keys, _maximum(keys))
            confidence = np.rint(_pick(classes, merged))
    out[0] = classes if np.array_equal(lut, np.arange(n_classes)) else lut[classes]
    for i, name in enumerate(outputs, start=1):
        if name == "confidence":
            out[i] = confidence
        elif name == "entropy":
            p = np.stack(merged) / 255.0
            p = p / np.maximum(p.sum(axis=0, keepdims=True), 1e-12)
            with np.errstate(divide="ignore", invalid="ignore"):
                h = -(np.where(p > 0, p * np.log(p), 0.0)).sum(axis=0)
            out[i] = np.rint(np.clip(h / np.log(max(n_classes, 2)), 0, 1) * 255.0)
        else:  # disagreement: axes whose label differs from the merged one
            out[i] = sum((a != classes for a in per_axis), np.zeros(shape, np.uint16))


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
        for axis in axes:
            node = group.get(f"probabilities/{axis}")
            if node is None:
                raise IncompleteOutputError(f"{out}: probabilities/{axis} is missing; rerun `volseg predict` with "
                                            "the same settings to finish it")
            store.require_complete(node, out / "probabilities" / axis)
        write_merged(group, out, axes, method=method, label_values=info["label_values"], outputs=outputs,
                     attrs={"merge": method, "axes": list(axes)}, voxel_size=info.get("voxel_size"),
                     progress=progress, factor=int(info.get("downsample", 1)), shape=info.get("shape"),
                     chunks=info.get("chunks"))
        store.set_status(group, merge=method, outputs=list(outputs))
        if not keep_probabilities:
            import shutil

            shutil.rmtree(out / "probabilities", ignore_errors=True)
            store.set_status(group, probabilities_deleted=True)
    return out


def _merge_task(output: str, axes: tuple[str, ...], region: tuple[tuple[int, int], ...], method: str,
                label_values: list[int], outputs: tuple[str, ...], factor: int = 1) -> int:
    """Merge one block: read its per-axis probability chunks, write each merged output's chunk once.

    With a downsampling model the per-axis probabilities are coarse: the block's coarse voxels (and
    one more around them) are read and upsampled linearly to the native ``region`` first.
    """
    from .resample import region_reader, upsample_region

    where = tuple(slice(a, b) for a, b in region)
    arrays = [zarr.open_array(store=output, path=f"probabilities/{axis}", mode="r") for axis in axes]
    if factor == 1:
        probs = [np.asarray(a[(slice(None), *where)]) for a in arrays]
    else:
        probs = [upsample_region(region_reader(a), region, factor, a.shape[1:]) for a in arrays]
    write_merged_block(output, probs, where, method=method, label_values=label_values, outputs=outputs)
    return 1


def write_merged_block(output: str, probs: list[np.ndarray], where: tuple[slice, ...], *, method: str,
                       label_values: Sequence[int], outputs: tuple[str, ...]) -> None:
    """Merge one block's per-axis probabilities and write its chunk of ``labels`` and each output once.

    ``probs`` is emptied, so the per-axis arrays are freed before the merged rows are written.
    """
    merged = merge_block(*probs, method=method, label_values=label_values, outputs=outputs)
    probs.clear()
    for i, name in enumerate(("labels", *outputs)):
        store.open_for_writing(output, f"{name}/0")[where] = merged[i]
    del merged
    trim_memory()


def write_merged(group: zarr.Group, output: str | os.PathLike[str], axes: Sequence[str], *, method: str,
                 label_values: Sequence[int], outputs: Sequence[str], attrs: dict[str, Any],
                 voxel_size: Sequence[float] | None = None, progress: bool = False, factor: int = 1,
                 shape: Sequence[int] | None = None, chunks: Sequence[int] | None = None) -> None:
    """Merge the complete per-axis probabilities of ``output`` into OME-Zarr multiscales (labels and extras).

    ``shape`` and ``chunks`` are those of the outputs (default: the probabilities'); with ``factor`` > 1
    (a downsampling model) the probabilities are on the coarse grid and are upsampled block by block.

    One task per block reads that block's per-axis chunks straight from the store, merges them and
    writes each output chunk once, so a worker thread holds one block's inputs and outputs, whatever
    the volume (a ``from_zarr``/``store`` graph let the scheduler read ahead: 2.2x the peak memory at
    768³ than at 256³, ``benchmarks/bench_merge.py``).
    """
    import dask

    from .ngff import create_multiscale, finish_multiscale

    first, *others = (group[f"probabilities/{axis}"] for axis in axes)
    assert isinstance(first, zarr.Array)
    for axis, other in zip(axes[1:], others):
        if not isinstance(other, zarr.Array) or other.shape != first.shape or other.chunks != first.chunks:
            raise VolsegError(f"{output}: probabilities/{axis} differs from probabilities/{axes[0]} in shape or "
                              f"chunks ({getattr(other, 'shape', None)} vs {first.shape}); rerun `volseg predict`")
    shape = tuple(int(s) for s in (shape if shape is not None else first.shape[1:]))
    chunks = tuple(int(c) for c in (chunks if chunks is not None else first.chunks[1:]))
    dtype = np.uint8 if max(label_values, default=0) <= 255 else np.uint16
    names = ("labels", *outputs)
    for name in names:
        create_multiscale(group, name, shape=shape, dtype=dtype if name == "labels" else np.uint8, chunks=chunks,
                          attrs=store.provenance(kind=name, **attrs), replace=True)
    task = dask.delayed(_merge_task, pure=False)
    path, spec = os.fspath(output), (tuple(axes), method, [int(v) for v in label_values], tuple(outputs), factor)
    tasks = []
    for index in store.chunk_grid(shape, chunks):
        region = store.chunk_region(index, shape, chunks)
        tasks.append(task(path, spec[0], region, *spec[1:], dask_key_name=f"merge-{'.'.join(map(str, index))}"))
    compute(*tasks, progress=progress)
    for name in names:
        finish_multiscale(group, name, voxel_size=voxel_size, progress=progress)
