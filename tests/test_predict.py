"""Out-of-core prediction: chunked == whole volume, fused == per-axis, resume, refusals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr

from volseg_dask.config import Settings
from volseg_dask.errors import (
    ConfigError,
    IncompleteOutputError,
    OutputExistsError,
    OutputLockedError,
    VolumeValueError,
)
from volseg_dask.grid import BlockGrid
from volseg_dask.io import open_volume
from volseg_dask.outputs import OutputLock, create_array, mark_complete, status
from volseg_dask.prediction import merge, predict, predict_array
from volseg_dask.prediction.merging import write_merged
from volseg_dask.prediction.votes import merge_block
from volseg_dask.synthetic import write_demo_data

from .conftest import make_model_file, read_array


def settings(**predict_options) -> Settings:
    return Settings().with_overrides({f"predict.{k}": v for k, v in predict_options.items()})


@pytest.fixture(scope="module")
def vol96(tmp_path_factory) -> Path:
    image, _ = write_demo_data(tmp_path_factory.mktemp("v96"), 96, seed=5, chunks=32)
    return image


@pytest.fixture(scope="module")
def vol48(tmp_path_factory) -> tuple[Path, Path]:
    return write_demo_data(tmp_path_factory.mktemp("v48"), 48, seed=3, chunks=16)


def probs(out: Path, axis: str) -> np.ndarray:
    return zarr.open_array(str(out / "probabilities" / axis))[:]


def test_chunked_prediction_equals_whole_volume(vol96, trained_model, tmp_path):
    """Several uneven blocks with a halo covering the network's context give what one block gives."""
    chunked = predict(vol96, trained_model, tmp_path / "chunked.zarr", settings(chunks=[48, 64, 56], halo=48))
    whole = predict(vol96, trained_model, tmp_path / "whole.zarr", settings(chunks=[96, 96, 96], halo=48))
    assert chunked.blocks_computed == 3 * 2 * 2 * 2 and whole.blocks_computed == 3
    for axis in "zyx":
        diff = np.abs(probs(chunked.output, axis).astype(int) - probs(whole.output, axis))
        assert (diff <= 1).mean() >= 0.999, (axis, (diff <= 1).mean(), diff.max())
    a, b = chunked.labels.compute(), whole.labels.compute()
    assert (a == b).mean() >= 0.999
    assert len(np.unique(a)) == 3  # a trained model, not a constant answer


def test_map_overlap_path_equals_store_path(vol48, trained_model, tmp_path):
    s = settings(chunks=[20, 24, 28], halo=8)
    result = predict(vol48[0], trained_model, tmp_path / "o.zarr", s)
    vol = open_volume(vol48[0], chunks=(20, 24, 28))
    for axis in "zyx":
        lazy = predict_array(vol, trained_model, axis=axis, settings=s)
        assert isinstance(lazy, da.Array) and lazy.shape == (3, 48, 48, 48)
        np.testing.assert_array_equal(lazy.compute(), probs(result.output, axis), err_msg=axis)


def test_fused_gives_the_per_axis_labels(vol48, trained_model, tmp_path):
    extras = {"entropy": True, "disagreement": True}
    per_axis = predict(vol48[0], trained_model, tmp_path / "a.zarr", settings(chunks=[16, 20, 24], halo=8, **extras))
    fused = predict(vol48[0], trained_model, tmp_path / "f.zarr",
                    settings(chunks=[16, 20, 24], halo=8, fused=True, **extras))
    assert not (fused.output / "probabilities").exists()
    for name in ("labels", "confidence", "entropy", "disagreement"):
        np.testing.assert_array_equal(open_volume(fused.output / name).compute(),
                                      open_volume(per_axis.output / name).compute(), err_msg=name)


def test_original_label_values_come_back(vol48, tmp_path):
    model = make_model_file(tmp_path / "m.pt", label_values=(0, 7, 255))
    result = predict(vol48[0], model, tmp_path / "o.zarr", settings(chunks=[24, 24, 24], halo=8, axes="z"))
    assert set(np.unique(result.labels.compute())) <= {0, 7, 255}


def test_25d_model_and_test_time_augmentation(vol48, tmp_path):
    model = make_model_file(tmp_path / "m3.pt", n_slices=3)
    s = settings(chunks=[20, 24, 28], halo=8, axes="all12", tta_flips=True)
    result = predict(vol48[0], model, tmp_path / "o.zarr", s)
    vol = open_volume(vol48[0], chunks=(20, 24, 28))
    np.testing.assert_array_equal(predict_array(vol, model, axis="y", settings=s).compute(), probs(result.output, "y"))
    assert sorted(p.name for p in (result.output / "probabilities").iterdir() if p.is_dir()) == ["x", "y", "z"]


def test_merge_methods_by_hand():
    # two classes, three axes, one voxel each: probabilities (C, 1, 1, 1) as uint8
    def p(a, b):
        return np.array([a, b], np.uint8).reshape(2, 1, 1, 1)

    axes = [p(100, 155), p(250, 5), p(120, 135)]  # axis 1 is the most confident: class 0
    values = [3, 9]
    assert merge_block(*axes, method="max", label_values=values)[0].item() == 3
    # mean: class 0 = (100+250+120)/3 = 156.7 > class 1 = 98.3
    assert merge_block(*axes, method="mean", label_values=values)[0].item() == 3
    # vote: axes 0 and 2 say class 1
    out = merge_block(*axes, method="vote", label_values=values, outputs=("confidence", "disagreement"))
    assert out[0].item() == 9 and out[2].item() == 1
    assert out[1].item() == round((155 + 5 + 135) / 3)
    ent = merge_block(p(128, 127), method="max", label_values=values, outputs=("entropy",))[1].item()
    assert ent == 255


@pytest.mark.parametrize("method", ["max", "mean", "vote"])
def test_blockwise_merge_equals_whole_arrays(tmp_path, method):
    """write_merged (the merge of predict and `volseg merge`) on uneven blocks equals one whole-array merge."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (3, 23, 31, 17), dtype=np.uint8) for _ in range(3)]
    whole = merge_block(*arrays, method=method, label_values=[0, 4, 9], outputs=("confidence", "entropy"))
    group = zarr.open_group(str(tmp_path / "m.zarr"), mode="w", zarr_format=3)
    for axis, probs in zip("zyx", arrays):
        arr = create_array(group, name=f"probabilities/{axis}", shape=probs.shape, dtype=np.uint8, chunks=(3, 7, 11, 5))
        arr[...] = probs
        mark_complete(arr)
    grid = BlockGrid((23, 31, 17), (7, 11, 5))
    write_merged(group, tmp_path / "m.zarr", "zyx", grid, method=method, label_values=[0, 4, 9],
                 extras=("confidence", "entropy"), attrs={})
    for row, name in enumerate(("labels", "confidence", "entropy")):
        np.testing.assert_array_equal(read_array(tmp_path / "m.zarr" / name), whole[row], err_msg=name)
        assert zarr.open_array(str(tmp_path / "m.zarr" / name / "0")).chunks == (7, 11, 5)


def test_rerun_refuses_mixing_and_existing(vol48, tiny_model, tmp_path):
    out = tmp_path / "o.zarr"
    predict(vol48[0], tiny_model, out, settings(chunks=[24, 24, 24], halo=8, axes="z"))
    with pytest.raises(OutputExistsError, match="already holds a complete prediction"):
        predict(vol48[0], tiny_model, out, settings(chunks=[24, 24, 24], halo=8, axes="z"))
    # an unfinished output made with other settings is not mixed with new blocks
    group = zarr.open_group(str(out), mode="r+")
    from volseg_dask.outputs import set_status

    set_status(group, complete=False)
    with pytest.raises(OutputExistsError, match="differs in: halo"):
        predict(vol48[0], tiny_model, out, settings(chunks=[24, 24, 24], halo=12, axes="z"))
    redo = predict(vol48[0], tiny_model, out, settings(chunks=[24, 24, 24], halo=12, axes="z"), overwrite=True)
    assert redo.blocks_computed == 8 and status(zarr.open_group(str(out)))["complete"] is True


def test_a_second_run_on_the_same_output_is_refused(vol48, tiny_model, tmp_path):
    out = tmp_path / "o.zarr"
    with OutputLock(out), pytest.raises(OutputLockedError, match=f"pid {os.getpid()}"):
        predict(vol48[0], tiny_model, out, settings(chunks=[24, 24, 24], halo=8, axes="z"))
    assert not out.exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(vol48, tiny_model, tmp_path, caplog):
    import json
    import socket

    out = tmp_path / "o.zarr"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / ".o.zarr.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "since": "earlier"}))
    result = predict(vol48[0], tiny_model, out, settings(chunks=[24, 24, 24], halo=8, axes="z"))
    assert result.blocks_computed == 8 and not lock.exists()
    assert "stale lock" in caplog.text


def test_two_runs_give_bit_identical_outputs(vol48, tiny_model, tmp_path):
    runs = [predict(vol48[0], tiny_model, tmp_path / f"run{i}.zarr",
                    settings(chunks=[24, 16, 24], halo=8, axes="zyx")) for i in range(2)]
    for name in ("labels/0", "confidence/0", "probabilities/z", "probabilities/y", "probabilities/x"):
        a, b = (read_array(r.output / name) for r in runs)
        assert a.shape == b.shape and np.array_equal(a, b), name


def test_halo_larger_than_block_and_nan_input(vol48, tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="predict.halo: 40 is larger than the block"):
        predict(vol48[0], tiny_model, tmp_path / "o.zarr", settings(chunks=[16, 16, 16], halo=40))
    data = np.random.default_rng(0).random((32, 32, 32), dtype=np.float32)
    data[20, 5, 5] = np.nan
    np.save(tmp_path / "nan.npy", data)
    with pytest.raises(VolumeValueError, match="NaN or infinite values in the block"):
        predict(tmp_path / "nan.npy", tiny_model, tmp_path / "n.zarr", settings(chunks=[16, 16, 16], halo=8))
    assert status(zarr.open_group(str(tmp_path / "n.zarr")))["complete"] is False
    with pytest.raises(IncompleteOutputError):
        open_volume(tmp_path / "n.zarr" / "probabilities" / "z")


def test_dropping_probabilities_and_merging_again(vol48, tiny_model, tmp_path):
    out = predict(vol48[0], tiny_model, tmp_path / "o.zarr", settings(chunks=[24, 24, 24], halo=8)).output
    first = open_volume(out / "labels").compute()
    merge(out, method="vote", outputs=("disagreement",))
    assert status(zarr.open_group(str(out)))["merge"] == "vote"
    assert open_volume(out / "disagreement").compute().max() <= 3
    merge(out, method="max", keep_probabilities=False)
    np.testing.assert_array_equal(open_volume(out / "labels").compute(), first)
    assert not (out / "probabilities").exists()
    with pytest.raises(IncompleteOutputError):
        merge(out)


def _run_cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "volseg_dask.cli", "-q", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_resume_after_sigkill_gives_the_uninterrupted_result(vol48, tiny_model, tmp_path):
    """A real SIGKILL mid-way; the rerun computes only the missing blocks; the result is identical."""
    args = ["--chunks", "12", "--halo", "8", "--entropy"]
    ref = _run_cli("predict", str(vol48[0]), str(tiny_model), "-o", str(tmp_path / "ref.zarr"), *args)
    assert ref.wait(timeout=300) == 0, ref.stderr.read() if ref.stderr else ""
    out = tmp_path / "killed.zarr"
    proc = _run_cli("predict", str(vol48[0]), str(tiny_model), "-o", str(out), *args)
    done = out / ".volseg" / "done"
    deadline = time.time() + 120
    while time.time() < deadline and sum(1 for _ in done.rglob("*.*")) < 40:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_after = sum(1 for _ in done.rglob("*.*"))
    total = 3 * 4 ** 3
    assert 40 <= killed_after < total
    assert status(zarr.open_group(str(out)))["complete"] is False
    with pytest.raises(IncompleteOutputError):
        open_volume(out / "probabilities" / "z")
    rerun = _run_cli("predict", str(vol48[0]), str(tiny_model), "-o", str(out), *args)
    assert rerun.wait(timeout=300) == 0
    message = rerun.stdout.read() if rerun.stdout else ""
    computed = int(message.split("(")[1].split(" blocks computed")[0])
    assert computed == total - killed_after, message
    for name in ("labels", "confidence", "entropy", "probabilities/z", "probabilities/y", "probabilities/x"):
        np.testing.assert_array_equal(read_array(out / name), read_array(tmp_path / "ref.zarr" / name), err_msg=name)


@pytest.mark.distributed
def test_local_cluster_gives_the_threaded_result(vol48, tiny_model, tmp_path):
    from distributed import Client, LocalCluster

    s = settings(chunks=[16, 24, 24], halo=8)
    threaded = predict(vol48[0], tiny_model, tmp_path / "t.zarr", s)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster):
        clustered = predict(vol48[0], tiny_model, tmp_path / "c.zarr", s)
    for name in ("labels", "confidence", "probabilities/x"):
        np.testing.assert_array_equal(read_array(clustered.output / name),
                                      read_array(threaded.output / name), err_msg=name)


def test_outputs_are_ome_zarr_multiscales(tmp_path, tiny_model):
    """Labels and confidence are NGFF 0.5 pyramids that the ome-zarr package reads back."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    from volseg_dask.resample import mode_2x2x2

    image, _ = write_demo_data(tmp_path, (72, 80, 96), seed=2, chunks=32)
    out = predict(image, tiny_model, tmp_path / "o.zarr", settings(chunks=[32, 32, 32], halo=8, axes="z")).output
    for name, levels in (("labels", 2), ("confidence", 2)):
        nodes = list(Reader(parse_url(str(out / name)))())
        assert nodes, name
        data = nodes[0].data
        assert len(data) == levels, (name, len(data))
        assert [tuple(d.shape) for d in data] == [(72, 80, 96), (36, 40, 48)]
        meta = nodes[0].metadata
        assert [a["name"] for a in meta["axes"]] == ["z", "y", "x"]
    labels = read_array(out / "labels")
    level1 = zarr.open_array(str(out / "labels" / "1"))[:]
    cubes = labels.reshape(36, 2, 40, 2, 48, 2)
    np.testing.assert_array_equal(level1, mode_2x2x2(cubes))
    # spot-check the mode by hand on one cube
    cube = labels[:2, :2, :2].ravel()
    counts = np.bincount(cube)
    assert counts[level1[0, 0, 0]] == counts.max()


def test_a_batch_job_log_gets_progress_lines(vol48, tiny_model, tmp_path):
    """stderr is a file, as in a batch job: one line per ~5 % of the blocks with an ETA, then the merge's."""
    log = tmp_path / "job.err"
    with log.open("w") as err:
        proc = subprocess.run([sys.executable, "-m", "volseg_dask.cli", "predict", str(vol48[0]), str(tiny_model), "-o",
                               str(tmp_path / "o.zarr"), "--chunks", "16", "--halo", "8", "--device", "cpu"],
                              stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, "CI": ""})
    assert proc.returncode == 0
    lines = log.read_text().splitlines()
    predict_lines = [line for line in lines if line.startswith("predict: ")]
    assert 10 <= len(predict_lines) <= 21 and predict_lines[-1].startswith("predict: 100 % (")  # 27 blocks
    assert all("ETA" in line for line in predict_lines)
    assert any(line.startswith("merge: 100 %") for line in lines)
    quiet = subprocess.run([sys.executable, "-m", "volseg_dask.cli", "-q", "predict", str(vol48[0]), str(tiny_model),
                            "-o", str(tmp_path / "q.zarr"), "--chunks", "16", "--halo", "8", "--device", "cpu"],
                           capture_output=True, text=True)
    assert quiet.returncode == 0 and "predict: " not in quiet.stderr
