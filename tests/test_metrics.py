"""Evaluation: a hand-computed confusion matrix, chunked == unchunked, clear errors."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from volseg_dask.errors import VolumeFormatError
from volseg_dask.metrics import confusion_matrix, evaluate


def test_hand_computed_confusion_matrix():
    truth = np.array([0, 0, 0, 0, 5, 5, 5, 9, 9, 9], np.uint8).reshape(1, 2, 5)
    pred = np.array([0, 0, 0, 5, 5, 5, 9, 9, 9, 0], np.uint8).reshape(1, 2, 5)
    values, cm = confusion_matrix(da.from_array(truth, chunks=(1, 1, 3)), da.from_array(pred, chunks=(1, 2, 2)))
    assert values == [0, 5, 9]
    #               pred 0  5  9
    expected = np.array([[3, 1, 0],   # truth 0
                         [0, 2, 1],   # truth 5
                         [1, 0, 2]])  # truth 9
    np.testing.assert_array_equal(cm, expected)
    result = evaluate(da.from_array(pred, chunks=(1, 1, 1)), da.from_array(truth, chunks=(1, 2, 5)))
    assert result.dice[0] == pytest.approx(2 * 3 / (4 + 4))
    assert result.dice[5] == pytest.approx(2 * 2 / (3 + 3))
    assert result.iou[9] == pytest.approx(2 / (3 + 3 - 2))
    assert result.accuracy == pytest.approx(7 / 10)


def test_ignore_label_leaves_voxels_out():
    truth = np.array([[[0, 0, 255, 255, 1, 1]]], np.uint8)
    pred = np.array([[[0, 1, 1, 0, 1, 1]]], np.uint8)
    result = evaluate(da.from_array(pred), da.from_array(truth), ignore_label=255)
    assert 255 not in result.dice
    assert result.dice[0] == pytest.approx(2 * 1 / (2 + 1))
    assert result.dice[1] == pytest.approx(2 * 2 / (2 + 3))
    assert result.accuracy == pytest.approx(3 / 4)


def test_chunked_equals_unchunked(tmp_path):
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 4, (23, 19, 31)).astype(np.uint16) * 7
    pred = np.where(rng.random(truth.shape) < 0.8, truth, rng.integers(0, 4, truth.shape) * 7).astype(np.uint16)
    whole = evaluate(da.from_array(pred, chunks=-1), da.from_array(truth, chunks=-1))
    chunked = evaluate(da.from_array(pred, chunks=(5, 7, 11)), da.from_array(truth, chunks=(9, 4, 13)),
                       json_path=tmp_path / "s.json")
    np.testing.assert_array_equal(whole.confusion, chunked.confusion)
    assert whole.dice == chunked.dice
    assert (tmp_path / "s.json").read_text().count("dice") >= 2
    expected = {v: 2 * np.sum((pred == v) & (truth == v)) / (np.sum(pred == v) + np.sum(truth == v))
                for v in (0, 7, 14, 21)}
    assert chunked.dice == pytest.approx(expected)


def test_mismatches_are_clear():
    a = da.zeros((4, 4, 4), dtype=np.uint8)
    with pytest.raises(VolumeFormatError, match=r"has shape \(4, 4, 4\) but truth has \(4, 4, 5\)"):
        evaluate(a, da.zeros((4, 4, 5), dtype=np.uint8))
    with pytest.raises(VolumeFormatError, match="labels must be integers"):
        evaluate(a.astype(np.float32), a)
    truth = da.from_array(np.array([0, 1, 2, 1] * 16, np.uint8).reshape(4, 4, 4))
    pred = da.from_array(np.array([0, 255, 128, 255] * 16, np.uint8).reshape(4, 4, 4))
    with pytest.raises(VolumeFormatError, match="label sets barely overlap"):
        evaluate(pred, truth)


def test_cli_table_and_json(tmp_path):
    import json

    from click.testing import CliRunner

    from volseg_dask.cli import cli
    from volseg_dask.synthetic import write_demo_data

    _, labels = write_demo_data(tmp_path, 24, seed=2, chunks=8)
    result = CliRunner().invoke(cli, ["evaluate", str(labels), str(labels), "--json", str(tmp_path / "s.json")])
    assert result.exit_code == 0 and "accuracy 1.0000, mean Dice 1.0000" in result.output
    assert json.loads((tmp_path / "s.json").read_text())["mean_dice"] == 1.0
    result = CliRunner().invoke(cli, ["evaluate", str(labels), str(tmp_path / "nope.zarr")])
    assert result.exit_code == 1 and "nope.zarr: no such file" in result.output


def test_an_input_rewritten_during_the_read_is_refused(tmp_path, monkeypatch):
    """A merge replacing the labels while evaluate reads them: no silently mixed result."""
    import volseg_dask.metrics as metrics
    from volseg_dask.errors import IncompleteOutputError
    from volseg_dask.synthetic import write_demo_data

    _, labels = write_demo_data(tmp_path, 16, seed=1, chunks=8)
    real = metrics.compute

    def rewrite_midway(*args, **kwargs):
        out = real(*args, **kwargs)
        write_demo_data(tmp_path, 16, seed=2, chunks=8, overwrite=True)  # another run replaces the input
        return out

    monkeypatch.setattr(metrics, "compute", rewrite_midway)
    with pytest.raises(IncompleteOutputError, match="was rewritten while it was being read"):
        evaluate(labels, labels)
