"""The training dataset: random 2D slices along z, y and x, read lazily from the volumes.

Nothing here loads a whole volume. A slice is cut from chunk-aligned blocks kept in a bounded LRU
cache (``data.cache_mb`` per process), so its cost is that of copying from memory once the blocks it
touches are warm.

Chunk read amplification
    Zarr decompresses whole chunks. A z-slice of a 128³-chunked volume reads the chunks it crosses
    to return 1/128 of each; an x-slice does the same across every chunk column it crosses. Read
    uncached, a 256² crop costs 4-9 chunk decompressions (2-4 MB each) for 128 kB of voxels.
    Caching whole blocks turns each of those decompressions into one per block per process: a
    training volume of a few hundred voxels a side (the usual labelled region) is read once and
    then served from memory; larger ones degrade gracefully to the cache's hit rate, and memory
    stays bounded by the cache, not the volume (``benchmarks/bench_sampling.py`` measures both).
    Label blocks are cached already mapped to class indices (one byte per voxel).

Labels
    Any integer label values are mapped to contiguous classes ``0 .. K-1`` (:class:`LabelMapping`;
    the original values are stored in the model file). ``ignore_label`` voxels, padding, and voxels
    held out for validation become :data:`IGNORE_INDEX` (255), which every loss and metric skips.

Validation split (:func:`make_split`)
    Slices along different axes intersect, so holding out slice *positions* of one axis is not
    enough: a y-slice crosses every held-out z-slice. The split therefore holds out *slabs of
    voxels*: along each sampled axis, a few blocks of at most ``validation_block`` consecutive
    positions (spread over the axis, together about ``validation_fraction`` of the voxels once the
    slabs of all axes are united). A voxel is a validation voxel when it lies in any slab. Training
    slices are drawn only at training positions of their own axis, and every voxel of theirs inside
    another axis's slab is set to ``IGNORE_INDEX``: validation labels never reach the loss. A guard
    band of ``1 + n_slices // 2`` positions on each side of every slab is neither trained nor
    validated, so no training slice (nor its 2.5D context) is a neighbour of a validation slice.
    Validation slices are whole-slab planes and are the same every epoch.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .config import DataSettings
from .errors import ConfigError, VolumeFormatError, VolumeValueError
from .io import mirror_indices, open_volume
from .normalize import Normalization, apply
from .progress import compute
from .resample import downsample_array

log = logging.getLogger(__name__)

__all__ = [
    "AXES",
    "GUARD",
    "IGNORE_INDEX",
    "ChunkCache",
    "EpochSampler",
    "LabelMapping",
    "SliceDataset",
    "SliceSpec",
    "TrainingVolume",
    "label_mapping",
    "make_split",
    "open_training_volumes",
    "worker_init",
]

AXES = ("z", "y", "x")
IGNORE_INDEX = 255
"""Class index of voxels left out of loss and metrics (ignore_label, padding, held-out voxels)."""
MAX_CLASSES = 255

REGION_WINDOW = 4
"""Regions a window of grouped training draws interleaves (see :meth:`SliceDataset.spec`)."""

TRAIN, VAL, GUARD = 0, 1, 2
"""Roles of a slice position along one axis (see :func:`make_split`)."""


# ---- labels -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelMapping:
    """Original label values <-> contiguous classes; ``values[c]`` is the value of class ``c``."""

    values: tuple[int, ...]
    ignore_label: int | None = None

    @property
    def classes(self) -> int:
        return len(self.values)

    def to_classes(self, labels: np.ndarray) -> np.ndarray:
        """Class indices (uint8) of a label block; ignore_label and unknown values -> IGNORE_INDEX."""
        flat = np.asarray(labels)
        if flat.dtype == np.bool_:
            flat = flat.view(np.uint8)
        elif flat.dtype.kind == "f":
            flat = np.rint(flat)
        values = np.asarray(self.values, np.int64)
        if flat.dtype in (np.uint8, np.int8):  # a lookup table is fastest for one-byte labels
            offset = 128 if flat.dtype == np.int8 else 0
            lut = np.full(256, IGNORE_INDEX, np.uint8)
            ok = (values + offset >= 0) & (values + offset < 256)
            lut[values[ok] + offset] = np.arange(len(values), dtype=np.uint8)[ok]
            return lut[flat.astype(np.int16) + offset]
        idx = np.searchsorted(values, flat)
        idx_c = np.minimum(idx, len(values) - 1)
        known = values[idx_c] == flat
        return np.where(known, idx_c, IGNORE_INDEX).astype(np.uint8)

    def to_values(self, classes: np.ndarray) -> np.ndarray:
        """Original label values of class indices."""
        return np.asarray(self.values)[classes]

    def to_dict(self) -> dict[str, Any]:
        return {"label_values": list(self.values), "ignore_label": self.ignore_label}


def _scan_block(block: np.ndarray, ignore_label: int | None) -> dict[str, Any]:
    """Unique values, validity and per-axis labelled-voxel profiles of one label block."""
    out: dict[str, Any] = {"nan": 0, "fractional": 0, "example": None}
    if block.dtype.kind == "f":
        finite = np.isfinite(block)
        out["nan"] = int(block.size - finite.sum())
        frac = finite & (block != np.rint(np.where(finite, block, 0)))
        out["fractional"] = int(frac.sum())
        if out["fractional"]:
            out["example"] = float(block[frac][0])
        block = np.where(finite, np.rint(block), 0)
    values = np.unique(block)
    out["values"] = values.astype(np.int64) if values.size <= 4 * MAX_CLASSES else values[: 4 * MAX_CLASSES + 1]
    labelled = np.ones(block.shape, bool) if ignore_label is None else block != ignore_label
    out["profiles"] = [labelled.sum(axis=tuple(d for d in range(3) if d != a), dtype=np.int64) for a in range(3)]
    return out


@dataclass
class LabelScan:
    """What one scan of a label volume found."""

    values: np.ndarray
    profiles: list[np.ndarray]  # per axis: labelled (non-ignore) voxels at each position


def scan_labels(labels: da.Array, path: str, ignore_label: int | None = None) -> LabelScan:
    """Read a label volume once, block by block: its values and labelled-voxel profiles.

    Raises
    ------
    VolumeValueError
        Non-numeric labels, float labels with NaN/Inf or non-integer values, or more than
        255 distinct values.
    """
    if labels.dtype.kind not in "biuf":
        raise VolumeValueError(f"{path}: labels of dtype {labels.dtype} are not integers; convert them to an "
                               "integer type (e.g. uint8)")
    parts = [dask.delayed(_scan_block)(labels.blocks[idx], ignore_label) for idx in np.ndindex(*labels.numblocks)]
    results = compute(*parts)
    nan = sum(r["nan"] for r in results)
    if nan:
        raise VolumeValueError(f"{path}: {nan} NaN or infinite label values; labels must be integers (set "
                               "unlabelled voxels to a value and pass it as data.ignore_label)")
    frac = sum(r["fractional"] for r in results)
    if frac:
        example = next(r["example"] for r in results if r["example"] is not None)
        raise VolumeValueError(f"{path}: {frac} label values are not integers (e.g. {example}); labels must be "
                               "whole numbers: give a label volume, not probabilities or an image")
    values = np.unique(np.concatenate([r["values"] for r in results]))
    profiles = []
    for a in range(3):
        profile = np.zeros(labels.shape[a], np.int64)
        for idx, r in zip(np.ndindex(*labels.numblocks), results):
            start = sum(labels.chunks[a][: idx[a]])
            profile[start:start + len(r["profiles"][a])] += r["profiles"][a]
        profiles.append(profile)
    return LabelScan(values=values, profiles=profiles)


def label_mapping(values: Sequence[int] | np.ndarray, ignore_label: int | None, where: str) -> LabelMapping:
    """The class mapping of the label values found in the training labels.

    Raises
    ------
    VolumeValueError
        No labelled voxel, a single class (nothing to learn), or more than 255 classes.
    """
    vals = sorted({int(v) for v in np.asarray(values).ravel()} - ({ignore_label} if ignore_label is not None
                                                                   else set()))
    if not vals:
        raise VolumeValueError(f"{where}: no labelled voxels (every voxel equals ignore_label {ignore_label}); "
                               "label some voxels, or check data.ignore_label")
    if len(vals) == 1:
        raise VolumeValueError(
            f"{where}: only one class is labelled (value {vals[0]}); there is nothing to learn. Label at least two "
            "classes (e.g. the background as well)" + (f", or check data.ignore_label ({ignore_label})"
                                                        if ignore_label is not None else "")
        )
    if len(vals) > MAX_CLASSES:
        raise VolumeValueError(f"{where}: {len(vals)} distinct label values, more than the {MAX_CLASSES} classes "
                               f"supported (first values: {vals[:5]}); is this an image rather than labels?")
    return LabelMapping(tuple(vals), ignore_label)


# ---- volumes ----------------------------------------------------------------------------------


def _check_image_values(image: da.Array, path: str) -> None:
    """Refuse NaN or infinite values anywhere in a float image (one blockwise pass)."""
    if image.dtype.kind not in "biuf":
        raise VolumeValueError(f"{path}: dtype {image.dtype} is not numeric; convert it to integers or floats")
    if image.dtype.kind != "f":
        return
    (bad,) = compute(da.map_blocks(lambda b: np.array([[[(~np.isfinite(b)).sum()]]]), image, dtype=np.int64,
                                   chunks=(1, 1, 1)).sum())
    if bad:
        raise VolumeValueError(f"{path}: {int(bad)} NaN or infinite voxels; replace them (e.g. with the "
                               "background value) before training")


@dataclass
class TrainingVolume:
    """One image/label pair: lazy arrays (or in-memory ones), its label scan and split roles."""

    image_path: str
    labels_path: str
    image: Any  # dask array or numpy array
    labels: Any
    scan: LabelScan
    roles: tuple[np.ndarray, np.ndarray, np.ndarray] = field(default_factory=lambda: (np.zeros(0, np.uint8),) * 3)
    factor: int = 1
    from_files: bool = False

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image.shape)  # type: ignore[return-value]

    def downsample(self, factor: int) -> None:
        """See the volume (and its label scan) as averaged over ``factor``-sided cubes (data.downsample)."""
        if factor == 1:
            return
        self.factor = factor
        self.image = downsample_array(self.image, factor)
        self.labels = downsample_array(self.labels, factor, labels=True)
        self.scan = LabelScan(self.scan.values, [np.add.reduceat(p, np.arange(0, len(p), factor))
                                                 for p in self.scan.profiles])

    def reopen(self) -> None:
        """Reopen lazy arrays from their paths (in a fresh DataLoader worker)."""
        if not self.from_files:
            return
        self.image = downsample_array(open_volume(self.image_path), self.factor)
        self.labels = downsample_array(open_volume(self.labels_path), self.factor, labels=True)


def open_training_volumes(pairs: Sequence[tuple[Any, Any]], data: DataSettings) -> list[TrainingVolume]:
    """Open image/label pairs lazily and check them (shape, label values, finite image values).

    Each element of ``pairs`` is ``(image, labels)``, each a path (any format ``open_volume`` reads) or,
    for tests and benchmarks, an in-memory 3D numpy array.

    Raises
    ------
    VolumeFormatError
        No pairs, or image and labels of different shapes.
    VolumeValueError
        Bad label values (see :func:`scan_labels`) or NaN/Inf in a float image.
    """
    if not pairs:
        raise VolumeFormatError("train: no training volumes given; pass at least one (image, labels) pair")
    volumes = []
    for n, pair in enumerate(pairs):
        if len(pair) != 2:
            raise VolumeFormatError(f"train: pair {n + 1} is {pair!r}; give (image, labels)")
        img_src, lab_src = pair
        image, img_path = _open(img_src, f"image {n + 1}")
        labels, lab_path = _open(lab_src, f"labels {n + 1}")
        if tuple(image.shape) != tuple(labels.shape):
            raise VolumeFormatError(f"{lab_path}: labels of shape {tuple(labels.shape)} do not match the image "
                                    f"{img_path} of shape {tuple(image.shape)}; give labels of the same shape (crop "
                                    "the image to the labelled region)")
        _check_image_values(da.asarray(image) if isinstance(image, np.ndarray) else image, img_path)
        lab_dask = da.from_array(labels, chunks=64) if isinstance(labels, np.ndarray) else labels
        scan = scan_labels(lab_dask, lab_path, data.ignore_label)
        vol = TrainingVolume(img_path, lab_path, image, labels, scan,
                             from_files=isinstance(image, da.Array) and isinstance(labels, da.Array))
        vol.downsample(data.downsample)
        volumes.append(vol)
    return volumes


def _open(src: Any, what: str) -> tuple[Any, str]:
    if isinstance(src, np.ndarray):
        if src.ndim != 3:
            raise VolumeFormatError(f"{what}: expected a 3D array (z, y, x), found shape {src.shape}")
        return src, f"<in-memory {what}>"
    return open_volume(src), os.fspath(src)


# ---- split ------------------------------------------------------------------------------------


def make_split(shape: Sequence[int], data: DataSettings, *, n_slices: int = 1, seed: int | None = 0,
               where: str = "volume") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Roles (TRAIN / VAL / GUARD) of every slice position along z, y and x of one volume.

    Along each axis with a positive ``data.axis_weights``, about ``f_axis = 1 - (1 - f) ** (1 / k)`` of
    the positions (``f`` = validation_fraction, ``k`` = sampled axes, so the united slabs hold about
    ``f`` of the voxels; at least one position) are held out, in blocks of at most
    ``data.validation_block`` positions, one block per equal segment of the axis, at a random place
    inside it. ``GUARD`` positions (``1 + n_slices // 2`` either side of each block) are used by
    neither. See the module docstring for why whole slabs, not slice positions, are held out.

    Raises
    ------
    ConfigError
        An axis too short to keep any training position.
    """
    roles = tuple(np.full(int(n), TRAIN, np.uint8) for n in shape)
    f = data.validation_fraction
    active = [a for a, name in enumerate(AXES) if data.axis_weights.get(name, 0) > 0]
    if f <= 0 or not active:
        return roles  # type: ignore[return-value]
    guard = 1 + n_slices // 2
    per_axis = 1.0 - (1.0 - f) ** (1.0 / len(active))
    rng = np.random.default_rng(None if seed is None else [seed, 7])
    for a in active:
        n = int(shape[a])
        n_val = max(1, round(per_axis * n))
        blocks = -(-n_val // data.validation_block)
        sizes = [n_val // blocks + (1 if i < n_val % blocks else 0) for i in range(blocks)]
        edges = np.linspace(0, n, blocks + 1).round().astype(int)
        role = roles[a]
        for size, lo, hi in zip(sizes, edges[:-1], edges[1:]):
            start = int(rng.integers(lo, max(lo, hi - size) + 1))
            role[max(0, start - guard):min(n, start + size + guard)] = GUARD
            role[start:start + size] = VAL
        if not (role == TRAIN).any():
            raise ConfigError(f"{where}: along {AXES[a]} ({n} slices) no training slice is left after holding out "
                              f"{n_val} for validation and {guard} guard slices around each block; lower "
                              "data.validation_fraction or data.validation_block, give a larger volume, or give "
                              "separate validation volumes")
    return roles  # type: ignore[return-value]


# ---- chunk cache ------------------------------------------------------------------------------


def _grid(chunks: Sequence[Sequence[int]], itemsize: int, limit: int) -> list[np.ndarray]:
    """Block boundaries per axis: the array's chunks, split evenly until a block fits ``limit`` bytes."""
    splits = [1, 1, 1]
    biggest = [max(c) for c in chunks]

    def nbytes() -> int:
        return int(np.prod([-(-b // s) for b, s in zip(biggest, splits)])) * itemsize

    while nbytes() > limit and any(-(-b // s) > 8 for b, s in zip(biggest, splits)):
        a = int(np.argmax([-(-b // s) for b, s in zip(biggest, splits)]))
        splits[a] *= 2
    out = []
    for a, axis_chunks in enumerate(chunks):
        edges = [0]
        for c in axis_chunks:
            start, step = edges[-1], -(-c // splits[a])
            edges += [*range(start + step, start + c, step), start + c]
        out.append(np.asarray(edges))
    return out


class ChunkCache:
    """A byte-bounded LRU cache of blocks, shared by the arrays of one process."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._data: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()

    def get(self, key: tuple[Any, ...], load: Callable[[], np.ndarray]) -> np.ndarray:
        """The block under ``key``, loaded (and kept, if it fits) on a miss."""
        block = self.lookup(key)
        return block if block is not None else self.put(key, load())

    def lookup(self, key: tuple[Any, ...]) -> np.ndarray | None:
        """The block under ``key`` (marked most recently used), or None (counted as a miss)."""
        block = self._data.get(key)
        if block is None:
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return block

    def put(self, key: tuple[Any, ...], block: np.ndarray) -> np.ndarray:
        """Keep ``block``, evicting the least recently used ones beyond the bound; return it."""
        if block.nbytes <= self.max_bytes:
            self._data[key] = block
            self.bytes += block.nbytes
            while self.bytes > self.max_bytes:
                _, old = self._data.popitem(last=False)
                self.bytes -= old.nbytes
        return block

    def clear(self) -> None:
        self._data.clear()
        self.bytes = 0

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "bytes": self.bytes, "blocks": len(self._data)}


class _BlockReader:
    """Reads regions of one array through the cache (whole blocks) or, for numpy, directly."""

    def __init__(self, key: str, array: Any, cache: ChunkCache | None,
                 transform: Callable[[np.ndarray], np.ndarray] | None = None, out_dtype: Any = None) -> None:
        self.key, self.array, self.cache, self.transform = key, array, cache, transform
        self.out_dtype = np.dtype(out_dtype or array.dtype)
        self.grid: list[np.ndarray] | None = None
        if isinstance(array, da.Array) and cache is not None:
            self.grid = _grid(array.chunks, max(self.out_dtype.itemsize, array.dtype.itemsize),
                              max(cache.max_bytes // 16, 2**20))
        self._edges = [[int(e) for e in edges] for edges in self.grid or []]

    def _load(self, region: tuple[slice, ...]) -> np.ndarray:
        block = self.array[region]
        if isinstance(block, da.Array):
            block = block.compute(scheduler="synchronous")
        block = np.asarray(block)
        return self.transform(block) if self.transform is not None else block

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        if self.grid is None or self.cache is None:
            return self._load(region)
        out = np.empty(tuple(r.stop - r.start for r in region), self.out_dtype)
        spans = []  # per axis: (block index, block start, block stop) of the blocks the region crosses
        for r, edges in zip(region, self._edges):
            first = bisect.bisect_right(edges, r.start) - 1
            last = bisect.bisect_left(edges, r.stop)
            spans.append([(i, edges[i], edges[i + 1]) for i in range(first, last)])
        for (bz, z0, z1), (by, y0, y1), (bx, x0, x1) in itertools.product(*spans):
            key = (self.key, bz, by, bx)
            block = self.cache.lookup(key)
            if block is None:
                block = self.cache.put(key, self._load((slice(z0, z1), slice(y0, y1), slice(x0, x1))))
            src, dst = [], []
            for r, a, b in zip(region, (z0, y0, x0), (z1, y1, x1)):
                lo, hi = max(r.start, a), min(r.stop, b)
                src.append(slice(lo - a, hi - a))
                dst.append(slice(lo - r.start, hi - r.start))
            out[tuple(dst)] = block[tuple(src)]
        return out


# ---- samples ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SliceSpec:
    """Where one sample comes from: volume, axis, position and in-plane crop offsets (may be < 0)."""

    volume: int
    axis: int
    position: int
    offset: tuple[int, int]


def _offset(rng: np.random.Generator, length: int, size: int) -> int:
    """Crop start along one in-plane axis: inside the plane, or (plane smaller) a random placement."""
    lo, hi = min(0, length - size), max(0, length - size)
    return int(rng.integers(lo, hi + 1))


class SliceDataset(Dataset):
    """Random (training) or fixed (validation) 2D slices as ``(image (C, S, S) float32, target (S, S) int64)``.

    Parameters
    ----------
    volumes
        Opened training volumes (:func:`open_training_volumes`) with their split roles set.
    mapping
        Label values -> classes.
    normalization
        Intensity window; the image is scaled to [0, 1], augmented, then standardised.
    data
        image_size, axis_weights, cache_mb.
    role
        ``"train"`` draws a new random slice for every index (deterministic in ``seed`` and the
        index, whichever worker reads it); ``"val"`` draws ``length`` slices once and serves
        those.
    length
        Samples per epoch (train) or in total (val).
    n_slices
        Adjacent slices as channels (2.5D), mirrored at the volume's borders.
    augment
        ``callable(image01 (H, W, C), mask (H, W), seed) -> (image01, mask)``, training only.
    seed
        Seed of the draws; ``None`` for fresh randomness each run.
    """

    def __init__(self, volumes: Sequence[TrainingVolume], mapping: LabelMapping, normalization: Normalization,
                 data: DataSettings, *, role: str = "train", length: int = 64, n_slices: int = 1,
                 augment: Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]] | None = None,
                 seed: int | None = 0) -> None:
        if role not in ("train", "val"):
            raise ValueError(f"role must be 'train' or 'val', not {role!r}")
        self.volumes = list(volumes)
        self.mapping = mapping
        self.norm01 = Normalization(normalization.low, normalization.high, normalization.method, 0.0, 1.0)
        self.mean, self.std = np.float32(normalization.mean), np.float32(normalization.std)
        self.size = data.image_size
        self.cache_bytes = data.cache_mb * 2**20
        self.role = role
        self.length = int(length)
        self.n_slices = n_slices
        self.augment = augment if role == "train" else None
        self.seed = seed if seed is not None else int(np.random.default_rng().integers(2**31))
        self.want = TRAIN if role == "train" else VAL
        weights = np.array([data.axis_weights.get(name, 0.0) for name in AXES], float)
        self._tables = self._position_tables(weights)
        if not self._tables:
            what = "training" if role == "train" else "validation"
            raise ConfigError(f"no {what} slices: no volume has {what} positions along an axis with a positive "
                              "data.axis_weights")
        self._open_readers()
        volume_bytes = sum(vol.image.nbytes + int(np.prod(vol.shape)) for vol in self.volumes)
        auto = 1 if volume_bytes <= self.cache_bytes else 8
        self.region_slices = (data.region_slices or auto) if role == "train" else 1
        self._fixed: list[SliceSpec] | None = None
        if role == "val":  # drawn once; duplicates (small planes, few positions) are dropped
            rng = np.random.default_rng([self.seed, 1])
            specs = dict.fromkeys(self._draw(rng) for _ in range(4 * self.length))
            self._fixed = list(specs)[: self.length]
            self.length = len(self._fixed)

    # positions each (volume, axis) may draw, with weights
    def _position_tables(self, axis_weights: np.ndarray) -> list[tuple[float, int, int, np.ndarray, np.ndarray]]:
        tables = []
        for v, vol in enumerate(self.volumes):
            for a in range(3):
                if axis_weights[a] <= 0:
                    continue
                ok = vol.roles[a] == self.want
                w = np.where(ok, vol.scan.profiles[a], 0).astype(float)
                if w.sum() <= 0:
                    continue
                positions = np.flatnonzero(w)
                cum = np.cumsum(w[positions])
                # a volume weighs by its labelled voxels on this axis, times the axis weight
                tables.append((axis_weights[a] * float(cum[-1]), v, a, positions, cum / cum[-1]))
        total = sum(t[0] for t in tables)
        return [(t[0] / total, *t[1:]) for t in tables]

    def _open_readers(self) -> None:
        self.cache = ChunkCache(self.cache_bytes)
        self._images = [_BlockReader(f"i{v}", vol.image, self.cache) for v, vol in enumerate(self.volumes)]
        self._labels = [_BlockReader(f"l{v}", vol.labels, self.cache, self.mapping.to_classes, np.uint8)
                        for v, vol in enumerate(self.volumes)]

    def reopen(self) -> None:
        """Reopen the volumes and start an empty cache (called in each DataLoader worker)."""
        for vol in self.volumes:
            vol.reopen()
        self._open_readers()

    def __len__(self) -> int:
        return self.length

    def _draw(self, rng: np.random.Generator) -> SliceSpec:
        probs = np.array([t[0] for t in self._tables])
        _, v, a, positions, cum = self._tables[int(rng.choice(len(self._tables), p=probs))]
        pos = int(positions[min(int(np.searchsorted(cum, rng.random(), side="right")), len(positions) - 1)])
        shape = self.volumes[v].shape
        d1, d2 = (d for d in range(3) if d != a)
        return SliceSpec(v, a, pos, (_offset(rng, shape[d1], self.size), _offset(rng, shape[d2], self.size)))

    def spec(self, index: int) -> SliceSpec:
        """The slice behind ``index``.

        With ``region_slices = n > 1``, indices come in windows of ``REGION_WINDOW * n``: each window
        draws ``REGION_WINDOW`` regions (a random slice, its "anchor") and ``n - 1`` more slices near
        each anchor (same volume and axis, a position inside the anchor's cached block, the crop
        shifted by at most a quarter), in a shuffled order. Consecutive samples then touch at most
        ``REGION_WINDOW`` regions, which the cache holds, while a batch still mixes several regions.
        """
        if self._fixed is not None:
            return self._fixed[index]
        n = self.region_slices
        if n <= 1:
            return self._draw(np.random.default_rng([self.seed, 0, int(index)]))
        span = REGION_WINDOW * n
        window, slot = divmod(int(index), span)
        k = int(np.random.default_rng([self.seed, 5, window]).permutation(span)[slot])
        region, member = window * REGION_WINDOW + k // n, k % n
        anchor = self._draw(np.random.default_rng([self.seed, 0, region]))
        if member == 0:
            return anchor
        return self._near(anchor, np.random.default_rng([self.seed, 4, region, member]))

    def _near(self, anchor: SliceSpec, rng: np.random.Generator) -> SliceSpec:
        v, a = anchor.volume, anchor.axis
        _, _, _, positions, cum = next(t for t in self._tables if t[1] == v and t[2] == a)
        shape = self.volumes[v].shape
        edges = self._images[v]._edges[a] if self._images[v]._edges else [0, shape[a]]
        block = bisect.bisect_right(edges, anchor.position) - 1
        inside = (positions >= edges[block]) & (positions < edges[block + 1])
        weights = np.diff(np.concatenate([[0.0], cum]))[inside]
        position = int(rng.choice(positions[inside], p=weights / weights.sum()))
        d1, d2 = (d for d in range(3) if d != a)
        jitter = max(1, self.size // 4)
        offsets = tuple(
            int(np.clip(o + rng.integers(-jitter, jitter + 1), min(0, n - self.size), max(0, n - self.size)))
            for o, n in zip(anchor.offset, (shape[d1], shape[d2]))
        )
        return SliceSpec(v, a, position, offsets)  # type: ignore[arg-type]

    def read(self, spec: SliceSpec) -> tuple[np.ndarray, np.ndarray]:
        """Raw image stack ``(n_slices, S, S)`` (reflect-padded) and classes ``(S, S)`` (IGNORE-padded)."""
        vol = self.volumes[spec.volume]
        shape, a, S = vol.shape, spec.axis, self.size
        d1, d2 = (d for d in range(3) if d != a)
        half = self.n_slices // 2
        along = mirror_indices(spec.position - half, spec.position + half + 1, shape[a])
        o1, o2 = spec.offset
        r1 = slice(max(0, o1), min(shape[d1], o1 + S))
        r2 = slice(max(0, o2), min(shape[d2], o2 + S))
        region: list[slice] = [slice(0, 0)] * 3
        region[a], region[d1], region[d2] = slice(int(along.min()), int(along.max()) + 1), r1, r2
        raw = np.moveaxis(self._images[spec.volume].read(tuple(region)), a, 0)[along - along.min()]
        region[a] = slice(spec.position, spec.position + 1)
        classes = np.moveaxis(self._labels[spec.volume].read(tuple(region)), a, 0)[0]
        if self.role == "train":  # voxels of other axes' validation slabs and guards never train
            held1, held2 = vol.roles[d1][r1] != TRAIN, vol.roles[d2][r2] != TRAIN
            if held1.any() or held2.any():
                classes = np.where(held1[:, None] | held2[None, :], np.uint8(IGNORE_INDEX), classes)
        pad = ((max(0, -o1), S - (r1.stop - r1.start) - max(0, -o1)),
               (max(0, -o2), S - (r2.stop - r2.start) - max(0, -o2)))
        if any(p for pair in pad for p in pair):
            raw = np.pad(raw, ((0, 0), *pad), mode="symmetric")
            classes = np.pad(classes, pad, constant_values=IGNORE_INDEX)
        return raw, classes

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.spec(index)
        raw, classes = self.read(spec)
        image = apply(raw, self.norm01)  # (C, S, S) in [0, 1]
        if self.augment is not None:
            seed = int(np.random.default_rng([self.seed, 2, int(index)]).integers(2**31))
            hwc, classes = self.augment(np.ascontiguousarray(image.transpose(1, 2, 0)), classes, seed)
            image = hwc.transpose(2, 0, 1) if hwc.ndim == 3 else hwc[None]
        image = (image - self.mean) / self.std
        return (torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                torch.from_numpy(np.ascontiguousarray(classes).astype(np.int64)))

    def positions(self) -> dict[str, int]:
        """How many slice positions this dataset draws from, per axis."""
        out = dict.fromkeys(AXES, 0)
        for _, _, a, positions, _ in self._tables:
            out[AXES[a]] += len(positions)
        return out


class EpochSampler(Sampler[int]):
    """Indices ``epoch * n .. epoch * n + n - 1``: new random slices every epoch, fixed by the seed.

    It runs in the main process, so :meth:`set_epoch` reaches persistent DataLoader workers.
    """

    def __init__(self, n: int) -> None:
        self.n = int(n)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.epoch * self.n, (self.epoch + 1) * self.n))

    def __len__(self) -> int:
        return self.n


def worker_init(worker_id: int) -> None:
    """DataLoader worker set-up: one torch thread, dask's synchronous scheduler, reopened volumes."""
    torch.set_num_threads(1)
    dask.config.set(scheduler="synchronous")
    info = torch.utils.data.get_worker_info()
    if info is not None and hasattr(info.dataset, "reopen"):
        info.dataset.reopen()


def split_summary(volumes: Sequence[TrainingVolume]) -> list[dict[str, Any]]:
    """Per volume: positions per role and axis (for logs and the model's metadata)."""
    out = []
    for vol in volumes:
        out.append({AXES[a]: {"train": int((r == TRAIN).sum()), "val": int((r == VAL).sum()),
                              "guard": int((r == GUARD).sum())} for a, r in enumerate(vol.roles)})
    return out
