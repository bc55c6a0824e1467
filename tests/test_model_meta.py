"""Model files written before ``ModelMeta`` (format 1) load and predict as they did when written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

import volseg_dask as vs
from volseg_dask.config import Settings

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("name", ["model_v1", "model_v1_ds2_25d"])
def test_format_1_model_predicts_as_when_written(tmp_path: Path, name: str) -> None:
    expected = np.load(DATA / "model_v1_expected.npz")
    np.save(tmp_path / "vol.npy", expected["image"])
    vs.convert(tmp_path / "vol.npy", tmp_path / "vol.zarr", chunks=(16, 16, 16))
    settings = Settings.from_dict({"predict": {"chunks": [16, 16, 16], "halo": 8, "axes": "zyx"}})
    vs.predict(tmp_path / "vol.zarr", DATA / f"{name}.pt", tmp_path / "out.zarr", settings)
    group = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    for axis in "zyx":
        got = group[f"probabilities/{axis}"][:].astype(np.int16)
        want = expected[f"{name}_probabilities_{axis}"].astype(np.int16)
        assert got.shape == want.shape
        # bit-identical on the machine that wrote the fixture; another CPU's float rounding may move a
        # probability by one uint8 step, a schema misread (normalisation, classes, slices, factor) by far more
        assert np.abs(got - want).max() <= 1, axis
    labels = group["labels/0"][:]
    want_labels = expected[f"{name}_labels"]
    assert set(np.unique(labels)) <= set(np.unique(want_labels))
    assert np.mean(labels == want_labels) > 0.999
