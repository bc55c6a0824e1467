"""Lazy slice sampling: shapes, axes, 2.5D, label mapping, bad inputs, split, cache, workers, augmentation."""

from __future__ import annotations

import bisect

import numpy as np
import pytest
import torch

from volseg_dask.config import AugmentSettings, DataSettings, Settings
from volseg_dask.errors import ConfigError, VolumeFormatError, VolumeValueError
from volseg_dask.labels import IGNORE_INDEX, LabelMapping, label_mapping
from volseg_dask.normalize import Normalization
from volseg_dask.training.augment import Augmenter
from volseg_dask.training.cache import ChunkCache
from volseg_dask.training.dataset import EpochSampler, SliceDataset, worker_init
from volseg_dask.training.split import GUARD, TRAIN, VAL, make_split
from volseg_dask.training.volumes import open_training_volumes

NORM = Normalization(low=3000.0, high=50000.0)


def _data(**kw) -> DataSettings:
    return Settings.from_dict({"data": {"image_size": 32, **kw}}).data


def _dataset(pairs, data=None, *, role="train", length=32, n_slices=1, augment=None, split=True, seed=0):
    data = data or _data()
    vols = open_training_volumes(pairs, data)
    mapping = label_mapping(np.unique(np.concatenate([v.scan.values for v in vols])), data.ignore_label, "test")
    for v in vols:
        v.roles = make_split(v.shape, data, n_slices=n_slices, seed=0) if split else tuple(
            np.full(n, TRAIN, np.uint8) for n in v.shape)
    return SliceDataset(vols, mapping, NORM, data, role=role, length=length, n_slices=n_slices, augment=augment,
                        seed=seed), vols, mapping


def test_shapes_axes_and_labels(small_zarr):
    ds, _vols, mapping = _dataset([small_zarr], length=64)
    assert mapping.values == (0, 1, 2) and len(ds) == 64
    axes = set()
    for i in range(64):
        x, y = ds[i]
        assert x.shape == (1, 32, 32) and x.dtype == torch.float32
        assert y.shape == (32, 32) and y.dtype == torch.int64
        assert set(y.unique().tolist()) <= {0, 1, 2, IGNORE_INDEX}
        axes.add(ds.spec(i).axis)
    assert axes == {0, 1, 2}


def test_lazy_reads_equal_the_in_memory_volume(small_zarr):
    """The chunk-cached Zarr sampler and the same sampler over numpy arrays give the same slices."""
    from volseg_dask.io.volume import open_volume

    image, labels = (open_volume(p).compute() for p in small_zarr)
    lazy, *_ = _dataset([small_zarr], length=24)
    eager, *_ = _dataset([(image, labels)], length=24)
    for i in range(24):
        spec = lazy.spec(i)
        assert spec == eager.spec(i)
        a, b = lazy[i], eager[i]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        # and the slice is the one the spec names (no augmentation here)
        raw, classes = lazy.read(spec)
        plane = np.moveaxis(image, spec.axis, 0)[spec.position]
        o1, o2 = spec.offset
        np.testing.assert_array_equal(raw[0], plane[o1:o1 + 32, o2:o2 + 32])
        truth = np.moveaxis(labels, spec.axis, 0)[spec.position][o1:o1 + 32, o2:o2 + 32]
        kept = classes != IGNORE_INDEX
        np.testing.assert_array_equal(classes[kept], truth[kept])
    assert lazy.cache.stats()["hits"] > lazy.cache.stats()["misses"] > 0


def test_padding_when_the_plane_is_smaller_than_the_crop(small_volume):
    image, labels = small_volume  # 40 x 48 x 56
    ds, *_ = _dataset([(image, labels)], _data(image_size=64), length=16, split=False)
    for i in range(16):
        x, y = ds[i]
        assert x.shape == (1, 64, 64)
        spec = ds.spec(i)
        h, w = (s for d, s in enumerate(image.shape) if d != spec.axis)
        assert int((y != IGNORE_INDEX).sum()) == h * w  # padding is ignored, every real voxel kept


def test_25d_stacks_neighbours_mirrored_at_the_border(small_volume):
    image, labels = small_volume
    ds, *_ = _dataset([(image, labels)], length=200, n_slices=3, split=False)
    seen_border = False
    for i in range(200):
        spec = ds.spec(i)
        raw, _ = ds.read(spec)
        assert raw.shape == (3, 32, 32)
        planes = np.moveaxis(image, spec.axis, 0)
        n = planes.shape[0]
        expect = [max(0, spec.position - 1) if spec.position > 0 else 0, spec.position,
                  spec.position + 1 if spec.position + 1 < n else n - 1]
        o1, o2 = spec.offset
        for c, p in enumerate(expect):
            np.testing.assert_array_equal(raw[c], planes[p][o1:o1 + 32, o2:o2 + 32])
        seen_border |= spec.position in (0, n - 1)
    assert seen_border


def test_label_mapping_round_trip_of_0_7_255():
    labels = np.array([[[0, 7], [255, 7]]], np.uint8)
    mapping = label_mapping(np.unique(labels), None, "l")
    assert mapping.values == (0, 7, 255) and mapping.classes == 3
    classes = mapping.to_classes(labels)
    np.testing.assert_array_equal(classes, [[[0, 1], [2, 1]]])
    np.testing.assert_array_equal(mapping.to_values(classes), labels)
    # the same through the other code paths: wide integers, negative values, integral floats
    for dtype in (np.int32, np.float32, np.int8):
        values = np.array([-3, 0, 7], dtype)
        m = label_mapping(values, None, "l")
        np.testing.assert_array_equal(m.to_classes(values), [0, 1, 2])
    with_ignore = label_mapping(np.unique(labels), 7, "l")
    assert with_ignore.values == (0, 255)
    np.testing.assert_array_equal(with_ignore.to_classes(labels), [[[0, IGNORE_INDEX], [1, IGNORE_INDEX]]])


def test_ignore_label_never_reaches_the_targets(small_volume):
    image, labels = small_volume
    sparse = labels.astype(np.int16)
    sparse[:, :, 20:] = -1  # only x < 20 annotated
    ds, *_ = _dataset([(image, sparse)], _data(ignore_label=-1), length=40, split=False)
    assert ds.mapping.values == (0, 1, 2)
    for i in range(40):
        spec = ds.spec(i)
        if spec.axis == 2:
            assert spec.position < 20  # positions without labels are never drawn
        assert set(ds[i][1].unique().tolist()) <= {0, 1, 2, IGNORE_INDEX}


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda lab: lab.astype(np.float32) * np.where(lab == 1, np.nan, 1), VolumeValueError, "NaN or infinite label"),
        (lambda lab: lab.astype(np.float32) + 0.5, VolumeValueError, "label values are not integers"),
        (lambda lab: np.arange(lab.size, dtype=np.int32).reshape(lab.shape), VolumeValueError,
         "more than the 255 classes"),
        (lambda lab: np.full_like(lab, 4), VolumeValueError, "only one class is labelled.*nothing to learn"),
        (lambda lab: lab[:, :, :-1], VolumeFormatError, "do not match the image"),
    ],
)
def test_bad_labels_are_refused_clearly(small_volume, make, error, message):
    image, labels = small_volume
    with pytest.raises(error, match=message):
        _dataset([(image, make(labels))])


def test_all_ignored_labels_and_bad_images_are_refused(small_volume):
    image, labels = small_volume
    with pytest.raises(VolumeValueError, match="no labelled voxels.*ignore_label 0"):
        _dataset([(image, np.zeros_like(labels))], _data(ignore_label=0))
    bad = image.astype(np.float32)
    bad[3, 4, 5] = np.inf
    with pytest.raises(VolumeValueError, match="1 NaN or infinite voxels"):
        _dataset([(bad, labels)])
    with pytest.raises(VolumeFormatError, match="no training volumes"):
        open_training_volumes([], _data())


def test_split_keeps_validation_voxels_out_of_training(small_volume):
    image, labels = small_volume
    data = _data(validation_fraction=0.2, validation_block=4)
    ds, vols, _ = _dataset([(image, labels)], data, length=300)
    roles = vols[0].roles
    for a, r in enumerate(roles):
        assert (r == VAL).any() and (r == TRAIN).any()
        # a guard band separates every validation position from the nearest training one
        val, train = np.flatnonzero(r == VAL), np.flatnonzero(r == TRAIN)
        assert np.abs(val[:, None] - train[None, :]).min() >= 2, a
    held = np.zeros(image.shape, bool)  # voxels in any validation slab or guard band
    val = np.zeros(image.shape, bool)  # voxels in any validation slab
    for a, r in enumerate(roles):
        shape = [1, 1, 1]
        shape[a] = -1
        held |= (r != TRAIN).reshape(shape)
        val |= (r == VAL).reshape(shape)
    assert 0.1 < val.mean() < 0.35  # about validation_fraction of the voxels
    for i in range(300):
        spec = ds.spec(i)
        assert roles[spec.axis][spec.position] == TRAIN
        _, classes = ds.read(spec)
        sel = [slice(None)] * 3
        sel[spec.axis] = spec.position
        d1, d2 = (d for d in range(3) if d != spec.axis)
        o1, o2 = spec.offset
        sel[d1], sel[d2] = slice(o1, o1 + 32), slice(o2, o2 + 32)
        mask = held[tuple(sel)]
        assert (classes[:mask.shape[0], :mask.shape[1]][mask] == IGNORE_INDEX).all()
    val_ds = SliceDataset(vols, ds.mapping, NORM, data, role="val", length=20)
    assert 0 < len(val_ds) <= 20
    for i in range(len(val_ds)):
        spec = val_ds.spec(i)
        assert roles[spec.axis][spec.position] == VAL
        assert val_ds.spec(i) == spec  # the same slices every epoch


def test_split_refuses_an_axis_without_training_positions():
    data = Settings.from_dict({"data": {"validation_fraction": 0.9, "axis_weights": {"z": 1, "y": 0, "x": 0}}}).data
    with pytest.raises(ConfigError, match="along z .* no training slice is left"):
        make_split((4, 64, 64), data, where="tiny.zarr")
    roles = make_split((64, 64, 64), _data(validation_fraction=0.0))
    assert all((r == TRAIN).all() for r in roles)
    assert GUARD not in make_split((64, 64, 64), _data(axis_weights={"z": 1, "y": 0, "x": 0}))[1]


def test_chunk_cache_is_bounded_and_counts():
    cache = ChunkCache(3000)
    loads = []
    for key in [1, 2, 1, 3, 4, 1]:
        cache.get((key,), lambda key=key: loads.append(key) or np.zeros(1000, np.uint8))
    assert cache.bytes <= 3000 and cache.stats()["blocks"] == 3
    assert loads == [1, 2, 3, 4] and cache.hits == 2  # 1 stayed: it was used most recently


def test_x_slices_read_each_chunk_once(small_zarr):
    """Read amplification: 48 x-slices of a 16³-chunked volume decompress each block once, not 48 times."""
    ds, *_ = _dataset([small_zarr], _data(axis_weights={"z": 0, "y": 0, "x": 1}, image_size=64,
                                          validation_fraction=0.0), length=100)
    for i in range(100):
        ds[i]
    stats = ds.cache.stats()
    assert stats["misses"] <= 2 * 27  # image and labels: 3 x 3 x 3 blocks each
    assert stats["hits"] >= 10 * stats["misses"]


def test_dataloader_with_two_workers_gives_the_same_batches(small_zarr):
    ds, *_ = _dataset([small_zarr], length=16, augment=Augmenter(AugmentSettings()))
    batches = {}
    for workers in (0, 2):
        sampler = EpochSampler(16)
        extra = {"worker_init_fn": worker_init, "persistent_workers": True} if workers else {}
        loader = torch.utils.data.DataLoader(ds, batch_size=8, sampler=sampler, num_workers=workers, **extra)
        out = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            out += [b for b in loader]
        batches[workers] = out
        del loader
    assert len(batches[0]) == 4
    for (x0, y0), (x2, y2) in zip(batches[0], batches[2]):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
    assert not torch.equal(batches[0][0][0], batches[0][2][0])  # epochs draw new slices


def test_augmentation_moves_image_and_mask_together():
    aug = Augmenter(AugmentSettings(flip=1.0, rotate90=0.0, affine=0.0, elastic=0.0, brightness_contrast=0.0,
                                    gamma=0.0, noise=0.0, blur=0.0))
    image = np.linspace(0, 1, 32 * 32 * 3, dtype=np.float32).reshape(32, 32, 3)
    mask = (image[..., 1] > 0.5).astype(np.uint8)
    out, out_mask = aug(image, mask, seed=1)
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out_mask, (out[..., 1] > 0.5).astype(np.uint8))
    full = Augmenter(AugmentSettings(elastic=1.0, affine=1.0))
    a, ma = full(image, mask, seed=5)
    b, mb = full(image, mask, seed=5)
    np.testing.assert_array_equal(a, b)  # a function of the seed
    assert set(np.unique(ma)) <= {0, 1} and np.array_equal(ma, mb)
    assert not Augmenter(AugmentSettings(enabled=False))
    mapping = LabelMapping((0, 1))
    assert mapping.to_dict() == {"label_values": [0, 1], "ignore_label": None}


def test_region_draws_stay_near_their_anchor_and_cut_cache_misses(tmp_path):
    """A volume larger than the cache: grouped draws re-read far fewer blocks than independent ones."""
    from volseg_dask.synthetic import write_demo_data

    pair = write_demo_data(tmp_path, 192, seed=2, chunks=32)  # 14 MB image + 7 MB labels > a 16 MB cache
    independent, _, _ = _dataset([pair], _data(cache_mb=16, region_slices=1), length=96)
    grouped, _, _ = _dataset([pair], _data(cache_mb=16), length=96)
    assert grouped.region_slices == 8 and independent.region_slices == 1  # auto: the volume does not fit
    for i in range(96):
        independent[i]
        grouped[i]
    assert grouped.cache.stats()["misses"] < 0.5 * independent.cache.stats()["misses"]
    # determinism, and every member of a region shares its anchor's axis and cached block
    again, _, _ = _dataset([pair], _data(cache_mb=16), length=96)
    assert [again.spec(i) for i in range(96)] == [grouped.spec(i) for i in range(96)]
    specs = [grouped.spec(i) for i in range(32)]  # one window: 4 regions of 8 slices
    regions = {(s.axis, bisect.bisect_right(grouped._images[0]._edges[s.axis], s.position)) for s in specs}
    assert len(regions) <= 4
    fits, _, _ = _dataset([pair], _data(cache_mb=64), length=8)
    assert fits.region_slices == 1
