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
