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
