"""The reader protocol shared by every format, and the paths that name a volume.

A reader is a small picklable array-like over one file (``shape``, ``dtype``, region reads) that
reopens its file on each read, so a ``distributed`` worker can read by itself. Its
``natural_chunks`` follow the format's read unit: a task reads from disk only what it returns.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import VolsegError, VolumeFormatError

__all__ = ["HDF5_SUFFIXES", "MRC_SUFFIXES", "TIFF_SUFFIXES", "Reader", "band_chunks", "grouped_chunks",
           "is_zarr_dir", "split_key"]

TIFF_SUFFIXES = (".tif", ".tiff")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".nxs", ".he5")
MRC_SUFFIXES = (".mrc", ".rec", ".map", ".st", ".mrcs", ".ali")
_KEYED = re.compile(r"^(?P<file>.*?(?:\.h5|\.hdf5|\.hdf|\.nxs|\.he5|\.zarr))(?::(?P<key>.*))?$", re.IGNORECASE)
_GROUP_BYTES = 64 * 2**20  # the most a task groups of a format's read units (TIFF strips, HDF5 chunks)


# ---- paths -----------------------------------------------------------------------------------


def split_key(path: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """Split ``"file.h5:/data"`` into the file and the key inside it (None when absent)."""
    text = os.fspath(path)
    match = _KEYED.match(text)
    if match and match.group("key") is not None:
        return Path(match.group("file")), match.group("key").strip("/") or None
    return Path(text), None


def is_zarr_dir(path: Path) -> bool:
    """Whether the folder ``path`` is a Zarr store or group (v2 or v3 metadata)."""
    return any((path / marker).exists() for marker in ("zarr.json", ".zarray", ".zgroup"))


# ---- readers: picklable, reopen their file on each read -------------------------------------


class Reader:
    """Array-like over one file: ``shape``, ``dtype``, ``ndim`` and region reads."""

    path: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    voxel_size: tuple[float, float, float] | None = None
    kind = "volume"

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def natural_chunks(self) -> tuple[int, ...]:
        raise NotImplementedError

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        region = tuple(slice(*k.indices(n)[:2]) if isinstance(k, slice) else k for k, n in zip(key, self.shape))
        if any(not isinstance(r, slice) for r in region):
            raise TypeError("volume readers take slices only")
        try:
            return self.read(region)
        except VolsegError:
            raise
        except Exception as exc:
            where = ", ".join(f"{r.start}:{r.stop}" for r in region)
            raise VolumeFormatError(
                f"{self.path}: reading the region [{where}] failed ({type(exc).__name__}: {exc}); the file "
                f"may be truncated or damaged; re-export or re-copy it"
            ) from exc

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        try:
            st = os.stat(self.path)
            stamp: tuple[Any, ...] = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = ()
        return (type(self).__name__, str(self.path), self.shape, str(self.dtype), *stamp)


def band_chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    """z-slab x y-band x full rows: one contiguous read per plane, bounded by the plane width."""
    return (min(shape[0], 128), min(shape[1], 128), shape[2])


def grouped_chunks(shape: tuple[int, ...], unit: tuple[int, ...], dtype: np.dtype) -> tuple[int, ...]:
    """Whole read units (stored chunks, tiles or strips) grouped up to ~128 voxels per axis and ~64 MB.

    Along each axis the group holds as many whole units as fit in 128 voxels (one at least), clipped
    to the volume. A group still over 64 MB (units of whole planes: strips of wide TIFF planes, HDF5
    chunks of one plane) is cut back along the leading axes first, to one unit at the least, so a
    task of 2520² float32 planes holds 2 planes, not 128.
    """
    unit = tuple(max(1, min(n, int(c))) for n, c in zip(shape, unit))
    group = [min(n, c * max(1, 128 // c)) for n, c in zip(shape, unit)]
    for axis, c in enumerate(unit):
        rest = int(np.prod(group[:axis] + group[axis + 1:])) * np.dtype(dtype).itemsize
        group[axis] = min(group[axis], max(c, _GROUP_BYTES // max(rest, 1) // c * c))
    return tuple(group)
