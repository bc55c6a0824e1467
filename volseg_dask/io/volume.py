"""Opening any volume: the reader for a path, the lazy dask array, its voxel size and a description.

Supported inputs (``open_volume``):

==========================  =============================================================
``vol.tif`` / ``.tiff``      multi-page or volumetric (one tiled 3D page) TIFF
``slices/``                  a folder of 2D TIFF slices, sorted naturally (``s2`` < ``s10``)
``file.h5:/group/data``      HDF5 dataset (``.h5 .hdf5 .hdf .nxs``); no key: the first 3D dataset
``vol.npy``                  NumPy file, read region by region
``vol.mrc`` (.rec .map .st)  MRC, read region by region (voxel size kept)
``vol.zarr[/path]``          Zarr v2 or v3 array, or a group plus the path of an array in it
==========================  =============================================================
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr

from .. import outputs
from ..errors import VolumeFormatError, VolumeNotFoundError
from .hdf5 import open_hdf5
from .raw import open_mrc, open_npy
from .reader import HDF5_SUFFIXES, MRC_SUFFIXES, TIFF_SUFFIXES, Reader, is_zarr_dir, split_key
from .tiff import open_tiff, open_tiff_folder
from .zarr_array import ZarrReader, open_zarr

__all__ = ["cached_reader", "open_reader", "open_volume", "volume_info", "volume_voxel_size"]


def open_reader(path: str | os.PathLike[str]) -> Reader:
    file, key = split_key(path)
    if not file.exists():
        hint = ""
        if file.parent.exists() and not file.parent.is_dir():
            hint = f" ({file.parent} is a file, not a folder)"
        raise VolumeNotFoundError(f"{file}: no such file or folder{hint}; check the path")
    suffix = file.suffix.lower()
    if file.is_dir():
        if is_zarr_dir(file) or suffix == ".zarr":
            return open_zarr(file, key)
        return open_tiff_folder(file)
    if suffix in TIFF_SUFFIXES:
        return open_tiff(file)
    if suffix in HDF5_SUFFIXES:
        return open_hdf5(file, key)
    if suffix == ".npy":
        return open_npy(file)
    if suffix in MRC_SUFFIXES:
        return open_mrc(file)
    raise VolumeFormatError(
        f"{file}: unknown volume format {suffix or '(no suffix)'!r}; use a TIFF (.tif), a folder of TIFF "
        "slices, HDF5 (file.h5:/dataset), NumPy (.npy), MRC (.mrc) or Zarr (.zarr)"
    )


def check_ndim(shape: tuple[int, ...], path: Any, ndim: int) -> None:
    if len(shape) == ndim:
        if any(s == 0 for s in shape):
            raise VolumeFormatError(f"{path}: is empty (shape {shape})")
        return
    if len(shape) < ndim:
        fix = "give a stack of slices (a multi-page TIFF or a folder of TIFFs) rather than one image"
    else:
        fix = "select one channel or time point first (e.g. save vol[0] as its own file)"
    raise VolumeFormatError(f"{path}: expected a {ndim}D volume (z, y, x), found shape {shape}; {fix}")


def open_volume(
    path: str | os.PathLike[str],
    *,
    chunks: Sequence[int] | str | None = None,
    ndim: int = 3,
) -> da.Array:
    """Open a volume lazily as a dask array.

    Parameters
    ----------
    path
        A TIFF file, a folder of TIFF slices, ``file.h5:/dataset``, ``.npy``, MRC, or a Zarr
        array (``outputs.zarr`` or ``outputs.zarr/path/in/group``); see the module docstring.
    chunks
        Dask chunks; default: the format's natural read unit (stored chunks for Zarr and HDF5,
        a TIFF's own tiles or strips, grouped; ``128 x 128 x full rows`` for NPY, MRC and
        uncompressed contiguous TIFF).
    ndim
        Number of dimensions required (3 for volumes).

    Returns
    -------
    dask.array.Array
        Lazy array; nothing but metadata has been read.

    Raises
    ------
    VolumeNotFoundError
        The file, folder, dataset or array does not exist.
    VolumeFormatError
        The file cannot be read, or its shape is not ``ndim``-dimensional.
    IncompleteOutputError
        The array was written by an unfinished volseg_dask run.
    """
    reader = open_reader(path)
    check_ndim(reader.shape, path, ndim)
    natural = reader.natural_chunks()
    arr = da.from_array(
        reader,
        chunks=natural,
        lock=False,
        asarray=False,
        fancy=False,
        meta=np.empty((0,) * reader.ndim, dtype=reader.dtype),
        name=f"volume-{dask.base.tokenize(reader)}",
    )
    if chunks is not None:
        arr = arr.rechunk(chunks if isinstance(chunks, str) else tuple(chunks))
    return arr


def volume_voxel_size(path: str | os.PathLike[str]) -> tuple[float, float, float] | None:
    """The voxel size (z, y, x) recorded in the file, where the format has one (MRC, our Zarr)."""
    return open_reader(path).voxel_size


def cached_reader(path: str) -> Reader:
    """A reader for ``path``, kept per process (tasks reopen nothing but the chunks they read)."""
    file, _ = split_key(path)
    try:
        stamp = os.stat(file).st_mtime_ns
    except OSError:
        stamp = 0
    return _reader_at(path, stamp)


@functools.lru_cache(maxsize=16)
def _reader_at(path: str, stamp: int) -> Reader:
    return open_reader(path)


def _disk_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _codec_text(codec: Any) -> str:
    try:
        spec = codec.to_dict()
        conf = ", ".join(f"{k}={v}" for k, v in spec.get("configuration", {}).items() if k != "typesize")
        return f"{spec['name']}({conf})"
    except Exception:  # numcodecs (Zarr v2) codecs
        return repr(codec)


def volume_info(path: str | os.PathLike[str], *, sample_chunks: int = 8) -> dict[str, Any]:
    """Describe a volume: format, shape, dtype, chunks, codec, size on disk, value range on a sample.

    The value range is read from at most ``sample_chunks`` chunks spread over the volume, so it is
    cheap on any size but may miss extremes (it says so).
    """
    reader = open_reader(path)
    file, _ = split_key(path)
    info: dict[str, Any] = {
        "path": str(path),
        "format": reader.kind,
        "shape": list(reader.shape),
        "dtype": str(reader.dtype),
        "chunks": list(reader.natural_chunks()),
        "size_on_disk_bytes": _disk_size(file),
        "size_in_memory_bytes": int(np.prod(reader.shape)) * reader.dtype.itemsize,
    }
    if reader.voxel_size:
        info["voxel_size"] = list(reader.voxel_size)
    if isinstance(reader, ZarrReader):
        arr = zarr.open_array(store=str(reader.path), path=reader.array_path or "", mode="r")
        info["zarr_format"] = arr.metadata.zarr_format
        info["codecs"] = [_codec_text(c) for c in (*arr.filters, *arr.compressors)] or ["none"]
        st = outputs.status(arr)
        if st is not None:
            info["complete"] = st.get("complete")
            info["provenance"] = {k: v for k, v in st.items() if k != "complete"}
    if reader.ndim >= 1 and all(s > 0 for s in reader.shape):
        vol = open_volume(path, ndim=reader.ndim)
        blocks = list(np.ndindex(*vol.numblocks))
        pick = np.unique(np.linspace(0, len(blocks) - 1, min(sample_chunks, len(blocks))).round().astype(int))
        lo, hi = math.inf, -math.inf
        for i in pick:
            block = np.asarray(vol.blocks[blocks[i]].compute(scheduler="sync"))
            if block.size:
                lo, hi = min(lo, float(np.nanmin(block))), max(hi, float(np.nanmax(block)))
        info["sample_range"] = [lo, hi]
        info["sampled_chunks"] = f"{len(pick)} of {len(blocks)}"
    return info

