"""Voxel grids: chunk grids, the network's grid vs the output's grid, and mirrored indices.

A model trained with ``data.downsample = N`` sees the volume averaged over N×N×N cubes. Cube ``c``
along an axis covers native voxels ``N·c .. N·c + N - 1`` (a last partial cube repeats the edge
voxel), and outside the volume the coarse voxels are mirrored, as native ones are. A prediction's
blocks therefore live on two grids, which :class:`BlockGrid` holds together: the output's (native
shape, ``predict.chunks``) and the network's (coarse shape, chunks divided by N, halo divided by N).
Block ``i`` of one is block ``i`` of the other. Probabilities come back to the native grid by linear
interpolation at voxel centres (native voxel ``i`` sits at coarse coordinate ``(i + 0.5) / N - 0.5``;
beyond the first and last coarse voxel the edge value is kept, as ``align_corners=False`` in torch),
so a native block needs its coarse block and at most one coarse voxel around it
(:meth:`BlockGrid.upsample_support`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["AXES", "BlockGrid", "Region", "chunk_grid", "chunk_region", "coarse_shape", "lerp_weights",
           "mirror_indices", "native_indices"]

AXES = {"z": 0, "y": 1, "x": 2}
"""Axis name -> dimension of a (z, y, x) volume; "along z" means the planes are (y, x)."""

Region = tuple[tuple[int, int], ...]
"""``(start, stop)`` per axis."""


def chunk_grid(shape: Sequence[int], chunks: Sequence[int]) -> list[tuple[int, ...]]:
    """Indices of the chunks of an array of ``shape`` in ``chunks`` (a partial last chunk counts)."""
    return list(np.ndindex(*(-(-int(s) // int(c)) for s, c in zip(shape, chunks))))


def chunk_region(index: Sequence[int], shape: Sequence[int], chunks: Sequence[int]) -> Region:
    """``(start, stop)`` per axis of chunk ``index`` of an array of ``shape`` in ``chunks``."""
    return tuple((i * c, min((i + 1) * c, s)) for i, c, s in zip(index, chunks, shape))


def mirror_indices(start: int, stop: int, size: int) -> np.ndarray:
    """Indices ``start:stop`` folded into ``[0, size)`` by mirroring with the edge repeated.

    The same boundary as dask's ``map_overlap(boundary="reflect")`` and numpy's ``symmetric`` pad.
    """
    idx = np.arange(start, stop) % (2 * size)
    return np.where(idx >= size, 2 * size - 1 - idx, idx)


def coarse_shape(shape: Sequence[int], factor: int) -> tuple[int, ...]:
    """Shape of a volume averaged over ``factor``-sided cubes (a partial last cube counts)."""
    return tuple(-(-int(s) // factor) for s in shape)


def native_indices(coarse: np.ndarray, factor: int, size: int) -> np.ndarray:
    """Native indices ``(len(coarse), factor)`` of the cubes ``coarse`` (the edge voxel repeats past ``size``)."""
    native = np.asarray(coarse)[:, None] * factor + np.arange(factor)[None, :]
    return np.minimum(native, size - 1)


def lerp_weights(start: int, stop: int, factor: int, coarse_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For native voxels ``start:stop``: the two coarse neighbours and the weight of the second."""
    u = (np.arange(start, stop, dtype=np.float64) + 0.5) / factor - 0.5
    j0 = np.floor(u).astype(np.int64)
    w = (u - j0).astype(np.float32)
    return np.clip(j0, 0, coarse_size - 1), np.clip(j0 + 1, 0, coarse_size - 1), w


@dataclass(frozen=True)
class BlockGrid:
    """The blocks of a prediction on the output's grid (native) and on the network's grid (coarse).

    Parameters
    ----------
    native_shape
        Shape (z, y, x) of the volume and of the merged outputs.
    native_chunks
        Block (= output chunk) shape at native resolution, clipped to the volume.
    factor
        The model's downsampling factor (1: both grids are the same).
    native_halo
        In-plane context in native voxels (:attr:`halo` is its coarse counterpart, rounded up).
    """

    native_shape: tuple[int, ...]
    native_chunks: tuple[int, ...]
    factor: int = 1
    native_halo: int = 0

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.native_shape)
        object.__setattr__(self, "native_shape", shape)
        object.__setattr__(self, "native_chunks", tuple(min(int(c), s) for c, s in zip(self.native_chunks, shape)))
        if not isinstance(self.factor, int) or self.factor < 1:
            raise ValueError(f"BlockGrid: factor must be a positive integer, not {self.factor!r}")

    @property
    def shape(self) -> tuple[int, ...]:
        """The network's grid: the volume's shape in coarse voxels."""
        return coarse_shape(self.native_shape, self.factor)

    @property
    def chunks(self) -> tuple[int, ...]:
        """Block shape on the network's grid."""
        return tuple(-(-c // self.factor) for c in self.native_chunks)

    @property
    def halo(self) -> int:
        """In-plane halo on the network's grid."""
        return -(-int(self.native_halo) // self.factor)

    def indices(self) -> list[tuple[int, ...]]:
        """Every block index (the same on both grids)."""
        return chunk_grid(self.native_shape, self.native_chunks)

    def block(self, index: Sequence[int]) -> Region:
        """Block ``index`` on the network's grid."""
        return chunk_region(index, self.shape, self.chunks)

    def native_block(self, index: Sequence[int]) -> Region:
        """Block ``index`` on the output's grid."""
        return chunk_region(index, self.native_shape, self.native_chunks)

    def upsample_support(self, index: Sequence[int]) -> Region:
        """The coarse voxels the linear upsampling of native block ``index`` reads: its block and one more around."""
        return self.support(self.native_block(index))

    def support(self, region: Region) -> Region:
        """The coarse voxels the linear upsampling of the native ``region`` reads."""
        out = []
        for (a, b), n in zip(region, self.shape):
            j0, j1, _ = lerp_weights(a, b, self.factor, n)
            out.append((int(j0.min()), int(j1.max()) + 1))
        return tuple(out)
