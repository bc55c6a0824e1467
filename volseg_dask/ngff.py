"""Viewer-ready outputs: OME-Zarr (NGFF 0.5) multiscale pyramids of the merged results.

Each merged output (``labels``, ``confidence``, ...) is a multiscale group: level ``0`` at full
resolution, then levels halved along every axis until the smallest side is below
``min_size``. Labels are downsampled by the mode of each 2×2×2 cube (ties: the first voxel, i.e.
stride), continuous maps by the mean. The group carries NGFF ``multiscales`` metadata (axes,
per-level scale from the voxel size when the input had one) and, for labels, ``image-label``, so
napari (napari-ome-zarr), neuroglancer and ``ome-zarr`` open it directly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr

from . import outputs
from .cluster import compute
from .errors import VolsegError
from .grid import chunk_grid, chunk_region
from .memory import trim_memory
from .resample import mean_2x2x2, mode_2x2x2

log = logging.getLogger(__name__)

__all__ = ["NGFF_VERSION", "create_multiscale", "finish_multiscale", "multiscales_metadata", "write_pyramid"]

NGFF_VERSION = "0.5"
#: Blosc codec of every level: merged maps are written once per block on the merge's critical path, where
#: lz4 writes several times faster than zstd (``benchmarks/README.md``, merge)
CODEC = ("lz4", 5)


#: smallest chunk edge of a pyramid level (below it, one task reduces several chunks of the level above)
MIN_CHUNK = 64


def multiscales_metadata(name: str, levels: int, voxel_size: Sequence[float] | None, *,
                         labels: bool) -> dict[str, Any]:
    """The ``ome`` attribute of an NGFF 0.5 multiscale group with ``levels`` levels halving each axis."""
    base = list(voxel_size) if voxel_size else [1.0, 1.0, 1.0]
    unit = {"unit": "micrometer"} if voxel_size else {}
    ome: dict[str, Any] = {
        "version": NGFF_VERSION,
        "multiscales": [{
            "name": name,
            "axes": [{"name": a, "type": "space", **unit} for a in "zyx"],
            "datasets": [
                {"path": str(k), "coordinateTransformations": [
                    {"type": "scale", "scale": [s * 2**k for s in base]},
                    {"type": "translation", "translation": [s * (2**k - 1) / 2 for s in base]},
                ]}
                for k in range(levels)
            ],
            "type": "mode" if labels else "mean",
        }],
    }
    if labels:
        ome["image-label"] = {"version": NGFF_VERSION}
    return ome


def _pyramid_task(node_path: str, level: int, region: tuple[tuple[int, int], ...], labels: bool) -> int:
    """Write one chunk of level ``level + 1``: read its 2×2×2-times larger region of ``level``, reduce it."""
    src = zarr.open_array(store=node_path, path=str(level), mode="r")
    block = np.asarray(src[tuple(slice(2 * a, 2 * b) for a, b in region)])
    cubes = block.reshape(block.shape[0] // 2, 2, block.shape[1] // 2, 2, block.shape[2] // 2, 2)
    small = (mode_2x2x2 if labels else mean_2x2x2)(cubes)
    outputs.open_for_writing(node_path, str(level + 1))[tuple(slice(a, b) for a, b in region)] = small
    del block, cubes, small
    trim_memory()
    return 1


def write_pyramid(group: zarr.Group, name: str, *, labels: bool, voxel_size: Sequence[float] | None = None,
                  min_size: int = 32, progress: bool = False) -> int:
    """Add the downsampled levels below ``group[name]/0`` and the NGFF metadata; return the level count.

    Level ``k + 1`` has chunks half the size of level ``k``'s (at least ``MIN_CHUNK``), so each of its
    chunks is made by one task from one chunk of level ``k`` (a few, once they are small), read
    straight from the store (an odd last voxel is dropped): a thread holds about one chunk, whatever
    the volume, and every output chunk is written once.
    """
    import dask

    node = group[name]
    assert isinstance(node, zarr.Group)
    level0 = node["0"]
    assert isinstance(level0, zarr.Array)
    chunks = tuple(level0.chunks)
    root = getattr(group.store_path.store, "root", None)
    if root is None:
        raise VolsegError(f"{name}: multiscale outputs are written to a folder (a local Zarr store) only")
    node_path = os.path.join(str(root), group.path, name)
    task = dask.delayed(_pyramid_task, pure=False)
    level, shape = 0, tuple(level0.shape)
    while min(shape) // 2 >= min_size:
        shape = tuple(s // 2 for s in shape)
        chunks = tuple(max(MIN_CHUNK, c // 2) for c in chunks)
        target_chunks = tuple(min(c, s) for c, s in zip(chunks, shape))
        target = outputs.create_array(node, name=str(level + 1), shape=shape, dtype=level0.dtype, chunks=target_chunks,
                                    codec=CODEC[0], clevel=CODEC[1], dimension_names=("z", "y", "x"),
                                    attrs={"kind": f"{name} level {level + 1}"})
        tasks = [task(node_path, level, chunk_region(index, shape, target_chunks), labels,
                      dask_key_name=f"pyramid-{name}-{level + 1}-{'.'.join(map(str, index))}")
                 for index in chunk_grid(shape, target_chunks)]
        compute(*tasks, progress=progress)
        outputs.mark_complete(target)
        level += 1
    node.attrs["ome"] = multiscales_metadata(name, level + 1, voxel_size, labels=labels)
    log.info("%s: %d pyramid level(s) below level 0", name, level)
    return level + 1


def create_multiscale(group: zarr.Group, name: str, *, shape: Sequence[int], dtype: Any, chunks: Sequence[int],
                      attrs: dict[str, Any], replace: bool = False) -> zarr.Array:
    """Create (or reopen) the multiscale group ``name`` and its level ``0`` array, marked incomplete."""
    if name in group and replace:
        del group[name]
    if name in group:
        return group[f"{name}/0"]  # type: ignore[return-value]
    node = group.create_group(name)
    outputs.set_status(node, **attrs, complete=False)
    return outputs.create_array(node, name="0", shape=shape, dtype=dtype, chunks=chunks, codec=CODEC[0],
                              clevel=CODEC[1], dimension_names=("z", "y", "x"), attrs=attrs)


def finish_multiscale(group: zarr.Group, name: str, *, voxel_size: Sequence[float] | None = None,
                      progress: bool = False) -> None:
    """Mark level 0 complete, build the pyramid and its metadata, then mark the group complete."""
    node = group[name]
    assert isinstance(node, zarr.Group)
    outputs.mark_complete(node["0"])
    labels = name in ("labels", "disagreement")
    levels = write_pyramid(group, name, labels=labels, voxel_size=voxel_size, progress=progress)
    outputs.mark_complete(group[name], levels=levels)  # a fresh handle: `node` holds attributes from before "ome"
