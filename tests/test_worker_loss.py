"""Workers lost on dask-distributed in the middle of a prediction: real SIGKILL, SIGSTOP and retirement.

Each test runs ``vs.predict`` on a ``distributed.LocalCluster`` of two worker processes and, once some
blocks (but not all) are done, takes a worker away; the prediction and then ``vs.merge`` must finish and
give the threaded result bit for bit:

* a worker process SIGKILLed (its nanny restarts it);
* a worker retired for good (``client.retire_workers``), the other one finishes alone;
* a worker frozen (SIGSTOP) inside a block task until the scheduler gives up on it and runs the task
  elsewhere, then woken (SIGCONT) after the prediction finished: the same block task ran twice, the late
  copy writing its chunk and done-marker after the other had, and the chunk is still right;
* the same late task, but of an earlier run that ``--overwrite`` replaced with another: it must not
  write its stale chunk into the new output (block tasks check the output's run key right before each
  write, and done-markers are kept per run key).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import dask
import pytest

import volseg_dask as vs

from .midrun import Background, assert_same, done_markers, wait_for

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

MERGED = ("labels", "disagreement")


def _settings():
    return vs.load_settings(overrides={"predict.chunks": [16, 16, 16], "predict.halo": 8, "predict.device": "cpu"})


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model):
    """A 48³ volume (27 blocks, 81 block tasks), its threaded prediction, and that prediction merged by vote."""
    root = tmp_path_factory.mktemp("loss")
    image, _ = vs.write_demo_data(root / "data", 48, seed=21, chunks=16)
    with dask.config.set(scheduler="threads"):
        ref = vs.predict(image, tiny_model, root / "threads.zarr", _settings()).output
        shutil.copytree(ref, root / "threads-vote.zarr")
        vs.merge(root / "threads-vote.zarr", method="vote", outputs=["disagreement"])
    return {"image": image, "model": tiny_model, "ref": ref, "ref_vote": root / "threads-vote.zarr", "total": 81}


def _cluster(n_workers: int = 2, preload: tuple[str, ...] = ()):
    from distributed import LocalCluster

    return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                        preload=list(preload))


def _same_code(client) -> None:
    """The workers import the volseg_dask under test (PYTHONPATH reached them), not another checkout."""
    where = client.run(lambda: __import__("volseg_dask").__file__)
    assert set(where.values()) == {vs.__file__}, where


def _predict_merge_and_compare(world, out: Path) -> None:
    result = vs.predict(world["image"], world["model"], out, _settings())
    assert_same(result.output, world["ref"])
    vs.merge(out, method="vote", outputs=["disagreement"])
    assert_same(out, world["ref_vote"], MERGED)


def test_sigkilled_worker_is_restarted_and_nothing_is_lost(world, tmp_path):
    from distributed import Client

    out = tmp_path / "seg.zarr"
    with _cluster() as cluster, Client(cluster) as client:
        _same_code(client)
        pids = client.run(os.getpid)
        victim = sorted(pids.values())[0]

        def kill(cancel):
            wait_for(lambda: done_markers(out) >= 5, 120, "the first blocks", interval=0.005, cancel=cancel)
            os.kill(victim, signal.SIGKILL)
            return done_markers(out)

        chaos = Background(kill)
        chaos.start()
        _predict_merge_and_compare(world, out)
        done_at_kill = chaos.outcome()
        assert 0 < done_at_kill < world["total"], done_at_kill
        client.wait_for_workers(2, timeout=60)  # the nanny started a new worker process
        assert victim not in client.run(os.getpid).values()


def test_worker_retired_for_good_mid_run_loses_nothing(world, tmp_path):
    from distributed import Client

    out = tmp_path / "seg.zarr"
    with _cluster() as cluster, Client(cluster) as client:
        _same_code(client)
        victim, survivor = sorted(client.scheduler_info()["workers"])

        def retire(cancel):
            wait_for(lambda: done_markers(out) >= 5, 120, "the first blocks", interval=0.005, cancel=cancel)
            before = done_markers(out)
            client.retire_workers([victim], close_workers=True)
            return before, done_markers(out)

        chaos = Background(retire)
        chaos.start()
        _predict_merge_and_compare(world, out)
        before, after = chaos.outcome()
        assert 0 < before <= after < world["total"], (before, after)  # retired before the last block
        assert list(client.scheduler_info()["workers"]) == [survivor]


PRELOAD = ("segmentation_models_pytorch",)
KEY = re.compile(r"predict-(?P<axes>[zyx]+)-(?P<index>\d+)\.(?P<j>\d+)\.(?P<k>\d+)-(?P<run>[0-9a-f]+)$")


def _block(key: str) -> tuple[str, tuple[int, int, int]]:
    """First axis and block index of a block task key such as ``predict-zyx-1.0.2-<run key>`` (the task
    predicts its axes in order: the first axis's chunk and marker are written first)."""
    match = KEY.match(key)
    assert match, f"unexpected task key {key!r}"
    return match["axes"][0], (int(match["index"]), int(match["j"]), int(match["k"]))


def _marker(out: Path, key: str) -> Path:
    axis, index = _block(key)
    run = KEY.match(key)["run"]  # type: ignore[index]
    return out / ".volseg" / "done" / run / f"probabilities-{axis}" / ".".join(map(str, index))


def _woken_and_refused(tmp_path: Path, key: str, out: Path) -> None:
    """The woken task's warning in the zombie's log: it found the output no longer its run's, wrote nothing."""
    log = tmp_path / "zombie.log"
    wait_for(lambda: "no longer the output of run" in log.read_text(), 60, f"the late task {key} to give up")
    assert not _marker(out, key).exists()


def _chunk_written(out: Path, key: str) -> bool:
    """The task's probability chunk is on disk (an unwritten chunk reads as zeros; written ones sum to ~255)."""
    import zarr

    axis, index = _block(key)
    path = out / "probabilities" / axis
    if not (path / "zarr.json").exists():
        return False
    return bool(zarr.open_array(str(path), mode="r")[(slice(None), *(slice(16 * i, 16 * i + 16) for i in index))]
                .any())


@contextlib.contextmanager
def _cluster_with_a_zombie(tmp_path: Path):
    """A LocalCluster of one worker and a worker without nanny ("zombie", its own process), worker-ttl 1 s
    (the scheduler drops a silent worker after max(1 s, 10 heartbeats) = 5 s). Both import torch before they
    join: an import holds the GIL for seconds, which the short worker-ttl would take for a dead worker."""
    from distributed import Client

    with dask.config.set({"distributed.scheduler.worker-ttl": "1s"}), _cluster(1, PRELOAD) as cluster, \
            Client(cluster) as client, (tmp_path / "zombie.log").open("w") as log:
        zombie = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address,
                                   "--no-nanny", "--nthreads", "1", "--no-dashboard", "--name", "zombie",
                                   *(a for m in PRELOAD for a in ("--preload", m))],
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=log)
        try:
            client.wait_for_workers(2, timeout=60)
            _same_code(client)
            (address,) = [a for a, w in client.scheduler_info()["workers"].items() if w["name"] == "zombie"]
            yield client, zombie, address
        finally:
            if zombie.poll() is None:
                os.kill(zombie.pid, signal.SIGCONT)
                zombie.kill()
            zombie.wait()


def _freeze_inside_a_task(client, zombie: subprocess.Popen, address: str, out: Path, *, before_write: bool = False,
                          cancel=None) -> str:
    """SIGSTOP the zombie while it runs a block task that has not reached its done-marker (nor, with
    ``before_write``, written its chunk); the task's key."""

    def attempt():
        running = client.run(lambda dask_worker: [str(t.key) for t in dask_worker.state.executing],
                             workers=[address])[address]
        if not running:
            return None
        os.kill(zombie.pid, signal.SIGSTOP)
        key = running[0]
        if not _marker(out, key).exists() and not (before_write and _chunk_written(out, key)):
            return key
        os.kill(zombie.pid, signal.SIGCONT)  # it had just got past that point: try again
        return None

    wait_for(lambda: done_markers(out) >= 5, 120, "the first blocks", interval=0.005, cancel=cancel)
    return wait_for(attempt, 60, "the zombie inside a block task", interval=0.005, cancel=cancel)


def test_block_task_run_twice_leaves_a_correct_chunk(world, tmp_path):
    """The zombie, frozen inside a block task (before its done-marker), is dropped by the scheduler, which
    reruns the task on the other worker; the prediction completes. Woken afterwards, the zombie goes on with
    the same task: it finds the output complete and writes nothing into it."""
    out = tmp_path / "seg.zarr"
    with _cluster_with_a_zombie(tmp_path) as (client, zombie, address):

        def freeze(cancel):
            key = _freeze_inside_a_task(client, zombie, address, out, cancel=cancel)
            at = done_markers(out)
            wait_for(lambda: address not in client.scheduler_info()["workers"], 60, "the scheduler to drop it",
                     interval=0.1, cancel=cancel)
            return key, at

        chaos = Background(freeze)
        chaos.start()
        result = vs.predict(world["image"], world["model"], out, _settings())
        key, done_at_freeze = chaos.outcome()
        assert 0 < done_at_freeze < world["total"], done_at_freeze
        assert not _marker(out, key).exists()  # the run completed (its markers are cleared) ...
        os.kill(zombie.pid, signal.SIGCONT)  # ... and now the frozen copy of `key` goes on
        _woken_and_refused(tmp_path, key, out)
        zombie.wait(timeout=60)  # it learns that it was dropped, and leaves
        assert_same(result.output, world["ref"])
        vs.merge(out, method="vote", outputs=["disagreement"])
        assert_same(out, world["ref_vote"], MERGED)


def test_late_task_of_an_overwritten_run_leaves_the_new_output_alone(world, tmp_path):
    """Run A (another model) on the cluster from `volseg predict --scheduler`, its client SIGKILLed while the
    zombie is frozen inside one of A's block tasks before the chunk write; run B with --overwrite completes
    (the zombie is dropped meanwhile) and equals the threaded B. Woken, the zombie finishes A's task: B's
    complete output must still equal the threaded B."""
    from .conftest import make_model_file

    other = make_model_file(tmp_path / "other.pt", seed=1)
    out = tmp_path / "seg.zarr"
    with _cluster_with_a_zombie(tmp_path) as (client, zombie, address):
        run_a = subprocess.Popen([sys.executable, "-m", "volseg_dask.cli", "-q", "predict", str(world["image"]),
                                  str(other), "-o", str(out), "--chunks", "16", "--halo", "8", "--device", "cpu",
                                  "--scheduler", client.scheduler.address], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        try:
            key = _freeze_inside_a_task(client, zombie, address, out, before_write=True)
        finally:
            run_a.kill()  # the client of run A dies mid-run (Ctrl-C, a killed job)
            run_a.wait()
        result = vs.predict(world["image"], world["model"], out, _settings(), overwrite=True)
        wait_for(lambda: address not in client.scheduler_info()["workers"], 60, "the scheduler to drop the zombie",
                 interval=0.1)
        assert_same(result.output, world["ref"])  # B itself is right ...
        os.kill(zombie.pid, signal.SIGCONT)  # ... and the frozen task of run A goes on
        _woken_and_refused(tmp_path, key, out)
        zombie.wait(timeout=60)
        assert_same(out, world["ref"])
