"""NPY and MRC volumes: C-ordered raw voxels at a byte offset, read region by region."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import VolumeFormatError
from .reader import Reader, band_chunks

__all__ = ["RawReader", "open_mrc", "open_npy"]


class RawReader(Reader):
    """Raw voxels at a byte offset (NPY body, MRC data block, uncompressed TIFF), read region by region.

    C order, or Fortran order (an NPY of a transposed array), read as the C-ordered transpose: the
    positioned reads follow the axis contiguous in the file either way.
    """

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype,
                 fortran_order: bool = False, voxel_size: tuple[float, float, float] | None = None,
                 kind: str = "npy") -> None:
        self.path, self.offset, self.shape, self.dtype = path, int(offset), tuple(shape), np.dtype(dtype)
        self.fortran_order, self.voxel_size, self.kind = fortran_order, voxel_size, kind

    def natural_chunks(self) -> tuple[int, ...]:
        if self.fortran_order:  # full columns along the first axis, the one contiguous in the file
            return band_chunks(self.shape[::-1])[::-1]
        return band_chunks(self.shape)

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        if self.fortran_order:  # the voxels of an F-ordered array are those of its transpose in C order
            return np.ascontiguousarray(self._read_c(self.shape[::-1], region[::-1]).T)
        return self._read_c(self.shape, region)

    def _read_c(self, shape: tuple[int, ...], region: tuple[slice, ...]) -> np.ndarray:
        """``region`` of the C-ordered voxels of ``shape`` at the offset."""
        # Positioned reads (one per plane) straight into the output, not a memory map: a mapped
        # file's pages count in the resident set as soon as they are touched, and the kernel maps
        # whole page-cache folios around each touched page, so copying a band out of mapped planes
        # made nearly the whole planes resident (benchmarks/README.md, bench_convert.py). Here a read
        # holds its output and, for partial rows, one plane's span.
        out = np.empty(tuple(max(0, r.stop - r.start) for r in region), self.dtype)
        if out.size == 0:
            return out
        lead = max(0, 2 - len(shape))  # view 0D/1D volumes as one plane of one row
        shape, region = (1,) * lead + shape, (slice(0, 1),) * lead + region
        ys, xs, row = region[-2], region[-1], shape[-1]
        rows, width = ys.stop - ys.start, xs.stop - xs.start
        span = (rows - 1) * row + width  # voxels from the region's first to its last in one plane
        planes = out.reshape(-1, rows, width)
        scratch = None if width == row else np.empty(rows * row, self.dtype)
        outer = [int(np.prod(shape[i + 1:])) for i in range(len(shape) - 2)]  # strides (voxels), leading axes
        with open(self.path, "rb", buffering=0) as fh:
            for k, index in enumerate(itertools.product(*(range(r.start, r.stop) for r in region[:-2]))):
                first = sum(i * s for i, s in zip(index, outer)) + ys.start * row + xs.start
                at = self.offset + first * self.dtype.itemsize
                if scratch is None:  # whole rows: the plane's part is contiguous in the file and in out
                    self._read_into(fh, at, planes[k])
                else:
                    self._read_into(fh, at, scratch[:span])
                    planes[k] = scratch.reshape(rows, row)[:, :width]
        return out

    def _read_into(self, fh: Any, offset: int, target: np.ndarray) -> None:
        buf = target.reshape(-1).view(np.uint8).data  # a writable memoryview of the bytes
        fh.seek(offset)
        done = 0
        while done < len(buf):
            got = fh.readinto(buf[done:])
            if not got:
                raise VolumeFormatError(
                    f"{self.path}: ends at byte {offset + done}, before the end of the voxel data; the file is "
                    "truncated; re-copy it"
                )
            done += got



def open_npy(file: Path) -> Reader:
    try:
        mm = np.load(file, mmap_mode="r")  # reads the header only; no voxel is touched
        shape, dtype, offset = mm.shape, mm.dtype, int(mm.offset)
        fortran = bool(mm.flags.f_contiguous and not mm.flags.c_contiguous)
        del mm
    except ValueError as exc:
        if "mmap length is greater than file size" in str(exc):
            raise VolumeFormatError(f"{file}: truncated (the header promises more data than the file holds); "
                                    "re-copy the file") from exc
        raise VolumeFormatError(f"{file}: not a readable .npy file ({exc})") from exc
    except Exception as exc:
        raise VolumeFormatError(f"{file}: not a readable .npy file ({exc})") from exc
    if dtype.hasobject:
        raise VolumeFormatError(f"{file}: holds Python objects, not numbers; save a numeric array")
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if file.stat().st_size < expected:
        raise VolumeFormatError(
            f"{file}: truncated ({file.stat().st_size} bytes, the header promises {expected}); re-copy the file"
        )
    return RawReader(file, offset, tuple(shape), dtype, fortran_order=fortran)


def open_mrc(file: Path) -> Reader:
    import mrcfile

    try:
        with mrcfile.open(file, mode="r", header_only=True, permissive=False) as mrc:
            header = mrc.header
            dtype = mrcfile.utils.data_dtype_from_header(header)
            shape = mrcfile.utils.data_shape_from_header(header)
            offset = int(header.nbytes + header.nsymbt)
            vs = mrc.voxel_size
            voxel = (float(vs.z), float(vs.y), float(vs.x))
    except Exception as exc:
        raise VolumeFormatError(f"{file}: not a readable MRC file ({exc})") from exc
    if len(shape) == 2:
        shape = (1, *shape)
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if file.stat().st_size < expected:
        raise VolumeFormatError(
            f"{file}: truncated ({file.stat().st_size} bytes, the header promises {expected}); re-copy the file"
        )
    voxel_size = voxel if all(v > 0 for v in voxel) else None
    return RawReader(file, offset, tuple(shape), dtype, voxel_size=voxel_size, kind="mrc")

