"""Resolution changes of volumes: N×N×N block means and modes, and the 2×2×2 kernels of the pyramids.

A model trained with ``data.downsample = N`` sees the volume averaged over N×N×N cubes (the labels by
their most frequent value); :func:`downsample_array` is that coarse volume as a lazy dask array, and
:func:`block_mean` / :func:`block_mode` the kernels (see :mod:`volseg_dask.grid` for the coarse grid).
The OME-Zarr pyramids (:mod:`volseg_dask.ngff`) halve their levels with :func:`mode_2x2x2` (labels)
and :func:`mean_2x2x2` (continuous maps). Linear upsampling of probabilities back to the native grid
is prediction's (:mod:`volseg_dask.prediction.upsample`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["block_mean", "block_mode", "downsample_array", "mean_2x2x2", "mode_2x2x2"]

#: output voxels reduced at a time inside a 2×2×2 kernel (the temporaries stay in the CPU cache)
SLAB_VOXELS = 1 << 15


def _cubes(x: np.ndarray, factor: int) -> np.ndarray:
    """``x`` (each dimension a multiple of ``factor``) viewed as ``(Z, f, Y, f, X, f)``."""
    z, y, w = (s // factor for s in x.shape)
    return x.reshape(z, factor, y, factor, w, factor)


def block_mean(x: np.ndarray, factor: int) -> np.ndarray:
    """float32 means of the ``factor``-sided cubes of ``x`` (each dimension a multiple of ``factor``)."""
    return _cubes(x, factor).mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)


def block_mode(x: np.ndarray, factor: int) -> np.ndarray:
    """Most frequent value of each ``factor``-sided cube of ``x``; ties: the first voxel (z, then y, then x)."""
    cubes = _cubes(x, factor)
    return mode_2x2x2(cubes) if factor == 2 else _cube_mode(cubes)


def _cube_mode(cubes: np.ndarray) -> np.ndarray:
    """Mode of each cube of ``(Z, f, Y, f, X, f)`` by pairwise comparison (any dtype, any f)."""
    z, y, x = cubes.shape[0::2]
    flat = cubes.transpose(0, 2, 4, 1, 3, 5).reshape(z, y, x, -1)
    counts = (flat[..., :, None] == flat[..., None, :]).sum(axis=-1)  # votes of each value of the cube
    best = counts.argmax(axis=-1)[..., None]  # first of the most frequent: the corner voxel on ties
    return np.take_along_axis(flat, best, axis=-1)[..., 0]


def _corners(x: np.ndarray) -> list[np.ndarray] | None:
    """The 8 voxels of each 2×2×2 cube as contiguous arrays, in cube order (z, then y, then x), when ``x``
    is dask's reshaped ``(Z, 2, Y, 2, X, 2)`` block; else None."""
    if x.ndim != 6 or x.shape[1::2] != (2, 2, 2):
        return None
    return [np.ascontiguousarray(x[:, i, :, j, :, k]) for i in (0, 1) for j in (0, 1) for k in (0, 1)]


def mode_2x2x2(cubes: np.ndarray) -> np.ndarray:
    """Most frequent value of each cube of ``cubes`` ``(Z, 2, Y, 2, X, 2)`` -> ``(Z, Y, X)``.

    Ties go to the first voxel of the cube (z, then y, then x) among the most frequent values, i.e.
    the corner voxel when all differ (stride downsampling). Unsigned and boolean types of up to two
    bytes take an elementwise path over the 8 corners, slab by slab; others the pairwise one.
    """
    if cubes.dtype.kind not in "ub" or cubes.dtype.itemsize > 2:
        return _cube_mode(cubes)
    out = np.empty((cubes.shape[0], cubes.shape[2], cubes.shape[4]), cubes.dtype)
    step = max(1, SLAB_VOXELS // max(1, cubes.shape[2] * cubes.shape[4]))
    for start in range(0, cubes.shape[0], step):
        corners = _corners(cubes[start:start + step])
        assert corners is not None
        out[start:start + step] = _mode_of_corners(corners, cubes.dtype)
    return out


def _mode_of_corners(corners: list[np.ndarray], dtype: np.dtype[Any]) -> np.ndarray:
    """Elementwise mode of 8 arrays: votes of each corner's value, then the largest
    ``(votes, 7 - position, value)`` key wins."""
    shape = corners[0].shape
    counts = [np.ones(shape, np.uint8) for _ in corners]
    equal = np.empty(shape, bool)
    for a in range(8):
        for b in range(a + 1, 8):
            np.equal(corners[a], corners[b], out=equal)
            counts[a] += equal
            counts[b] += equal
    bits = 8 * dtype.itemsize
    wide = np.uint16 if bits == 8 else np.uint32
    best = np.zeros(shape, wide)
    key = np.empty(shape, wide)
    for k, (value, votes) in enumerate(zip(corners, counts)):
        np.copyto(key, votes)
        key <<= 3
        key |= 7 - k
        key <<= bits
        key |= value
        np.maximum(best, key, out=best)
    best &= (1 << bits) - 1
    return best.astype(dtype)


def mean_2x2x2(cubes: np.ndarray) -> np.ndarray:
    """Rounded mean of each cube of ``cubes`` ``(Z, 2, Y, 2, X, 2)`` -> ``(Z, Y, X)``, in its dtype
    (``np.rint`` of the float mean, ties to even; exact integer arithmetic for uint8)."""
    corners = _corners(cubes) if cubes.dtype == np.uint8 else None
    if corners is None:
        return np.rint(cubes.mean(axis=(1, 3, 5))).astype(cubes.dtype)
    # rint(sum / 8) in integers, ties to even as np.rint
    total = np.zeros(corners[0].shape, np.uint16)
    for c in corners:
        total += c
    quotient, rest = total >> 3, total & 7
    quotient += (rest > 4) | ((rest == 4) & (quotient & 1 == 1))
    return quotient.astype(np.uint8)


def downsample_array(arr: Any, factor: int, *, labels: bool = False) -> Any:
    """A lazy dask array of ``arr`` (dask or numpy) averaged over ``factor``-sided cubes.

    Images become float32 means; label volumes keep their dtype and take each cube's most frequent
    value (ties: the first voxel). The values equal those :func:`volseg_dask.prediction.reads.read_downsampled`
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
    reduce = block_mode if labels else block_mean
    out_chunks = tuple(tuple(c // factor for c in axis) for axis in a.chunks)
    return a.map_blocks(reduce, factor, chunks=out_chunks, dtype=a.dtype if labels else np.float32)
