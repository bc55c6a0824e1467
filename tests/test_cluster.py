"""dask-distributed: the CLI's clusters, and GPU resource requests that reach the scheduler."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from volseg_dask.cli import cli
from volseg_dask.config import Settings
from volseg_dask.prediction import predict
from volseg_dask.synthetic import write_demo_data

from .conftest import read_array

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def vol(tmp_path_factory):
    return write_demo_data(tmp_path_factory.mktemp("c"), 32, seed=9, chunks=16)[0]


COMMON = ["--chunks", "16", "--halo", "8", "--axes", "zx"]


@pytest.fixture(scope="module")
def threaded(vol, tiny_model, tmp_path_factory):
    """The reference: the same prediction on dask's threaded scheduler (no cluster)."""
    out = tmp_path_factory.mktemp("threads") / "t.zarr"
    result = CliRunner().invoke(cli, ["predict", str(vol), str(tiny_model), "-o", str(out), *COMMON])
    assert result.exit_code == 0, result.output
    return out


def _assert_same(out, ref):
    for name in ("labels", "confidence", "probabilities/z", "probabilities/x"):
        np.testing.assert_array_equal(read_array(out / name), read_array(ref / name), err_msg=name)


def test_cli_local_cluster_equals_threads(vol, tiny_model, threaded, tmp_path):
    clustered = CliRunner().invoke(cli, ["predict", str(vol), str(tiny_model), "-o", str(tmp_path / "c.zarr"),
                                         "--workers", "2", *COMMON])
    assert clustered.exit_code == 0, clustered.output
    assert "dashboard: http" in clustered.output
    _assert_same(tmp_path / "c.zarr", threaded)


def test_local_cluster_workers_keep_glibc_dynamic_mmap_threshold():
    """distributed's MALLOC_TRIM_THRESHOLD_ is dropped from the workers we start (the rest of its set-up stays),
    and the user's own dask config is untouched afterwards."""
    import os

    import dask

    from volseg_dask.cluster import dask_scheduler

    with dask_scheduler(workers=1) as client:
        env = client.run(lambda: {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")})
    assert list(env.values()) == [{"MALLOC_TRIM_THRESHOLD_": None, "OMP_NUM_THREADS": "1"}]
    assert dask.config.get("distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_") == 65536


def test_cli_on_an_existing_scheduler_equals_threads(vol, tiny_model, threaded, tmp_path):
    """`volseg predict --scheduler ADDRESS` against a real cluster of 2 worker processes started here."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        result = CliRunner().invoke(cli, ["predict", str(vol), str(tiny_model), "-o", str(tmp_path / "s.zarr"),
                                          "--scheduler", cluster.scheduler_address, *COMMON])
        assert result.exit_code == 0, result.output
        assert f"connected to {cluster.scheduler_address}" in result.output
        with Client(cluster) as client:  # the inference tasks went through this scheduler
            prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
        assert any(p.startswith("predict-") for p in prefixes), prefixes
    _assert_same(tmp_path / "s.zarr", threaded)


def test_bad_scheduler_address_is_one_clear_line(vol, tiny_model, tmp_path):
    result = CliRunner().invoke(cli, ["predict", str(vol), str(tiny_model), "-o", str(tmp_path / "x.zarr"),
                                      "--scheduler", "tcp://127.0.0.1:9", "--workers", "2"])
    assert result.exit_code == 1 and "not both" in result.output


def test_inference_tasks_go_only_to_gpu_workers(vol, tiny_model, tmp_path):
    """One worker declares GPU=1, one does not: every inference task must run on the first."""
    from distributed import Client, LocalCluster, get_task_stream

    with LocalCluster(n_workers=1, threads_per_worker=1, resources={"GPU": 1}, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        plain = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address,
                                  "--nthreads", "1", "--no-dashboard"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        try:
            client.wait_for_workers(2, timeout=60)
            workers = client.scheduler_info()["workers"]
            gpu = {a for a, w in workers.items() if w.get("resources", {}).get("GPU")}
            assert len(workers) == 2 and len(gpu) == 1
            with get_task_stream(client) as stream:
                predict(vol, tiny_model, tmp_path / "g.zarr",
                        Settings().with_overrides({"predict.chunks": [8, 16, 16], "predict.halo": 8}))
            ran = [t for t in stream.data if str(t["key"]).startswith("predict-")]
            assert len(ran) == 4 * 2 * 2  # one task per block, for all its axes
            assert {t["worker"] for t in ran} == gpu
        finally:
            plain.terminate()
            plain.wait(timeout=30)
            time.sleep(0.5)


def test_convert_merge_evaluate_on_a_local_cluster_equal_threads(vol, threaded, tmp_path):
    """The other cluster verbs through the API inside ``with Client(...)``: same results as threads."""
    import shutil

    from distributed import Client, LocalCluster

    from volseg_dask.io import convert
    from volseg_dask.metrics import evaluate
    from volseg_dask.prediction import merge

    source = tmp_path / "vol.npy"
    np.save(source, read_array(vol)[:, 3:, 5:])  # uneven against the chunks below
    truth = vol.parent / "labels.zarr"
    for name in ("t", "c"):
        shutil.copytree(threaded, tmp_path / f"{name}.zarr")
    convert(source, tmp_path / "t.vol.zarr", chunks=(16, 8, 12))
    merge(tmp_path / "t.zarr", method="vote", outputs=["disagreement"])
    scores = evaluate(tmp_path / "t.zarr" / "labels", truth).to_dict()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        convert(source, tmp_path / "c.vol.zarr", chunks=(16, 8, 12))
        merge(tmp_path / "c.zarr", method="vote", outputs=["disagreement"])
        clustered = evaluate(tmp_path / "c.zarr" / "labels", truth).to_dict()
        prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert len(prefixes) >= 3, prefixes  # the graphs ran on the cluster
    np.testing.assert_array_equal(read_array(tmp_path / "c.vol.zarr"), read_array(tmp_path / "t.vol.zarr"))
    np.testing.assert_array_equal(read_array(tmp_path / "c.vol.zarr"), np.load(source))
    for name in ("labels", "disagreement"):
        np.testing.assert_array_equal(read_array(tmp_path / "c.zarr" / name), read_array(tmp_path / "t.zarr" / name),
                                      err_msg=name)
    assert clustered == scores


def test_cli_convert_on_a_local_cluster(tmp_path):
    data = np.arange(20 * 24 * 28, dtype=np.uint16).reshape(20, 24, 28)
    np.save(tmp_path / "v.npy", data)
    result = CliRunner().invoke(cli, ["convert", str(tmp_path / "v.npy"), str(tmp_path / "v.zarr"), "--chunks", "8",
                                      "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "dashboard: http" in result.output
    np.testing.assert_array_equal(read_array(tmp_path / "v.zarr"), data)
