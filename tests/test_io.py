"""Reading every format lazily, converting, exporting, and failing cleanly."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import dask.array as da
import h5py
import mrcfile
import numpy as np
import pytest
import tifffile
import zarr

from volseg_dask import outputs
from volseg_dask.errors import (
    ConfigError,
    IncompleteOutputError,
    OutputExistsError,
    VolsegError,
    VolumeFormatError,
    VolumeNotFoundError,
    WriteFailedError,
)
from volseg_dask.io import convert, export, open_volume, split_key, volume_info


@pytest.fixture
def vol(small_volume):
    return small_volume[0]


def _write_all_formats(tmp: Path, vol: np.ndarray) -> dict[str, str]:
    np.save(tmp / "v.npy", vol)
    tifffile.imwrite(tmp / "v.tif", vol, photometric="minisblack")
    (tmp / "slices").mkdir()
    for z in range(vol.shape[0]):  # unpadded numbers: natural sort must give 2 before 10
        tifffile.imwrite(tmp / "slices" / f"s{z}.tif", vol[z])
    with h5py.File(tmp / "v.h5", "w") as fh:
        fh.create_dataset("entry/other", data=np.zeros((3, 3)))
        fh.create_dataset("entry/data", data=vol, chunks=(8, 16, 16))
    with mrcfile.new(tmp / "v.mrc") as mrc:
        mrc.set_data(vol.astype(np.int16))
        mrc.voxel_size = (2.0, 2.0, 2.0)
    zarr.create_array(str(tmp / "v2.zarr"), data=vol, chunks=(16, 16, 16), zarr_format=2)
    group = zarr.open_group(str(tmp / "g.zarr"), mode="w")
    group.create_array("inner/data", data=vol, chunks=(10, 20, 30))
    return {
        "npy": str(tmp / "v.npy"),
        "tiff": str(tmp / "v.tif"),
        "tiff-folder": str(tmp / "slices"),
        "hdf5-key": f"{tmp / 'v.h5'}:/entry/data",
        "hdf5-first-3d": str(tmp / "v.h5"),
        "mrc": str(tmp / "v.mrc"),
        "zarr-v2": str(tmp / "v2.zarr"),
        "zarr-group-path": str(tmp / "g.zarr" / "inner" / "data"),
        "zarr-group-key": f"{tmp / 'g.zarr'}:inner/data",
    }


def test_open_every_format(tmp_path, vol):
    paths = _write_all_formats(tmp_path, vol)
    for kind, path in paths.items():
        arr = open_volume(path)
        assert isinstance(arr, da.Array), kind
        assert arr.shape == vol.shape, kind
        expected = vol.astype(np.int16) if kind == "mrc" else vol
        np.testing.assert_array_equal(arr.compute(), expected, err_msg=kind)
        # an uneven region read across chunk borders
        np.testing.assert_array_equal(arr[3:37, 5:41, 7:50].compute(), expected[3:37, 5:41, 7:50], err_msg=kind)


def test_reads_follow_the_format_unit(tmp_path, vol):
    paths = _write_all_formats(tmp_path, vol)
    assert open_volume(paths["tiff"]).chunks[1:] == ((48,), (56,))  # whole planes
    assert open_volume(paths["npy"]).chunksize[2] == 56  # full rows
    assert open_volume(paths["zarr-v2"]).chunksize == (16, 16, 16)
    assert open_volume(paths["npy"], chunks=(8, 8, 8)).chunksize == (8, 8, 8)


def test_fortran_ordered_npy_reads_by_columns(tmp_path, vol):
    np.save(tmp_path / "f.npy", np.asfortranarray(vol))
    arr = open_volume(tmp_path / "f.npy", chunks=None)
    assert arr.chunksize == (40, 48, 56)  # whole columns along z, the axis contiguous in the file
    np.testing.assert_array_equal(arr.compute(), vol)
    np.testing.assert_array_equal(arr[3:37, 5:41, 7:50].compute(), vol[3:37, 5:41, 7:50])
    big = np.lib.format.open_memmap(tmp_path / "g.npy", mode="w+", dtype=np.uint8, shape=(300, 200, 500),
                                    fortran_order=True)
    del big
    assert open_volume(tmp_path / "g.npy").chunksize == (300, 128, 128)


def test_mrc_voxel_size_is_kept(tmp_path, vol):
    paths = _write_all_formats(tmp_path, vol)
    out = convert(paths["mrc"], tmp_path / "m.zarr")
    assert volume_info(out)["voxel_size"] == [2.0, 2.0, 2.0]


def test_split_key():
    assert split_key("a/b.h5:/x/y") == (Path("a/b.h5"), "x/y")
    assert split_key("a/b.h5") == (Path("a/b.h5"), None)
    assert split_key("s.zarr:labels") == (Path("s.zarr"), "labels")
    assert split_key("plain.tif") == (Path("plain.tif"), None)


def test_round_trip_npy_zarr_tiff_zarr_h5(tmp_path, vol):
    np.save(tmp_path / "a.npy", vol)
    z1 = convert(tmp_path / "a.npy", tmp_path / "a.zarr", chunks=(16, 20, 24))
    t = export(z1, tmp_path / "a.tif")
    z2 = convert(t, tmp_path / "b.zarr", chunks=17)
    h = export(z2, f"{tmp_path / 'b.h5'}:/volume/raw")
    n = export(f"{h}:/volume/raw", tmp_path / "c.npy")
    folder = export(z2, tmp_path / "slices")
    for path in (z1, t, z2, f"{h}:/volume/raw", n, folder):
        got = open_volume(path).compute()
        assert got.dtype == vol.dtype, path
        np.testing.assert_array_equal(got, vol, err_msg=str(path))
    arr = zarr.open_array(str(z2))
    assert arr.chunks == (17, 17, 17)
    meta = arr.attrs[outputs.ATTR]
    assert meta["complete"] is True and meta["source"] == str(t) and meta["version"]


def test_convert_a_region(tmp_path, vol):
    """--region cuts the image crop of a labelled sub-volume; the box is recorded."""
    np.save(tmp_path / "v.npy", vol)
    out = convert(tmp_path / "v.npy", tmp_path / "crop.zarr", chunks=8, region="3:20, :, 10:")
    np.testing.assert_array_equal(open_volume(out).compute(), vol[3:20, :, 10:])
    attrs = zarr.open_array(str(out)).attrs["volseg_dask"]
    assert attrs["region"] == [[3, 20], [0, vol.shape[1]], [10, vol.shape[2]]]
    pairs = convert(tmp_path / "v.npy", tmp_path / "crop2.zarr", region=[(0, 4), (5, 9), (0, 2)])
    np.testing.assert_array_equal(open_volume(pairs).compute(), vol[:4, 5:9, :2])
    with pytest.raises(ConfigError, match=r"5:5 along y is empty"):
        convert(tmp_path / "v.npy", tmp_path / "bad.zarr", region="0:4,5:5,:")
    assert not (tmp_path / "bad.zarr").exists()


def test_convert_keeps_dtypes(tmp_path):
    for dtype in (np.uint8, np.int16, np.float32):
        data = (np.arange(6 * 7 * 8) % 251).astype(dtype).reshape(6, 7, 8)
        np.save(tmp_path / f"{np.dtype(dtype).name}.npy", data)
        out = convert(tmp_path / f"{np.dtype(dtype).name}.npy", tmp_path / f"{np.dtype(dtype).name}.zarr", chunks=4)
        got = open_volume(out).compute()
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, data)


def test_info_reports_codec_and_range(small_zarr):
    info = volume_info(small_zarr[0])
    assert info["shape"] == [48, 48, 48] and info["dtype"] == "uint16"
    assert info["codecs"][0].startswith("blosc(cname=zstd")
    assert info["sample_range"][0] < info["sample_range"][1]
    assert info["complete"] is True


# ---- bad input ---------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(VolumeNotFoundError, match="nope.tif: no such file"):
        open_volume(tmp_path / "nope.tif")
    assert issubclass(VolumeNotFoundError, FileNotFoundError)


@pytest.mark.parametrize("suffix", [".tif", ".h5", ".npy", ".mrc"])
def test_corrupt_file(tmp_path, suffix):
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(VolumeFormatError, match=f"bad{suffix}: not a readable"):
        open_volume(bad)


def test_truncated_npy_and_tiff(tmp_path, vol):
    np.save(tmp_path / "t.npy", vol)
    data = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeFormatError, match="truncated"):
        open_volume(tmp_path / "t.npy")
    tifffile.imwrite(tmp_path / "t.tif", vol)
    data = (tmp_path / "t.tif").read_bytes()
    (tmp_path / "t.tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeFormatError, match="t.tif"):
        open_volume(tmp_path / "t.tif").compute()


def test_corrupt_zarr_chunk(tmp_path, vol):
    out = convert_npy(tmp_path, vol)
    chunk = next(p for p in (out / "c").rglob("*") if p.is_file())
    chunk.write_bytes(b"garbage")
    key = "/".join(chunk.relative_to(out).parts)
    with pytest.raises(VolumeFormatError, match=f"chunk {key} .* cannot be decoded .*the store is damaged"):
        open_volume(out).compute()


def convert_npy(tmp_path: Path, vol: np.ndarray) -> Path:
    np.save(tmp_path / "src.npy", vol)
    return convert(tmp_path / "src.npy", tmp_path / "src.zarr", chunks=16)


def test_hdf5_without_the_dataset(tmp_path, vol):
    with h5py.File(tmp_path / "f.h5", "w") as fh:
        fh.create_dataset("a", data=vol)
        fh.create_dataset("flat", data=np.zeros((4, 4)))
    with pytest.raises(VolumeNotFoundError, match=r"has no dataset /b; datasets in the file: /a, /flat"):
        open_volume(f"{tmp_path / 'f.h5'}:/b")
    with h5py.File(tmp_path / "g.h5", "w") as fh:
        fh.create_dataset("flat", data=np.zeros((4, 4)))
    with pytest.raises(VolumeFormatError, match="holds no 3D dataset"):
        open_volume(tmp_path / "g.h5")


def test_tiff_folder_with_differing_shapes(tmp_path, vol):
    (tmp_path / "s").mkdir()
    tifffile.imwrite(tmp_path / "s" / "a1.tif", vol[0])
    tifffile.imwrite(tmp_path / "s" / "a2.tif", vol[1, :10])
    with pytest.raises(VolumeFormatError, match=r"a2.tif: shape \(10, 56\) uint16 differs from the first slice"):
        open_volume(tmp_path / "s")


@pytest.mark.parametrize("shape", [(20, 30), (2, 5, 6, 7)])
def test_wrong_dimensionality(tmp_path, shape):
    np.save(tmp_path / "w.npy", np.zeros(shape, np.uint8))
    expected = re.escape(f"expected a 3D volume (z, y, x), found shape {tuple(shape)}")
    with pytest.raises(VolumeFormatError, match=expected):
        open_volume(tmp_path / "w.npy")


def test_zarr_group_without_a_named_array(small_zarr, tmp_path):
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("a", shape=(4, 4, 4), dtype="u1")
    group.create_array("b", shape=(4, 4, 4), dtype="u1")
    with pytest.raises(VolumeFormatError, match="is a Zarr group, not an array; name one of its members"):
        open_volume(tmp_path / "g.zarr")


def test_unknown_format(tmp_path):
    (tmp_path / "v.xyz").write_text("x")
    with pytest.raises(VolumeFormatError, match="unknown volume format '.xyz'"):
        open_volume(tmp_path / "v.xyz")


def test_existing_output_is_refused_and_kept(tmp_path, vol):
    src = convert_npy(tmp_path, vol)
    (tmp_path / "out.tif").write_text("precious")
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        export(src, tmp_path / "out.tif")
    assert (tmp_path / "out.tif").read_text() == "precious"
    export(src, tmp_path / "out.tif", overwrite=True)
    np.testing.assert_array_equal(open_volume(tmp_path / "out.tif").compute(), vol)


def test_incomplete_input_is_refused(tmp_path):
    arr = outputs.create_array(tmp_path / "half.zarr", shape=(8, 8, 8), dtype="u1", chunks=(4, 4, 4))
    outputs.set_status(arr, blocks_done=3, blocks_total=8)
    with pytest.raises(IncompleteOutputError, match=r"incomplete \(3 of 8 blocks written\)"):
        open_volume(tmp_path / "half.zarr")
    with pytest.raises(IncompleteOutputError):
        export(tmp_path / "half.zarr", tmp_path / "x.tif")
    assert not (tmp_path / "x.tif").exists()


def test_disk_failure_midway_leaves_nothing(tmp_path, vol, monkeypatch):
    """A write error part-way (simulated ENOSPC) removes the partial output; dst never appears."""
    np.save(tmp_path / "src.npy", vol)
    original = zarr.storage.LocalStore.set
    calls = {"n": 0}

    async def failing_set(self, key, value):
        if key.startswith("c/"):
            calls["n"] += 1
            if calls["n"] > 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        return await original(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", failing_set)
    with pytest.raises(WriteFailedError, match="No space left on device.*nothing was left at") as info:
        convert(tmp_path / "src.npy", tmp_path / "dst.zarr", chunks=8)
    assert isinstance(info.value, OSError) and isinstance(info.value, VolsegError)
    assert calls["n"] > 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.npy"]


def test_tiff_export_failure_leaves_nothing(tmp_path, vol, monkeypatch):
    src = convert_npy(tmp_path, vol)
    import volseg_dask.io.conversion as io_mod

    real = io_mod.compute
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.EIO, "Input/output error")
        return real(*args, **kwargs)

    monkeypatch.setattr(io_mod, "compute", flaky)
    with pytest.raises(WriteFailedError, match="Input/output error"):
        export(src, tmp_path / "o.tif")
    assert not any(p.name.startswith((".o.tif", "o.tif")) for p in tmp_path.iterdir())


def test_leftovers_of_killed_runs_are_removed(tmp_path, vol):
    import socket

    np.save(tmp_path / "a.npy", vol)
    dead = tmp_path / f".a.zarr.partial-{socket.gethostname()}-999999999-deadbeef"
    dead.mkdir()
    alive = tmp_path / f".a.zarr.partial-{socket.gethostname()}-{os.getpid()}-0badf00d"
    alive.mkdir()
    other_host = tmp_path / ".a.zarr.partial-elsewhere-1-abcdef12"
    other_host.mkdir()
    convert(tmp_path / "a.npy", tmp_path / "a.zarr")
    assert not dead.exists() and alive.exists() and other_host.exists()


def test_export_refuses_an_input_rewritten_while_read(tmp_path, monkeypatch):
    import volseg_dask.io.conversion as io_mod
    from volseg_dask.synthetic import write_demo_data

    image, _ = write_demo_data(tmp_path, 16, seed=1, chunks=8)
    real = io_mod.compute

    def rewrite_midway(*args, **kwargs):
        out = real(*args, **kwargs)
        write_demo_data(tmp_path, 16, seed=2, chunks=8, overwrite=True)
        return out

    monkeypatch.setattr(io_mod, "compute", rewrite_midway)
    with pytest.raises(IncompleteOutputError, match="was rewritten while it was being read"):
        export(image, tmp_path / "o.tif")
    assert not (tmp_path / "o.tif").exists()
