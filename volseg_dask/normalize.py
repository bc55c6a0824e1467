"""Robust intensity statistics (on a sample, via dask) and the mapping to network input.

Raw intensities are clipped to ``[low, high]`` (percentiles or mean ± k·sd of a sample of whole
chunks spread over the volume), scaled to [0, 1], then standardised with fixed ``mean``/``std`` (the
grey-level average of ImageNet's statistics, which suits pretrained encoders and is harmless for
random ones). The numbers are stored in the model file and reused at prediction, or recomputed on
the prediction volume for data of other contrast.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import dask.array as da
import numpy as np

from .cluster import compute
from .config import DataSettings
from .errors import VolumeValueError

log = logging.getLogger(__name__)

__all__ = ["Normalization", "apply", "compute_normalization", "sample_blocks"]

IMAGENET_GREY_MEAN = 0.449  # mean of ImageNet's (0.485, 0.456, 0.406)
IMAGENET_GREY_STD = 0.226  # mean of ImageNet's (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Normalization:
    """Clip window and standardisation: ``((clip(x, low, high) - low) / (high - low) - mean) / std``."""

    low: float
    high: float
    method: str = "percentile"
    mean: float = IMAGENET_GREY_MEAN
    std: float = IMAGENET_GREY_STD
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Normalization:
        return cls(**{k: raw[k] for k in ("low", "high", "method", "mean", "std", "source") if k in raw})


def apply(block: np.ndarray, norm: Normalization) -> np.ndarray:
    """Map raw intensities to network input (float32)."""
    scale = 1.0 / (norm.high - norm.low)
    out = np.clip(block.astype(np.float32, copy=False), norm.low, norm.high)
    out = (out - np.float32(norm.low)) * np.float32(scale)
    return (out - np.float32(norm.mean)) / np.float32(norm.std)


def sample_blocks(vol: da.Array, voxels: int, seed: int = 0) -> list[tuple[int, ...]]:
    """Indices of whole dask blocks, spread at random over ``vol``, holding about ``voxels`` voxels."""
    blocks = list(np.ndindex(*vol.numblocks))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(blocks))
    picked, total = [], 0
    for i in order:
        idx = blocks[i]
        picked.append(idx)
        total += int(np.prod([vol.chunks[d][j] for d, j in enumerate(idx)]))
        if total >= voxels:
            break
    return picked


def compute_normalization(vol: da.Array, settings: DataSettings | None = None, *, source: str = "",
                          seed: int = 0) -> Normalization:
    """Intensity statistics of ``vol`` from a sample of whole chunks.

    Raises
    ------
    VolumeValueError
        NaN or infinite values in the sample, or a constant volume (nothing to learn from).
    """
    settings = settings or DataSettings()
    if vol.dtype.kind not in "biuf":
        raise VolumeValueError(f"{source}: dtype {vol.dtype} is not numeric; convert it to integers or floats")
    # sample small sub-blocks so a sample covers many places even when chunks are large
    sub = vol.rechunk(tuple(min(c, 64) for c in vol.chunksize))
    picked = sample_blocks(sub, settings.stats_sample_voxels, seed)
    parts = compute(*[sub.blocks[idx].ravel() for idx in picked])
    sample = np.concatenate([np.asarray(p) for p in parts])
    if sample.dtype.kind == "f" and not np.isfinite(sample).all():
        bad = int((~np.isfinite(sample)).sum())
        raise VolumeValueError(
            f"{source}: {bad} NaN or infinite values in a {sample.size}-voxel sample; replace them (e.g. with "
            "the background value) before training or prediction"
        )
    if settings.normalization == "percentile":
        lo, hi = np.percentile(sample, settings.clip_percentiles)
    else:
        mean, sd = float(sample.mean(dtype=np.float64)), float(sample.std(dtype=np.float64))
        lo, hi = mean - settings.std_factor * sd, mean + settings.std_factor * sd
    lo, hi = float(lo), float(hi)
    if not hi > lo:
        lo, hi = float(sample.min()), float(sample.max())
        if not hi > lo:
            raise VolumeValueError(f"{source}: every sampled voxel equals {lo}; the volume holds no image "
                                   "contrast to segment")
    log.info("normalisation of %s: clip [%g, %g] (%s, %d voxels sampled)", source, lo, hi,
             settings.normalization, sample.size)
    return Normalization(low=lo, high=hi, method=settings.normalization, source=source)
