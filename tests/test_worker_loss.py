"""Workers lost on dask-distributed in the middle of a prediction: real SIGKILL, SIGSTOP and retirement.

Each test runs ``vs.predict`` on a ``distributed.LocalCluster`` of two worker processes and, once some
blocks (but not all) are done, takes a worker away; the prediction and then ``vs.merge`` must finish and
give the threaded result bit for bit:

* a worker process SIGKILLed (its nanny restarts it);
* a worker retired for good (``client.retire_workers``), the other one finishes alone;
* a worker frozen (SIGSTOP) inside a block task until the scheduler gives up on it and runs the task
  elsewhere, then woken (SIGCONT) after the prediction finished: the same block task ran twice, the late
  copy writing its chunk and done-marker after the other had, and the chunk is still right.
"""

from __future__ import annotations

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
KEY = re.compile(r"predict-(?P<axis>[zyx])-(?P<index>\d+\.\d+\.\d+)-")


def _marker(out: Path, key: str) -> Path:
    """The done-marker of a block task key such as ``predict-z-1.0.2-<run key>``."""
    match = KEY.match(key)
    assert match, f"unexpected task key {key!r}"
    return out / ".volseg" / "done" / f"probabilities-{match['axis']}" / match["index"]


def test_block_task_run_twice_leaves_a_correct_chunk(world, tmp_path):
    """A worker without nanny frozen inside a block task (before its done-marker) is dropped by the scheduler
    (worker-ttl), which reruns the task on the other worker; the prediction completes. Woken afterwards, the
    frozen worker finishes the same task: it writes the block's chunk and marker a second time. (Both workers
    import torch before they join: an import holds the GIL for seconds, which the short worker-ttl would
    take for a dead worker.)"""
    from distributed import Client

    out = tmp_path / "seg.zarr"
    with dask.config.set({"distributed.scheduler.worker-ttl": "1s"}), _cluster(1, PRELOAD) as cluster, \
            Client(cluster) as client:
        log = (tmp_path / "zombie.log").open("w")
        zombie = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address,
                                   "--no-nanny", "--nthreads", "1", "--no-dashboard", "--name", "zombie",
                                   *(a for m in PRELOAD for a in ("--preload", m))],
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=log)
        try:
            client.wait_for_workers(2, timeout=60)
            _same_code(client)
            (address,) = [a for a, w in client.scheduler_info()["workers"].items() if w["name"] == "zombie"]

            def stop_inside_a_task():
                """SIGSTOP the zombie while it runs a block task that has not reached its done-marker."""
                running = client.run(lambda dask_worker: [str(t.key) for t in dask_worker.state.executing],
                                     workers=[address])[address]
                if not running:
                    return None
                os.kill(zombie.pid, signal.SIGSTOP)
                if not _marker(out, running[0]).exists():
                    return running[0]
                os.kill(zombie.pid, signal.SIGCONT)  # it had just finished that one: try again
                return None

            def freeze(cancel):
                wait_for(lambda: done_markers(out) >= 5, 120, "the first blocks", interval=0.005, cancel=cancel)
                key = wait_for(stop_inside_a_task, 60, "the zombie inside a task", interval=0.005, cancel=cancel)
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
            wait_for(lambda: _marker(out, key).exists(), 60, f"the late copy of {key} to finish")
            zombie.wait(timeout=60)  # it learns that it was dropped, and leaves
        finally:
            if zombie.poll() is None:
                os.kill(zombie.pid, signal.SIGCONT)
                zombie.kill()
            zombie.wait()
            log.close()
        assert_same(result.output, world["ref"])
        vs.merge(out, method="vote", outputs=["disagreement"])
    assert_same(out, world["ref_vote"], MERGED)
