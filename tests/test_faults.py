"""Kills mid-run: real subprocesses, SIGKILL or SIGTERM at random points, then a rerun.

After every kill the output is absent or marked incomplete, or — when the signal came after the
command had finished it — identical to the uninterrupted run: it never looks complete when it is
not. A rerun gives exactly the result of an uninterrupted run. The randomised matrix is marked ``slow``
(``make test-slow``); the default run keeps one resume test in test_predict.py.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from volseg_dask.outputs import status
from volseg_dask.synthetic import write_demo_data

from .conftest import read_array

TINY_TRAIN = """
model: {architecture: Unet, encoder: resnet18, encoder_depth: 3, decoder_channels: [16, 8, 4]}
data: {image_size: 32, validation_block: 4}
train: {epochs: 4, samples_per_epoch: 24, batch_size: 4, learning_rate: 0.002, torch_threads: 1}
"""


def volseg(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "volseg_dask.cli", "-q", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("faults")
    image, labels = write_demo_data(root / "data", 64, seed=6, chunks=16)
    np.save(root / "vol.npy", read_array(image))
    (root / "tiny.yaml").write_text(TINY_TRAIN)
    return {"root": root, "image": image, "labels": labels, "model": tiny_model}


def _commands(w: dict, out: Path) -> dict[str, list[str]]:
    return {
        "convert": ["convert", str(w["root"] / "vol.npy"), str(out), "--chunks", "8"],
        "export": ["export", str(w["image"]), str(out)],
        "predict": ["predict", str(w["image"]), str(w["model"]), "-o", str(out), "--chunks", "16", "--halo", "8"],
        "merge": ["merge", str(out), "--method", "mean"],
        "train": ["train", str(w["image"]), str(w["labels"]), "-o", str(out), "-c", str(w["root"] / "tiny.yaml")],
    }


def _suffix(command: str) -> str:
    return {"export": ".tif", "train": ".pt"}.get(command, ".zarr")


def _result(path: Path, command: str) -> object:
    if command == "train":
        import torch

        state = torch.load(path, weights_only=True)["state_dict"]
        return {k: v.numpy() for k, v in state.items()}
    if command == "export":
        import tifffile

        return tifffile.imread(path)
    if command == "convert":
        return read_array(path)
    return {name: read_array(path / name) for name in ("labels", "confidence")}


def _same(a: object, b: object) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # type: ignore[union-attr]
    return np.array_equal(a, b)  # type: ignore[arg-type]


def _looks_finished(path: Path, command: str) -> bool:
    if not path.exists():
        return False
    if command == "train":
        import torch

        meta = torch.load(path, weights_only=True)["meta"]
        return meta["training"]["stop_reason"] != "interrupted"
    if command == "export":
        return True
    if command == "merge":
        return status(zarr.open_group(str(path / "labels"), mode="r")).get("complete") is True
    return status(zarr.open(str(path), mode="r")).get("complete") is True


KILLS = [(command, seed) for command, n in (("convert", 3), ("export", 2), ("predict", 4), ("merge", 2),
                                            ("train", 3)) for seed in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize(("command", "seed"), KILLS, ids=[f"{c}-{s}" for c, s in KILLS])
def test_kill_and_rerun(world, tmp_path, command, seed):
    rng = random.Random(f"{command}-{seed}")
    sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
    reference = tmp_path / f"reference{_suffix(command)}"
    target = tmp_path / f"target{_suffix(command)}"
    if command == "merge":  # merge works on a finished prediction: make one for each run
        for out in (reference, target):
            finish(volseg(*_commands(world, out)["predict"]))
    start = time.perf_counter()
    finish(volseg(*_commands(world, reference)[command]))
    duration = time.perf_counter() - start

    proc = volseg(*_commands(world, target)[command])
    time.sleep(rng.uniform(0.35, 0.95) * duration)
    proc.send_signal(sig)
    proc.communicate(timeout=300)
    killed_mid_run = proc.returncode != 0
    finished_looking = _looks_finished(target, command)
    traces = [p.name for p in tmp_path.iterdir() if p.name.startswith((target.name, f".{target.name}"))]
    record = {"command": command, "seed": seed, "signal": sig.name, "run_s": round(duration, 2),
              "returncode": proc.returncode, "left_on_disk": sorted(traces), "finished_looking": finished_looking}
    if killed_mid_run and finished_looking:
        # the signal came after the output was finished (e.g. while the interpreter shut down, after
        # "wrote ..."): then it must really be complete, identical to the uninterrupted run
        record["killed_after_finishing"] = True
        assert _same(_result(target, command), _result(reference, command)), record

    rerun = _commands(world, target)[command]
    if command in ("convert", "export", "train") and target.exists():
        rerun.append("--overwrite")  # an interrupted model (SIGTERM) or a finished output stays until replaced
    if command == "predict" and finished_looking:
        shutil.rmtree(target)
        rerun = _commands(world, target)[command]
    summary = finish(volseg(*rerun)).strip().splitlines()
    record["rerun"] = summary[-1] if summary else ""  # predict: "N blocks computed, M already done"
    with Path(os.environ.get("VOLSEG_FAULT_LOG", tmp_path / "faults.jsonl")).open("a") as log:
        log.write(json.dumps(record) + "\n")
    assert _same(_result(target, command), _result(reference, command)), record
