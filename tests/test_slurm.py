"""SLURM for real: examples/slurm_predict.py through dask-jobqueue on a one-node SLURM started here.

tests/slurm/start.sh installs Debian's slurm-wlm and munge when absent and starts munged, slurmctld and
slurmd; every test submits real jobs (one dask worker each) and compares the prediction with the threaded
one bit for bit, also when a job is cancelled or a worker retires (``--lifetime``) in the middle of the
run. At the end stop.sh cancels the jobs and stops exactly the daemons it started, and nothing of the
test cluster may be left running. Without root or Debian's registry the tests skip (start.sh says why).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dask
import pytest

import volseg_dask as vs

from .midrun import Background, assert_same, done_markers, wait_for
from .slurm_cluster import TestSlurm

pytestmark = pytest.mark.distributed

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "slurm_predict.py"
SOURCE = Path(vs.__file__).resolve().parent.parent  # the volseg_dask under test: the jobs import this one
CHUNKS, HALO, BATCH = 16, 8, 4


def _example():
    spec = importlib.util.spec_from_file_location("slurm_predict", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _settings():
    return vs.load_settings(overrides={"predict.chunks": [CHUNKS] * 3, "predict.halo": HALO,
                                       "predict.batch_size": BATCH, "predict.device": "cpu"})


def _job_options(logs: Path) -> list[str]:
    """examples/slurm_predict.py's flags for this test cluster: CPU-only one-core jobs, this Python and code."""
    return ["--queue", "debug", "--gres", "", "--device", "cpu", "--cores", "1", "--threads", "1",
            "--memory", "2GB", "--walltime", "00:10:00", "--python", sys.executable,
            "--prologue", f"export PYTHONPATH={SOURCE}${{PYTHONPATH:+:$PYTHONPATH}}",
            "--prologue", "export OMP_NUM_THREADS=1", "--log-directory", str(logs),
            "--chunks", str(CHUNKS), "--halo", str(HALO), "--batch-size", str(BATCH)]


@pytest.fixture(scope="session")
def slurm_session(tmp_path_factory):
    """One test SLURM for the session (started on first use, again after a test stopped it)."""
    pytest.importorskip("dask_jobqueue")
    cluster = TestSlurm(tmp_path_factory.mktemp("slurm-state"))
    yield cluster
    left = cluster.stop()
    if left:
        pytest.fail(f"the test SLURM left processes running: {', '.join(left)}", pytrace=False)


def _ready(slurm: TestSlurm) -> TestSlurm:
    if not slurm.running:
        slurm.start()
    return slurm


def _no_jobs_left(slurm: TestSlurm) -> None:
    """The example's `with cluster` cancels its jobs on the way out: none may outlive a test."""
    if not slurm.running:
        return
    try:
        wait_for(lambda: not slurm.squeue(), 30, "the test's jobs to leave the queue", interval=0.2)
    except TimeoutError:
        left = slurm.squeue()
        subprocess.run(["scancel", *left], timeout=30)  # this test cluster's jobs, so the next test starts clean
        pytest.fail(f"jobs outlived the test: {left}", pytrace=False)


@pytest.fixture
def slurm(slurm_session):
    yield _ready(slurm_session)
    _no_jobs_left(slurm_session)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model):
    """A 64³ synthetic volume (64 blocks, 192 block tasks) and its threaded prediction (the reference)."""
    root = tmp_path_factory.mktemp("slurm-data")
    image, _ = vs.write_demo_data(root / "v64", 64, seed=64, chunks=16)
    with dask.config.set(scheduler="threads"):
        ref = vs.predict(image, tiny_model, root / "threads.zarr", _settings())
    return {"model": tiny_model, "image": image, "ref": ref.output, "total": 3 * (64 // CHUNKS) ** 3}


def _worker_log(logs: Path, job: str) -> str:
    path = logs / f"dask-worker-{job}.err"
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(scope="module")
def plain_run(slurm_session, world, tmp_path_factory):
    """make_cluster of the example scaled to 2 jobs, and vs.predict on it: what it did, and when (the run
    without incidents that test_workers_retired_by_lifetime_lose_nothing sizes its lifetime by)."""
    import time

    from distributed import Client, get_task_stream

    slurm = _ready(slurm_session)
    root = tmp_path_factory.mktemp("plain")
    example = _example()
    args = example.parse_args(["in", "model", "out", *_job_options(root / "logs"), "--lifetime", ""])
    cluster = example.make_cluster(**example.cluster_options(args))
    run = {"script": cluster.job_script()}
    with cluster, Client(cluster) as client:
        cluster.scale(jobs=2)
        client.wait_for_workers(2, timeout=120)
        run["joined"] = time.time()
        run["jobs"] = client.run(lambda: os.environ.get("SLURM_JOB_ID"))
        run["running"] = slurm.squeue("RUNNING")
        run["imports"] = client.run(lambda: __import__("volseg_dask").__file__)
        with get_task_stream(client) as stream:
            run["result"] = vs.predict(world["image"], world["model"], root / "seg.zarr", _settings())
        run["done"] = time.time()
    run["tasks"] = [t for t in stream.data if str(t["key"]).startswith("predict-")]
    _no_jobs_left(slurm)
    return run


def test_two_slurm_jobs_predict_like_threads(plain_run, world):
    """make_cluster of the example, scaled to 2 jobs: both workers compute blocks; the result equals threads."""
    run = plain_run
    assert "#SBATCH -p debug" in run["script"] and "--gres" not in run["script"] and "GPU=1" not in run["script"]
    jobs = set(run["jobs"].values())
    assert len(jobs) == 2 and jobs <= set(run["running"]), run["jobs"]
    assert set(run["imports"].values()) == {vs.__file__}, run["imports"]  # the prologue's PYTHONPATH reached them
    assert run["result"].blocks_computed == world["total"]
    workers = [t["worker"] for t in run["tasks"]]
    # one task per block for its 3 axes; both SLURM jobs did part of the work
    assert len(workers) == world["total"] // 3 and len(set(workers)) == 2
    assert_same(run["result"].output, world["ref"])


def test_cancelled_job_is_replaced_and_nothing_is_lost(slurm, world, tmp_path):
    """scancel of one worker's job once some blocks are done: adapt(2, 2) submits a new job, whose worker
    joins while the prediction runs, and the result equals the threaded one. (No --preload: a worker joins
    before it imports torch, so the replacement joins soon after the cancel.)"""
    image, ref, total = world["image"], world["ref"], world["total"]
    out, logs = tmp_path / "seg.zarr", tmp_path / "logs"

    def cancel_one(cancel):
        first = wait_for(lambda: len(slurm.squeue("RUNNING")) == 2 and slurm.squeue("RUNNING"), 120,
                         "2 running jobs", interval=0.5, cancel=cancel)
        wait_for(lambda: done_markers(out) >= total // 8, 120, "the first blocks", interval=0.05, cancel=cancel)
        victim = sorted(first)[0]
        subprocess.run(["scancel", victim], check=True, timeout=30)
        done_at_kill = done_markers(out)
        new = wait_for(lambda: set(slurm.squeue("RUNNING")) - set(first), 120, "a replacement job", interval=0.5,
                       cancel=cancel)
        joined = wait_for(lambda: [j for j in sorted(new) if "Registered to" in _worker_log(logs, j)], 120,
                          "the replacement worker", interval=0.1, cancel=cancel)
        return victim, done_at_kill, done_markers(out), joined[0]

    chaos = Background(cancel_one)
    # a cancelled job's worker is gone at once (its connection closes): adapt replaces it after the
    # lost-worker-timeout; worker-ttl, for a worker that hangs instead, is kept well above a busy worker's pauses
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "1s", "distributed.scheduler.worker-ttl": "30s"}):
        chaos.start()
        _example().main([str(image), str(world["model"]), str(out), *_job_options(logs),
                         "--jobs", "2", "--min-jobs", "2", "--lifetime", "", "--preload", ""])
    victim, done_at_kill, done_at_join, job = chaos.outcome()
    assert 0 < done_at_kill < total, done_at_kill
    assert 0 < done_at_join < total, "the replacement joined only after the last block"
    assert victim != job
    assert_same(out, ref)


def test_workers_retired_by_lifetime_lose_nothing(slurm, world, plain_run, tmp_path):
    """--lifetime with --lifetime-stagger: workers leave mid-run, adapt starts new jobs; nothing is lost.

    The lifetime is sized by the plain run of the same prediction on this SLURM: its workers had finished
    their first block `w` seconds after joining and the last one `c` seconds after (--preload, the default,
    imports torch before the lifetime starts). These retire 50-70 % into the blocks, and their replacements,
    with as long a lifetime, have time for the rest (on a machine slower now, a third pair takes over).
    """
    image, ref, total = world["image"], world["ref"], world["total"]
    first_done = {}
    for t in plain_run["tasks"]:
        stop = max(s["stop"] for s in t["startstops"])
        first_done[t["worker"]] = min(first_done.get(t["worker"], stop), stop)
    w = max(first_done.values()) - plain_run["joined"]
    c = plain_run["done"] - plain_run["joined"]
    lifetime, stagger = f"{w + 0.6 * (c - w):.1f}s", f"{0.1 * (c - w):.1f}s"
    out, logs = tmp_path / "seg.zarr", tmp_path / "logs"

    def watch_retirements(cancel):
        first = wait_for(lambda: len(slurm.squeue("RUNNING")) == 2 and slurm.squeue("RUNNING"), 120,
                         "2 running jobs", interval=0.5, cancel=cancel)
        wait_for(lambda: done_markers(out) > 0, 120, "the first blocks", interval=0.05, cancel=cancel)
        gone = wait_for(lambda: set(first) - set(slurm.squeue()), 300, "a job to end", interval=0.5, cancel=cancel)
        return gone, done_markers(out)

    watch = Background(watch_retirements)
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "1s"}):
        watch.start()
        _example().main([str(image), str(world["model"]), str(out), *_job_options(logs),
                         "--jobs", "2", "--min-jobs", "2", "--lifetime", lifetime, "--lifetime-stagger", stagger])
    gone, done_when_gone = watch.outcome()
    assert 0 < done_when_gone < total, (done_when_gone, lifetime, stagger)
    for job in gone:
        assert "worker-lifetime-reached" in _worker_log(logs, job), _worker_log(logs, job)[-2000:]
    assert_same(out, ref)


def test_stop_cancels_jobs_and_stops_only_its_own_daemons(slurm, tmp_path):
    """stop.sh ends a running job and the daemons start.sh started, and leaves alone processes that merely
    share their names (it kills by recorded PID, never by name)."""
    job = subprocess.run(["sbatch", "--parsable", "-o", str(tmp_path / "job.out"), "--wrap", "sleep 300"],
                         capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    wait_for(lambda: slurm.squeue("RUNNING").get(job), 60, "the sleep job to run", interval=0.2)
    decoys = []
    for name in ("slurmctld", "slurmd", "munged", "slurmstepd"):
        shutil.copy("/bin/sleep", tmp_path / name)
        # unrelated processes that merely share the daemons' names (and know nothing of this cluster)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
        decoys.append(subprocess.Popen([str(tmp_path / name), "300"], env=env))
    try:
        # the job's processes count as the cluster's while they run (a job is RUNNING before its script starts)
        wait_for(lambda: any("sleep" in p for p in slurm.leftovers()), 60, "the job's sleep to start", interval=0.2)
        left = slurm.stop()
        assert left == [], left
        assert all(p.poll() is None for p in decoys), "stop.sh killed a process it did not start"
        assert not os.environ.get("SLURM_CONF", "").startswith(str(slurm.state))
    finally:
        for p in decoys:
            p.kill()
            p.wait()


def test_start_skips_with_a_reason_where_slurm_cannot_be_installed():
    """Not root and no slurm programs on PATH: start.sh exits 77 with one line saying why (the fixture skips)."""
    if os.getuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run start.sh as another user")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.chmod(root, 0o777)
        bin_dir = root / "bin"  # bash and coreutils, but no slurm or munge programs
        bin_dir.mkdir()
        for tool in ("bash", "dirname", "mkdir", "id", "cat"):
            os.symlink(shutil.which(tool), bin_dir / tool)
        script = (Path(__file__).parent / "slurm" / "start.sh").read_text()
        as_nobody = [shutil.which("setpriv"), "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        proc = subprocess.run([*as_nobody, str(bin_dir / "bash"), "-s", str(root / "state")], input=script,
                              capture_output=True, text=True, env={"PATH": str(bin_dir)}, cwd=root, timeout=60)
        assert proc.returncode == 77, proc.stderr
        assert proc.stderr.count("\n") == 1 and "needs root" in proc.stderr, proc.stderr
        assert not (root / "state" / "pids").exists()
