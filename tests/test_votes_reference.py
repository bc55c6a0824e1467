"""The slab-wise, branch-free merge and downsampling kernels against plain numpy references.

Small value ranges make ties common, so the tie rules (first class, first axis, corner voxel) are exercised.
"""
from __future__ import annotations

import numpy as np
import pytest

from volseg_dask.prediction.votes import merge_block
from volseg_dask.resample import mean_2x2x2, mode_2x2x2


def reference_merge(*probs, method, label_values, outputs=()):
    stack = np.stack(probs)  # (A, C, z, y, x)
    n_classes = stack.shape[1]
    per_axis = stack.argmax(axis=1)
    if method == "max":
        best = stack.max(axis=1).argmax(axis=0)[None]
        classes = np.take_along_axis(per_axis, best, axis=0)[0]
        merged = np.take_along_axis(stack, best[:, None], axis=0)[0].astype(np.float32)
    else:
        merged = stack.mean(axis=0, dtype=np.float32)
        if method == "mean":
            classes = merged.argmax(axis=0)
        else:
            counts = np.stack([(per_axis == c).sum(axis=0) for c in range(n_classes)])
            classes = (counts.astype(np.float32) * 256.0 + merged).argmax(axis=0)
    lut = np.asarray(label_values)
    out = np.empty((1 + len(outputs), *classes.shape), np.uint8 if lut.max() <= 255 else np.uint16)
    out[0] = lut[classes]
    for i, name in enumerate(outputs, start=1):
        if name == "confidence":
            out[i] = np.rint(np.take_along_axis(merged, classes[None], axis=0)[0])
        elif name == "entropy":
            p = merged / 255.0
            p = p / np.maximum(p.sum(axis=0, keepdims=True), 1e-12)
            with np.errstate(divide="ignore", invalid="ignore"):
                h = -(np.where(p > 0, p * np.log(p), 0.0)).sum(axis=0)
            out[i] = np.rint(np.clip(h / np.log(max(n_classes, 2)), 0, 1) * 255.0)
        else:
            out[i] = (per_axis != classes[None]).sum(axis=0)
    return out


@pytest.mark.parametrize("method", ["max", "mean", "vote"])
@pytest.mark.parametrize(("n_axes", "n_classes", "high"), [(1, 2, 256), (3, 3, 4), (3, 4, 256), (12, 5, 3)])
def test_merge_block_matches_reference(method, n_axes, n_classes, high):
    rng = np.random.default_rng(n_axes * 100 + n_classes)
    shape = (n_classes, 9, 13, 300)  # several slabs along z (the kernel works on ~64k voxels at a time)
    probs = [rng.integers(0, high, shape, dtype=np.uint8) for _ in range(n_axes)]
    values = [0, 7, 300, 2, 9][:n_classes] if n_classes > 2 else [0, 1]
    outputs = ("confidence", "entropy", "disagreement")
    got = merge_block(*probs, method=method, label_values=values, outputs=outputs)
    want = reference_merge(*probs, method=method, label_values=values, outputs=outputs)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[3], want[3])
    # entropy goes through float logs: equal up to one rounding step
    assert np.abs(got[2].astype(int) - want[2].astype(int)).max() <= 1


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32])
def test_mode_2x2x2_matches_reference(dtype):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 3, (10, 2, 40, 2, 12, 2)).astype(dtype)
    cubes = np.transpose(x, (0, 2, 4, 1, 3, 5)).reshape(10, 40, 12, 8)
    counts = (cubes[..., :, None] == cubes[..., None, :]).sum(axis=-1)
    want = np.take_along_axis(cubes, counts.argmax(axis=-1)[..., None], axis=-1)[..., 0]
    np.testing.assert_array_equal(mode_2x2x2(x), want)


def test_mean_2x2x2_matches_numpy():
    x = np.random.default_rng(2).integers(0, 256, (6, 2, 7, 2, 9, 2), dtype=np.uint8)
    np.testing.assert_array_equal(mean_2x2x2(x), np.rint(x.mean(axis=(1, 3, 5))).astype(np.uint8))
