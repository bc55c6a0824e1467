"""TIFF volumes: a multi-page (or 3D) TIFF file, or a folder of 2D TIFF slices sorted naturally."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import VolumeFormatError
from .reader import TIFF_SUFFIXES, Reader, is_zarr_dir, planes_per_read

__all__ = ["TiffFolderReader", "TiffStackReader", "open_tiff", "open_tiff_folder"]


class TiffStackReader(Reader):
    """A multi-page (or 3D) TIFF: whole pages are decoded, so chunks are whole planes."""

    kind = "tiff"

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)

    def natural_chunks(self) -> tuple[int, ...]:
        return (planes_per_read(self.shape, self.dtype), self.shape[1], self.shape[2])

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        import tifffile

        z = region[0]
        with tifffile.TiffFile(self.path) as tf:
            series = tf.series[0]
            if len(series.pages) == self.shape[0]:
                data = series.asarray(key=range(z.start, z.stop)) if z.stop > z.start else None
                if data is None:
                    return np.empty((0, *self.shape[1:]), self.dtype)[(slice(None), *region[1:])]
                data = data.reshape((z.stop - z.start, *self.shape[1:]))
                return np.ascontiguousarray(data[(slice(None), *region[1:])])
            return np.ascontiguousarray(series.asarray()[region])  # one page holding the whole volume


class TiffFolderReader(Reader):
    """A folder of 2D TIFF files, one plane each."""

    kind = "tiff-folder"

    def __init__(self, path: Path, files: list[str], shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.files, self.shape, self.dtype = path, files, tuple(shape), np.dtype(dtype)

    def natural_chunks(self) -> tuple[int, ...]:
        return (planes_per_read(self.shape, self.dtype), self.shape[1], self.shape[2])

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        import tifffile

        z = region[0]
        out = np.empty((z.stop - z.start, *(r.stop - r.start for r in region[1:])), self.dtype)
        for i, name in enumerate(self.files[z.start:z.stop]):
            plane = tifffile.imread(self.path / name)
            if plane.shape != self.shape[1:]:
                raise VolumeFormatError(
                    f"{self.path / name}: shape {plane.shape} differs from the other slices {self.shape[1:]}"
                )
            out[i] = plane[region[1:]]
        return out



def _tiff_shape(file: Path) -> tuple[tuple[int, ...], np.dtype]:
    import tifffile

    try:
        with tifffile.TiffFile(file) as tf:
            series = tf.series[0]
            shape, dtype = tuple(series.shape), np.dtype(series.dtype)
            if len(series.pages) and series.pages[0] is not None:
                page_shape = tuple(series.pages[0].shape)
                if len(shape) > len(page_shape) and int(np.prod(shape[: len(shape) - len(page_shape)])) == len(
                        series.pages):
                    shape = (len(series.pages), *page_shape)
    except Exception as exc:
        raise VolumeFormatError(f"{file}: not a readable TIFF file ({type(exc).__name__}: {exc})") from exc
    return shape, dtype


def open_tiff(file: Path) -> Reader:
    shape, dtype = _tiff_shape(file)
    if len(shape) == 2:
        shape = (1, *shape)
    return TiffStackReader(file, shape, dtype)


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
    shape0, dtype0 = _tiff_shape(folder / files[0])
    for name in files[1:]:
        shape, dtype = _tiff_shape(folder / name)
        if shape != shape0 or dtype != dtype0:
            raise VolumeFormatError(
                f"{folder / name}: shape {shape} {dtype} differs from the first slice {files[0]} "
                f"({shape0} {dtype0}); every slice of a stack must have the same shape and dtype"
            )
    if len(shape0) != 2:
        raise VolumeFormatError(f"{folder / files[0]}: slices must be 2D images, found shape {shape0}")
    return TiffFolderReader(folder, files, (len(files), *shape0), dtype0)

