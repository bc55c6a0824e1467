"""The command line: help, data commands, and one-line errors with a non-zero exit code."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from volseg_dask.cli import cli
from volseg_dask.io import open_volume


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_help_lists_commands():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("convert", "export", "info", "config", "demo-data"):
        assert command in result.output


def test_demo_data_convert_info_export(tmp_path, small_volume):
    result = run("demo-data", str(tmp_path / "d"), "--shape", "24,32,40", "--seed", "1", "--chunks", "16")
    assert result.exit_code == 0, result.output
    np.save(tmp_path / "v.npy", small_volume[0])
    assert run("convert", str(tmp_path / "v.npy"), str(tmp_path / "v.zarr"), "--chunks", "16,24,32").exit_code == 0
    result = run("info", str(tmp_path / "v.zarr"))
    assert "shape" in result.output and "[40, 48, 56]" in result.output and "blosc" in result.output
    assert run("export", str(tmp_path / "v.zarr"), str(tmp_path / "v.tif")).exit_code == 0
    np.testing.assert_array_equal(open_volume(tmp_path / "v.tif").compute(), small_volume[0])


def test_config_write_show_check(tmp_path):
    path = tmp_path / "s.yaml"
    assert run("config", "write-defaults", str(path)).exit_code == 0
    assert yaml.safe_load(path.read_text())["model"]["architecture"] == "Unet"
    light = tmp_path / "cpu.yaml"
    assert run("config", "write-defaults", str(light), "--preset", "cpu").exit_code == 0
    raw = yaml.safe_load(light.read_text())
    assert raw["model"]["encoder"] == "tu-mobilenetv3_small_100" and raw["data"]["image_size"] == 128
    assert raw["train"]["max_minutes"] is None and "ok" in run("config", "check", str(light)).output
    result = run("config", "write-defaults", str(path))
    assert result.exit_code == 1 and "already exists" in result.output
    assert "s.yaml: ok" in run("config", "check", str(path)).output
    path.write_text("train:\n  epochs: -3\n")
    result = run("config", "check", str(path))
    assert result.exit_code == 1
    assert result.output.strip() == f"error: {path}: train.epochs: -3 is below the minimum 1"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["info", "{tmp}/missing.tif"], "missing.tif: no such file or folder"),
        (["convert", "{tmp}/missing.h5:/data", "{tmp}/o.zarr"], "missing.h5: no such file"),
        (["convert", "{tmp}/flat.npy", "{tmp}/o.zarr"], "expected a 3D volume"),
        (["convert", "{tmp}/v.npy", "{tmp}/exists.zarr"], "already exists; choose another output path"),
        (["export", "{tmp}/v.npy", "{tmp}/o.png"], "cannot export to '.png'"),
        (["convert", "{tmp}/v.npy", "{tmp}/no/such/dir/o.zarr"], "the output folder"),
    ],
)
def test_errors_are_one_line_without_traceback(tmp_path, args, message):
    np.save(tmp_path / "flat.npy", np.zeros((4, 4)))
    np.save(tmp_path / "v.npy", np.zeros((4, 4, 4), np.uint8))
    (tmp_path / "exists.zarr").mkdir()
    argv = [a.format(tmp=tmp_path) for a in args]
    proc = subprocess.run([sys.executable, "-m", "volseg_dask.cli", *argv], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "o.zarr").exists()


def test_debug_shows_the_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "volseg_dask.cli", "--debug", "info", str(tmp_path / "x.tif")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "VolumeNotFoundError" in proc.stderr


def test_api_verbs_stay_functions_after_their_modules_are_imported():
    import importlib

    import volseg_dask as vs

    for module in ("training", "training.run", "prediction", "prediction.run", "prediction.merging", "metrics",
                   "io", "io.conversion", "io.volume"):
        importlib.import_module(f"volseg_dask.{module}")
    for verb in ("train", "predict", "merge", "evaluate", "convert", "export", "open_volume", "predict_array"):
        assert callable(getattr(vs, verb)) and not isinstance(getattr(vs, verb), type(vs)), verb


def test_verbosity_and_debug_are_accepted_after_the_subcommand(tmp_path):
    import logging

    np.save(tmp_path / "v.npy", np.zeros((4, 4, 4), np.uint8))
    logger = logging.getLogger("volseg_dask")
    assert run("convert", str(tmp_path / "v.npy"), str(tmp_path / "a.zarr"), "-v").exit_code == 0
    assert logger.level == logging.INFO
    assert run("-v", "convert", str(tmp_path / "v.npy"), str(tmp_path / "b.zarr"), "-v").exit_code == 0
    assert logger.level == logging.DEBUG  # -v before and after add up
    assert run("config", "show", "-q").exit_code == 0 and logger.level == logging.ERROR
    proc = subprocess.run([sys.executable, "-m", "volseg_dask.cli", "info", str(tmp_path / "x.tif"), "--debug"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "VolumeNotFoundError" in proc.stderr
    assert "-v, --verbose" in run("predict", "--help").output
