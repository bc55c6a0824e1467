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


def test_cli_local_cluster_equals_threads(vol, tiny_model, tmp_path):
    common = ["--chunks", "16", "--halo", "8", "--axes", "zx"]
    threads = CliRunner().invoke(cli, ["predict", str(vol), str(tiny_model), "-o", str(tmp_path / "t.zarr"), *common])
    assert threads.exit_code == 0, threads.output
    clustered = CliRunner().invoke(cli, ["predict", str(vol), str(tiny_model), "-o", str(tmp_path / "c.zarr"),
                                         "--workers", "2", *common])
    assert clustered.exit_code == 0, clustered.output
    assert "dashboard: http" in clustered.output
    for name in ("labels", "probabilities/z", "probabilities/x"):
        np.testing.assert_array_equal(read_array(tmp_path / "c.zarr" / name),
                                      read_array(tmp_path / "t.zarr" / name), err_msg=name)


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
            assert len(ran) == 3 * 4 * 2 * 2
            assert {t["worker"] for t in ran} == gpu
        finally:
            plain.terminate()
            plain.wait(timeout=30)
            time.sleep(0.5)
