"""``merge``: the per-axis probabilities of a prediction voted into labels (and extras), block by block.

One task per block reads that block's per-axis chunks straight from the store, merges them
(:mod:`~volseg_dask.prediction.votes`) and writes each output chunk once, so a worker thread holds one
block's inputs and outputs, whatever the volume (``benchmarks/bench_merge.py``).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask
import numpy as np
import zarr

from ..cluster import compute
from ..errors import IncompleteOutputError, VolsegError, VolumeFormatError, VolumeNotFoundError, WriteFailedError
from ..grid import BlockGrid
from ..labels import label_dtype
from ..ngff import create_multiscale, finish_multiscale
from ..outputs import OutputLock, provenance, require_complete, set_status, status
from .tasks import merge_task
from .votes import METHODS

log = logging.getLogger(__name__)

__all__ = ["merge", "write_merged"]


def merge(
    output: str | os.PathLike[str],
    *,
    method: str | None = None,
    outputs: Sequence[str] | None = None,
    keep_probabilities: bool = True,
    progress: bool | str = False,
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
        ``True``: a progress bar; ``"lines"``: a line per ~5 % of the blocks (batch jobs).

    Returns
    -------
    pathlib.Path
        The output folder; labels at ``OUT.zarr/labels``.
    """
    out = Path(output)
    if not (out / "zarr.json").exists():
        raise VolumeNotFoundError(f"{out}: not a prediction output (no zarr.json); run `volseg predict` first")
    with OutputLock(out):
        group = zarr.open(store=str(out), mode="r+")
        info = (status(group) or {}) if isinstance(group, zarr.Group) else {}
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
        extras = tuple(info.get("outputs", ()) if outputs is None else outputs)
        for axis in axes:
            node = group.get(f"probabilities/{axis}")
            if node is None:
                raise IncompleteOutputError(f"{out}: probabilities/{axis} is missing; rerun `volseg predict` with "
                                            "the same settings to finish it")
            require_complete(node, out / "probabilities" / axis)
        first = group[f"probabilities/{axes[0]}"]
        assert isinstance(first, zarr.Array)
        grid = BlockGrid(tuple(info.get("shape") or first.shape[1:]), tuple(info.get("chunks") or first.chunks[1:]),
                         int(info.get("downsample", 1)))
        try:
            write_merged(group, out, axes, grid, method=method, label_values=info["label_values"], extras=extras,
                         attrs={"merge": method, "axes": list(axes)}, voxel_size=info.get("voxel_size"),
                         progress=progress)
        except OSError as exc:
            if isinstance(exc, VolsegError):
                raise
            raise WriteFailedError(f"{out}: writing the merged outputs failed ({exc.strerror or exc}); they stay "
                                   "marked incomplete and the per-axis probabilities are untouched: fix the cause "
                                   "(e.g. free disk space) and run `volseg merge` again") from exc
        set_status(group, merge=method, outputs=list(extras))
        if not keep_probabilities:
            shutil.rmtree(out / "probabilities", ignore_errors=True)
            set_status(group, probabilities_deleted=True)
    return out


def write_merged(group: zarr.Group, output: str | os.PathLike[str], axes: Sequence[str], grid: BlockGrid, *,
                 method: str, label_values: Sequence[int], extras: Sequence[str], attrs: dict[str, Any],
                 voxel_size: Sequence[float] | None = None, progress: bool | str = False) -> None:
    """Merge the complete per-axis probabilities of ``output`` into OME-Zarr multiscales (labels and extras).

    The outputs have ``grid``'s native shape and chunks; with a downsampling model the probabilities
    are on its coarse grid and are upsampled block by block.
    """
    first, *others = (group[f"probabilities/{axis}"] for axis in axes)
    assert isinstance(first, zarr.Array)
    for axis, other in zip(axes[1:], others):
        if not isinstance(other, zarr.Array) or other.shape != first.shape or other.chunks != first.chunks:
            raise VolsegError(f"{output}: probabilities/{axis} differs from probabilities/{axes[0]} in shape or "
                              f"chunks ({getattr(other, 'shape', None)} vs {first.shape}); rerun `volseg predict`")
    names = ("labels", *extras)
    for name in names:
        create_multiscale(group, name, shape=grid.native_shape,
                          dtype=label_dtype(label_values) if name == "labels" else np.uint8,
                          chunks=grid.native_chunks, attrs=provenance(kind=name, **attrs), replace=True)
    task = dask.delayed(merge_task, pure=False)
    path, values = os.fspath(output), [int(v) for v in label_values]
    tasks = [task(path, tuple(axes), index, grid, method, values, tuple(extras),
                  dask_key_name=f"merge-{'.'.join(map(str, index))}") for index in grid.indices()]
    compute(*tasks, progress=progress, label="merge")
    for name in names:
        finish_multiscale(group, name, voxel_size=voxel_size, progress=progress is True)
