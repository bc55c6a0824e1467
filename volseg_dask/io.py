"""Reading any volume lazily, converting it to chunked Zarr v3, exporting it back, streamed.

Supported inputs (``open_volume``):

==========================  =============================================================
``vol.tif`` / ``.tiff``      multi-page (or 3D) TIFF
``slices/``                  a folder of 2D TIFF slices, sorted naturally (``s2`` < ``s10``)
``file.h5:/group/data``      HDF5 dataset (``.h5 .hdf5 .hdf .nxs``); no key: the first 3D dataset
``vol.npy``                  NumPy file, memory-mapped region by region
``vol.mrc`` (.rec .map .st)  MRC, memory-mapped region by region (voxel size kept)
``vol.zarr[/path]``          Zarr v2 or v3 array, or a group plus the path of an array in it
==========================  =============================================================

Each format is read through a small picklable reader object whose chunks follow the format's
natural read unit (whole planes for TIFF, z-slab x y-band regions for memory-mapped files, the
stored chunks for Zarr and HDF5), so every task reads from disk only what it returns and a
``distributed`` worker can reopen the file by itself.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr

from . import store
from .errors import ConfigError, VolsegError, VolumeFormatError, VolumeNotFoundError
from .progress import compute

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CHUNKS",
    "convert",
    "export",
    "mirror_indices",
    "open_volume",
    "read_padded",
    "split_key",
    "volume_info",
]

DEFAULT_CHUNKS = (128, 128, 128)
TIFF_SUFFIXES = (".tif", ".tiff")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".nxs", ".he5")
MRC_SUFFIXES = (".mrc", ".rec", ".map", ".st", ".mrcs", ".ali")
_KEYED = re.compile(r"^(?P<file>.*?(?:\.h5|\.hdf5|\.hdf|\.nxs|\.he5|\.zarr))(?::(?P<key>.*))?$", re.IGNORECASE)
_SLAB_BYTES = 64 * 2**20  # target size of a plane-wise read (TIFF)


# ---- paths -----------------------------------------------------------------------------------


def split_key(path: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """Split ``"file.h5:/data"`` into the file and the key inside it (None when absent)."""
    text = os.fspath(path)
    match = _KEYED.match(text)
    if match and match.group("key") is not None:
        return Path(match.group("file")), match.group("key").strip("/") or None
    return Path(text), None


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _is_zarr_dir(path: Path) -> bool:
    return any((path / marker).exists() for marker in ("zarr.json", ".zarray", ".zgroup"))


# ---- readers: picklable, reopen their file on each read -------------------------------------


class _Reader:
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


def _band_chunks(shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, ...]:
    """z-slab x y-band x full rows: one contiguous read per plane, bounded by the plane width."""
    return (min(shape[0], 128), min(shape[1], 128), shape[2])


class _RawReader(_Reader):
    """C-ordered raw voxels at a byte offset (NPY body, MRC data block), read region by region."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype,
                 fortran_order: bool = False, voxel_size: tuple[float, float, float] | None = None,
                 kind: str = "npy") -> None:
        self.path, self.offset, self.shape, self.dtype = path, int(offset), tuple(shape), np.dtype(dtype)
        self.fortran_order, self.voxel_size, self.kind = fortran_order, voxel_size, kind

    def natural_chunks(self) -> tuple[int, ...]:
        return _band_chunks(self.shape, self.dtype)

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        if self.fortran_order:
            mm = np.memmap(self.path, self.dtype, "r", self.offset, self.shape, order="F")
            out = np.array(mm[region])
            del mm
            return out
        # Positioned reads (one per plane) straight into the output, not a memory map: a mapped
        # file's pages count in the resident set as soon as they are touched, and the kernel maps
        # whole page-cache folios around each touched page, so copying a 128-row band out of 128
        # mapped planes made nearly all 128 planes resident (140 MB per read at 1024², growing with
        # the plane). Here a read holds its output and, for partial rows, one plane's span.
        out = np.empty(tuple(max(0, r.stop - r.start) for r in region), self.dtype)
        if out.size == 0:
            return out
        lead = max(0, 2 - self.ndim)  # view 0D/1D volumes as one plane of one row
        shape, region = (1,) * lead + self.shape, (slice(0, 1),) * lead + region
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


class _H5Reader(_Reader):
    kind = "hdf5"

    def __init__(self, path: Path, key: str, shape: tuple[int, ...], dtype: np.dtype,
                 chunks: tuple[int, ...] | None) -> None:
        self.path, self.key, self.shape, self.dtype, self.h5chunks = path, key, tuple(shape), np.dtype(dtype), chunks

    def natural_chunks(self) -> tuple[int, ...]:
        if self.h5chunks:
            # whole HDF5 chunks, grouped up to ~128 along each axis
            return tuple(min(n, c * max(1, 128 // c)) for n, c in zip(self.shape, self.h5chunks))
        return _band_chunks(self.shape, self.dtype)

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        import h5py

        with h5py.File(self.path, "r") as fh:
            return np.asarray(fh[self.key][region])

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        return (*super().__dask_tokenize__(), self.key)


class _TiffStackReader(_Reader):
    """A multi-page (or 3D) TIFF: whole pages are decoded, so chunks are whole planes."""

    kind = "tiff"

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)

    def natural_chunks(self) -> tuple[int, ...]:
        return (_planes_per_read(self.shape, self.dtype), self.shape[1], self.shape[2])

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


class _TiffFolderReader(_Reader):
    """A folder of 2D TIFF files, one plane each."""

    kind = "tiff-folder"

    def __init__(self, path: Path, files: list[str], shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.files, self.shape, self.dtype = path, files, tuple(shape), np.dtype(dtype)

    def natural_chunks(self) -> tuple[int, ...]:
        return (_planes_per_read(self.shape, self.dtype), self.shape[1], self.shape[2])

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


class _ZarrReader(_Reader):
    kind = "zarr"

    def __init__(self, path: Path, array_path: str | None, shape: tuple[int, ...], dtype: np.dtype,
                 chunks: tuple[int, ...]) -> None:
        self.path, self.array_path, self.shape, self.dtype, self.zchunks = (
            path, array_path, tuple(shape), np.dtype(dtype), chunks)
        self._array: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_array"] = None
        return state

    def natural_chunks(self) -> tuple[int, ...]:
        return self.zchunks

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        if self._array is None:
            self._array = zarr.open_array(store=str(self.path), path=self.array_path or "", mode="r")
        return np.asarray(self._array[region])

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        # the chunk files change while the metadata file stays: tokenise by the metadata's time
        meta = self.path / (self.array_path or "") / "zarr.json"
        stamp = os.stat(meta).st_mtime_ns if meta.exists() else 0
        return (*super().__dask_tokenize__(), self.array_path, stamp)


def _planes_per_read(shape: tuple[int, ...], dtype: np.dtype) -> int:
    plane = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
    return int(max(1, min(shape[0], 128, _SLAB_BYTES // max(plane, 1))))


# ---- opening ---------------------------------------------------------------------------------


def _open_reader(path: str | os.PathLike[str]) -> _Reader:
    file, key = split_key(path)
    if not file.exists():
        hint = ""
        if file.parent.exists() and not file.parent.is_dir():
            hint = f" ({file.parent} is a file, not a folder)"
        raise VolumeNotFoundError(f"{file}: no such file or folder{hint}; check the path")
    suffix = file.suffix.lower()
    if file.is_dir():
        if _is_zarr_dir(file) or suffix == ".zarr":
            return _open_zarr(file, key)
        return _open_tiff_folder(file)
    if suffix in TIFF_SUFFIXES:
        return _open_tiff(file)
    if suffix in HDF5_SUFFIXES:
        return _open_hdf5(file, key)
    if suffix == ".npy":
        return _open_npy(file)
    if suffix in MRC_SUFFIXES:
        return _open_mrc(file)
    raise VolumeFormatError(
        f"{file}: unknown volume format {suffix or '(no suffix)'!r}; use a TIFF (.tif), a folder of TIFF "
        "slices, HDF5 (file.h5:/dataset), NumPy (.npy), MRC (.mrc) or Zarr (.zarr)"
    )


def _open_npy(file: Path) -> _Reader:
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
    return _RawReader(file, offset, tuple(shape), dtype, fortran_order=fortran)


def _open_mrc(file: Path) -> _Reader:
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
    return _RawReader(file, offset, tuple(shape), dtype, voxel_size=voxel_size, kind="mrc")


def _open_hdf5(file: Path, key: str | None) -> _Reader:
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
        return _H5Reader(file, key, tuple(ds.shape), ds.dtype, ds.chunks)


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


def _open_tiff(file: Path) -> _Reader:
    shape, dtype = _tiff_shape(file)
    if len(shape) == 2:
        shape = (1, *shape)
    return _TiffStackReader(file, shape, dtype)


def _open_tiff_folder(folder: Path) -> _Reader:
    files = sorted((p.name for p in folder.iterdir() if p.suffix.lower() in TIFF_SUFFIXES and p.is_file()),
                   key=_natural_key)
    if not files:
        inside = sorted(p.name for p in folder.iterdir() if p.is_dir() and _is_zarr_dir(p))
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
    return _TiffFolderReader(folder, files, (len(files), *shape0), dtype0)


def _open_zarr(root: Path, key: str | None) -> _Reader:
    try:
        node = zarr.open(store=str(root), path=key or "", mode="r")
    except FileNotFoundError as exc:
        raise VolumeNotFoundError(f"{root}: has no array {key!r}") from exc
    except Exception as exc:
        raise VolumeFormatError(f"{root}: not a readable Zarr store ({type(exc).__name__}: {exc})") from exc
    array_path = key
    if isinstance(node, zarr.Group):
        node, array_path = _pick_array(node, root, key)
    store.require_complete(node, root / (key or ""))
    store.require_complete_tree(root / (array_path or ""))
    chunks = tuple(node.shards or node.chunks) if getattr(node, "shards", None) else tuple(node.chunks)
    reader = _ZarrReader(root, array_path, tuple(node.shape), node.dtype, chunks)
    reader.voxel_size = _zarr_voxel_size(node)
    return reader


def _pick_array(group: zarr.Group, root: Path, key: str | None) -> tuple[zarr.Array, str]:
    prefix = f"{key}/" if key else ""
    attrs: dict[str, Any] = dict(group.attrs)
    multiscales = attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")
    if multiscales:
        level0 = str(multiscales[0]["datasets"][0]["path"])
        return group[level0], prefix + level0  # type: ignore[return-value]
    arrays = [name for name, _ in group.arrays()]
    if "labels" in arrays and len(arrays) == 1:
        return group["labels"], prefix + "labels"  # type: ignore[return-value]
    if len(arrays) == 1:
        return group[arrays[0]], prefix + arrays[0]  # type: ignore[return-value]
    members = sorted(arrays) + sorted(f"{name}/" for name, _ in group.groups())
    raise VolumeFormatError(
        f"{root / (key or '')}: is a Zarr group, not an array; name one of its members, e.g. "
        f"{root / (key or '') / (members[0] if members else 'ARRAY')} (members: {', '.join(members) or 'none'})"
    )


def _zarr_voxel_size(node: zarr.Array) -> tuple[float, float, float] | None:
    value = (store.status(node) or {}).get("voxel_size")
    if isinstance(value, (list, tuple)) and len(value) == 3:
        return (float(value[0]), float(value[1]), float(value[2]))
    return None


def _check_ndim(shape: tuple[int, ...], path: Any, ndim: int) -> None:
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
        array (``store.zarr`` or ``store.zarr/path/in/group``); see the module docstring.
    chunks
        Dask chunks; default: the format's natural read unit (stored chunks for Zarr and HDF5,
        whole planes for TIFF, ``128 x 128 x full rows`` for NPY/MRC).
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
    reader = _open_reader(path)
    _check_ndim(reader.shape, path, ndim)
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
    return _open_reader(path).voxel_size


def _reader_cached(path: str) -> _Reader:
    """A reader for ``path``, kept per process (tasks reopen nothing but the chunks they read)."""
    file, _ = split_key(path)
    try:
        stamp = os.stat(file).st_mtime_ns
    except OSError:
        stamp = 0
    return _cached_reader(path, stamp)


@functools.lru_cache(maxsize=16)
def _cached_reader(path: str, stamp: int) -> _Reader:
    return _open_reader(path)


def mirror_indices(start: int, stop: int, size: int) -> np.ndarray:
    """Indices ``start:stop`` folded into ``[0, size)`` by mirroring with the edge repeated.

    The same boundary as dask's ``map_overlap(boundary="reflect")`` and numpy's ``symmetric`` pad.
    """
    idx = np.arange(start, stop) % (2 * size)
    return np.where(idx >= size, 2 * size - 1 - idx, idx)


def read_padded(path: str | os.PathLike[str], start: Sequence[int], stop: Sequence[int]) -> np.ndarray:
    """Read ``[start, stop)`` of a volume; parts outside it are mirrored (edge repeated).

    ``start`` may be negative and ``stop`` may pass the shape: a block plus its halo at the
    border of the volume reads exactly what the whole volume, mirrored, would give there.
    """
    reader = _reader_cached(os.fspath(path))
    lo = [max(0, a) for a in start]
    hi = [min(n, b) for b, n in zip(stop, reader.shape)]
    if all(a == c and b == d for a, b, c, d in zip(start, stop, lo, hi)):
        return reader[tuple(slice(a, b) for a, b in zip(lo, hi))]
    return _read_mapped(reader, [mirror_indices(a, b, n) for a, b, n in zip(start, stop, reader.shape)])


def _read_mapped(reader: _Reader, maps: Sequence[np.ndarray]) -> np.ndarray:
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

    Coordinates are on the coarse grid (see :mod:`volseg_dask.resample`); outside it the coarse
    voxels are mirrored, so a block plus halo reads what the whole coarsened volume holds there.
    """
    from .resample import block_mean, coarse_shape, native_indices

    if factor == 1:
        return read_padded(path, start, stop)
    reader = _reader_cached(os.fspath(path))
    maps = [native_indices(mirror_indices(a, b, c), factor, n).ravel()
            for a, b, c, n in zip(start, stop, coarse_shape(reader.shape, factor), reader.shape)]
    return block_mean(_read_mapped(reader, maps), factor)


# ---- info ------------------------------------------------------------------------------------


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
    reader = _open_reader(path)
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
    if isinstance(reader, _ZarrReader):
        arr = zarr.open_array(store=str(reader.path), path=reader.array_path or "", mode="r")
        info["zarr_format"] = arr.metadata.zarr_format
        info["codecs"] = [_codec_text(c) for c in (*arr.filters, *arr.compressors)] or ["none"]
        st = store.status(arr)
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


# ---- convert ---------------------------------------------------------------------------------


def parse_region(region: str | Sequence[Any], shape: Sequence[int], *, where: str = "region") -> list[tuple[int, int]]:
    """``(start, stop)`` per axis of a box given as ``"z0:z1,y0:y1,x0:x1"`` or as pairs, checked against ``shape``.

    Raises
    ------
    ConfigError
        Not three ranges, not integers, or a range that is empty or outside the volume.
    """
    if isinstance(region, str):
        parts = [p.strip() for p in region.split(",")]
        pairs: list[Any] = []
        for p in parts:
            lo, sep, hi = p.partition(":")
            if not sep:
                raise ConfigError(f"{where}: {region!r} is not z0:z1,y0:y1,x0:x1 (each part needs a ':')")
            pairs.append((lo.strip() or None, hi.strip() or None))
    else:
        pairs = [tuple(p) for p in region]
    if len(pairs) != len(shape):
        raise ConfigError(f"{where}: {region!r} gives {len(pairs)} ranges; give one per axis (z, y, x), e.g. "
                          "0:256,0:256,0:256")
    box = []
    for axis, (lo, hi), n in zip("zyx", pairs, shape):
        try:
            a = 0 if lo is None else int(lo)
            b = int(n) if hi is None else int(hi)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {lo}:{hi} along {axis} is not a range of integers") from None
        if not 0 <= a < b <= n:
            raise ConfigError(f"{where}: {a}:{b} along {axis} is empty or outside the volume (0:{n}); give "
                              f"0 <= start < stop <= {n}")
        box.append((a, b))
    return box


def _normalise_chunks(chunks: Sequence[int] | int, shape: tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(chunks, int):
        chunks = (chunks,) * len(shape)
    if len(chunks) != len(shape) or any(int(c) < 1 for c in chunks):
        raise VolsegError(f"chunks must be {len(shape)} positive integers, found {tuple(chunks)}")
    return tuple(min(int(c), s) for c, s in zip(chunks, shape))


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    chunks: Sequence[int] | int = DEFAULT_CHUNKS,
    codec: str = "zstd",
    clevel: int = 5,
    overwrite: bool = False,
    progress: bool = False,
    region: str | Sequence[tuple[int, int]] | None = None,
) -> Path:
    """Convert any supported volume to a chunked, compressed Zarr v3 array, streamed.

    The source is read in its natural units and written chunk-aligned through the active dask
    scheduler; memory is bounded by a few read units, never by the volume. The array is built under
    a hidden temporary name and renamed to ``dst`` only when complete.

    Parameters
    ----------
    src
        Any input :func:`open_volume` reads.
    dst
        Output Zarr path (``*.zarr``).
    chunks
        Zarr chunk shape (z, y, x), clipped to the volume; default 128³.
    codec, clevel
        Blosc compressor (``zstd``, ``lz4``, ``zlib``, ...) and level.
    overwrite
        Replace an existing ``dst`` (only after the new array is complete).
    progress
        Show a progress bar.
    region
        Only this box of the source: ``"z0:z1,y0:y1,x0:x1"`` (an empty bound means the edge, as in
        ``"0:256,:,:"``) or ``[(z0, z1), (y0, y1), (x0, x1)]``; e.g. the image crop matching a labelled
        sub-volume. Recorded in the output's attributes.

    Returns
    -------
    pathlib.Path
        ``dst``.
    """
    dst = Path(dst)
    vol = open_volume(src)
    box = None
    if region is not None:
        box = parse_region(region, vol.shape, where=f"{src}: --region")
        vol = vol[tuple(slice(a, b) for a, b in box)]
    target = _normalise_chunks(chunks, vol.shape)
    attrs = store.provenance(kind="volume", source=os.fspath(src), voxel_size=volume_voxel_size(src),
                             **({"region": [list(b) for b in box]} if box else {}))
    log.info("converting %s %s %s -> %s (chunks %s, blosc %s)", src, vol.shape, vol.dtype, dst, target, codec)
    with store.atomic_output(dst, overwrite=overwrite) as tmp:
        out = store.create_array(tmp, shape=vol.shape, dtype=vol.dtype, chunks=target, codec=codec,
                                 clevel=clevel, dimension_names=("z", "y", "x"), attrs=attrs)
        write = da.store(vol.rechunk(target), out, lock=False, compute=False)  # type: ignore[arg-type]
        compute(write, progress=progress)
        store.mark_complete(out)
    return dst


# ---- export ----------------------------------------------------------------------------------


def _slabs(vol: da.Array) -> list[tuple[int, int]]:
    bounds = np.cumsum((0, *vol.chunks[0]))
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


def export(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    compression: str | None = None,
    progress: bool = False,
) -> Path:
    """Write a volume (usually a Zarr output) to TIFF, HDF5, NPY or a folder of TIFF slices.

    The format follows ``dst``: ``.tif``/``.tiff`` a multi-page TIFF (BigTIFF above 4 GB),
    ``.h5``/``.hdf5`` (optionally ``file.h5:/key``, default key ``data``) an HDF5 dataset, ``.npy`` a
    NumPy file, and a path without a suffix a folder of 2D TIFF slices. The volume is read one
    z-slab of chunks at a time; the output is built under a temporary name and renamed when done.

    Parameters
    ----------
    src
        Any input :func:`open_volume` reads (an incomplete volseg_dask output is refused).
    dst
        Output path; its suffix selects the format.
    overwrite
        Replace an existing ``dst`` once the new file is complete.
    compression
        TIFF: a tifffile compression (``zlib``, ``zstd``, ``lzw``); HDF5: ``gzip`` or ``lzf``.
        Default none, which every reader opens.
    progress
        Show a progress bar over slabs.
    """
    from tqdm.auto import tqdm

    file, key = split_key(dst)
    suffix = file.suffix.lower()
    if suffix not in (*TIFF_SUFFIXES, *HDF5_SUFFIXES, ".npy", ""):
        raise VolumeFormatError(
            f"{file}: cannot export to {suffix!r}; use .tif, .h5, .npy, or a path without suffix for a folder of "
            "TIFF slices"
        )
    vol = open_volume(src)
    if vol.chunks[0][0] > 256 or max(vol.chunks[0]) * np.prod(vol.shape[1:]) * vol.dtype.itemsize > 2**30:
        vol = vol.rechunk({0: max(1, min(64, 2**30 // int(np.prod(vol.shape[1:]) * vol.dtype.itemsize)))})
    bar = tqdm(total=vol.shape[0], unit="plane", disable=not progress, desc=f"export {file.name}")
    planes = (plane for _, _, slab in _iter_slabs(vol, bar) for plane in slab)

    with store.atomic_output(file, overwrite=overwrite) as tmp, store.unchanged_while_reading(src):
        if suffix in TIFF_SUFFIXES:
            import tifffile

            bigtiff = vol.nbytes > 2**32 - 2**25
            with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
                tw.write(planes, shape=vol.shape, dtype=vol.dtype, photometric="minisblack",
                         compression=compression)
        elif suffix in HDF5_SUFFIXES:
            import h5py

            with h5py.File(tmp, "w") as fh:
                ds = fh.create_dataset(key or "data", shape=vol.shape, dtype=vol.dtype,
                                       chunks=True, compression=compression)
                for z0, z1, slab in _iter_slabs(vol, bar):
                    ds[z0:z1] = slab
                ds.attrs["source"] = os.fspath(src)
        elif suffix == ".npy":
            header = {"descr": np.lib.format.dtype_to_descr(vol.dtype), "fortran_order": False,
                      "shape": tuple(vol.shape)}
            with open(tmp, "wb") as fh:
                np.lib.format.write_array_header_2_0(fh, header)
                for _, _, slab in _iter_slabs(vol, bar):
                    fh.write(np.ascontiguousarray(slab).tobytes())
        else:
            import tifffile

            tmp.mkdir()
            width = max(5, len(str(vol.shape[0] - 1)))
            for z, plane in enumerate(planes):
                tifffile.imwrite(tmp / f"slice_{z:0{width}d}.tif", plane, photometric="minisblack",
                                 compression=compression)
    bar.close()
    return file


def _iter_slabs(vol: da.Array, bar: Any) -> Iterator[tuple[int, int, np.ndarray]]:
    """Compute ``vol`` one z-slab of chunks at a time: (z0, z1, slab)."""
    for z0, z1 in _slabs(vol):
        (slab,) = compute(vol[z0:z1])
        yield z0, z1, np.asarray(slab)
        bar.update(z1 - z0)
