"""A byte-bounded LRU cache of chunk-aligned blocks, and the reader that serves slice regions from it.

Zarr decompresses whole chunks. A z-slice of a 128³-chunked volume reads the chunks it crosses to
return 1/128 of each; an x-slice does the same across every chunk column it crosses. Caching whole
blocks turns each of those decompressions into one per block per process: a training volume of a few
hundred voxels a side (the usual labelled region) is read once and then served from memory; larger
ones degrade gracefully to the cache's hit rate, and memory stays bounded by the cache, not the
volume (``benchmarks/bench_sampling.py`` measures both). Label blocks are cached already mapped to
class indices (one byte per voxel).
"""

from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import dask.array as da
import numpy as np

__all__ = ["BlockReader", "ChunkCache", "block_edges"]


def block_edges(chunks: Sequence[Sequence[int]], itemsize: int, limit: int) -> list[np.ndarray]:
    """Block boundaries per axis: the array's chunks, split evenly until a block fits ``limit`` bytes."""
    splits = [1, 1, 1]
    biggest = [max(c) for c in chunks]

    def nbytes() -> int:
        return int(np.prod([-(-b // s) for b, s in zip(biggest, splits)])) * itemsize

    while nbytes() > limit and any(-(-b // s) > 8 for b, s in zip(biggest, splits)):
        a = int(np.argmax([-(-b // s) for b, s in zip(biggest, splits)]))
        splits[a] *= 2
    out = []
    for a, axis_chunks in enumerate(chunks):
        edges = [0]
        for c in axis_chunks:
            start, step = edges[-1], -(-c // splits[a])
            edges += [*range(start + step, start + c, step), start + c]
        out.append(np.asarray(edges))
    return out


class ChunkCache:
    """A byte-bounded LRU cache of blocks, shared by the arrays of one process."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._data: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()

    def get(self, key: tuple[Any, ...], load: Callable[[], np.ndarray]) -> np.ndarray:
        """The block under ``key``, loaded (and kept, if it fits) on a miss."""
        block = self.lookup(key)
        return block if block is not None else self.put(key, load())

    def lookup(self, key: tuple[Any, ...]) -> np.ndarray | None:
        """The block under ``key`` (marked most recently used), or None (counted as a miss)."""
        block = self._data.get(key)
        if block is None:
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return block

    def put(self, key: tuple[Any, ...], block: np.ndarray) -> np.ndarray:
        """Keep ``block``, evicting the least recently used ones beyond the bound; return it."""
        if block.nbytes <= self.max_bytes:
            self._data[key] = block
            self.bytes += block.nbytes
            while self.bytes > self.max_bytes:
                _, old = self._data.popitem(last=False)
                self.bytes -= old.nbytes
        return block

    def clear(self) -> None:
        self._data.clear()
        self.bytes = 0

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "bytes": self.bytes, "blocks": len(self._data)}


class BlockReader:
    """Reads regions of one array through the cache (whole blocks) or, for numpy, directly."""

    def __init__(self, key: str, array: Any, cache: ChunkCache | None,
                 transform: Callable[[np.ndarray], np.ndarray] | None = None, out_dtype: Any = None) -> None:
        self.key, self.array, self.cache, self.transform = key, array, cache, transform
        self.out_dtype = np.dtype(out_dtype or array.dtype)
        self.grid: list[np.ndarray] | None = None
        if isinstance(array, da.Array) and cache is not None:
            self.grid = block_edges(array.chunks, max(self.out_dtype.itemsize, array.dtype.itemsize),
                              max(cache.max_bytes // 16, 2**20))
        self._edges = [[int(e) for e in edges] for edges in self.grid or []]

    def _load(self, region: tuple[slice, ...]) -> np.ndarray:
        block = self.array[region]
        if isinstance(block, da.Array):
            block = block.compute(scheduler="synchronous")
        block = np.asarray(block)
        return self.transform(block) if self.transform is not None else block

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        if self.grid is None or self.cache is None:
            return self._load(region)
        out = np.empty(tuple(r.stop - r.start for r in region), self.out_dtype)
        spans = []  # per axis: (block index, block start, block stop) of the blocks the region crosses
        for r, edges in zip(region, self._edges):
            first = bisect.bisect_right(edges, r.start) - 1
            last = bisect.bisect_left(edges, r.stop)
            spans.append([(i, edges[i], edges[i + 1]) for i in range(first, last)])
        for (bz, z0, z1), (by, y0, y1), (bx, x0, x1) in itertools.product(*spans):
            key = (self.key, bz, by, bx)
            block = self.cache.lookup(key)
            if block is None:
                block = self.cache.put(key, self._load((slice(z0, z1), slice(y0, y1), slice(x0, x1))))
            src, dst = [], []
            for r, a, b in zip(region, (z0, y0, x0), (z1, y1, x1)):
                lo, hi = max(r.start, a), min(r.stop, b)
                src.append(slice(lo - a, hi - a))
                dst.append(slice(lo - r.start, hi - r.start))
            out[tuple(dst)] = block[tuple(src)]
        return out

