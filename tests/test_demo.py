"""The demo flow end to end, shrunk: small volumes and a few seconds of training."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from volseg_dask.cli import cli
from volseg_dask.demo import demo_settings, otsu_baseline
from volseg_dask.synthetic import make_volume


def test_demo_runs_end_to_end(tmp_path):
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path), "--size", "64", "--train-size", "64",
                                      "--minutes", "0.15"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "multi-Otsu Dice" in result.output and "4/4 unseen volume 64³" in result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["dice"]) == {"brine", "grain", "gas"}
    for name in ("demo.png", "model.pt", "model.curves.png", "scores.json"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "prediction.zarr" / "labels" / "0").is_dir()


def test_demo_settings_are_valid_and_small():
    s = demo_settings()
    assert s.model.architecture == "Unet" and s.train.max_minutes is not None and s.train.max_minutes <= 5


def test_otsu_baseline_maps_intensity_order_to_classes():
    """Well-separated levels: the baseline must be right (gas darkest, then brine, then grain)."""
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, (16, 16, 16)).astype(np.uint8)
    levels = np.array([20000, 40000, 5000])[truth]  # brine, grain, gas intensities
    image = (levels + rng.normal(0, 500, truth.shape)).astype(np.uint16)
    dice = otsu_baseline(image, truth)
    assert sorted(dice) == [0, 1, 2] and min(dice.values()) > 0.99, dice
    noisy, labels = make_volume(64, seed=1)  # shading and noise: a global threshold falls short
    assert min(otsu_baseline(noisy, labels).values()) < 0.9
