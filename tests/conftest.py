"""Shared fixtures: small synthetic volumes on disk in several formats."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def small_volume() -> tuple[np.ndarray, np.ndarray]:
    """A 40 x 48 x 56 synthetic CT volume and its labels (uneven on purpose)."""
    from volseg_dask.synthetic import make_volume

    return make_volume((40, 48, 56), seed=7)


@pytest.fixture(scope="session")
def small_zarr(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """image.zarr and labels.zarr of a 48^3 synthetic volume, 16^3 chunks."""
    from volseg_dask.synthetic import write_demo_data

    out = tmp_path_factory.mktemp("demo")
    return write_demo_data(out, 48, seed=3, chunks=16)


def make_model_file(path: Path, *, classes: int = 3, label_values=(0, 1, 2), n_slices: int = 1,
                    low: float = 3000.0, high: float = 50000.0, seed: int = 0) -> Path:
    """A small random-weight model file (resnet18 encoder, 3 stages): enough to test the machinery."""
    import torch

    from volseg_dask.config import ModelSettings
    from volseg_dask.models import ModelMeta, build_model, pad_multiple, save_model
    from volseg_dask.normalize import Normalization

    settings = ModelSettings(architecture="Unet", encoder="resnet18", encoder_depth=3, decoder_channels=[16, 8, 4],
                             n_slices=n_slices)
    torch.manual_seed(seed)
    model = build_model(settings, classes=classes)
    meta = ModelMeta(model=settings, label_values=tuple(label_values), normalization=Normalization(low, high),
                     in_channels=n_slices, pad_multiple=pad_multiple(model, settings))
    return save_model(path, model, meta)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_file(tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small model fitted for 60 steps on synthetic slices (a few seconds): it has learned local
    features, so its receptive context is realistic, unlike a random network's."""
    import torch

    from volseg_dask.config import ModelSettings
    from volseg_dask.models import ModelMeta, build_model, pad_multiple, save_model
    from volseg_dask.normalize import Normalization, apply
    from volseg_dask.synthetic import make_volume

    img, lab = make_volume(64, seed=11)
    norm = Normalization(low=float(np.percentile(img, 0.5)), high=float(np.percentile(img, 99.5)))
    x = apply(img, norm)
    settings = ModelSettings(architecture="Unet", encoder="resnet18", encoder_depth=3, decoder_channels=[16, 8, 4])
    torch.manual_seed(0)
    model = build_model(settings, classes=3)
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    rng = np.random.default_rng(0)
    for _ in range(60):
        axis, idx = rng.integers(3), rng.integers(0, 64, 8)
        xs = np.ascontiguousarray(np.moveaxis(x, axis, 0)[idx][:, None])
        ys = np.moveaxis(lab, axis, 0)[idx].astype(np.int64)
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(xs)), torch.from_numpy(ys))
        opt.zero_grad()
        loss.backward()
        opt.step()
    meta = ModelMeta(model=settings, label_values=(0, 1, 2), normalization=norm,
                     pad_multiple=pad_multiple(model, settings))
    return save_model(tmp_path_factory.mktemp("trained") / "trained.pt", model.eval(), meta)


def read_array(path: Path) -> np.ndarray:
    """The data of a Zarr array, or of level 0 of a multiscale group."""
    import zarr

    node = zarr.open(str(path), mode="r")
    if isinstance(node, zarr.Group):
        node = node["0"]
    return node[:]


def interrupt_validation(monkeypatch: pytest.MonkeyPatch, call: int = 2) -> None:
    """Ctrl-C during the ``call``-th validation of a training run (the epochs before it are finished)."""
    from volseg_dask.training import loop

    real = loop.Runner.validate
    calls = []

    def validate(self):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(loop.Runner, "validate", validate)
