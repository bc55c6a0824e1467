"""HDF5 datasets (``file.h5:/group/data``; no key: the first 3D dataset), read by stored chunks."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import VolumeFormatError, VolumeNotFoundError
from .reader import Reader, band_chunks, grouped_chunks

log = logging.getLogger(__name__)

__all__ = ["H5Reader", "open_hdf5"]


class H5Reader(Reader):
    kind = "hdf5"

    def __init__(self, path: Path, key: str, shape: tuple[int, ...], dtype: np.dtype,
                 chunks: tuple[int, ...] | None) -> None:
        self.path, self.key, self.shape, self.dtype, self.h5chunks = path, key, tuple(shape), np.dtype(dtype), chunks

    def natural_chunks(self) -> tuple[int, ...]:
        if self.h5chunks:  # whole HDF5 chunks: h5py decodes only the chunks a region overlaps
            return grouped_chunks(self.shape, self.h5chunks, self.dtype)
        return band_chunks(self.shape)

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        import h5py

        with h5py.File(self.path, "r") as fh:
            return np.asarray(fh[self.key][region])

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        return (*super().__dask_tokenize__(), self.key)



def open_hdf5(file: Path, key: str | None) -> Reader:
    import h5py

    try:
        fh = h5py.File(file, "r")
    except Exception as exc:
        raise VolumeFormatError(f"{file}: not a readable HDF5 file ({exc})") from exc
    with fh:
        if key is None:
            found: list[tuple[str, tuple[int, ...]]] = []
            fh.visititems(lambda name, obj: found.append((name, obj.shape)) if isinstance(obj, h5py.Dataset)
                          else None)
            three_d = [name for name, shape in found if len(shape) == 3]
            if not three_d:
                listing = ", ".join(f"/{n} {s}" for n, s in found) or "no datasets at all"
                raise VolumeFormatError(f"{file}: holds no 3D dataset ({listing}); name one as {file}:/path")
            key = three_d[0]
            if len(three_d) > 1:
                log.info("%s: several 3D datasets, using /%s (name one as %s:/path)", file, key, file)
        if key not in fh or not isinstance(fh[key], h5py.Dataset):
            names: list[str] = []
            fh.visititems(lambda name, obj: names.append("/" + name) if isinstance(obj, h5py.Dataset) else None)
            raise VolumeNotFoundError(
                f"{file}: has no dataset /{key}; datasets in the file: {', '.join(names) or 'none'}"
            )
        ds = fh[key]
        if ds.dtype.kind not in "biuf":
            raise VolumeFormatError(f"{file}:/{key}: dtype {ds.dtype} is not numeric")
        return H5Reader(file, key, tuple(ds.shape), ds.dtype, ds.chunks)

