"""Resolution changes: N×N×N block means of volumes and linear upsampling of probabilities.

A model trained with ``data.downsample = N`` sees the volume averaged over N×N×N cubes (the
labels by their most frequent value). The coarse volume is defined once for the whole volume, so
every block read of it gives exactly what the whole coarsened volume holds there: cube ``c`` along
an axis covers native voxels ``N·c .. N·c + N - 1``, a last partial cube repeats the edge voxel, and
outside the volume the coarse voxels are mirrored (as :func:`volseg_dask.io.mirror_indices` does at
native resolution).

Probabilities predicted on the coarse grid come back to the native grid by separable linear
interpolation at voxel centres (native voxel ``i`` sits at coarse coordinate ``(i + 0.5) / N - 0.5``;
beyond the first and last coarse voxel the edge value is kept, as ``align_corners=False`` in torch).
Each native voxel depends only on its global position and the coarse values around it, so a
blockwise upsampling equals the whole-volume one whatever the blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["block_mean", "coarse_shape", "downsample_array", "lerp_weights", "native_indices", "region_reader",
           "upsample_region"]


def coarse_shape(shape: Sequence[int], factor: int) -> tuple[int, ...]:
    """Shape of a volume averaged over ``factor``-sided cubes (a partial last cube counts)."""
    return tuple(-(-int(s) // factor) for s in shape)


def native_indices(coarse: np.ndarray, factor: int, size: int) -> np.ndarray:
    """Native indices ``(len(coarse), factor)`` of the cubes ``coarse`` (the edge voxel repeats past ``size``)."""
    native = np.asarray(coarse)[:, None] * factor + np.arange(factor)[None, :]
    return np.minimum(native, size - 1)


def block_mean(x: np.ndarray, factor: int) -> np.ndarray:
    """float32 means of the ``factor``-sided cubes of ``x`` (each dimension a multiple of ``factor``)."""
    shape = [s // factor for s in x.shape]
    cubes = x.reshape(shape[0], factor, shape[1], factor, shape[2], factor)
    return cubes.mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)


def _block_mode(x: np.ndarray, factor: int) -> np.ndarray:
    shape = [s // factor for s in x.shape]
    cubes = x.reshape(shape[0], factor, shape[1], factor, shape[2], factor)
    if factor == 2 and x.dtype.kind in "ub" and x.dtype.itemsize <= 2:
        from .ngff import mode_2x2x2

        return mode_2x2x2(cubes, axis=(1, 3, 5))
    flat = cubes.transpose(0, 2, 4, 1, 3, 5).reshape(*shape, -1)
    counts = (flat[..., :, None] == flat[..., None, :]).sum(axis=-1)
    return np.take_along_axis(flat, counts.argmax(axis=-1)[..., None], axis=-1)[..., 0]


def downsample_array(arr: Any, factor: int, *, labels: bool = False) -> Any:
    """A lazy dask array of ``arr`` (dask or numpy) averaged over ``factor``-sided cubes.

    Images become float32 means; label volumes keep their dtype and take each cube's most frequent
    value (ties: the first voxel). The values equal those :func:`volseg_dask.io.read_downsampled`
    reads from a file.
    """
    import dask.array as da

    if factor == 1:
        return arr
    a = arr if isinstance(arr, da.Array) else da.from_array(arr, chunks=64)
    pad = [(0, (-int(s)) % factor) for s in a.shape]
    if any(p for _, p in pad):
        a = da.pad(a, pad, mode="edge")
    a = a.rechunk(tuple(max(factor, c - c % factor) for c in a.chunksize))
    reduce = _block_mode if labels else block_mean
    out_chunks = tuple(tuple(c // factor for c in axis) for axis in a.chunks)
    return a.map_blocks(reduce, factor, chunks=out_chunks, dtype=a.dtype if labels else np.float32)


def lerp_weights(start: int, stop: int, factor: int, coarse_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For native voxels ``start:stop``: the two coarse neighbours and the weight of the second."""
    u = (np.arange(start, stop, dtype=np.float64) + 0.5) / factor - 0.5
    j0 = np.floor(u).astype(np.int64)
    w = (u - j0).astype(np.float32)
    return np.clip(j0, 0, coarse_size - 1), np.clip(j0 + 1, 0, coarse_size - 1), w


def region_reader(probs: Any, origin: Sequence[int] = (0, 0, 0)) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """A ``read`` for :func:`upsample_region`: coarse regions, in global coordinates, of ``probs``
    ``(C, z, y, x)`` (a numpy or Zarr array) whose first voxel is the global voxel ``origin``."""
    def read(where: tuple[slice, ...]) -> np.ndarray:
        return np.asarray(probs[(slice(None), *(slice(w.start - o, w.stop - o) for w, o in zip(where, origin)))])
    return read


def upsample_region(read: Callable[[tuple[slice, ...]], np.ndarray], region: Sequence[tuple[int, int]], factor: int,
                    coarse: Sequence[int], *, slab: int = 32) -> np.ndarray:
    """uint8 probabilities ``(C, z, y, x)`` of the native ``region``, linearly upsampled from the coarse grid.

    Parameters
    ----------
    read
        ``read((slice_z, slice_y, slice_x))`` -> uint8 ``(C, ...)`` coarse probabilities of that region.
    region
        Native ``(start, stop)`` per spatial axis.
    factor
        The model's downsampling factor.
    coarse
        Shape of the coarse grid (z, y, x).
    slab
        Native z-planes interpolated at a time (bounds the float32 temporaries).
    """
    weights = [lerp_weights(a, b, factor, n) for (a, b), n in zip(region, coarse)]
    lo = [int(j0.min()) for j0, _, _ in weights]
    hi = [int(j1.max()) + 1 for _, j1, _ in weights]
    (zj0, zj1, zw), (yj0, yj1, yw), (xj0, xj1, xw) = weights
    src = read(tuple(slice(a, b) for a, b in zip(lo, hi)))
    out = np.empty((src.shape[0], *(b - a for a, b in region)), np.uint8)
    for s in range(0, out.shape[1], slab):
        z0, z1 = zj0[s:s + slab] - lo[0], zj1[s:s + slab] - lo[0]
        need = np.arange(int(z0.min()), int(z1.max()) + 1)
        part = src[:, need].astype(np.float32)
        part = _lerp(part, yj0 - lo[1], yj1 - lo[1], yw, axis=2)
        part = _lerp(part, xj0 - lo[2], xj1 - lo[2], xw, axis=3)
        part = _lerp(part, z0 - need[0], z1 - need[0], zw[s:s + slab], axis=1)
        out[:, s:s + slab] = np.rint(part)
    return out


def _lerp(x: np.ndarray, j0: np.ndarray, j1: np.ndarray, w: np.ndarray, axis: int) -> np.ndarray:
    shape = [1] * x.ndim
    shape[axis] = len(w)
    w = w.reshape(shape)
    a = np.take(x, j0, axis=axis)
    a *= 1 - w
    a += np.take(x, j1, axis=axis) * w
    return a
