"""TIFF volumes: a multi-page or volumetric (``ImageDepth``) TIFF file, or a folder of 2D TIFF slices sorted naturally.

A TIFF is never decoded whole, and a read decodes only what it returns (plus the rest of the
units it overlaps):

* uncompressed voxels stored contiguously in final form (tifffile's ``series.dataoffset``: what
  tifffile, ImageJ and most exporters write without compression, striped volumetric pages included)
  are raw C-ordered voxels at an offset, read region by region with positioned reads
  (:class:`~volseg_dask.io.raw.RawReader`, ``kind="tiff"``);
* anything else (compressed, tiled, predicted, big-endian) through tifffile's Zarr store
  (``series.aszarr()``, a zarr-python 3 store with Zarr v2 metadata): :class:`TiffStackReader`.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import VolsegError, VolumeFormatError
from .raw import RawReader
from .reader import TIFF_SUFFIXES, Reader, grouped_chunks, is_zarr_dir

__all__ = ["TiffFolderReader", "TiffStackReader", "open_tiff", "open_tiff_folder"]

_NATIVE = "<" if sys.byteorder == "little" else ">"


class TiffStackReader(Reader):
    """A TIFF file read by its own tiles or strips, through tifffile's Zarr store.

    The read unit (``units``) is what the file stores and compresses as one piece:

    * a volumetric tiled page (``ImageDepth`` + ``TileDepth``): a tile, depth × length × width;
    * a tiled page of a multi-page file: a tile, 1 × length × width;
    * a striped file, volumetric pages included (an ``ImageDepth`` page stores its strips plane
      after plane): a strip, 1 plane × ``RowsPerStrip`` rows × the full width.

    :meth:`natural_chunks` groups whole units up to ~128 voxels per axis and ~64 MB
    (:func:`~volseg_dask.io.reader.grouped_chunks`), so a dask task decodes the units it returns
    and nothing else; any region read decodes only the units it overlaps (zarr decodes up to
    ``async.concurrency`` of them at once, each copied into the output as it comes).

    The file is opened on the first read and kept open by this reader in this process (a
    ``distributed`` worker or a forked process opens its own: the open file is not pickled and
    is reopened when the process id changes).
    """

    kind = "tiff"

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype, store_shape: tuple[int, ...],
                 store_chunks: tuple[int, ...]) -> None:
        self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)
        self.store_shape, self.store_chunks = tuple(store_shape), tuple(store_chunks)
        # the store's axes are ours less (or plus) length-1 ones, or a series' leading axes
        # flattened into our z (a (t, z, y, x) series of 2D pages read as t·z planes)
        self.flat = _squeezed(self.store_shape) != _squeezed(self.shape)
        if self.flat and (self.store_shape[-2:] != self.shape[-2:]
                          or int(np.prod(self.store_shape[:-2])) != self.shape[0]):
            raise VolumeFormatError(
                f"{path}: its TIFF series has shape {self.store_shape}, which does not read as {self.shape}; "
                "save one 3D stack (z, y, x) per file"
            )
        self._lock, self._lock_pid = threading.Lock(), os.getpid()
        self._open: tuple[int, Any, Any] | None = None  # (pid, TiffFile, zarr array)

    @property
    def units(self) -> tuple[int, ...]:
        """The file's tile or strip shape on our axes (z, y, x)."""
        if self.flat:
            return (1, *self.store_chunks[-2:])
        inner = iter(c for c, n in zip(self.store_chunks, self.store_shape) if n != 1)
        return tuple(1 if n == 1 else next(inner) for n in self.shape)

    def natural_chunks(self) -> tuple[int, ...]:
        return grouped_chunks(self.shape, self.units, self.dtype)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"], state["_lock"] = None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock, self._lock_pid = threading.Lock(), os.getpid()

    def _array(self) -> Any:
        pid = os.getpid()
        state = self._open
        if state is not None and state[0] == pid:
            return state[2]
        if self._lock_pid != pid:  # a forked child: its copy of the lock may have been held at the fork
            self._lock, self._lock_pid = threading.Lock(), pid
        with self._lock:
            if self._open is None or self._open[0] != pid:
                tf, array = _open_store(self.path)
                self._open = (pid, tf, array)
            return self._open[2]

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        out_shape = tuple(max(0, r.stop - r.start) for r in region)
        if 0 in out_shape:
            return np.empty(out_shape, self.dtype)
        array = self._array()
        if self.flat:  # plane by plane: each reads the tiles or strips of one page
            out = np.empty(out_shape, self.dtype)
            lead = self.store_shape[:-2]
            for i, z in enumerate(range(region[0].start, region[0].stop)):
                out[i] = array[(*np.unravel_index(z, lead), *region[1:])]
            return out
        ours = iter(r for r, n in zip(region, self.shape) if n != 1)
        index = tuple(slice(0, 1) if n == 1 else next(ours) for n in self.store_shape)
        return np.asarray(array[index], dtype=self.dtype).reshape(out_shape)

    def close(self) -> None:
        """Close the file this reader holds open in this process (the next read reopens it)."""
        with self._lock:
            if self._open is not None and self._open[0] == os.getpid():
                self._open[1].close()
            self._open = None


class TiffFolderReader(Reader):
    """A folder of 2D TIFF files, one plane each; each plane is read as :func:`open_tiff` reads a file."""

    kind = "tiff-folder"

    def __init__(self, path: Path, files: list[str], shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.files, self.shape, self.dtype = path, files, tuple(shape), np.dtype(dtype)

    def natural_chunks(self) -> tuple[int, ...]:
        return grouped_chunks(self.shape, (1, *self.shape[1:]), self.dtype)

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        z = region[0]
        out = np.empty((z.stop - z.start, *(r.stop - r.start for r in region[1:])), self.dtype)
        for i, name in enumerate(self.files[z.start:z.stop]):
            plane = open_tiff(self.path / name, probe=False)
            if plane.shape[1:] != self.shape[1:] or plane.shape[0] != 1:
                raise VolumeFormatError(
                    f"{self.path / name}: shape {plane.shape[1:]} differs from the other slices {self.shape[1:]}"
                )
            out[i] = plane.read((slice(0, 1), *region[1:]))[0]
            if isinstance(plane, TiffStackReader):
                plane.close()
        return out


# ---- opening -----------------------------------------------------------------------------------


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(n for n in shape if n != 1)


def _series_shape(series: Any) -> tuple[int, ...]:
    """The series' shape, its leading (non-page) axes flattened into one when they count its pages."""
    shape = tuple(series.shape)
    if len(series.pages) and series.pages[0] is not None:
        page_shape = tuple(series.pages[0].shape)
        lead = len(shape) - len(page_shape)
        if lead > 0 and int(np.prod(shape[:lead])) == len(series.pages):
            shape = (len(series.pages), *page_shape)
    return shape


def _zarr_array(series: Any) -> Any:
    import zarr

    # maxworkers > 1: tifffile decodes each tile in a thread (asyncio.to_thread), not in zarr's
    # one event-loop thread, so the reads of several dask threads decode in parallel
    return zarr.open_array(series.aszarr(maxworkers=2), mode="r", zarr_format=2)


def _open_store(file: Path) -> tuple[Any, Any]:
    """``(TiffFile, zarr array)`` over the first series of ``file`` (the caller closes the TiffFile)."""
    import tifffile

    tf = tifffile.TiffFile(file)
    try:
        return tf, _zarr_array(tf.series[0])
    except BaseException:
        tf.close()
        raise


def _raw_reader(file: Path, tf: Any, series: Any, shape: tuple[int, ...], dtype: np.dtype) -> RawReader | None:
    """A positioned-read reader when the voxels lie uncompressed, contiguous and native in ``file``."""
    offset = series.dataoffset
    if offset is None or series.is_multifile or (dtype.itemsize > 1 and tf.byteorder != _NATIVE):
        return None
    expected = int(offset) + int(np.prod(shape)) * dtype.itemsize
    size = file.stat().st_size
    if size < expected:
        raise VolumeFormatError(
            f"{file}: truncated ({size} bytes, its TIFF tags promise {expected}); re-copy or re-export the file"
        )
    return RawReader(file, int(offset), shape, dtype, kind="tiff")


def open_tiff(file: Path, *, probe: bool = True) -> Reader:
    """The reader for one TIFF file: positioned reads where its voxels are raw, else tile by tile.

    Parameters
    ----------
    file
        A TIFF file; its first series is the volume (a 2D image reads as one plane).
    probe
        Decode the file's first tile or strip now, so that a codec missing here fails on opening
        rather than in the middle of a run.

    Raises
    ------
    VolumeFormatError
        Not a readable TIFF, truncated, or compressed with a codec tifffile cannot decode here.
    """
    import tifffile

    try:
        with tifffile.TiffFile(file) as tf:
            series = tf.series[0]
            shape, dtype = _series_shape(series), np.dtype(series.dtype)
            if len(shape) == 2:
                shape = (1, *shape)
            raw = _raw_reader(file, tf, series, shape, dtype)
            if raw is not None:
                return raw
            array = _zarr_array(series)
            reader = TiffStackReader(file, shape, dtype, tuple(array.shape), tuple(array.chunks))
            if not probe or not all(shape):
                return reader
            try:
                array[(slice(0, 1),) * array.ndim]
            except Exception as exc:
                name = getattr(series.keyframe.compression, "name", series.keyframe.compression)
                hint = "" if not isinstance(exc, (ImportError, KeyError)) else (
                    "; tifffile decodes it only with the imagecodecs package: pip install imagecodecs, or "
                    "re-export the file with zlib or no compression")
                raise VolumeFormatError(f"{file}: its first tile ({name} compression) cannot be decoded "
                                        f"({type(exc).__name__}: {exc}){hint}") from exc
            return reader
    except VolsegError:
        raise
    except Exception as exc:
        raise VolumeFormatError(f"{file}: not a readable TIFF file ({type(exc).__name__}: {exc})") from exc


def open_tiff_folder(folder: Path) -> Reader:
    import tifffile

    files = tifffile.natural_sorted(p.name for p in folder.iterdir() if p.suffix.lower() in TIFF_SUFFIXES
                                    and p.is_file())
    if not files:
        inside = sorted(p.name for p in folder.iterdir() if p.is_dir() and is_zarr_dir(p))
        hint = f" (it holds the Zarr stores {', '.join(inside)}: give one of those)" if inside else ""
        raise VolumeFormatError(
            f"{folder}: a folder with neither TIFF slices nor Zarr metadata{hint}; give a folder of .tif "
            "slices or a Zarr store"
        )
    shape0, dtype0 = _file_shape(folder / files[0])
    for name in files[1:]:
        shape, dtype = _file_shape(folder / name)
        if shape != shape0 or dtype != dtype0:
            raise VolumeFormatError(
                f"{folder / name}: shape {shape} {dtype} differs from the first slice {files[0]} "
                f"({shape0} {dtype0}); every slice of a stack must have the same shape and dtype"
            )
    if len(shape0) != 2:
        raise VolumeFormatError(f"{folder / files[0]}: slices must be 2D images, found shape {shape0}")
    return TiffFolderReader(folder, files, (len(files), *shape0), dtype0)


def _file_shape(file: Path) -> tuple[tuple[int, ...], np.dtype]:
    import tifffile

    try:
        with tifffile.TiffFile(file) as tf:
            series = tf.series[0]
            return _series_shape(series), np.dtype(series.dtype)
    except Exception as exc:
        raise VolumeFormatError(f"{file}: not a readable TIFF file ({type(exc).__name__}: {exc})") from exc
