"""``convert`` any volume (or a box of it) to chunked Zarr v3 and ``export`` it back, streamed slab by slab."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from .. import outputs
from ..cluster import compute
from ..errors import ConfigError, VolsegError, VolumeFormatError
from .reader import HDF5_SUFFIXES, TIFF_SUFFIXES, split_key
from .volume import open_volume, volume_voxel_size

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_CHUNKS", "convert", "export", "parse_region"]

DEFAULT_CHUNKS = (128, 128, 128)


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
    attrs = outputs.provenance(kind="volume", source=os.fspath(src), voxel_size=volume_voxel_size(src),
                             **({"region": [list(b) for b in box]} if box else {}))
    log.info("converting %s %s %s -> %s (chunks %s, blosc %s)", src, vol.shape, vol.dtype, dst, target, codec)
    with outputs.atomic_output(dst, overwrite=overwrite) as tmp:
        out = outputs.create_array(tmp, shape=vol.shape, dtype=vol.dtype, chunks=target, codec=codec,
                                 clevel=clevel, dimension_names=("z", "y", "x"), attrs=attrs)
        write = da.store(vol.rechunk(target), out, lock=False, compute=False)  # type: ignore[arg-type]
        compute(write, progress=progress)
        outputs.mark_complete(out)
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

    with outputs.atomic_output(file, overwrite=overwrite) as tmp, outputs.unchanged_while_reading(src):
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
