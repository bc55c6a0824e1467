from __future__ import annotations

import numpy as np
import zarr

from volseg_dask.io import open_volume
from volseg_dask.synthetic import Scene, make_volume, render_block, write_demo_data


def test_reproducible_by_seed():
    a_img, a_lab = make_volume(32, seed=5)
    b_img, b_lab = make_volume(32, seed=5)
    c_img, _ = make_volume(32, seed=6)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    assert not np.array_equal(a_img, c_img)


def test_blocks_are_independent_of_blocking():
    scene = Scene.build((30, 40, 50), seed=2)
    whole_img, whole_lab = render_block(scene, (slice(0, 30), slice(0, 40), slice(0, 50)))
    part_img, part_lab = render_block(scene, (slice(7, 19), slice(13, 40), slice(0, 21)))
    np.testing.assert_array_equal(part_img, whole_img[7:19, 13:40, 0:21])
    np.testing.assert_array_equal(part_lab, whole_lab[7:19, 13:40, 0:21])


def test_all_three_classes_and_realistic_intensities():
    img, lab = make_volume(96, seed=0)
    fractions = np.bincount(lab.ravel(), minlength=3) / lab.size
    assert img.dtype == np.uint16 and lab.dtype == np.uint8
    assert set(np.unique(lab)) == {0, 1, 2}
    assert all(f > 0.03 for f in fractions), fractions
    means = [img[lab == c].mean() for c in range(3)]
    assert means[2] < means[0] < means[1]  # gas darkest, then brine, grains brightest


def test_global_threshold_is_not_enough():
    """Shading makes class intensity ranges overlap: the best single thresholds misclassify a lot."""
    img, lab = make_volume(96, seed=1)
    # the best possible pair of global thresholds, found by brute force on the truth itself
    values = np.percentile(img, np.linspace(1, 99, 60))
    best = 0.0
    for i, t1 in enumerate(values):
        for t2 in values[i + 1:]:
            pred = np.select([img < t1, img < t2], [2, 0], 1)
            best = max(best, float((pred == lab).mean()))
    assert best < 0.93, best


def test_write_demo_data_matches_in_memory(tmp_path):
    image_path, labels_path = write_demo_data(tmp_path, (24, 40, 36), seed=4, chunks=16)
    img, lab = make_volume((24, 40, 36), seed=4)
    np.testing.assert_array_equal(open_volume(image_path).compute(), img)
    np.testing.assert_array_equal(open_volume(labels_path).compute(), lab)
    assert zarr.open_array(str(labels_path)).chunks == (16, 16, 16)
