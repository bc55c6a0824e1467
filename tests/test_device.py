"""Device selection and autocast, the GPU path exercised by mocking what torch reports."""

from __future__ import annotations

import pytest
import torch

from volseg_dask import device as dev
from volseg_dask.errors import ConfigError


def test_cpu_everywhere():
    assert dev.select_device("cpu").type == "cpu"
    assert isinstance(dev.autocast(torch.device("cpu")), type(dev.autocast(torch.device("cpu"), False)))


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert dev.select_device("auto") == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: True)
    assert dev.select_device("auto") == torch.device("mps")
    monkeypatch.setattr(dev, "_mps_available", lambda: False)
    assert dev.select_device("auto") == torch.device("cpu")


def test_explicit_cuda_checks_presence_and_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA device is available"):
        dev.select_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dev.select_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="has 2 CUDA device"):
        dev.select_device("cuda:2")


def test_autocast_only_on_cuda():
    ctx = dev.autocast(torch.device("cuda", 0))
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.float16
    assert not isinstance(dev.autocast(torch.device("cuda", 0), enabled=False), torch.autocast)
    assert not isinstance(dev.autocast(torch.device("cpu")), torch.autocast)


@pytest.mark.distributed
def test_each_local_cluster_worker_takes_its_own_gpu():
    """`volseg predict --workers N --device cuda`: worker k of the LocalCluster picks GPU k of those visible
    (mocked here: 3 visible GPUs); a process outside a worker keeps the current device."""
    import torch
    from distributed import Client, LocalCluster

    def pick_with_three_gpus():
        torch.cuda.device_count = lambda: 3
        torch.cuda.current_device = lambda: 0
        return dev._worker_gpu()

    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster, Client(cluster) as client:
        names = {a: w["name"] for a, w in client.scheduler_info()["workers"].items()}
        picked = {a: client.submit(pick_with_three_gpus, workers=[a], pure=False).result() for a in names}
    assert sorted(names.values()) == [0, 1]
    assert {names[a]: g for a, g in picked.items()} == {0: 0, 1: 1}
