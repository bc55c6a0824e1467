"""Learned fusion of the axes: exact blockwise kernels, the sample, the fit, the merge, refusals, the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from volseg_dask.config import Settings
from volseg_dask.errors import (
    ConfigError,
    IncompleteOutputError,
    ModelFileError,
    OutputExistsError,
    VolumeFormatError,
    VolumeValueError,
)
from volseg_dask.grid import BlockGrid, coarse_shape
from volseg_dask.io import open_volume
from volseg_dask.models import ModelMeta, load_model, read_model_file, save_model
from volseg_dask.outputs import create_array, file_sha256, mark_complete, set_status, status
from volseg_dask.prediction import merge, predict
from volseg_dask.prediction.fusion import WEIGHT_BUDGET, Fusion, fuse_block, fused_logits, pad_edge
from volseg_dask.prediction.fusion_fit import fit_fusion, fit_fusion_on_volume
from volseg_dask.prediction.fusion_samples import sample_voxels
from volseg_dask.prediction.merging import write_merged
from volseg_dask.prediction.upsample import upsample_region
from volseg_dask.prediction.votes import merge_block
from volseg_dask.synthetic import write_demo_data

from .conftest import read_array

HASH = "ab" * 32
EXTRAS = ("confidence", "entropy", "disagreement")


def settings(**predict_options) -> Settings:
    return Settings().with_overrides({f"predict.{k}": v for k, v in predict_options.items()})


def random_fusion(kind: str, classes: int = 3, axes: str = "zyx", seed: int = 0) -> Fusion:
    rng = np.random.default_rng(seed)
    shape = (classes, len(axes)) if kind == "linear" else (classes, len(axes), classes, 3, 3, 3)
    return Fusion.quantize(kind, axes, rng.normal(0, 4, shape), rng.normal(0, 1, classes), HASH)


def probability_store(path: Path, arrays: list[np.ndarray], chunks: tuple[int, ...], axes: str = "zyx") -> zarr.Group:
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    for axis, probs in zip(axes, arrays):
        arr = create_array(group, name=f"probabilities/{axis}", shape=probs.shape, dtype=np.uint8,
                           chunks=(probs.shape[0], *chunks))
        arr[...] = probs
        mark_complete(arr)
    return group


# ---- the kernels --------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [1.0, 0.37, 12.5])
def test_equal_weight_linear_fusion_is_the_mean_merge(tmp_path, weight):
    """Labels and disagreement equal the mean merge's bit for bit, with many ties (values 0-3), blockwise too."""
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 4, (3, 23, 31, 17), dtype=np.uint8) for _ in range(3)]
    fusion = Fusion.quantize("linear", "zyx", np.full((3, 3), weight), np.zeros(3), HASH)
    assert len(np.unique(fusion.weights)) == 1
    values = [0, 4, 9]
    mean = merge_block(*arrays, method="mean", label_values=values, outputs=("disagreement",))
    fused = fuse_block(arrays, fusion, label_values=values, outputs=("disagreement",))
    np.testing.assert_array_equal(fused, mean)
    group = probability_store(tmp_path / "m.zarr", arrays, (7, 11, 5))
    write_merged(group, tmp_path / "m.zarr", "zyx", BlockGrid((23, 31, 17), (7, 11, 5)), method="learned",
                 label_values=values, extras=("disagreement",), attrs={}, fusion=fusion)
    np.testing.assert_array_equal(read_array(tmp_path / "m.zarr" / "labels"), mean[0])
    np.testing.assert_array_equal(read_array(tmp_path / "m.zarr" / "disagreement"), mean[1])


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("factor", [1, 2])
def test_blockwise_fusion_equals_whole_arrays(tmp_path, kind, factor):
    """The production write_merged on uneven blocks equals one fusion of the whole volume (edge repeated)."""
    rng = np.random.default_rng(2)
    shape = (23, 31, 17)
    chunks = (8, 12, 6) if factor == 2 else (7, 11, 5)
    grid = BlockGrid(shape, chunks, factor)
    arrays = [rng.integers(0, 256, (3, *coarse_shape(shape, factor)), dtype=np.uint8) for _ in range(3)]
    fusion = random_fusion(kind)
    whole_region = tuple((0, s) for s in shape)
    native = [upsample_region(lambda w, p=p: p[(slice(None), *w)], whole_region, grid) for p in arrays]
    padded = [pad_edge(p, whole_region, whole_region, fusion.halo) for p in native]
    whole = fuse_block(padded, fusion, label_values=[0, 4, 9], outputs=EXTRAS)
    assert len(np.unique(whole[0])) == 3
    group = probability_store(tmp_path / "m.zarr", arrays, grid.chunks)
    write_merged(group, tmp_path / "m.zarr", "zyx", grid, method="learned", label_values=[0, 4, 9], extras=EXTRAS,
                 attrs={}, fusion=fusion)
    for row, name in enumerate(("labels", *EXTRAS)):
        np.testing.assert_array_equal(read_array(tmp_path / "m.zarr" / name), whole[row], err_msg=name)


def test_conv_fusion_is_the_fitted_convolution_and_linear_the_multiplanar_model():
    """The integer kernel computes torch's conv3d of the stacked probabilities (p in [0, 1]) up to the rounding of
    the weights; the linear model is softmax(Σ_a W[c, a]·p[a, c] + b[c])."""
    rng = np.random.default_rng(3)
    weights = rng.normal(0, 4, (3, 3, 3, 3, 3, 3))
    bias = rng.normal(0, 1, 3)
    fusion = Fusion.quantize("conv", "zyx", weights, bias, HASH)
    assert (np.abs(fusion.weights).reshape(3, -1).sum(axis=1) <= WEIGHT_BUDGET).all()
    assert np.abs(fusion.float_weights() - weights).max() < 1e-3 * np.abs(weights).max()
    probs = [rng.integers(0, 256, (3, 9, 12, 10), dtype=np.uint8) for _ in range(3)]
    stack = torch.from_numpy(np.concatenate(probs)[None].astype(np.float64) / 255)
    want = torch.nn.functional.conv3d(stack, torch.from_numpy(weights.reshape(3, 9, 3, 3, 3)),
                                      torch.from_numpy(bias))[0].numpy()
    got = fused_logits(probs, fusion)
    assert got.shape == (3, 7, 10, 8)
    assert np.abs(got - want).max() < 2e-3 * np.abs(want).max()
    lin_w = rng.normal(0, 4, (3, 3))
    linear = Fusion.quantize("linear", "zyx", lin_w, bias, HASH)
    p = np.stack(probs).astype(np.float64) / 255  # (A, C, ...)
    want = np.einsum("ca,ac...->c...", lin_w, p) + bias[:, None, None, None]
    assert np.abs(fused_logits(probs, linear) - want).max() < 1e-3 * np.abs(want).max()
    out = fuse_block(probs, linear, label_values=[0, 1, 2], outputs=("confidence",))
    soft = np.exp(want - want.max(axis=0)) / np.exp(want - want.max(axis=0)).sum(axis=0)
    assert (out[0] == want.argmax(axis=0)).mean() > 0.99
    assert np.abs(out[1].astype(int) - np.rint(soft.max(axis=0) * 255)).max() <= 1


def test_fusion_parameters_travel_in_the_model_file_and_damage_is_refused(tiny_model, tmp_path):
    _, meta = read_model_file(tiny_model)
    assert meta.fusion is None and meta.to_dict()["fusion"] is None
    model, _ = load_model(tiny_model)
    fusion = random_fusion("conv")
    path = save_model(tmp_path / "f.pt", model, dataclasses.replace(meta, fusion=fusion))
    _, back = read_model_file(path)
    assert back.fusion is not None and back.fusion.kind == "conv" and back.fusion.axes == ("z", "y", "x")
    np.testing.assert_array_equal(back.fusion.weights, fusion.weights)
    np.testing.assert_array_equal(back.fusion.scale, fusion.scale)
    good = fusion.to_dict()
    for broken, what in [({"kind": "mlp"}, "kind 'mlp'"), ({"axes": ["z", "z", "x"]}, "axes"),
                         ({"weights": np.asarray(good["weights"])[:2].tolist()}, "weights"),
                         ({"weights": (np.asarray(good["weights"]) * 2).tolist()}, "absolute sum"),
                         ({"network_sha256": "abc"}, "network_sha256"), ({"scale": [0.0, 1.0, 1.0]}, "scale")]:
        raw = {**meta.to_dict(), "fusion": {**good, **broken}}
        with pytest.raises(ModelFileError, match=what):
            ModelMeta.from_dict(raw, path="m.pt")
    # the format-1 fixture of an older version has no fusion field
    _, old = read_model_file(Path(__file__).parent / "data" / "model_v1.pt")
    assert old.fusion is None


# ---- samples and fits on a real prediction ------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory, trained_model):
    """A labelled 48³ volume, its per-axis prediction by the trained test model, and fused model files."""
    root = tmp_path_factory.mktemp("fusion")
    image, labels = write_demo_data(root / "data", 48, seed=3, chunks=16)
    pred = predict(image, trained_model, root / "pred.zarr", settings(chunks=[24, 16, 20], halo=8)).output
    fused = {kind: fit_fusion(pred, labels, root / f"{kind}.pt", model=trained_model, kind=kind, samples=6000,
                              seed=0) for kind in ("linear", "conv")}
    return {"root": root, "image": image, "labels": labels, "pred": pred, "model": trained_model,
            "fused": {k: r.model_path for k, r in fused.items()}, "fits": fused}


def test_samples_are_stratified_bounded_reproducible_and_skip_ignored(world, tmp_path):
    truth = open_volume(world["labels"]).compute()
    marked = truth.copy()
    marked[:20, :, :30] = 255  # unlabelled
    np.save(tmp_path / "marked.npy", marked)
    lazy = open_volume(tmp_path / "marked.npy")
    info = status(zarr.open_group(str(world["pred"])))
    grid = BlockGrid(tuple(info["shape"]), tuple(info["chunks"]))

    def draw(seed, n=900):
        return sample_voxels(str(world["pred"]), "zyx", grid, lazy, [0, 1, 2], 255, samples=n, seed=seed, radius=1)

    a, b, c = draw(1), draw(1), draw(2)
    for field in ("patches", "classes", "positions"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.positions, c.positions)
    counts = np.bincount(marked[marked != 255].ravel(), minlength=3)
    assert counts.min() < 300 < counts.max()  # a rare class: all of its voxels, 300 of the others
    assert a.per_class.tolist() == np.minimum(300, counts).tolist()
    n = int(a.per_class.sum())
    assert a.patches.shape == (n, 9, 3, 3, 3)
    z, y, x = a.positions.T
    assert (marked[z, y, x] == a.classes).all()  # never an unlabelled voxel: every class is the truth's
    assert len({tuple(p) for p in a.positions}) == n
    whole = [pad_edge(zarr.open_array(str(world["pred"] / "probabilities" / axis))[:], ((0, 48),) * 3,
                      ((0, 48),) * 3, 1) for axis in "zyx"]
    for i in range(0, n, 97):
        want = np.concatenate([p[:, z[i]:z[i] + 3, y[i]:y[i] + 3, x[i]:x[i] + 3] for p in whole])
        np.testing.assert_array_equal(a.patches[i], want)
    assert a.class_voxels.tolist() == counts.tolist()
    weights = a.weights  # back to the truth's class frequencies
    assert np.isclose(weights.mean(), 1.0)
    assert np.allclose([weights[a.classes == c][0] for c in range(3)], counts / counts.sum() * n / a.per_class)
    many = draw(0, n=3 * 10**6)  # more than there are: every labelled voxel once
    assert many.per_class.tolist() == counts.tolist()


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_fit_writes_the_network_plus_fusion_and_predicting_with_it_is_the_learned_merge(world, tmp_path, kind):
    fused_path, fit = world["fused"][kind], world["fits"][kind]
    _, meta = read_model_file(fused_path)
    assert meta.fusion is not None and meta.fusion.kind == kind
    assert meta.fusion.network_sha256 == file_sha256(world["model"]) != file_sha256(fused_path)
    assert meta.fusion.fit["samples"] == sum(meta.fusion.fit["samples_per_class"]) <= 6000
    assert meta.fusion.fit["seed"] == 0
    assert fit.accuracy["learned"] >= fit.accuracy["mean"] - 0.01 and fit.seconds > 0
    original, _ = load_model(world["model"])
    network, _ = load_model(fused_path)
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), network.state_dict().values()))
    # the learned merge of the original prediction, and a prediction with the fused file, are the same
    pred = tmp_path / "p.zarr"
    shutil.copytree(world["pred"], pred)
    merge(pred, method="learned", model=fused_path, outputs=EXTRAS)
    info = status(zarr.open_group(str(pred)))
    assert info["merge"] == "learned" and info["fusion_kind"] == kind and info["fusion_model"] == str(fused_path)
    direct = predict(world["image"], fused_path, tmp_path / "d.zarr",  # the default merge 'auto' is 'learned' here
                     settings(chunks=[24, 16, 20], halo=8, entropy=True, disagreement=True))
    recorded = status(zarr.open_group(str(direct.output)))
    assert recorded["merge"] == "learned" and recorded["network_sha256"] == meta.fusion.network_sha256
    for name in ("labels", *EXTRAS, "probabilities/z"):
        np.testing.assert_array_equal(read_array(direct.output / name), read_array(pred / name), err_msg=name)
    mean = merge_block(*(read_array(pred / "probabilities" / a) for a in "zyx"), method="mean",
                       label_values=[0, 1, 2])[0]
    learned = read_array(pred / "labels")
    assert 0 < (learned != mean).mean() < 0.05  # a different merge, not a different segmentation
    # fused mode: linear sees exactly the per-axis blocks; conv also the ring of 1 voxel around each block,
    # predicted from the block's own planes (the neighbouring task predicts it from its own)
    fused = predict(world["image"], fused_path, tmp_path / "f.zarr",
                    settings(chunks=[24, 16, 20], halo=8, merge="learned", fused=True))
    same = read_array(fused.output / "labels") == learned
    if kind == "linear":
        assert same.all()
    else:  # every voxel off the blocks' inner faces is exact; on them the ring's probabilities differ a little
        inner = np.ones(same.shape, bool)
        for d, step in enumerate((24, 16, 20)):
            faces = [i for b in range(step, 48, step) for i in (b - 1, b)]
            index = [slice(None)] * 3
            index[d] = faces
            inner[tuple(index)] = False
        assert same[inner].all() and same.mean() > 0.98
    # a rerun of merge without --method keeps the learned merge and its model
    merge(pred)
    np.testing.assert_array_equal(read_array(pred / "labels"), learned)


def test_learned_fusion_of_a_downsampling_model(world, tmp_path):
    """Coarse per-axis probabilities are upsampled to the native grid, in the fit and in the merge."""
    model, meta = load_model(world["model"])
    half = save_model(tmp_path / "half.pt", model, dataclasses.replace(meta, downsample=2))
    s = settings(chunks=[16, 24, 32], halo=16)
    pred = predict(world["image"], half, tmp_path / "p.zarr", s).output
    assert zarr.open_array(str(pred / "probabilities" / "z")).shape == (3, 24, 24, 24)
    fit = fit_fusion(pred, world["labels"], tmp_path / "half-conv.pt", model=half, kind="conv", samples=3000)
    merge(pred, method="learned", model=fit.model_path)
    labels = read_array(pred / "labels")
    assert labels.shape == (48, 48, 48)
    fused = predict(world["image"], fit.model_path, tmp_path / "f.zarr",
                    settings(chunks=[16, 24, 32], halo=16, merge="learned", fused=True))
    # fused mode predicts other regions (the support of each grown block): as close as the max merge's fused mode
    fused_max = predict(world["image"], half, tmp_path / "m.zarr", settings(chunks=[16, 24, 32], halo=16, fused=True))
    merge(pred, method="max")
    close_max = (read_array(fused_max.output / "labels") == read_array(pred / "labels")).mean()
    assert (read_array(fused.output / "labels") == labels).mean() > min(0.97, close_max - 0.01)


# ---- refusals -----------------------------------------------------------------------------------


def test_probabilities_of_another_network_are_refused(world, tiny_model, tmp_path):
    with pytest.raises(ModelFileError, match="come from another network"):
        fit_fusion(world["pred"], world["labels"], tmp_path / "x.pt", model=tiny_model, samples=500)
    assert not (tmp_path / "x.pt").exists()
    other = predict(world["image"], tiny_model, tmp_path / "o.zarr", settings(chunks=[24, 24, 24], halo=8)).output
    before = read_array(other / "labels")
    with pytest.raises(ModelFileError, match="fitted for another network"):
        merge(other, method="learned", model=world["fused"]["linear"])
    np.testing.assert_array_equal(read_array(other / "labels"), before)
    assert status(zarr.open_group(str(other / "labels")))["complete"] is True


def test_a_model_without_fusion_asked_for_learned_is_refused_before_any_work(world, tmp_path):
    with pytest.raises(ModelFileError, match="has no fusion parameters"):
        predict(world["image"], world["model"], tmp_path / "o.zarr", settings(merge="learned"))
    assert not (tmp_path / "o.zarr").exists()
    pred = tmp_path / "p.zarr"
    shutil.copytree(world["pred"], pred)
    with pytest.raises(ModelFileError, match="has no fusion parameters.*volseg fuse fit"):
        merge(pred, method="learned")  # the model that predicted it has none
    np.testing.assert_array_equal(read_array(pred / "labels"), read_array(world["pred"] / "labels"))
    with pytest.raises(ConfigError, match="fitted on the axes zyx, the prediction has z"):
        predict(world["image"], world["fused"]["conv"], tmp_path / "z.zarr", settings(merge="learned", axes="z"))
    assert not (tmp_path / "z.zarr").exists()


def test_the_default_merge_is_learned_only_where_it_can_be(world, tmp_path, caplog):
    """'auto': max for a model file without fusion (as before fusion existed), and for one fitted on other axes."""
    along_z = settings(chunks=[48, 48, 48], axes="z")
    plain = predict(world["image"], world["model"], tmp_path / "p.zarr", along_z)
    assert status(zarr.open_group(str(plain.output)))["merge"] == "max"
    other = predict(world["image"], world["fused"]["conv"], tmp_path / "o.zarr", along_z)
    assert status(zarr.open_group(str(other.output)))["merge"] == "max"
    assert "fitted on the axes zyx, this prediction is along z: merging by max" in caplog.text
    np.testing.assert_array_equal(read_array(other.output / "labels"), read_array(plain.output / "labels"))


def test_bad_inputs_of_the_fit(world, tmp_path):
    labels, model = world["labels"], world["model"]
    truth = open_volume(labels).compute()
    np.save(tmp_path / "small.npy", truth[:40])
    with pytest.raises(VolumeFormatError, match=r"shape \(40, 48, 48\) differs from the prediction"):
        fit_fusion(world["pred"], tmp_path / "small.npy", tmp_path / "x.pt", model=model)
    np.save(tmp_path / "odd.npy", np.where(truth == 2, 7, truth).astype(np.uint8))
    with pytest.raises(VolumeValueError, match="label values 7 that the model does not predict"):
        fit_fusion(world["pred"], tmp_path / "odd.npy", tmp_path / "x.pt", model=model)
    np.save(tmp_path / "one.npy", np.zeros_like(truth))
    with pytest.raises(VolumeValueError, match="at least two classes"):
        fit_fusion(world["pred"], tmp_path / "one.npy", tmp_path / "x.pt", model=model)
    np.save(tmp_path / "float.npy", truth.astype(np.float32))
    with pytest.raises(VolumeFormatError, match="must be integers"):
        fit_fusion(world["pred"], tmp_path / "float.npy", tmp_path / "x.pt", model=model)
    with pytest.raises(OutputExistsError):
        fit_fusion(world["pred"], labels, world["fused"]["conv"], model=model)
    with pytest.raises(ConfigError, match="kind must be one of"):
        fit_fusion(world["pred"], labels, tmp_path / "x.pt", model=model, kind="mlp")
    # an incomplete prediction, a fused one, one whose probabilities were deleted
    pred = tmp_path / "p.zarr"
    shutil.copytree(world["pred"], pred)
    set_status(zarr.open_array(str(pred / "probabilities" / "y"), mode="r+"), complete=False)
    with pytest.raises(IncompleteOutputError, match="probabilities/y: this output is incomplete"):
        fit_fusion(pred, labels, tmp_path / "x.pt", model=model)
    fused = predict(world["image"], model, tmp_path / "f.zarr", settings(chunks=[24, 24, 24], halo=8, fused=True))
    with pytest.raises(IncompleteOutputError, match="holds no per-axis probabilities"):
        fit_fusion(fused.output, labels, tmp_path / "x.pt", model=model)
    shutil.rmtree(pred / "probabilities")
    with pytest.raises(IncompleteOutputError, match="holds no per-axis probabilities"):
        fit_fusion(pred, labels, tmp_path / "x.pt", model=model)
    assert not (tmp_path / "x.pt").exists()


# ---- resume and completeness --------------------------------------------------------------------


def _predict(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "volseg_dask.cli", "-q", "predict", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _blocks_done(out: Path) -> int:
    return sum(1 for _ in (out / ".volseg" / "done").rglob("*.*"))


def test_learned_prediction_resumes_after_sigkill_and_a_failed_merge_is_never_complete(world, tmp_path):
    """A real SIGKILL in a `predict --merge learned`; the rerun computes the rest and gives the uninterrupted result."""
    command = [str(world["image"]), str(world["fused"]["conv"]), "--chunks", "16", "--halo", "8", "--merge", "learned",
               "--entropy", "-o"]
    ref = _predict(*command, str(tmp_path / "ref.zarr"))
    assert ref.wait(timeout=300) == 0, ref.stderr.read() if ref.stderr else ""
    out = tmp_path / "killed.zarr"
    proc, deadline = _predict(*command, str(out)), time.time() + 120
    while _blocks_done(out) < 20 and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_after = _blocks_done(out)
    assert 20 <= killed_after < 81 and status(zarr.open_group(str(out)))["complete"] is False
    rerun = _predict(*command, str(out))
    summary, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0 and f"({81 - killed_after} blocks computed" in summary, summary
    for name in ("labels", "confidence", "entropy", "probabilities/x"):
        np.testing.assert_array_equal(read_array(out / name), read_array(tmp_path / "ref.zarr" / name), err_msg=name)
    # a learned merge that fails half-way (a damaged chunk) leaves labels marked incomplete; fixed, it finishes
    chunk = next(p for p in sorted((out / "probabilities" / "x").rglob("*")) if p.is_file() and p.name != "zarr.json")
    saved = chunk.read_bytes()
    chunk.write_bytes(b"garbage")
    with pytest.raises(Exception):  # noqa: B017 - the codec's own error
        merge(out, method="learned")
    assert status(zarr.open_group(str(out / "labels")))["complete"] is False
    with pytest.raises(IncompleteOutputError):
        open_volume(out / "labels")
    chunk.write_bytes(saved)
    merge(out, method="learned")
    np.testing.assert_array_equal(read_array(out / "labels"), read_array(tmp_path / "ref.zarr" / "labels"))
    assert status(zarr.open_group(str(out / "labels")))["complete"] is True


# ---- the command line and the API ---------------------------------------------------------------


def test_cli_fuse_fit_predict_and_merge_learned(world, tmp_path):
    import volseg_dask as vs
    from volseg_dask.cli import cli

    assert vs.fit_fusion is fit_fusion
    runner = CliRunner()
    fused = tmp_path / "fused.pt"
    result = runner.invoke(cli, ["fuse", "fit", str(world["pred"]), str(world["labels"]), "-o", str(fused), "--model",
                                 str(world["model"]), "--kind", "linear", "--samples", "1500", "--seed", "4"])
    assert result.exit_code == 0, result.output
    assert "linear fusion fitted on" in result.output and "accuracy on them" in result.output
    _, meta = read_model_file(fused)
    assert meta.fusion is not None and meta.fusion.fit["seed"] == 4
    again = runner.invoke(cli, ["fuse", "fit", str(world["pred"]), str(world["labels"]), "-o", str(fused), "--model",
                                str(world["model"])])
    assert again.exit_code == 1 and "already exists" in again.output
    out = tmp_path / "p.zarr"
    result = runner.invoke(cli, ["predict", str(world["image"]), str(fused), "-o", str(out), "--merge", "learned",
                                 "--chunks", "24", "--halo", "8"])
    assert result.exit_code == 0, result.output
    copy = tmp_path / "c.zarr"
    shutil.copytree(world["pred"], copy)
    result = runner.invoke(cli, ["merge", str(copy), "--method", "learned", "--model", str(fused)])
    assert result.exit_code == 0, result.output
    assert (read_array(copy / "labels") == read_array(out / "labels")).mean() > 0.99  # other blocks, same model
    result = runner.invoke(cli, ["merge", str(copy), "--method", "learned", "--model", str(world["model"])])
    assert result.exit_code == 1 and result.output.startswith("error: ") and "has no fusion parameters" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_train_with_fit_fusion(world, tmp_path):
    from volseg_dask.cli import cli

    config = tmp_path / "s.yaml"
    raw = {"model": {"architecture": "Unet", "encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [16, 8, 4]},
           "data": {"image_size": 32, "validation_block": 4},
           "train": {"epochs": 1, "samples_per_epoch": 16, "batch_size": 8, "learning_rate": 3e-3, "torch_threads": 1,
                     "device": "cpu"},
           "predict": {"chunks": [24, 24, 24], "halo": 8}}
    config.write_text(json.dumps(raw))
    image, labels = world["image"], world["labels"]  # the machinery, not the quality: train and fit on one volume
    runner = CliRunner()
    small = tmp_path / "small.npy"
    np.save(small, open_volume(world["labels"]).compute()[:40])
    bad = runner.invoke(cli, ["train", str(image), str(labels), "-o", str(tmp_path / "bad.pt"), "-c", str(config),
                              "--fit-fusion", str(world["image"]), str(small)])
    assert bad.exit_code == 1 and "differs from the image" in bad.output and not (tmp_path / "bad.pt").exists()
    result = runner.invoke(cli, ["train", str(image), str(labels), "-o", str(tmp_path / "m.pt"), "-c", str(config),
                                 "--fit-fusion", str(world["image"]), str(world["labels"]), "--fusion-kind", "linear"])
    assert result.exit_code == 0, result.output
    assert "linear fusion fitted on" in result.output
    _, meta = read_model_file(tmp_path / "m.pt")
    assert meta.fusion is not None and meta.fusion.fit["truth"] == str(world["labels"])
    assert meta.training  # still the trained model's record
    assert not [p for p in tmp_path.iterdir() if ".fusion-" in p.name]  # the temporary prediction is gone
    # refitting a fused file keeps the network it belongs to
    refit = fit_fusion_on_volume(tmp_path / "m.pt", world["image"], world["labels"], tmp_path / "m2.pt", kind="conv",
                                 samples=1000, settings=Settings.from_dict(raw))
    _, again = read_model_file(refit.model_path)
    assert again.fusion is not None and again.fusion.network_sha256 == meta.fusion.network_sha256


@pytest.mark.gpu
def test_fused_learned_prediction_on_the_gpu(world, tmp_path):
    """Inference on CUDA (float16 autocast), the fusion on the CPU: the labels of the CPU run, up to autocast."""
    s = settings(chunks=[24, 16, 20], halo=8, merge="learned", fused=True)
    cpu = predict(world["image"], world["fused"]["conv"], tmp_path / "c.zarr", s)
    gpu = predict(world["image"], world["fused"]["conv"], tmp_path / "g.zarr",
                  s.with_overrides({"predict.device": "cuda"}))
    assert (read_array(gpu.output / "labels") == read_array(cpu.output / "labels")).mean() > 0.99
