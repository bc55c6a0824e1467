"""Linear upsampling of coarse per-axis probabilities to the native grid, block by block.

Each native voxel depends only on its global position and the coarse values around it
(:func:`volseg_dask.grid.lerp_weights`), so a blockwise upsampling equals the whole-volume one
whatever the blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..grid import BlockGrid, lerp_weights

__all__ = ["region_reader", "upsample_region"]


def region_reader(probs: Any, origin: Sequence[int] = (0, 0, 0)) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """A ``read`` for :func:`upsample_region`: coarse regions, in global coordinates, of ``probs``
    ``(C, z, y, x)`` (a numpy or Zarr array) whose first voxel is the global voxel ``origin``."""
    def read(where: tuple[slice, ...]) -> np.ndarray:
        return np.asarray(probs[(slice(None), *(slice(w.start - o, w.stop - o) for w, o in zip(where, origin)))])
    return read


def upsample_region(read: Callable[[tuple[slice, ...]], np.ndarray], region: Sequence[tuple[int, int]],
                    grid: BlockGrid, *, slab: int = 32) -> np.ndarray:
    """uint8 probabilities ``(C, z, y, x)`` of the native ``region``, linearly upsampled from the coarse grid.

    Parameters
    ----------
    read
        ``read((slice_z, slice_y, slice_x))`` -> uint8 ``(C, ...)`` coarse probabilities of that region.
    region
        Native ``(start, stop)`` per spatial axis.
    grid
        The prediction's grids (the downsampling factor and the coarse shape).
    slab
        Native z-planes interpolated at a time (bounds the float32 temporaries).
    """
    weights = [lerp_weights(a, b, grid.factor, n) for (a, b), n in zip(region, grid.shape)]
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
