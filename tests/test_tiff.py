"""TIFF reading by the file's own tiles and strips: volumetric (ImageDepth) pages, compressed
multi-page files, raw contiguous files, and a memory test on a 1 GB volumetric TIFF."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import h5py
import numcodecs
import numpy as np
import pytest
import tifffile

from volseg_dask.errors import VolumeFormatError
from volseg_dask.io import convert, open_volume, volume_info
from volseg_dask.io.raw import RawReader
from volseg_dask.io.reader import grouped_chunks
from volseg_dask.io.tiff import TiffStackReader, open_tiff
from volseg_dask.io.volume import open_reader

ROOT = Path(__file__).resolve().parents[1]

try:
    import imagecodecs  # noqa: F401

    HAVE_IMAGECODECS = True
except ImportError:
    HAVE_IMAGECODECS = False


@pytest.fixture(scope="module")
def vol() -> np.ndarray:
    """Uneven against every tile shape below; uint16, so byte order matters."""
    return np.random.default_rng(5).integers(0, 60000, (37, 70, 90), dtype=np.uint16)


def _assert_reads(path: Path, vol: np.ndarray) -> None:
    arr = open_volume(path)
    np.testing.assert_array_equal(arr.compute(), vol)
    np.testing.assert_array_equal(arr[3:30, 17:66, 5:81].compute(), vol[3:30, 17:66, 5:81])
    reader = open_reader(path)
    for region in [(slice(0, 1), slice(0, 1), slice(0, 1)), (slice(36, 37), slice(5, 70), slice(89, 90)),
                   (slice(9, 24), slice(31, 33), slice(0, 90)), (slice(4, 4), slice(0, 9), slice(0, 9))]:
        np.testing.assert_array_equal(reader[region], vol[region], err_msg=str(region))


@pytest.mark.parametrize("tile", [(16, 64, 64), (5, 16, 32), (1, 32, 16), (37, 80, 96)])
@pytest.mark.parametrize("compression", [None, "zlib"])
def test_volumetric_tiled_round_trip(tmp_path, vol, tile, compression):
    path = tmp_path / "v.tif"
    tifffile.imwrite(path, vol, tile=tile, compression=compression)
    with tifffile.TiffFile(path) as tf:  # one page holds the whole volume, in tiles
        assert len(tf.pages) == 1 and tf.pages[0].imagedepth == 37 and tf.pages[0].is_tiled
    reader = open_reader(path)
    assert isinstance(reader, TiffStackReader) and reader.units == tile
    _assert_reads(path, vol)
    chunks = reader.natural_chunks()
    for n, c, t in zip(vol.shape, chunks, tile):  # whole tiles, grouped up to 128 voxels
        assert c == min(n, t * max(1, 128 // t)), (chunks, tile)
    assert open_volume(path).chunksize == chunks
    assert volume_info(path)["chunks"] == list(chunks)


@pytest.mark.parametrize("case", ["volumetric-striped", "volumetric-striped-zlib", "multipage-zlib",
                                  "multipage-tiled-zlib", "multipage-predictor", "big-endian", "multipage-raw",
                                  "volumetric-striped-raw"])
def test_other_layouts_round_trip(tmp_path, vol, case):
    path = tmp_path / "v.tif"
    kwargs = {
        "volumetric-striped": dict(volumetric=True, rowsperstrip=7, compression="zlib"),
        "volumetric-striped-zlib": dict(volumetric=True, compression="zlib"),
        "multipage-zlib": dict(compression="zlib", rowsperstrip=16),
        "multipage-tiled-zlib": dict(tile=(32, 48), compression="zlib"),
        "multipage-predictor": dict(compression="zlib", predictor=True),
        "big-endian": dict(byteorder=">"),
        "multipage-raw": dict(),
        "volumetric-striped-raw": dict(volumetric=True, rowsperstrip=9),
    }[case]
    tifffile.imwrite(path, vol, photometric="minisblack", **kwargs)
    reader = open_reader(path)
    if case.endswith("raw"):  # uncompressed, contiguous, native: positioned reads of what is asked
        assert isinstance(reader, RawReader) and reader.kind == "tiff"
    else:
        assert isinstance(reader, TiffStackReader)
        expected_units = {"volumetric-striped": (1, 7, 90), "multipage-zlib": (1, 16, 90),
                          "multipage-tiled-zlib": (1, 32, 48)}.get(case, (1, 70, 90))
        assert reader.units == expected_units
    _assert_reads(path, vol)


def test_a_read_decodes_only_the_tiles_it_overlaps(tmp_path, vol):
    """One tile's compressed bytes replaced by garbage: every region off that tile still reads, the
    tile's own region fails naming the file (reading the page whole would fail everywhere)."""
    path = tmp_path / "v.tif"
    tifffile.imwrite(path, vol, tile=(16, 32, 32), compression="zlib")
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        last = len(page.dataoffsets) - 1  # the tile at z 32:37, y 64:70, x 64:90
        offset, count = page.dataoffsets[last], page.databytecounts[last]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\xff" * count)
    reader = open_reader(path)
    np.testing.assert_array_equal(reader[0:32, :, :], vol[:32])
    np.testing.assert_array_equal(reader[30:37, 0:64, 0:90], vol[30:37, :64])
    np.testing.assert_array_equal(reader[30:37, 60:70, 0:64], vol[30:37, 60:70, :64])
    with pytest.raises(VolumeFormatError, match=r"v\.tif: reading the region \[32:37, 64:70, 64:90\] failed"):
        reader[32:37, 64:70, 64:90]


def test_whole_plane_units_are_grouped_by_bytes(tmp_path):
    """Strips of whole wide planes (and HDF5 chunks of one plane) group to ~64 MB, not 128 planes."""
    path = tmp_path / "wide.tif"
    tifffile.imwrite(path, np.zeros((40, 2048, 2048), np.uint8), compression="zlib", rowsperstrip=2048)
    reader = open_reader(path)
    assert reader.units == (1, 2048, 2048)
    assert reader.natural_chunks() == (16, 2048, 2048)  # 16 × 4 MB planes
    with h5py.File(tmp_path / "wide.h5", "w") as fh:  # chunks unwritten: a few KB on disk
        fh.create_dataset("data", shape=(300, 4096, 4096), dtype=np.float32, chunks=(1, 4096, 4096))
    assert open_reader(tmp_path / "wide.h5").natural_chunks() == (1, 4096, 4096)
    assert grouped_chunks((300, 300, 300), (16, 16, 16), np.dtype(np.uint8)) == (128, 128, 128)
    assert grouped_chunks((300, 4096, 4096), (1, 256, 256), np.dtype(np.float32)) == (128, 256, 256)
    assert grouped_chunks((300, 3000, 3000), (10, 3000, 3000), np.dtype(np.uint16)) == (10, 3000, 3000)


def test_series_of_4d_pages_reads_as_flat_planes(tmp_path):
    """A (t, z, y, x) series of compressed 2D pages reads as t·z planes, as the pages lie in the file."""
    data = np.random.default_rng(1).integers(0, 255, (3, 5, 40, 50), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "h.tif", data, compression="zlib", photometric="minisblack")
    reader = open_reader(tmp_path / "h.tif")
    assert reader.shape == (15, 40, 50) and reader.natural_chunks() == (15, 40, 50)
    np.testing.assert_array_equal(reader[4:12, 3:33, 7:50], data.reshape(15, 40, 50)[4:12, 3:33, 7:50])


def _read_region(reader: TiffStackReader, z0: int) -> tuple[np.ndarray, bool]:
    """A region, and whether the file it came through was opened by this process."""
    block = reader[z0:z0 + 9, 11:60, 3:77]
    return block, reader._open is not None and reader._open[0] == os.getpid()


def _read_in_child(reader: TiffStackReader, z0: int, send: Any) -> None:
    send.send(_read_region(reader, z0))
    send.close()


def test_reader_pickles_and_each_process_opens_its_own_file(tmp_path, vol):
    path = tmp_path / "v.tif"
    tifffile.imwrite(path, vol, tile=(8, 32, 32), compression="zlib")
    reader = open_reader(path)
    assert isinstance(reader, TiffStackReader)
    np.testing.assert_array_equal(reader[0:5, 0:5, 0:5], vol[:5, :5, :5])  # the file is open here now
    copy = pickle.loads(pickle.dumps(reader))
    assert copy._open is None
    np.testing.assert_array_equal(copy[2:30, 5:50, 1:88], vol[2:30, 5:50, 1:88])
    # forked children inherit the reader with its open file (and the file offset): each must open its own
    fork = multiprocessing.get_context("fork")
    starts, children = [0, 7, 14, 21, 28], []
    for z0 in starts:
        receive, send = fork.Pipe(duplex=False)
        child = fork.Process(target=_read_in_child, args=(reader, z0, send))  # inherited, not pickled
        child.start()
        children.append((child, receive))
    np.testing.assert_array_equal(reader[:, :, :], vol)  # the parent reads meanwhile
    for z0, (child, receive) in zip(starts, children):
        block, own = receive.recv()
        child.join(60)
        np.testing.assert_array_equal(block, vol[z0:z0 + 9, 11:60, 3:77])
        assert own, "a forked child read through its parent's open file"
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # pickled to a fresh interpreter
        block, own = pool.apply(_read_region, (reader, 3))
    np.testing.assert_array_equal(block, vol[3:12, 11:60, 3:77])
    assert own and reader._open is not None and reader._open[0] == os.getpid()


def test_convert_on_a_distributed_cluster(tmp_path, vol):
    from distributed import Client, LocalCluster

    path = tmp_path / "v.tif"
    tifffile.imwrite(path, vol, tile=(16, 32, 32), compression="zlib")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster):
        out = convert(path, tmp_path / "v.zarr", chunks=(16, 24, 40))
    np.testing.assert_array_equal(open_volume(out).compute(), vol)


def _zstd_tiff(path: Path, vol: np.ndarray, tile: tuple[int, int, int]) -> None:
    """A zstd-tiled volumetric TIFF written from tiles compressed here (tifffile needs no zstd encoder for that)."""
    codec = numcodecs.Zstd(level=3)
    padded = np.zeros([-(-n // t) * t for n, t in zip(vol.shape, tile)], vol.dtype)
    padded[: vol.shape[0], : vol.shape[1], : vol.shape[2]] = vol
    tiles = (codec.encode(np.ascontiguousarray(padded[z:z + tile[0], y:y + tile[1], x:x + tile[2]]))
             for z in range(0, padded.shape[0], tile[0]) for y in range(0, padded.shape[1], tile[1])
             for x in range(0, padded.shape[2], tile[2]))
    tifffile.imwrite(path, tiles, shape=vol.shape, dtype=vol.dtype, tile=tile, compression="zstd")


def test_zstd_tiles_read_or_fail_on_opening_naming_the_fix(tmp_path, vol):
    path = tmp_path / "z.tif"
    _zstd_tiff(path, vol, (16, 32, 32))
    if HAVE_IMAGECODECS:
        _assert_reads(path, vol)
    else:  # on opening, not in the middle of a run
        with pytest.raises(VolumeFormatError, match=r"z\.tif: its first tile \(ZSTD compression\).*pip install "
                                                    r"imagecodecs"):
            open_volume(path)


def test_folder_of_compressed_tiled_slices(tmp_path, vol):
    (tmp_path / "s").mkdir()
    for z in range(vol.shape[0]):
        tifffile.imwrite(tmp_path / "s" / f"s{z}.tif", vol[z], tile=(32, 32), compression="zlib")
    arr = open_volume(tmp_path / "s")
    assert arr.chunksize == vol.shape
    np.testing.assert_array_equal(arr[2:35, 9:61, 20:71].compute(), vol[2:35, 9:61, 20:71])


def test_truncated_raw_tiff_is_refused_on_opening(tmp_path, vol):
    path = tmp_path / "t.tif"
    tifffile.imwrite(path, vol, volumetric=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(VolumeFormatError, match=r"t\.tif: truncated"):
        open_tiff(path)


# ---- memory: a 1 GB volumetric tiled TIFF converted in a child process --------------------------

GB_SIDE = 1024
PEAK_BOUND_MB = 256  # measured ~60 MB over the child's baseline (the old reader: several GB)

CHILD = textwrap.dedent("""
    import json, sys, time

    def hwm():
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM:"))

    from volseg_dask.io import convert, open_volume

    vol = open_volume(sys.argv[1])  # imports done, the file opened: the baseline
    base = hwm()
    start = time.perf_counter()
    convert(sys.argv[1], sys.argv[2])
    print(json.dumps({"base_mb": base, "peak_mb": hwm(), "convert_s": time.perf_counter() - start,
                      "chunks": list(vol.chunksize)}))
""")


def _write_pattern_tiff(path: Path, side: int, tile: tuple[int, int, int]) -> None:
    """A side³ uint8 volumetric tiled TIFF, streamed tile by tile (never whole in memory)."""
    def tiles():
        for z in range(0, side, tile[0]):
            for y in range(0, side, tile[1]):
                for x in range(0, side, tile[2]):
                    zz, yy, xx = np.ogrid[z:z + tile[0], y:y + tile[1], x:x + tile[2]]
                    yield ((zz * 7 + yy * 3 + xx) % 251).astype(np.uint8)

    tifffile.imwrite(path, tiles(), shape=(side,) * 3, dtype=np.uint8, tile=tile, bigtiff=True)


def test_converting_a_1gb_volumetric_tiff_stays_small(tmp_path):
    start = time.perf_counter()
    src = tmp_path / "big.tif"
    _write_pattern_tiff(src, GB_SIDE, (16, 64, 64))
    written = time.perf_counter() - start
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(tmp_path / "big.zarr")],
                              capture_output=True, text=True, timeout=600, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, proc.stderr
        figures = json.loads(proc.stdout.strip().splitlines()[-1])
        out = open_volume(tmp_path / "big.zarr")
        assert out.shape == (GB_SIDE,) * 3
        zz, yy, xx = np.ogrid[500:530, 1000:1024, 0:40]
        np.testing.assert_array_equal(out[500:530, 1000:1024, 0:40].compute(), ((zz * 7 + yy * 3 + xx) % 251))
    finally:
        src.unlink(missing_ok=True)  # pytest keeps the last runs' temporary folders: drop the 1 GB now
    print(f"\n1 GB volumetric TIFF: written in {written:.1f} s; {figures}; test {time.perf_counter() - start:.1f} s")
    assert figures["chunks"] == [128, 128, 128]
    assert figures["peak_mb"] - figures["base_mb"] < PEAK_BOUND_MB, figures
