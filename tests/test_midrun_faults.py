"""Faults that arrive while a prediction runs, or between a run and its resume: each is one clear line,
nothing looks finished that is not, and what was written stays resumable where it can be."""

from __future__ import annotations

import errno
import glob
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from volseg_dask.cli import cli
from volseg_dask.outputs import status
from volseg_dask.prediction import run as run_mod
from volseg_dask.synthetic import write_demo_data

from .conftest import make_model_file, read_array

PREDICT = ["--chunks", "16", "--halo", "8", "--axes", "zx", "--device", "cpu"]


@pytest.fixture()
def image(tmp_path):
    return write_demo_data(tmp_path / "data", (32, 48, 48), seed=8, chunks=16)[0]


def run(*args: str):
    result = CliRunner().invoke(cli, list(args))
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    return result, lines


def _complete(path: Path) -> bool | None:
    return status(zarr.open_group(str(path), mode="r")).get("complete")


def test_a_corrupt_input_chunk_mid_run_names_the_chunk_and_keeps_the_rest(image, tiny_model, tmp_path, monkeypatch):
    """A chunk file of the input is overwritten with garbage once the run has begun: the run stops with one
    line naming that chunk; the blocks written before stay, and once the chunk is restored the same command
    finishes with the result of an undisturbed run."""
    out = tmp_path / "o.zarr"
    victim = sorted(glob.glob(str(image / "c" / "1" / "*" / "*")))[-1]  # a chunk of the last z-slab
    saved = Path(victim).read_bytes()
    real = run_mod.block_task
    calls = {"n": 0}

    def corrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # two blocks are done: the input goes bad under the run
            Path(victim).write_bytes(b"not a blosc frame" * 20)
        return real(*args, **kwargs)

    monkeypatch.setattr(run_mod, "block_task", corrupting)
    import dask

    with dask.config.set(scheduler="synchronous"):  # blocks in order, so the bad one comes after two good ones
        result, lines = run("predict", str(image), str(tiny_model), "-o", str(out), *PREDICT)
    assert result.exit_code == 1 and len(lines) == 1, result.output
    key = "/".join(Path(victim).relative_to(image).parts)
    assert key in lines[0] and "cannot be decoded" in lines[0] and "rerun the same command" in lines[0]
    assert _complete(out) is False
    done = list((out / ".volseg" / "done").rglob("*.*.*"))
    assert done, "the blocks written before the fault were lost"
    monkeypatch.setattr(run_mod, "block_task", real)
    Path(victim).write_bytes(saved)
    resumed, _ = run("predict", str(image), str(tiny_model), "-o", str(out), *PREDICT)
    assert resumed.exit_code == 0, resumed.output
    assert f"{len(done)} already done" in resumed.output
    clean, _ = run("predict", str(image), str(tiny_model), "-o", str(tmp_path / "c.zarr"), *PREDICT)
    assert clean.exit_code == 0
    for name in ("labels", "probabilities/z", "probabilities/x"):
        np.testing.assert_array_equal(read_array(out / name), read_array(tmp_path / "c.zarr" / name), err_msg=name)


def _interrupted(image: Path, model: Path, out: Path, monkeypatch) -> None:
    """A prediction stopped after two blocks (a kill, as far as the output can tell)."""
    real = run_mod.block_task
    calls = {"n": 0}

    def stopping(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(run_mod, "block_task", stopping)
    import dask

    with dask.config.set(scheduler="synchronous"):
        result, _ = run("predict", str(image), str(model), "-o", str(out), *PREDICT)
    assert result.exit_code == 130 and _complete(out) is False
    monkeypatch.setattr(run_mod, "block_task", real)


def test_an_input_whose_shape_changed_between_runs_is_refused(image, tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "o.zarr"
    _interrupted(image, tiny_model, out, monkeypatch)
    shutil.rmtree(image)
    write_demo_data(image.parent, (32, 48, 40), seed=8, chunks=16, overwrite=True)
    result, lines = run("predict", str(image), str(tiny_model), "-o", str(out), *PREDICT)
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "unfinished prediction with other settings or inputs" in lines[0] and "input_shape" in lines[0]
    assert _complete(out) is False


def test_a_model_file_replaced_between_resume_attempts_is_refused(image, tmp_path, monkeypatch):
    model = make_model_file(tmp_path / "m.pt", seed=1)
    out = tmp_path / "o.zarr"
    _interrupted(image, model, out, monkeypatch)
    make_model_file(model, seed=2)  # the same path, other weights
    result, lines = run("predict", str(image), str(model), "-o", str(out), *PREDICT)
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "model_sha256" in lines[0] and "--overwrite" in lines[0]
    assert _complete(out) is False


def test_the_disk_filling_during_the_merge(image, tiny_model, tmp_path, monkeypatch):
    """Every block is predicted, then the merge's writes fail: one line, the output stays incomplete, and a
    rerun (disk free again) merges without predicting anything again."""
    out = tmp_path / "o.zarr"
    original = zarr.storage.LocalStore.set

    async def failing_set(self, key, value):
        if key.startswith("labels/0/c/"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return await original(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", failing_set)
    result, lines = run("predict", str(image), str(tiny_model), "-o", str(out), *PREDICT)
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "No space left on device" in lines[0] and "rerun the same command" in lines[0]
    assert _complete(out) is False
    assert status(zarr.open_group(str(out / "labels"), mode="r"))["complete"] is False
    monkeypatch.setattr(zarr.storage.LocalStore, "set", original)
    again, _ = run("predict", str(image), str(tiny_model), "-o", str(out), *PREDICT)
    assert again.exit_code == 0 and "(0 blocks computed" in again.output, again.output
    assert _complete(out) is True


def test_the_merge_verb_on_a_full_disk(image, tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "o.zarr"
    assert run("predict", str(image), str(tiny_model), "-o", str(out), *PREDICT)[0].exit_code == 0
    original = zarr.storage.LocalStore.set

    async def failing_set(self, key, value):
        if key.startswith("labels/0/c/"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return await original(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", failing_set)
    result, lines = run("merge", str(out), "--method", "vote")
    assert result.exit_code == 1 and len(lines) == 1 and "volseg merge" in lines[0], result.output
    assert status(zarr.open_group(str(out / "labels"), mode="r"))["complete"] is False


def test_the_output_folder_deleted_mid_run(image, tiny_model, tmp_path, monkeypatch):
    """The output folder is removed while blocks are being written: one line that says so, and whatever the
    late tasks recreate never looks like a finished prediction."""
    out = tmp_path / "o.zarr"
    real = run_mod.block_task
    calls = {"n": 0}
    lock = threading.Lock()

    def deleting(*args, **kwargs):
        with lock:
            calls["n"] += 1
            if calls["n"] == 3:
                shutil.rmtree(out)
        return real(*args, **kwargs)

    monkeypatch.setattr(run_mod, "block_task", deleting)
    result, lines = run("predict", str(image), str(tiny_model), "-o", str(out), *PREDICT)
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "disappeared" in lines[0] or "missing" in lines[0], lines
    time.sleep(0.1)
    if (out / "zarr.json").exists():
        assert _complete(out) is not True
    for labels in out.rglob("labels"):
        assert not (labels / "zarr.json").exists() or status(zarr.open_group(str(labels), mode="r")).get(
            "complete") is not True
