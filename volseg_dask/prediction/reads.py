"""Block + halo reads for prediction: straight from the input, mirrored outside it, coarsened for a
downsampling model."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ..grid import coarse_shape, mirror_indices, native_indices
from ..io.reader import Reader
from ..io.volume import cached_reader
from ..resample import block_mean

__all__ = ["read_downsampled", "read_padded"]


def read_padded(path: str | os.PathLike[str], start: Sequence[int], stop: Sequence[int]) -> np.ndarray:
    """Read ``[start, stop)`` of a volume; parts outside it are mirrored (edge repeated).

    ``start`` may be negative and ``stop`` may pass the shape: a block plus its halo at the
    border of the volume reads exactly what the whole volume, mirrored, would give there.
    """
    reader = cached_reader(os.fspath(path))
    lo = [max(0, a) for a in start]
    hi = [min(n, b) for b, n in zip(stop, reader.shape)]
    if all(a == c and b == d for a, b, c, d in zip(start, stop, lo, hi)):
        return reader[tuple(slice(a, b) for a, b in zip(lo, hi))]
    return _read_mapped(reader, [mirror_indices(a, b, n) for a, b, n in zip(start, stop, reader.shape)])


def _read_mapped(reader: Reader, maps: Sequence[np.ndarray]) -> np.ndarray:
    """``volume[np.ix_(*maps)]`` from one read of the indices' bounding box (no gather when it is a plain box)."""
    lo = [int(m.min()) for m in maps]
    hi = [int(m.max()) + 1 for m in maps]
    core = reader[tuple(slice(a, b) for a, b in zip(lo, hi))]
    if all(np.array_equal(m, np.arange(a, b)) for m, a, b in zip(maps, lo, hi)):
        return core
    return core[np.ix_(*(m - a for m, a in zip(maps, lo)))]


def read_downsampled(path: str | os.PathLike[str], start: Sequence[int], stop: Sequence[int],
                     factor: int) -> np.ndarray:
    """Read ``[start, stop)`` of the volume averaged over ``factor``-sided cubes (float32).

    Coordinates are on the coarse grid (:class:`volseg_dask.grid.BlockGrid`); outside it the coarse
    voxels are mirrored, so a block plus halo reads what the whole coarsened volume holds there.
    ``factor`` 1 is :func:`read_padded`.
    """
    if factor == 1:
        return read_padded(path, start, stop)
    reader = cached_reader(os.fspath(path))
    maps = [native_indices(mirror_indices(a, b, c), factor, n).ravel()
            for a, b, c, n in zip(start, stop, coarse_shape(reader.shape, factor), reader.shape)]
    return block_mean(_read_mapped(reader, maps), factor)

