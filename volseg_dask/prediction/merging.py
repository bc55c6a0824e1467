"""``merge``: the per-axis probabilities of a prediction voted (or fused) into labels and extras, block by block.

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
from ..errors import (
    IncompleteOutputError,
    ModelFileError,
    VolsegError,
    VolumeFormatError,
    VolumeNotFoundError,
    WriteFailedError,
)
from ..grid import BlockGrid
from ..labels import label_dtype
from ..ngff import create_multiscale, finish_multiscale
from ..outputs import OutputLock, provenance, require_complete, set_status, status
from .fusion import LEARNED, Fusion, check_fusion, prediction_network
from .tasks import merge_task
from .votes import METHODS

log = logging.getLogger(__name__)

__all__ = ["load_fusion", "merge", "open_prediction", "write_merged"]


def merge(
    output: str | os.PathLike[str],
    *,
    method: str | None = None,
    outputs: Sequence[str] | None = None,
    keep_probabilities: bool = True,
    model: str | os.PathLike[str] | None = None,
    progress: bool | str = False,
) -> Path:
    """Merge the per-axis probabilities of a prediction output into ``labels`` (and extras).

    Parameters
    ----------
    output
        A prediction output folder (``OUT.zarr``) whose ``probabilities/{z,y,x}`` are complete.
    method
        ``max``, ``mean``, ``vote`` or ``learned`` (the fusion of a model file,
        :mod:`~volseg_dask.prediction.fusion`); default: the one recorded by ``predict``.
    outputs
        Extra arrays to write (``confidence``, ``entropy``, ``disagreement``); default: as recorded.
    keep_probabilities
        Delete the per-axis arrays after a successful merge when False.
    model
        For ``learned``: the model file whose fusion to apply (made by ``volseg fuse fit`` for the
        network that predicted ``output``); default: the one a learned merge of ``output`` used
        before, else the model file that predicted it.
    progress
        ``True``: a progress bar; ``"lines"``: a line per ~5 % of the blocks (batch jobs).

    Returns
    -------
    pathlib.Path
        The output folder; labels at ``OUT.zarr/labels``.

    Raises
    ------
    ModelFileError
        ``learned`` with a model file without fusion parameters, or one fitted for another network.
    """
    out = Path(output)
    _require_prediction_folder(out)
    with OutputLock(out):
        group, info, axes, grid = open_prediction(out)
        method = method or info.get("merge", "max")
        if method not in (*METHODS, LEARNED):
            raise VolsegError(f"merge: method must be one of {', '.join((*METHODS, LEARNED))}, not {method!r}")
        extras = tuple(info.get("outputs", ()) if outputs is None else outputs)
        fusion, recorded = None, {}
        if method == LEARNED:
            fusion_model = Path(model if model is not None else info.get("fusion_model") or info.get("model", ""))
            fusion = load_fusion(fusion_model, info, out, axes=axes)
            recorded = {"fusion_model": str(fusion_model), "fusion_kind": fusion.kind}
        try:
            write_merged(group, out, axes, grid, method=method, label_values=info["label_values"], extras=extras,
                         attrs={"merge": method, "axes": list(axes), **recorded}, voxel_size=info.get("voxel_size"),
                         progress=progress, fusion=fusion)
        except OSError as exc:
            if isinstance(exc, VolsegError):
                raise
            raise WriteFailedError(f"{out}: writing the merged outputs failed ({exc.strerror or exc}); they stay "
                                   "marked incomplete and the per-axis probabilities are untouched: fix the cause "
                                   "(e.g. free disk space) and run `volseg merge` again") from exc
        set_status(group, merge=method, outputs=list(extras), **recorded)
        if not keep_probabilities:
            shutil.rmtree(out / "probabilities", ignore_errors=True)
            set_status(group, probabilities_deleted=True)
    return out


def open_prediction(out: Path) -> tuple[zarr.Group, dict[str, Any], list[str], BlockGrid]:
    """A prediction output's group, status, predicted axes and block grid, refused unless its per-axis
    probabilities are all there and complete.

    Raises
    ------
    VolumeNotFoundError, VolumeFormatError
        Not a prediction output.
    IncompleteOutputError
        The per-axis probabilities are missing (a fused or deleted prediction) or unfinished.
    """
    _require_prediction_folder(out)
    group = zarr.open(store=str(out), mode="r+")
    info = (status(group) or {}) if isinstance(group, zarr.Group) else {}
    if not isinstance(group, zarr.Group) or info.get("kind") != "prediction":
        raise VolumeFormatError(f"{out}: holds no per-axis probabilities (not a prediction output); give the "
                                "folder `volseg predict` wrote")
    axes = info.get("axes_done") or info.get("axes")
    if not axes or "probabilities" not in group:
        raise IncompleteOutputError(f"{out}: holds no per-axis probabilities (fused outputs have labels only, and "
                                    "--no-keep-probabilities deletes them); rerun `volseg predict` without "
                                    "--fused, keeping the probabilities")
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
    return group, info, list(axes), grid


def _require_prediction_folder(out: Path) -> None:
    if not (out / "zarr.json").exists():
        raise VolumeNotFoundError(f"{out}: not a prediction output (no zarr.json); run `volseg predict` first")


def load_fusion(model: Path, info: dict[str, Any], out: Path, *, axes: Sequence[str]) -> Fusion:
    """The fusion of the model file ``model``, checked against the prediction ``out`` (status ``info``)
    before any work: it must exist, fit the prediction's axes and classes, and belong to the network that
    made the per-axis probabilities.

    Raises
    ------
    ModelFileError
        No fusion parameters, or fitted for another network than the prediction's.
    """
    from ..models import read_model_file  # torch: only the learned merge reads a model file

    _, meta = read_model_file(model)
    fusion = check_fusion(meta.fusion, model, axes=axes, classes=len(info["label_values"]))
    made_by = prediction_network(info)
    if made_by != fusion.network_sha256:
        raise ModelFileError(f"{model}: its fusion was fitted for another network (sha256 "
                             f"{fusion.network_sha256[:12]}) than the one that predicted {out} ({str(made_by)[:12]}); "
                             "give the fused model file of that network, or predict again with this one")
    if list(meta.label_values) != [int(v) for v in info["label_values"]]:
        raise ModelFileError(f"{model}: label values {list(meta.label_values)} differ from those of {out} "
                             f"({info['label_values']}); give the model file of that prediction")
    return fusion


def write_merged(group: zarr.Group, output: str | os.PathLike[str], axes: Sequence[str], grid: BlockGrid, *,
                 method: str, label_values: Sequence[int], extras: Sequence[str], attrs: dict[str, Any],
                 voxel_size: Sequence[float] | None = None, progress: bool | str = False,
                 fusion: Fusion | None = None) -> None:
    """Merge the complete per-axis probabilities of ``output`` into OME-Zarr multiscales (labels and extras).

    The outputs have ``grid``'s native shape and chunks; with a downsampling model the probabilities
    are on its coarse grid and are upsampled block by block. ``method`` ``learned`` applies ``fusion``
    (required then), reading the per-axis arrays in the fusion's order of axes.
    """
    if method == LEARNED:
        if fusion is None:
            raise ValueError("write_merged: method 'learned' needs the fusion parameters")
        axes = check_fusion(fusion, output, axes=axes, classes=len(label_values)).axes
    else:
        fusion = None
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
    tasks = [task(path, tuple(axes), index, grid, method, values, tuple(extras), fusion,
                  dask_key_name=f"merge-{'.'.join(map(str, index))}") for index in grid.indices()]
    compute(*tasks, progress=progress, label="merge")
    for name in names:
        finish_multiscale(group, name, voxel_size=voxel_size, progress=progress is True)
