"""Training where users train: torchrun (gloo on the CPU), resume after SIGKILL, fine-tuning, batch logs.

Real processes throughout: ``torchrun --nproc_per_node 2`` runs ``volseg train`` as a user would, a
rank is killed with SIGKILL, a training run is killed and rerun. The two torchrun tests are marked
``distributed`` (real process groups) and run in the default suite (about 30-60 s each on 2 cores).
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from volseg_dask.cli import cli
from volseg_dask.config import ModelSettings, Settings
from volseg_dask.errors import ConfigError, ModelFileError, OutputExistsError
from volseg_dask.models import load_model, read_model_file
from volseg_dask.normalize import apply
from volseg_dask.synthetic import make_volume, write_demo_data
from volseg_dask.training import run as run_mod
from volseg_dask.training import train
from volseg_dask.training.dataset import EpochSampler
from volseg_dask.training.distributed import env_ranks, process_group

from .conftest import interrupt_validation, make_model_file

TINY = {"architecture": "Unet", "encoder": "tu-resnet10t", "encoder_depth": 3, "decoder_channels": [16, 8, 4]}
"""A small network whose every weight trains (resnet18 at depth 3 carries 10 M weights of stages it skips)."""
TORCHRUN = Path(sys.executable).with_name("torchrun")
REPO = Path(__file__).resolve().parents[1]


def settings(**train_kw) -> Settings:
    raw = {"model": TINY, "data": {"image_size": 32, "validation_block": 4},
           "train": {"epochs": 4, "samples_per_epoch": 32, "batch_size": 8, "learning_rate": 3e-3, "patience": 50,
                     "torch_threads": 1, "device": "cpu", **train_kw}}
    return Settings.from_dict(raw)


def env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}


def volseg(*args: str) -> list[str]:
    return [sys.executable, "-m", "volseg_dask.cli", *args]


def torchrun(*args: str) -> list[str]:
    return [str(TORCHRUN), "--nproc_per_node", "2", "--monitor-interval", "0.2", "-m", "volseg_dask.cli", *args]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("hpc")
    return write_demo_data(root / "data", 48, seed=4, chunks=16)  # 12 % gas: every class to learn


def states_equal(a: dict, b: dict) -> list[str]:
    """Names of the tensors that differ (bitwise)."""
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def held_out_dice(model_path: Path, image: np.ndarray, labels: np.ndarray) -> float:
    """Mean per-class Dice of the model's z-slice predictions of a volume it never saw."""
    model, meta = load_model(model_path)
    with torch.inference_mode():
        logits = model(torch.from_numpy(apply(image, meta.normalization))[:, None])
    pred = logits.argmax(1).numpy()
    scores = [2 * np.sum((pred == c) & (labels == c)) / max(1, np.sum(pred == c) + np.sum(labels == c))
              for c in range(meta.classes) if np.any(labels == c)]
    return float(np.mean(scores))


# ---- the ranks' environment and the sampler's shares ------------------------------------------


def test_ranks_come_from_torchrun_or_an_srun_step_only():
    assert env_ranks({}) == (0, 1, 0)
    assert env_ranks({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == (3, 8, 1)
    assert env_ranks({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1"}) == (5, 8, 1)
    # a batch script's own environment names the allocation's tasks, not this command's processes
    assert env_ranks({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0"}) == (0, 1, 0)
    # srun torchrun: torchrun's ranks win
    both = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}
    assert env_ranks(both) == (1, 2, 1)
    with pytest.raises(ConfigError, match="not integers"):
        env_ranks({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="outside"):
        env_ranks({"RANK": "2", "WORLD_SIZE": "2"})
    srun = {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}
    with pytest.raises(ConfigError, match="MASTER_ADDR and MASTER_PORT not set"), \
            process_group(torch.device("cpu"), 1.0, srun):
        pass


def test_epoch_shares_are_disjoint_equal_and_make_the_steps_of_one_process():
    for n, world, batch in ((32, 2, 4), (10, 3, 2), (7, 7, 1), (50, 4, 3)):
        samplers = [EpochSampler(n, rank, world, batch) for rank in range(world)]
        for epoch in (0, 5):
            shares = []
            for s in samplers:
                s.set_epoch(epoch)
                shares.append(list(s))
            assert len({len(x) for x in shares}) == 1 and len(shares[0]) == len(samplers[0]) >= n // world - batch
            flat = [i for x in shares for i in x]
            assert len(set(flat)) == len(flat) and set(flat) <= set(range(epoch * n, (epoch + 1) * n))
            assert len(flat) > n - world  # only a remainder that does not divide among the ranks is left out
            # step k of the ranks together = step k of one process with world x batch
            first = sorted(i for x in shares for i in x[:batch])
            assert first == list(range(epoch * n, epoch * n + world * batch)) or n < world * batch
    single = EpochSampler(12, batch=8)
    single.set_epoch(2)
    assert list(single) == list(range(24, 36)) and len(single) == 12


# ---- torchrun ---------------------------------------------------------------------------------


EPOCHS, SLICES = 10, 48


def converging(**train_kw) -> Settings:
    """Enough steps (and 64-px crops: whole planes) for the tiny network to learn the three classes."""
    raw = settings(epochs=EPOCHS, samples_per_epoch=SLICES, learning_rate=1e-2, **train_kw).to_dict()
    raw["data"]["image_size"] = 64
    return Settings.from_dict(raw)


@pytest.mark.distributed
def test_torchrun_two_processes_train_one_model(data, tmp_path):
    """2 ranks x 4 slices a step = 1 process x 8: the same slices in every step, the same number of steps."""
    image, labels = data
    one = tmp_path / "one.pt"
    train([(image, labels)], one, converging())
    config = tmp_path / "two.yaml"
    converging(batch_size=4).save(config)
    out = tmp_path / "two.pt"
    proc = subprocess.run(torchrun("-vv", "train", str(image), str(labels), "-o", str(out), "-c", str(config)),
                          env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert log.count("wrote ") == 1 and "x 2 processes (gloo)" in log
    # one model file, loadable without running code; nothing else of the run's left behind
    raw = torch.load(out, weights_only=True)
    assert raw["format"] == "volseg_dask.model" and raw["meta"]["training"]["epochs_run"] == EPOCHS
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("two", ".two"))) == [
        "two.curves.png", "two.metrics.csv", "two.metrics.json", "two.pt", "two.samples.png", "two.yaml"]
    # each rank's slice indices per epoch (its debug log): disjoint, all within that epoch's draws
    shares: dict[int, dict[int, set[int]]] = {}
    for rank, epoch, runs in re.findall(r"rank (\d) of 2, epoch (\d+): slice indices ([\d -]+)", log):
        indices = set()
        for run in runs.split():
            lo, _, hi = run.partition("-")
            indices.update(range(int(lo), int(hi or lo) + 1))
        shares.setdefault(int(epoch), {})[int(rank)] = indices
    assert sorted(e for e in shares if e < 10_000) == list(range(EPOCHS))  # 10000+: the range test's draws
    for epoch, by_rank in shares.items():
        assert sorted(by_rank) == [0, 1] and len(by_rank[0]) == len(by_rank[1]) == SLICES // 2
        assert not by_rank[0] & by_rank[1], (epoch, by_rank)
        assert by_rank[0] | by_rank[1] == set(range(epoch * SLICES, (epoch + 1) * SLICES))
    # as good as one process with the same slices, on a volume neither saw. Not equal to it: each rank's batch
    # norm sees its own 4 planes, not 8 (measured, one process vs two ranks: 0.918 vs 0.908 on one machine,
    # 0.892 vs 0.920 on a fresh clone), so the claim is one-sided
    test_image, test_labels = make_volume((24, 48, 48), seed=8)
    d_one, d_two = held_out_dice(one, test_image, test_labels), held_out_dice(out, test_image, test_labels)
    assert d_one > 0.8 and d_two >= d_one - 0.02, (d_one, d_two)


def _rank_pid(launcher: subprocess.Popen, rank: int, timeout: float = 120) -> int:
    import psutil

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank):
                    return child.pid
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.2)
    raise AssertionError(f"no process of rank {rank} under torchrun")


@pytest.fixture(scope="module")
def killed_rank(data, tmp_path_factory):
    """A torchrun run of 2 ranks whose rank 1 got SIGKILL in epoch 2: (folder, command, exit code, seconds, output)."""
    image, labels = data
    folder = tmp_path_factory.mktemp("killed")
    config = folder / "s.yaml"
    settings(epochs=6, batch_size=4, learning_rate=None, lr_finder_steps=10).save(config)  # the range test too
    command = torchrun("train", str(image), str(labels), "-o", str(folder / "m.pt"), "-c", str(config))
    proc = subprocess.Popen(command, env=env(), cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    victim = _rank_pid(proc, 1)
    assert proc.stdout is not None
    for line in proc.stdout:  # rank 0's batch log: a line per epoch, once the epoch's checkpoint is written
        if line.split(": ", 1)[-1].startswith("epoch 1/6"):
            break
    assert (folder / "m.ckpt").exists()
    os.kill(victim, signal.SIGKILL)  # in epoch 2
    killed = time.monotonic()
    rest, _ = proc.communicate(timeout=120)
    return folder, command, proc.returncode, time.monotonic() - killed, rest


@pytest.mark.distributed
def test_a_rank_killed_mid_epoch_ends_the_other_with_one_line(killed_rank):
    folder, _, returncode, seconds, output = killed_rank
    assert returncode != 0 and seconds < 60, (returncode, seconds)
    ours = [line for line in output.splitlines() if "rerun the same command to resume" in line]
    assert len(ours) == 1, output[-3000:]
    assert (ours[0].startswith("error:") and "another process of this run stopped or hung" in ours[0]) \
        or "interrupted: saved the best model so far" in ours[0], ours  # torchrun's SIGTERM came first
    assert (folder / "m.ckpt").exists() and not (folder / ".m.pt.lock").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_the_killed_torchrun_run_resumes_on_every_rank(killed_rank):
    """The same command again: rank 0 and rank 1 read the checkpoint and go on after epoch 1 (~40 s more)."""
    folder, command, _, _, _ = killed_rank
    again = subprocess.run(command, env=env(), cwd=folder, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from epoch 1 of 6" in again.stderr
    _, meta = read_model_file(folder / "m.pt")
    assert meta.training["epochs_run"] == 6 and meta.training["attempts"] == 2
    assert [h["epoch"] for h in meta.training["history"]] == [1, 2, 3, 4, 5, 6]
    assert not (folder / "m.ckpt").exists()


@pytest.mark.distributed
def test_srun_style_ranks_stop_together_when_one_fails_its_checks(data, tmp_path):
    """Two processes with srun's variables (no torchrun): rank 0 finds the output taken, rank 1 stops too."""
    import socket

    image, labels = data
    out = tmp_path / "m.pt"
    out.write_text("someone else's model")
    config = tmp_path / "s.yaml"
    settings(epochs=2, batch_size=4).save(config)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(2):
        srun = {"SLURM_PROCID": str(rank), "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": str(rank),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(volseg("train", str(image), str(labels), "-o", str(out), "-c", str(config)),
                                      env={**env(), **srun}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    errors = [p.communicate(timeout=120)[1].strip().splitlines() for p in procs]
    assert [p.returncode for p in procs] == [1, 1], errors
    assert len(errors[0]) == 1 and "m.pt: already exists" in errors[0][0], errors
    assert errors[1] == ["error: rank 1 of 2: another process of this run failed while checking the inputs; its "
                         "message says why"], errors
    assert out.read_text() == "someone else's model" and not (tmp_path / ".m.pt.lock").exists()


# ---- resume -----------------------------------------------------------------------------------


def test_resume_after_sigkill_gives_bit_identical_weights(data, tmp_path):
    image, labels = data
    epochs = 5
    k = int(np.random.default_rng().integers(1, epochs))  # the epoch after which the run is killed
    config = tmp_path / "s.yaml"
    settings(epochs=epochs).save(config)
    reference = train([(image, labels)], tmp_path / "reference.pt", settings(epochs=epochs))
    out = tmp_path / "m.pt"
    command = volseg("-vv", "train", str(image), str(labels), "-o", str(out), "-c", str(config))
    proc = subprocess.Popen(command, env=env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if f"checkpoint of epoch {k} written" in line:
            proc.send_signal(signal.SIGKILL)  # in epoch k + 1
            break
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL and not out.exists(), f"k={k}"
    rerun = subprocess.run(volseg("train", str(image), str(labels), "-o", str(out), "-c", str(config)), env=env(),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumed from epoch {k} of {epochs}" in rerun.stderr, (k, rerun.stderr)
    a, _ = read_model_file(tmp_path / "reference.pt")
    b, meta = read_model_file(out)
    assert states_equal(a, b) == [], f"k={k}"
    assert [h["train_loss"] for h in meta.training["history"]] == [h["train_loss"] for h in reference.history]
    assert meta.training["attempts"] == 2 and not (tmp_path / "m.ckpt").exists()


@pytest.fixture
def interrupted(small_volume, tmp_path, monkeypatch):
    """A run stopped by Ctrl-C in epoch 2: the best model so far, and the checkpoint of epoch 1."""
    image, labels = small_volume
    interrupt_validation(monkeypatch)
    out = tmp_path / "m.pt"
    result = train([(image, labels)], out, settings(epochs=3))
    monkeypatch.undo()
    assert result.stop_reason == "interrupted" and (tmp_path / "m.ckpt").exists()
    return image, labels, out


def test_a_checkpoint_of_other_settings_or_inputs_is_refused_and_restart_starts_afresh(interrupted, caplog):
    image, labels, out = interrupted
    ckpt = out.with_suffix(".ckpt")
    before = {p: p.stat().st_mtime_ns for p in (out, ckpt)}
    with pytest.raises(OutputExistsError, match=r"differs in: train\.epochs: 3 -> 4\); rerun with the original"):
        train([(image, labels)], out, settings(epochs=4))
    other = labels.copy()
    other[0, 0, 0] = (other[0, 0, 0] + 1) % 3
    with pytest.raises(OutputExistsError, match=r"differs in: training volume 1 labels \(another file"):
        train([(image, other)], out, settings(epochs=3))
    assert {p: p.stat().st_mtime_ns for p in (out, ckpt)} == before  # nothing written
    # the same run resumes (and may replace the model file the interrupted attempt saved)
    with caplog.at_level("WARNING", logger="volseg_dask.training"):
        resumed = train([(image, labels)], out, settings(epochs=3))
    assert "resumed from epoch 1 of 3" in caplog.text
    assert resumed.attempts == 2 and resumed.epochs_run == 3 and not ckpt.exists()
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]


def test_restart_deletes_the_checkpoint(interrupted):
    image, labels, out = interrupted
    with pytest.raises(OutputExistsError, match="already exists"):  # the interrupted model stays until replaced
        train([(image, labels)], out, settings(epochs=2), restart=True)
    assert not out.with_suffix(".ckpt").exists()
    fresh = train([(image, labels)], out, settings(epochs=2), restart=True, overwrite=True)
    assert fresh.attempts == 1 and fresh.epochs_run == 2


def test_the_checkpoint_never_passes_for_a_model(interrupted, tmp_path):
    image, _, out = interrupted
    ckpt = out.with_suffix(".ckpt")
    raw = torch.load(ckpt, weights_only=True)  # loads without running code
    assert raw["format"] == "volseg_dask.checkpoint" and "state_dict" not in raw and "meta" not in raw
    with pytest.raises(ModelFileError, match="a training checkpoint, not a model file; rerun the `volseg train`"):
        load_model(ckpt)
    np.save(tmp_path / "v.npy", image)
    result = CliRunner().invoke(cli, ["predict", str(tmp_path / "v.npy"), str(ckpt), "-o", str(tmp_path / "o.zarr")])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "not a model file" in result.output
    assert not (tmp_path / "o.zarr").exists()


def test_cli_refusal_and_interruption_say_how_to_resume(interrupted, monkeypatch):
    image, labels, out = interrupted
    np.save(out.parent / "i.npy", image)
    np.save(out.parent / "l.npy", labels)
    config = out.parent / "s.yaml"
    settings(epochs=9).save(config)
    runner = CliRunner()
    refused = runner.invoke(cli, ["train", str(out.parent / "i.npy"), str(out.parent / "l.npy"), "-o", str(out),
                                  "-c", str(config)])
    assert refused.exit_code == 1 and refused.output.count("\n") == 1
    assert "in-memory" not in refused.output and "--restart" in refused.output

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "train", stopped)
    result = runner.invoke(cli, ["train", str(out.parent / "i.npy"), str(out.parent / "l.npy"), "-o", str(out)])
    assert result.exit_code == 130
    assert "interrupted; rerun the same command to resume training from its last checkpoint" in result.output


# ---- fine-tuning ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A small model file (label values 0, 1, 2; intensity window 3000-50000)."""
    return make_model_file(tmp_path_factory.mktemp("parent") / "parent.pt", seed=4)


def _frozen(**extra) -> Settings:
    """Learning rate 0: every weight stays as initialised, so what initialised it shows."""
    raw = settings(epochs=1, learning_rate=0.0).to_dict()
    raw["model"] = {"init_from": None}  # network settings left at their defaults: the parent's apply
    for key, value in extra.items():
        section, name = key.split(".")
        raw[section][name] = value
    return Settings.from_dict(raw)


def test_fine_tune_with_the_same_label_values_starts_from_every_weight(parent, small_volume, tmp_path):
    image, labels = small_volume
    train([(image, labels)], tmp_path / "new.pt", _frozen(**{"model.init_from": str(parent)}))
    old, old_meta = read_model_file(parent)
    new, meta = read_model_file(tmp_path / "new.pt")
    trained = [k for k in old if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(old[k], new[k]) for k in trained)
    assert meta.model == old_meta.model and meta.label_values == (0, 1, 2)
    assert meta.parent_path == str(parent.resolve())
    import hashlib

    assert meta.parent_sha256 == hashlib.sha256(parent.read_bytes()).hexdigest()
    assert meta.normalization == old_meta.normalization  # data.normalization_from: model
    train([(image, labels)], tmp_path / "own.pt",
          _frozen(**{"model.init_from": str(parent), "data.normalization_from": "recompute"}))
    assert read_model_file(tmp_path / "own.pt")[1].normalization.high != old_meta.normalization.high
    assert "init_from" not in torch.load(tmp_path / "new.pt", weights_only=True)["meta"]["model"]


def test_fine_tune_with_new_label_values_reinitialises_their_output_rows(parent, small_volume, tmp_path):
    image, labels = small_volume
    relabelled = np.array([0, 1, 5], np.uint8)[labels]  # value 2 is gone, 5 is new
    relabelled[:2] = 2  # ... and 2 is back, with a different extra: values 0, 1, 2, 5
    train([(image, relabelled)], tmp_path / "new.pt", _frozen(**{"model.init_from": str(parent)}))
    old, _ = read_model_file(parent)
    new, meta = read_model_file(tmp_path / "new.pt")
    assert meta.label_values == (0, 1, 2, 5) and meta.classes == 4
    head = [k for k in old if k.startswith("segmentation_head.")]
    assert head and all(new[k].shape[0] == 4 and old[k].shape[0] == 3 for k in head)
    for k in head:
        assert torch.equal(new[k][:3], old[k])  # the values the parent knew keep their rows
        if old[k].ndim > 1:  # weights (smp starts every bias at 0)
            assert not any(torch.equal(new[k][3], row) for row in old[k])  # 5 starts afresh
    rest = [k for k in old if k not in head and not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(old[k], new[k]) for k in rest)


def test_fine_tune_refuses_settings_that_ask_for_another_network(parent, small_volume, tmp_path):
    image, labels = small_volume
    with pytest.raises(ConfigError, match=r"model\.encoder_depth: 4 \(the file's: 3\)"):
        train([(image, labels)], tmp_path / "m.pt", _frozen(**{"model.init_from": str(parent),
                                                               "model.encoder_depth": 4}))
    same = _frozen(**{"model.init_from": str(parent)})
    own = read_model_file(parent)[1].model
    same.model = ModelSettings(**{**vars(own), "init_from": str(parent)})  # the parent's own values are fine
    assert train([(image, labels)], tmp_path / "ok.pt", same).epochs_run == 1
    assert not (tmp_path / "m.pt").exists()


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_bad_init_from_files_are_one_line_and_write_nothing(parent, odd_labels_files, tmp_path):
    image, labels = odd_labels_files
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(parent.read_bytes()[: parent.stat().st_size // 2])
    payload = _Payload()
    payload.marker = tmp_path / "code-ran"  # type: ignore[attr-defined]
    pickled = tmp_path / "pickled.pt"
    with pickled.open("wb") as fh:
        pickle.dump({"format": "volseg_dask.model", "meta": payload}, fh)
    architecture = tmp_path / "fpn.yaml"
    raw = _frozen(**{"model.init_from": str(parent)}).to_dict()
    raw["model"]["architecture"] = "FPN"
    Settings.from_dict(raw).save(architecture)
    cases = {
        "missing": (["--init-from", str(tmp_path / "missing.pt")], "model file not found"),
        "truncated": (["--init-from", str(truncated)], "truncated"),
        "pickled": (["--init-from", str(pickled)], "it may contain code, which is never run"),
        "architecture": (["-c", str(architecture)], "model.architecture: 'FPN' (the file's: 'Unet')"),
    }
    for name, (args, message) in cases.items():
        out = tmp_path / f"out-{name}.pt"
        result = CliRunner().invoke(cli, ["train", str(image), str(labels), "-o", str(out), *args])
        assert result.exit_code == 1 and result.output.count("\n") == 1, (name, result.output)
        assert result.output.startswith("error: ") and message in result.output, (name, result.output)
        assert not [p for p in tmp_path.iterdir() if p.name.startswith((out.stem, f".{out.stem}"))], name
    assert not payload.marker.exists()  # type: ignore[attr-defined]


@pytest.fixture
def odd_labels_files(small_volume, tmp_path):
    image, labels = small_volume
    np.save(tmp_path / "image.npy", image)
    np.save(tmp_path / "labels.npy", labels)
    return tmp_path / "image.npy", tmp_path / "labels.npy"


# ---- batch logs ---------------------------------------------------------------------------------


def test_train_prints_one_line_per_epoch_when_stderr_is_a_file(data, tmp_path):
    image, labels = data
    config = tmp_path / "s.yaml"
    settings(epochs=3, samples_per_epoch=16).save(config)
    log = tmp_path / "job.err"
    with log.open("w") as err:
        proc = subprocess.run(volseg("train", str(image), str(labels), "-o", str(tmp_path / "m.pt"), "-c", str(config)),
                              env=env(), stderr=err, stdout=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 0, log.read_text()
    lines = [line for line in log.read_text().splitlines() if "volseg_dask.training.progress" in line]
    assert [re.search(r": epoch (\d+)/3 ", line).group(1) for line in lines] == ["1", "2", "3"], log.read_text()
    for line in lines:
        assert re.search(r"train loss \d\.\d{4}, val loss \d+\.\d{4}, Dice \[0: [\d.-]+, 1: [\d.-]+, 2: [\d.-]+\], "
                         r"lr \d\.\d\de-\d\d, \d+\.\d s, ETA \d+ s", line), line


def test_gpu_sized_settings_on_a_cpu_say_how_long_an_epoch_takes(small_volume, tmp_path, monkeypatch, caplog):
    from volseg_dask.demo import cpu_settings

    assert run_mod._gpu_sized(Settings()) and not run_mod._gpu_sized(cpu_settings())
    image, labels = small_volume
    plain = train([(image, labels)], tmp_path / "a.pt", settings(epochs=1))
    monkeypatch.setattr(run_mod, "_gpu_sized", lambda s: True)  # the tiny network, timed as if it were large
    with caplog.at_level("WARNING", logger="volseg_dask.training"):
        warned = train([(image, labels)], tmp_path / "b.pt", settings(epochs=1))
    notes = [r.getMessage() for r in caplog.records if "no GPU here" in r.getMessage()]
    assert len(notes) == 1 and "an epoch of 4 steps takes about" in notes[0] and "--preset cpu" in notes[0]
    # timing a step leaves the run as it was
    assert states_equal(read_model_file(tmp_path / "a.pt")[0], read_model_file(tmp_path / "b.pt")[0]) == []
    assert plain.history[0]["train_loss"] == warned.history[0]["train_loss"]


def test_the_slurm_script_starts_torchrun_as_torchrun_and_volseg_parse_it():
    import shlex

    from torch.distributed.run import get_args_parser

    from volseg_dask.cli import train_command

    script = REPO / "examples" / "slurm_train.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    call = script.read_text().split("srun --kill-on-bad-exit=1 torchrun", 1)[1].split("\n\n", 1)[0]
    values = {"SLURM_JOB_NUM_NODES": "2", "GPUS_PER_NODE": "4", "HEAD": "node01", "SLURM_JOB_ID": "42",
              "IMAGE": "image.zarr", "LABELS": "labels.zarr", "MODEL": "model.pt", "CONFIG": "train.yaml"}
    args = shlex.split(re.sub(r"\$(\w+)", lambda m: values[m.group(1)], call.replace("\\\n", " ")))
    parsed = get_args_parser().parse_args(args)
    assert (parsed.nnodes, parsed.nproc_per_node, parsed.rdzv_backend) == ("2", "4", "c10d")
    assert parsed.rdzv_endpoint == "node01:29500" and parsed.rdzv_id == "42" and parsed.module
    assert parsed.training_script == "volseg_dask.cli" and parsed.training_script_args[0] == "train"
    ctx = train_command.make_context("train", parsed.training_script_args[1:])
    assert ctx.params["volumes"] == ("image.zarr", "labels.zarr") and str(ctx.params["output"]) == "model.pt"


# ---- where CUDA exists ------------------------------------------------------------------------


@pytest.mark.gpu
def test_resume_on_cuda_keeps_the_cuda_rng_and_finishes(small_volume, tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    image, labels = small_volume
    interrupt_validation(monkeypatch)
    out = tmp_path / "m.pt"
    assert train([(image, labels)], out, settings(epochs=3, device="cuda")).stop_reason == "interrupted"
    assert "cuda" in torch.load(out.with_suffix(".ckpt"), weights_only=True)["rng"]
    monkeypatch.undo()
    resumed = train([(image, labels)], out, settings(epochs=3, device="cuda"))
    assert resumed.attempts == 2 and resumed.epochs_run == 3 and not out.with_suffix(".ckpt").exists()


@pytest.mark.gpu
@pytest.mark.distributed
def test_torchrun_on_two_gpus_uses_nccl(data, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    image, labels = data
    config = tmp_path / "s.yaml"
    settings(epochs=2, batch_size=4, device="auto").save(config)
    proc = subprocess.run(torchrun("train", str(image), str(labels), "-o", str(tmp_path / "m.pt"), "-c", str(config),
                                   "-v"), env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2 processes (nccl)" in proc.stderr and read_model_file(tmp_path / "m.pt")[1].training["epochs_run"] == 2
