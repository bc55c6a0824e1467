"""The training dataset: random 2D slices along z, y and x, read lazily through the chunk cache.

A slice is cut from chunk-aligned blocks kept in a bounded LRU cache (``data.cache_mb`` per process,
:mod:`~volseg_dask.training.cache`), so its cost is that of copying from memory once the blocks it
touches are warm. Training draws are a pure function of the seed and the sample index, whichever
DataLoader worker reads them.
"""

from __future__ import annotations

import bisect
import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import dask
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..config import DataSettings
from ..errors import ConfigError
from ..grid import mirror_indices
from ..labels import IGNORE_INDEX, LabelMapping
from ..normalize import Normalization, apply
from .cache import BlockReader, ChunkCache
from .split import AXES, TRAIN, VAL
from .volumes import TrainingVolume

log = logging.getLogger(__name__)

__all__ = ["REGION_WINDOW", "EpochSampler", "SliceDataset", "SliceSpec", "worker_init"]

REGION_WINDOW = 4
"""Regions a window of grouped training draws interleaves (see :meth:`SliceDataset.spec`)."""


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
        self._images = [BlockReader(f"i{v}", vol.image, self.cache) for v, vol in enumerate(self.volumes)]
        self._labels = [BlockReader(f"l{v}", vol.labels, self.cache, self.mapping.to_classes, np.uint8)
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

    Under torch.distributed the ``world_size`` ranks share them batch by batch: of every
    ``world_size * batch`` consecutive indices (one step of the whole run) rank ``r`` takes the
    ``r``-th ``batch``. So no index, hence no slice, is drawn twice per epoch across the ranks; a
    step of N ranks trains on the same slices as a step of one process with ``N * batch``; every
    rank makes the same number of steps (a remainder that does not divide is left out); and the
    grouped draws of ``data.region_slices`` stay together. It runs in the main process, so
    :meth:`set_epoch` reaches persistent DataLoader workers.
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, batch: int = 1) -> None:
        self.n = int(n)
        self.rank, self.world_size, self.batch = int(rank), int(world_size), int(batch)
        step = self.world_size * self.batch
        self._full, rest = divmod(self.n, step)
        self._tail = rest // self.world_size  # the last, partial step: an equal part each
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self) -> list[int]:
        """This rank's indices of the current epoch."""
        start, step, b = self.epoch * self.n, self.world_size * self.batch, self.batch
        mine = [start + g * step + self.rank * b + i for g in range(self._full) for i in range(b)]
        tail = start + self._full * step + self.rank * self._tail
        return mine + list(range(tail, tail + self._tail))

    def __iter__(self) -> Iterator[int]:
        indices = self.indices()
        if self.world_size > 1:
            log.debug("rank %d of %d, epoch %d: slice indices %s", self.rank, self.world_size, self.epoch,
                      _runs(indices))
        return iter(indices)

    def __len__(self) -> int:
        return self._full * self.batch + self._tail


def _runs(indices: Sequence[int]) -> str:
    """``0-3 8-11 16``: consecutive indices as ranges."""
    out: list[str] = []
    for _, group in itertools.groupby(enumerate(indices), key=lambda pair: pair[1] - pair[0]):
        run = [value for _, value in group]
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return " ".join(out)


def worker_init(worker_id: int) -> None:
    """DataLoader worker set-up: one torch thread, dask's synchronous scheduler, reopened volumes."""
    torch.set_num_threads(1)
    dask.config.set(scheduler="synchronous")
    info = torch.utils.data.get_worker_info()
    if info is not None and hasattr(info.dataset, "reopen"):
        info.dataset.reopen()

