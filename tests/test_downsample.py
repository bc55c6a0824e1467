"""Training and prediction at 1/N resolution (``data.downsample``): coarse reads, upsampling, the flow."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from volseg_dask.config import Settings
from volseg_dask.errors import ConfigError
from volseg_dask.grid import BlockGrid, coarse_shape
from volseg_dask.io import convert, open_volume
from volseg_dask.models import load_model, read_model_file, save_model
from volseg_dask.prediction import merge, predict, predict_array
from volseg_dask.prediction.reads import read_downsampled
from volseg_dask.prediction.upsample import upsample_region
from volseg_dask.resample import downsample_array
from volseg_dask.synthetic import write_demo_data
from volseg_dask.training import train
from volseg_dask.training.volumes import open_training_volumes

from .conftest import read_array

SHAPE = (44, 48, 52)  # uneven against every block below


def settings(**predict_options) -> Settings:
    return Settings().with_overrides({f"predict.{k}": v for k, v in predict_options.items()})


@pytest.fixture(scope="module")
def vol(tmp_path_factory) -> Path:
    return write_demo_data(tmp_path_factory.mktemp("ds"), SHAPE, seed=4, chunks=16)[0]


@pytest.fixture(scope="module")
def half_model(trained_model, tmp_path_factory) -> Path:
    """The trained test model, declared to work at half resolution (as data.downsample: 2 records it)."""
    model, meta = load_model(trained_model)
    assert meta.downsample == 1
    return save_model(tmp_path_factory.mktemp("half") / "half.pt", model, dataclasses.replace(meta, downsample=2))


@pytest.mark.parametrize("factor", [2, 3])
def test_coarse_reads_equal_the_coarsened_volume(tmp_path, factor):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 60000, (13, 18, 21)).astype(np.uint16)
    np.save(tmp_path / "v.npy", data)
    convert(tmp_path / "v.npy", tmp_path / "v.zarr", chunks=8)
    whole = np.asarray(downsample_array(data, factor).compute())
    cs = coarse_shape(data.shape, factor)
    assert whole.shape == cs and whole.dtype == np.float32
    # a cube by hand, and the last, partial cube repeating the edge voxel
    assert whole[0, 0, 0] == np.float32(data[:factor, :factor, :factor].mean())
    edge = data[-(13 % factor or factor):, :factor, :factor]
    full = np.concatenate([edge, np.repeat(edge[-1:], factor - len(edge), axis=0)])
    assert whole[-1, 0, 0] == np.float32(full.mean())
    np.testing.assert_array_equal(read_downsampled(tmp_path / "v.zarr", [0, 0, 0], list(cs), factor), whole)
    np.testing.assert_array_equal(read_downsampled(tmp_path / "v.zarr", [1, 2, 0], [4, 5, cs[2]], factor),
                                  whole[1:4, 2:5, :])
    mirrored = read_downsampled(tmp_path / "v.zarr", [-2, 0, 0], [cs[0] + 1, cs[1], cs[2]], factor)
    np.testing.assert_array_equal(mirrored[2:-1], whole)
    np.testing.assert_array_equal(mirrored[[0, 1, -1]], whole[[1, 0, -1]])


def test_label_cubes_take_their_most_frequent_value():
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[:2, :2, :2] = [[[7, 7], [7, 3]], [[3, 3], [7, 255]]]  # 7 wins 4 of 8
    labels[2:, 2:, 2:] = 255
    coarse = np.asarray(downsample_array(labels, 2, labels=True).compute())
    assert coarse.dtype == np.uint8 and coarse.shape == (2, 2, 2)
    assert coarse[0, 0, 0] == 7 and coarse[1, 1, 1] == 255 and coarse[0, 1, 0] == 0


@pytest.mark.parametrize(("factor", "shape"), [(2, (13, 18, 21)), (3, (13, 18, 21)), (2, (16, 16, 16))])
def test_upsampling_is_blockwise_exact_and_trilinear(factor, shape):
    rng = np.random.default_rng(1)
    cs = coarse_shape(shape, factor)
    probs = rng.integers(0, 256, (3, *cs)).astype(np.uint8)

    def read(where):
        return probs[(slice(None), *where)]

    grid = BlockGrid(shape, shape, factor)
    assert grid.shape == cs
    whole = upsample_region(read, [(0, s) for s in shape], grid, slab=5)
    part = upsample_region(read, [(3, 11), (5, 15), (0, 7)], grid, slab=3)
    np.testing.assert_array_equal(whole[:, 3:11, 5:15, 0:7], part)
    reference = torch.nn.functional.interpolate(torch.from_numpy(probs[None].astype(np.float32)), scale_factor=factor,
                                                mode="trilinear", align_corners=False)[0].numpy()
    reference = reference[:, :shape[0], :shape[1], :shape[2]]
    assert np.abs(reference - whole).max() <= 0.5 + 1e-4  # torch's trilinear, rounded


def test_prediction_at_half_resolution(vol, half_model, tmp_path):
    """Coarse per-axis probabilities; native labels equal a plain whole-volume reference of the same steps:
    torch's trilinear upsampling of each axis's probabilities, then numpy's argmax of the highest one."""
    result = predict(vol, half_model, tmp_path / "c.zarr", settings(chunks=[16, 24, 32], halo=16))
    assert result.blocks_computed == 3 * 3 * 2 * 2
    coarse = coarse_shape(SHAPE, 2)
    per_axis = [zarr.open_array(str(result.output / "probabilities" / axis))[:] for axis in "zyx"]
    assert all(p.shape == (3, *coarse) for p in per_axis)
    up = [torch.nn.functional.interpolate(torch.from_numpy(p[None].astype(np.float32)), scale_factor=2,
                                          mode="trilinear", align_corners=False)[0].numpy()
          for p in per_axis]
    stack = np.rint(np.stack(up))[(slice(None), slice(None), *(slice(0, s) for s in SHAPE))]  # (axis, C, ...)
    best_axis = stack.max(axis=1).argmax(axis=0)
    reference = np.take_along_axis(stack.argmax(axis=1), best_axis[None], axis=0)[0]
    labels = read_array(result.output / "labels")
    assert labels.shape == SHAPE and len(np.unique(labels)) == 3
    assert (labels == reference).mean() >= 0.999  # rounding ties may differ between torch and numpy
    group = zarr.open_group(str(result.output))
    assert group["probabilities/z"].attrs["volseg_dask"]["downsample"] == 2
    merge(result.output, method="max")  # the re-merge upsamples the same way
    np.testing.assert_array_equal(read_array(result.output / "labels"), labels)


def test_map_overlap_path_at_half_resolution_equals_the_store_path(vol, half_model, tmp_path):
    s = settings(chunks=[16, 24, 32], halo=12)  # coarse: blocks of 8-16 (last ones 6 and 10), halo 6
    result = predict(vol, half_model, tmp_path / "o.zarr", s)
    lazy = predict_array(open_volume(vol, chunks=(16, 24, 32)), half_model, axis="y", settings=s)
    assert lazy.shape == (3, *coarse_shape(SHAPE, 2))
    np.testing.assert_array_equal(lazy.compute(), zarr.open_array(str(result.output / "probabilities" / "y"))[:])


def test_fused_at_half_resolution_is_as_close_to_one_block_as_the_per_axis_path(vol, half_model, tmp_path):
    """At 1/N resolution a fused task predicts its block's coarse voxels and the ring of one coarse voxel its
    upsampling needs, so near block faces it sees other context than the per-axis tasks (which predict the ring
    in the neighbouring blocks): not identical (at N = 1 it is), but as close to the one-block result."""
    s = {"chunks": [16, 24, 32], "halo": 16}
    per_axis = read_array(predict(vol, half_model, tmp_path / "a.zarr", settings(**s)).output / "labels")
    fused = read_array(predict(vol, half_model, tmp_path / "f.zarr", settings(fused=True, **s)).output / "labels")
    whole = read_array(predict(vol, half_model, tmp_path / "w.zarr", settings(chunks=list(SHAPE), halo=16))
                       .output / "labels")
    assert fused.shape == SHAPE
    assert (fused == whole).mean() >= (per_axis == whole).mean() - 0.01
    assert (fused == per_axis).mean() >= 0.95


def test_blocks_must_be_multiples_of_the_factor(vol, half_model, tmp_path):
    with pytest.raises(ConfigError, match=r"predict\.chunks.*multiples of 2"):
        predict(vol, half_model, tmp_path / "o.zarr", settings(chunks=[15, 24, 32]))
    assert not (tmp_path / "o.zarr").exists()


def test_training_at_half_resolution(small_volume, tmp_path):
    image, labels = small_volume  # 40 x 48 x 56
    raw = {"model": {"architecture": "Unet", "encoder": "resnet18", "encoder_depth": 3,
                     "decoder_channels": [16, 8, 4]},
           "data": {"image_size": 32, "validation_block": 4, "downsample": 2},
           "train": {"epochs": 1, "samples_per_epoch": 8, "batch_size": 4, "learning_rate": 3e-3,
                     "torch_threads": 1, "device": "cpu"}}
    s = Settings.from_dict(raw)
    (vol,) = open_training_volumes([(image, labels)], s.data)
    assert vol.shape == (20, 24, 28)
    assert [len(p) for p in vol.scan.profiles] == [20, 24, 28]
    assert sum(vol.scan.profiles[0]) == labels.size  # every voxel labelled, counted at native resolution
    result = train([(image, labels)], tmp_path / "m.pt", s)
    _, meta = read_model_file(result.model_path)
    assert meta.downsample == 2
    np.save(tmp_path / "image.npy", image)
    out = predict(tmp_path / "image.npy", result.model_path, tmp_path / "p.zarr", settings(chunks=[16, 16, 16], halo=8))
    assert read_array(out.output / "labels").shape == image.shape
