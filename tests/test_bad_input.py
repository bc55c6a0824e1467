"""The bad-input matrix: every case exits non-zero with one clear line and leaves nothing finished.

Each case is a command line over a small world of good and bad files. The checks are the same for
all: exit code 1, exactly one ``error:`` line naming the file or key, no traceback, and the output
path either absent or not marked complete.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch
import zarr
from click.testing import CliRunner

from volseg_dask.cli import cli
from volseg_dask.config import Settings
from volseg_dask.models import FORMAT
from volseg_dask.outputs import create_array, status
from volseg_dask.prediction import predict
from volseg_dask.synthetic import make_volume, write_demo_data

from .conftest import make_model_file


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("world")
    img, lab = make_volume(24, seed=1)
    image, _ = write_demo_data(w / "good", 24, seed=1, chunks=12)
    np.save(w / "img.npy", img)
    np.save(w / "lab.npy", lab)
    np.save(w / "flat.npy", img[0])
    np.save(w / "four_d.npy", img[None])
    nan = img.astype(np.float32)
    nan[3, 4, 5] = np.nan
    np.save(w / "nan.npy", nan)
    np.save(w / "float_labels.npy", lab.astype(np.float32) + 0.5)
    (w / "notes").mkdir()
    (w / "notes" / "readme.txt").write_text("not an image")
    tifffile.imwrite(w / "t.tif", img)
    data = (w / "t.tif").read_bytes()
    (w / "truncated.tif").write_bytes(data[: len(data) // 3])
    (w / "corrupt.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00garbage" * 50)
    with h5py.File(w / "keys.h5", "w") as fh:
        fh.create_dataset("data", data=img)
    (w / "mixed").mkdir()
    tifffile.imwrite(w / "mixed" / "a1.tif", img[0])
    tifffile.imwrite(w / "mixed" / "a2.tif", img[1, :10])
    damaged = w / "damaged.zarr"
    arr = zarr.create_array(str(damaged), shape=img.shape, chunks=(12, 12, 12), dtype=img.dtype)
    arr[:] = img
    next(p for p in (damaged / "c").rglob("*") if p.is_file()).write_bytes(b"not blosc")
    half = create_array(w / "half.zarr", shape=(8, 8, 8), dtype="u1", chunks=(4, 4, 4))
    half[:4] = 1
    (w / "exists.zarr").mkdir()
    (w / "exists.tif").write_text("keep me")
    if os.geteuid() == 0:  # root writes through permission bits: use a folder no one may create files in
        (w / "readonly").symlink_to("/sys")
    else:
        (w / "readonly").mkdir()
        (w / "readonly").chmod(0o555)
    # models
    model = make_model_file(w / "model.pt")
    make_model_file(w / "rgb.pt", n_slices=1)
    state = torch.load(w / "rgb.pt", weights_only=True)
    state["meta"]["in_channels"] = 3
    torch.save(state, w / "rgb.pt")
    torch.save({"weights": torch.zeros(2)}, w / "foreign.pt")
    state["meta"].update(in_channels=1, downsample=2)
    torch.save(state, w / "half_res.pt")
    data = model.read_bytes()
    (w / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save({"format": FORMAT, "format_version": 42, "state_dict": {}, "meta": {}}, w / "future.pt")

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(w / "pwned"),))

    (w / "payload.pt").write_bytes(pickle.dumps({"format": FORMAT, "x": Payload()}))
    # settings files
    (w / "unknown.yaml").write_text("predict:\n  halo_size: 3\n")
    (w / "wrongtype.yaml").write_text("predict:\n  batch_size: many\n")
    (w / "negative.yaml").write_text("predict:\n  chunks: [-8, 16, 16]\n")
    (w / "notyaml.yaml").write_text("predict: [unclosed\n")
    # prediction outputs
    s = Settings().with_overrides({"predict.chunks": [12, 12, 12], "predict.halo": 4, "predict.axes": "z"})
    predict(image, model, w / "pred.zarr", s)
    predict(image, model, w / "fused.zarr", s.with_overrides({"predict.fused": True}))
    locked = w / "locked.zarr"
    predict(image, model, locked, s)
    (w / ".locked.zarr.lock").write_text('{"host": "another-node", "pid": 1, "since": "then"}')
    unfinished = w / "unfinished.zarr"
    predict(image, model, unfinished, s)
    from volseg_dask.outputs import set_status

    set_status(zarr.open_group(str(unfinished), mode="r+"), complete=False)
    return w


W = "{w}"
PREDICT = ["predict", f"{W}/good/image.zarr", f"{W}/model.pt", "--chunks", "12", "--halo", "4", "--axes", "z", "-o"]

CASES = {
    # convert
    "convert: missing input": (["convert", f"{W}/nope.tif", f"{W}/o1.zarr"], "nope.tif: no such file"),
    "convert: folder that is no volume": (["convert", f"{W}/notes", f"{W}/o2.zarr"], "neither TIFF slices nor Zarr"),
    "convert: truncated TIFF": (["convert", f"{W}/truncated.tif", f"{W}/o3.zarr"], "truncated.tif"),
    "convert: corrupt HDF5": (["convert", f"{W}/corrupt.h5", f"{W}/o4.zarr"], "corrupt.h5: not a readable HDF5"),
    "convert: damaged Zarr chunk": (["convert", f"{W}/damaged.zarr", f"{W}/o5.zarr"], "damaged.zarr: chunk c/0/0/0"),
    "convert: 2D data": (["convert", f"{W}/flat.npy", f"{W}/o6.zarr"], "expected a 3D volume"),
    "convert: 4D data": (["convert", f"{W}/four_d.npy", f"{W}/o7.zarr"], "select one channel"),
    "convert: HDF5 key missing": (["convert", f"{W}/keys.h5:/raw", f"{W}/o8.zarr"], "has no dataset /raw"),
    "convert: TIFF slices differ": (["convert", f"{W}/mixed", f"{W}/o9.zarr"], "a2.tif: shape"),
    "convert: unknown format": (["convert", f"{W}/notes/readme.txt", f"{W}/o10.zarr"], "unknown volume format"),
    "convert: output exists": (["convert", f"{W}/img.npy", f"{W}/exists.zarr"], "exists.zarr: already exists"),
    "convert: read-only folder": (["convert", f"{W}/img.npy", f"{W}/readonly/o.zarr"], "is not writable"),
    "convert: bad --chunks": (["convert", f"{W}/img.npy", f"{W}/o11.zarr", "--chunks", "a,b"],
                              "'a,b': give one size"),
    "convert: region outside": (["convert", f"{W}/img.npy", f"{W}/o12.zarr", "--region", "0:8,0:8,20:30"],
                                "--region: 20:30 along x is empty or outside the volume (0:24)"),
    "convert: region malformed": (["convert", f"{W}/img.npy", f"{W}/o13.zarr", "--region", "0-8,:,:"],
                                  "--region: '0-8,:,:' is not z0:z1,y0:y1,x0:x1"),
    "predict: odd blocks for a downsampling model": ([*PREDICT[:2], f"{W}/half_res.pt", "--chunks", "11", "--halo",
                                                     "4", "--axes", "z", "-o", f"{W}/p17.zarr"],
                                                    "predict.chunks: [11, 11, 11] must be multiples of 2"),
    # export
    "export: incomplete input": (["export", f"{W}/half.zarr", f"{W}/e1.tif"], "incomplete"),
    "export: unknown format": (["export", f"{W}/img.npy", f"{W}/e2.png"], "cannot export to '.png'"),
    "export: output exists": (["export", f"{W}/img.npy", f"{W}/exists.tif"], "exists.tif: already exists"),
    "export: missing input": (["export", f"{W}/nope.zarr", f"{W}/e3.tif"], "nope.zarr: no such file"),
    "export: read-only folder": (["export", f"{W}/img.npy", f"{W}/readonly/e.tif"], "is not writable"),
    # info
    "info: missing": (["info", f"{W}/nope.npy"], "nope.npy: no such file"),
    "info: corrupt HDF5": (["info", f"{W}/corrupt.h5"], "not a readable HDF5"),
    # predict: models
    "predict: model missing": ([*PREDICT[:2], f"{W}/nope.pt", *PREDICT[3:], f"{W}/p1.zarr"], "nope.pt: model file"),
    "predict: model not ours": ([*PREDICT[:2], f"{W}/foreign.pt", *PREDICT[3:], f"{W}/p2.zarr"],
                                "not a volseg_dask model file"),
    "predict: truncated model": ([*PREDICT[:2], f"{W}/truncated.pt", *PREDICT[3:], f"{W}/p3.zarr"], "truncated"),
    "predict: newer model format": ([*PREDICT[:2], f"{W}/future.pt", *PREDICT[3:], f"{W}/p4.zarr"],
                                    "format version 42 is newer"),
    "predict: pickle with code": ([*PREDICT[:2], f"{W}/payload.pt", *PREDICT[3:], f"{W}/p5.zarr"], "refused"),
    "predict: channels do not fit": ([*PREDICT[:2], f"{W}/rgb.pt", *PREDICT[3:], f"{W}/p6.zarr"],
                                     "takes 3 channels"),
    # predict: data and settings
    "predict: volume missing": (["predict", f"{W}/nope.zarr", *PREDICT[2:], f"{W}/p7.zarr"], "nope.zarr: no such"),
    "predict: NaN in the image": (["predict", f"{W}/nan.npy", *PREDICT[2:], f"{W}/p8.zarr"], "NaN or infinite"),
    "predict: halo larger than block": ([*PREDICT, f"{W}/p9.zarr", "--halo", "40"], "predict.halo: 40 is larger"),
    "predict: YAML unknown key": ([*PREDICT, f"{W}/p10.zarr", "-c", f"{W}/unknown.yaml"], "'halo_size'"),
    "predict: YAML wrong type": ([*PREDICT, f"{W}/p11.zarr", "-c", f"{W}/wrongtype.yaml"],
                                 "predict.batch_size: expected a number or 'auto', found 'many'"),
    "predict: YAML negative size": ([*PREDICT, f"{W}/p12.zarr", "-c", f"{W}/negative.yaml"],
                                    "predict.chunks[0]: -8 is below the minimum"),
    "predict: not YAML": ([*PREDICT, f"{W}/p13.zarr", "-c", f"{W}/notyaml.yaml"], "not valid YAML"),
    "predict: YAML missing": ([*PREDICT, f"{W}/p14.zarr", "-c", f"{W}/nope.yaml"], "settings file not found"),
    "predict: output complete": ([*PREDICT, f"{W}/pred.zarr"], "already holds a complete prediction"),
    "predict: read-only folder": ([*PREDICT, f"{W}/readonly/p.zarr"], "is not writable"),
    "predict: incomplete input": (["predict", f"{W}/half.zarr", *PREDICT[2:], f"{W}/p15.zarr"], "incomplete"),
    "predict: output locked": ([*PREDICT, f"{W}/locked.zarr", "--overwrite"], "in use by another run"),
    "predict: unknown device": ([*PREDICT, f"{W}/p16.zarr", "--device", "tpu"], "predict.device: 'tpu'"),
    # merge
    "merge: not a prediction": (["merge", f"{W}/good/image.zarr"], "holds no per-axis probabilities"),
    "merge: fused output": (["merge", f"{W}/fused.zarr"], "fused outputs have labels only"),
    "merge: incomplete": (["merge", f"{W}/half.zarr"], "holds no per-axis probabilities"),
    "merge: missing": (["merge", f"{W}/nope.zarr"], "nope.zarr: not a prediction output"),
    "merge: locked": (["merge", f"{W}/locked.zarr"], "in use by another run"),
    # evaluate
    "evaluate: shapes differ": (["evaluate", f"{W}/pred.zarr/labels", f"{W}/half.zarr"], "incomplete"),
    "evaluate: float labels": (["evaluate", f"{W}/float_labels.npy", f"{W}/lab.npy"], "labels must be integers"),
    "evaluate: missing truth": (["evaluate", f"{W}/pred.zarr/labels", f"{W}/nope.zarr"], "nope.zarr: no such"),
    "evaluate: unfinished prediction": (["evaluate", f"{W}/unfinished.zarr/labels", f"{W}/lab.npy"],
                                        "(it belongs to"),
    "evaluate: shape mismatch": (["evaluate", f"{W}/flat.npy", f"{W}/lab.npy"], "expected a 3D volume"),
    # settings
    "config: write over a file": (["config", "write-defaults", f"{W}/unknown.yaml"], "already exists"),
    "config: unknown key": (["config", "check", f"{W}/unknown.yaml"], "unknown key predict.'halo_size'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(world, case):
    args, message = CASES[case]
    argv = [a.replace(W, str(world)) for a in args]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code != 0, (case, result.output)
    assert isinstance(result.exception, SystemExit), (case, repr(result.exception))
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert "Traceback" not in result.output
    if message is not None:
        assert any(message in line for line in lines), (case, result.output)
    error_lines = [line for line in lines if line.startswith(("error:", "Error:"))]
    assert len(error_lines) == 1, (case, result.output)
    # nothing that looks finished at any fresh output of the case (named o*, e*, p* in the world)
    for a in argv[1:]:
        out = Path(a)
        if out.parent == world and re.fullmatch(r"[oep]\d+\.(zarr|tif)", out.name) and out.exists():
            if (out / "zarr.json").exists():
                assert status(zarr.open_group(str(out), mode="r")).get("complete") is not True, case
            else:
                raise AssertionError(f"{case}: {out} was left behind")
    assert not (world / "pwned").exists()


def test_the_matrix_is_large_enough():
    assert len(CASES) >= 40


def test_disk_full_midway_through_predict(world, monkeypatch):
    """A write error mid-prediction: a clear error, and the output stays marked incomplete."""
    original = zarr.storage.LocalStore.set
    calls = {"n": 0}

    async def failing_set(self, key, value):
        if "/c/" in key or key.startswith("c/"):
            calls["n"] += 1
            if calls["n"] > 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return await original(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", failing_set)
    out = world / "full.zarr"
    result = CliRunner().invoke(cli, [a.replace(W, str(world)) for a in PREDICT] + [str(out)])
    assert result.exit_code == 1 and "No space left on device" in result.output, result.output
    assert "Traceback" not in result.output
    assert status(zarr.open_group(str(out), mode="r"))["complete"] is False
