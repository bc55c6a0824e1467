"""The per-block tasks: the axes of one block, all axes of a block merged (fused), and the merge of a block.

A prediction task reads its block plus halo once, straight from the input (halo toward neighbouring
blocks only, the union of its axes' contexts), runs the slab function along each axis, writes each
axis's output chunk exactly once and drops a done-marker per axis; a rerun skips marked block-axes. A
merge task reads one block of each per-axis array and writes each merged output's chunk once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from ..errors import VolumeValueError
from ..grid import AXES, BlockGrid, Region
from ..memory import trim_memory
from ..outputs import open_for_writing, read_status
from .fusion import Fusion, fuse_block, grow, native_probabilities, pad_edge
from .reads import read_downsampled
from .upsample import region_reader, upsample_region
from .votes import merge_block

if TYPE_CHECKING:  # the slab function needs torch; merge tasks run without it
    from .inference import SlabSpec

log = logging.getLogger(__name__)

__all__ = ["DONE_DIR", "IN_FLIGHT", "block_context", "block_task", "done_marker", "fused_task", "merge_task",
           "predict_axes", "write_merged_block"]

DONE_DIR = ".volseg/done"

IN_FLIGHT = 3
"""Axes of one block queued on a device thread at once (all of them): the device computes the next axes while
the task writes the first (``benchmarks/bench_pipeline.py``: with 2 of 3 queued, the device waited for a task
to write before it got the third, and sat idle whenever both threads were reading)."""


def block_context(block: Region, shape: Sequence[int], halo: int, axis: int, half: int) -> list[tuple[int, int]]:
    """Voxels of context on each side of a block for one axis's planes.

    In-plane, ``halo`` toward neighbouring blocks (as much of it as the volume holds) and none at the
    volume's border, where a whole plane sees the edge exactly as a whole-volume prediction does (and
    no time goes into mirrored halo). Along the axis, ``half`` slices of 2.5D context, mirrored at the
    border.
    """
    return [(half, half) if d == axis else (min(halo, a), min(halo, n - b))
            for d, ((a, b), n) in enumerate(zip(block, shape))]


def read_block(volume: str, grid: BlockGrid, block: Region, pads: Sequence[tuple[int, int]]) -> np.ndarray:
    """``block`` of the network's grid plus ``pads`` of context, refused when it holds NaN or Inf."""
    start = [a - p for (a, _), (p, _) in zip(block, pads)]
    stop = [b + q for (_, b), (_, q) in zip(block, pads)]
    data = read_downsampled(volume, start, stop, grid.factor)
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        where = ", ".join(f"{a * grid.factor}:{b * grid.factor}" for a, b in block)
        raise VolumeValueError(f"{volume}: NaN or infinite values in the block [{where}]; replace them "
                               "(e.g. with the background value) and run again")
    return data


def done_marker(output: Path, run_key: str, name: str, index: Sequence[int]) -> Path:
    """The file that records block ``index`` of ``name`` as written by the run ``run_key``."""
    return output / DONE_DIR / run_key / name / ".".join(map(str, index))


def _still_ours(output: str, run_key: str) -> bool:
    """Whether ``output`` is still the unfinished output of the run ``run_key``, read just before a write.

    A task of an abandoned run (its client killed, its worker frozen and thawed) may outlive it; when the
    output was replaced since (``--overwrite``, a finished rerun), it must not write there.
    """
    record = read_status(Path(output))
    return record is not None and record.get("run_key") == run_key and record.get("complete") is False


def block_task(volume: str, output: str, axes: Sequence[str], index: tuple[int, ...], grid: BlockGrid,
               spec: SlabSpec, run_key: str) -> int:
    """Predict block ``index`` along each of ``axes`` not done before, from one read of the block and its
    context; write each axis's probability chunk and its done-marker. Returns the block-axes computed."""
    out = Path(output)
    todo = [a for a in axes if not done_marker(out, run_key, f"probabilities-{a}", index).exists()]
    if not todo:
        return 0
    block = grid.block(index)
    where = (slice(None), *(slice(a, b) for a, b in block))
    written = 0
    try:
        for axis, probs in predict_axes(volume, todo, block, grid, spec):
            if not _still_ours(output, run_key):
                log.warning("%s: no longer the output of run %s; block %s is not written", output, run_key, index)
                break
            open_for_writing(output, f"probabilities/{axis}")[where] = probs
            del probs
            _mark(done_marker(out, run_key, f"probabilities-{axis}", index))
            written += 1
    finally:
        trim_memory()
    return written


def _mark(marker: Path) -> None:
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()


def predict_axes(volume: str, axes: Sequence[str], block: Region, grid: BlockGrid, spec: SlabSpec, *,
                 extra: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    """``(axis, uint8 probabilities (C, ...))`` of ``block`` (network's grid) along each of ``axes``, in order,
    from one read of the block and the union of the axes' contexts.

    Every axis sees exactly the region (block plus its own context) a single-axis prediction reads for
    it. ``extra`` voxels around the block, where the volume has them, come back too: predicted from the
    same planes (their in-plane context) and, along the axis, from extra planes, so the block's own
    voxels stay exactly those of the block tasks. With a device thread, all axes are queued on the device
    at once and the caller writes each as it comes.
    """
    from .inference import pipelined, submit_block

    half = (spec.n_slices - 1) // 2
    out = grow(block, grid.shape, extra)
    reads = []  # per axis, the region it reads: the block's planes and context, covering `out`
    for axis in axes:
        context = block_context(block, grid.shape, grid.halo, AXES[axis], half)
        reads.append([(o0 - half, o1 + half) if d == AXES[axis] else (min(b0 - c0, o0), max(b1 + c1, o1))
                      for d, ((b0, b1), (o0, o1), (c0, c1)) in enumerate(zip(block, out, context))])
    lo = [min(r[d][0] for r in reads) for d in range(3)]
    hi = [max(r[d][1] for r in reads) for d in range(3)]
    data = read_block(volume, grid, block, [(b0 - a, b - b1) for (b0, b1), a, b in zip(block, lo, hi)])
    window = IN_FLIGHT if pipelined(spec) else 1
    pending: list[tuple[str, Any]] = []
    for axis, region in zip(axes, reads):
        sub = tuple(slice(a - start, b - start) for (a, b), start in zip(region, lo))
        crop = [(o0 - a, b - o1) for (a, b), (o0, o1) in zip(region, out)]
        pending.append((axis, submit_block(data[sub], axis, spec, crop)))
        if len(pending) >= window:
            done, future = pending.pop(0)
            yield done, future.result()
    del data
    for axis, future in pending:
        yield axis, future.result()


def fused_task(volume: str, output: str, axes: tuple[str, ...], index: tuple[int, ...], grid: BlockGrid,
               spec: SlabSpec, method: str, label_values: list[int], extras: tuple[str, ...],
               fusion: Fusion | None, run_key: str) -> int:
    """Predict block ``index`` along every axis, merge, and write its chunk of labels and ``extras``.

    A learned ``fusion`` with spatial context sees the block grown by its halo where the volume has
    it (predicted in the same task, from the block's own planes), then the fused block is cropped.
    """
    marker = done_marker(Path(output), run_key, "fused", index)
    if marker.exists():
        return 0
    native = grid.native_block(index)
    halo = fusion.halo if fusion is not None else 0
    axes = fusion.axes if fusion is not None else axes  # the fusion's order of axes (the same set, checked)
    grown = grow(native, grid.native_shape, halo)
    if grid.factor == 1:
        per_axis = [p for _, p in predict_axes(volume, axes, native, grid, spec, extra=halo)]
    else:  # the coarse voxels the native block's linear upsampling needs: its block and one more around it
        support = grid.upsample_support(index)
        coarse = [p for _, p in predict_axes(volume, axes, support, grid, spec, extra=halo)]
        origin = [a for a, _ in grow(support, grid.shape, halo)]
        per_axis = [upsample_region(region_reader(p, origin), grown, grid) for p in coarse]
        del coarse
    per_axis = [pad_edge(p, native, grown, halo) for p in per_axis]
    if not _still_ours(output, run_key):
        log.warning("%s: no longer the output of run %s; block %s is not written", output, run_key, index)
        return 0
    write_merged_block(output, per_axis, tuple(slice(a, b) for a, b in native), method=method,
                       label_values=label_values, outputs=extras, fusion=fusion)
    _mark(marker)
    return 1


def merge_task(output: str, axes: tuple[str, ...], index: tuple[int, ...], grid: BlockGrid, method: str,
               label_values: list[int], extras: tuple[str, ...], fusion: Fusion | None = None) -> int:
    """Merge block ``index``: read its per-axis probability chunks, write each merged output's chunk once.

    With a downsampling model the per-axis probabilities are coarse: the block's coarse voxels (and
    one more around them) are read and upsampled linearly to the native block first. A learned
    ``fusion`` with spatial context also reads its halo of voxels from the neighbouring blocks.
    """
    region = grid.native_block(index)
    arrays = [zarr.open_array(store=output, path=f"probabilities/{axis}", mode="r") for axis in axes]
    probs = native_probabilities(arrays, region, grid, fusion.halo if fusion is not None else 0)
    write_merged_block(output, probs, tuple(slice(a, b) for a, b in region), method=method,
                       label_values=label_values, outputs=extras, fusion=fusion)
    return 1


def write_merged_block(output: str, probs: list[np.ndarray], where: tuple[slice, ...], *, method: str,
                       label_values: Sequence[int], outputs: tuple[str, ...], fusion: Fusion | None = None) -> None:
    """Merge one block's per-axis probabilities and write its chunk of ``labels`` and each output once.

    ``probs`` (with ``fusion.halo`` voxels of context when a learned ``fusion`` is given) is emptied, so
    the per-axis arrays are freed before the merged rows are written.
    """
    if fusion is not None:
        merged = fuse_block(probs, fusion, label_values=label_values, outputs=outputs)
    else:
        merged = merge_block(*probs, method=method, label_values=label_values, outputs=outputs)
    probs.clear()
    for i, name in enumerate(("labels", *outputs)):
        open_for_writing(output, f"{name}/0")[where] = merged[i]
    del merged
    trim_memory()
