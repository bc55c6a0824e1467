"""Reproducible synthetic SXCT-like volumes with ground truth: the demo data and the test fixture.

The scene imitates synchrotron CT of methane-bearing sand: a pack of overlapping sand grains
(class 1) with gas bubbles (class 2) occupying part of the pore space and brine (class 0) filling
the rest. It is rendered as CT intensities with grain-to-grain mineral variation, partial-volume
blur, low-frequency shading (additive offset and multiplicative gain, as from beam hardening and
uneven illumination) and Gaussian noise, so that one global threshold per class is not enough.

Every voxel is a pure function of its coordinates and the seed (the noise comes from a counter-based
hash, not a sequential generator), so a volume rendered whole, in slabs or in dask blocks of any
shape is the same volume; generation needs memory for one block at a time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
from scipy import ndimage

from . import outputs
from .cluster import compute

log = logging.getLogger(__name__)

__all__ = ["CLASS_NAMES", "SceneParams", "make_volume", "render_block", "write_demo_data"]

CLASS_NAMES = ("brine", "grain", "gas")


@dataclass(frozen=True)
class SceneParams:
    """Geometry and imaging parameters of the synthetic scene (lengths in voxels)."""

    grain_radius: tuple[float, float] = (7.0, 15.0)
    grain_fraction: float = 0.50  # Boolean-model target solid fraction
    bubble_radius: tuple[float, float] = (10.0, 24.0)
    bubble_fraction: float = 0.16  # fraction of space inside bubble envelopes (gas = envelope ∩ pores)
    intensity: tuple[float, float, float] = (0.45, 0.72, 0.18)  # brine, grain, gas
    grain_jitter: float = 0.05
    blur_sigma: float = 1.0
    noise_sigma: float = 0.055
    shading_offset: float = 0.13
    shading_gain: float = 0.18
    shading_wavelength: float = 150.0
    blur_sigma_z: float | None = None  # partial-volume blur along z (None: blur_sigma), e.g. a coarser z resolution
    slice_noise_sigma: float = 0.0  # an intensity offset per z-slice (flux changes between slices): z stripes


def _spheres(rng: np.random.Generator, shape: Sequence[int], radius: tuple[float, float],
             fraction: float) -> np.ndarray:
    """Centres and radii (z, y, x, r) of a Boolean model covering ``shape`` plus a margin."""
    r_lo, r_hi = radius
    margin = r_hi + 1
    extent = np.asarray(shape, dtype=float) + 2 * margin
    mean_vol = 4.0 / 3.0 * np.pi * np.mean(rng.uniform(r_lo, r_hi, 4096) ** 3)
    intensity = -np.log(1.0 - fraction) / mean_vol
    n = rng.poisson(intensity * float(np.prod(extent)))
    centres = rng.uniform(0, 1, (n, 3)) * extent - margin
    radii = rng.uniform(r_lo, r_hi, n)
    return np.column_stack([centres, radii])


@dataclass
class Scene:
    """Object lists of one synthetic volume; render any block of it with :func:`render_block`."""

    shape: tuple[int, int, int]
    seed: int
    params: SceneParams
    grains: np.ndarray
    grain_level: np.ndarray
    bubbles: np.ndarray
    waves: np.ndarray  # (2, k, 5): offset and gain waves, each (direction z y x, phase, weight)

    @classmethod
    def build(cls, shape: Sequence[int], seed: int = 0, params: SceneParams | None = None) -> Scene:
        params = params or SceneParams()
        shape3 = tuple(int(s) for s in shape)
        if len(shape3) != 3 or min(shape3) < 1:
            raise ValueError(f"shape must be three positive sizes, found {tuple(shape)}")
        rng = np.random.default_rng(seed)
        grains = _spheres(rng, shape3, params.grain_radius, params.grain_fraction)
        grain_level = params.intensity[1] + rng.normal(0, params.grain_jitter, len(grains))
        bubbles = _spheres(rng, shape3, params.bubble_radius, params.bubble_fraction)
        dirs = rng.normal(size=(2, 4, 3))
        dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
        phases = rng.uniform(0, 2 * np.pi, (2, 4, 1))
        weights = rng.uniform(0.5, 1.0, (2, 4, 1))
        weights /= weights.sum(axis=1, keepdims=True)
        waves = np.concatenate([dirs, phases, weights], axis=-1)
        return cls(shape3, int(seed), params, grains, grain_level, bubbles, waves)


def _paint(block: np.ndarray, origin: np.ndarray, spheres: np.ndarray, values: np.ndarray | float) -> None:
    """Set ``block`` to ``values`` (per sphere or one value) inside every sphere touching it."""
    size = np.asarray(block.shape)
    lo = spheres[:, :3] - spheres[:, 3:4] - origin
    hi = spheres[:, :3] + spheres[:, 3:4] - origin
    hit = np.all((hi >= 0) & (lo < size), axis=1)
    vals = np.broadcast_to(np.asarray(values, dtype=block.dtype), (len(spheres),))
    for (cz, cy, cx, r), v, a, b in zip(spheres[hit], vals[hit], lo[hit], hi[hit]):
        s = np.maximum(np.floor(a).astype(int), 0)
        e = np.minimum(np.ceil(b).astype(int) + 1, size)
        z = (np.arange(s[0], e[0]) + origin[0] - cz) ** 2
        y = (np.arange(s[1], e[1]) + origin[1] - cy) ** 2
        x = (np.arange(s[2], e[2]) + origin[2] - cx) ** 2
        inside = z[:, None, None] + y[None, :, None] + x[None, None, :] <= r * r
        view = block[s[0]:e[0], s[1]:e[1], s[2]:e[2]]
        view[inside] = v


def _hash_uniform(index: np.ndarray, seed: int) -> np.ndarray:
    """Counter-based uniform numbers in (0, 1) from integer voxel indices (splitmix64)."""
    with np.errstate(over="ignore"):
        x = index.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return ((x >> np.uint64(11)).astype(np.float64) + 0.5) / float(2**53)


def _noise(scene: Scene, region: tuple[slice, slice, slice]) -> np.ndarray:
    z, y, x = (np.arange(r.start, r.stop, dtype=np.uint64) for r in region)
    _, ny, nx = (np.uint64(s) for s in scene.shape)
    idx = (z[:, None, None] * ny + y[None, :, None]) * nx + x[None, None, :]
    u1 = _hash_uniform(idx * np.uint64(2), scene.seed)
    u2 = _hash_uniform(idx * np.uint64(2) + np.uint64(1), scene.seed)
    return (np.sqrt(-2.0 * np.log(u1)) * np.cos(2 * np.pi * u2)).astype(np.float32)


def _shading(scene: Scene, region: tuple[slice, slice, slice], which: int) -> np.ndarray:
    coords = np.meshgrid(*(np.arange(r.start, r.stop, dtype=np.float32) for r in region), indexing="ij",
                         sparse=True)
    k = 2 * np.pi / scene.params.shading_wavelength
    field = np.zeros([r.stop - r.start for r in region], np.float32)
    for dz, dy, dx, phase, weight in scene.waves[which]:
        field += np.float32(weight) * np.cos(k * (dz * coords[0] + dy * coords[1] + dx * coords[2]) + phase)
    return field


def render_block(scene: Scene, region: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray]:
    """Render one block: (image uint16, labels uint8). Identical whatever the blocking."""
    p = scene.params
    sigma = (p.blur_sigma if p.blur_sigma_z is None else p.blur_sigma_z, p.blur_sigma, p.blur_sigma)
    margin = [int(np.ceil(4 * s)) if s > 0 else 0 for s in sigma]
    origin = np.array([r.start - m for r, m in zip(region, margin)], dtype=float)
    padded = tuple(r.stop - r.start + 2 * m for r, m in zip(region, margin))
    grain_id = np.zeros(padded, np.int32)  # 1 + index of the grain covering a voxel, 0 for pore space
    _paint(grain_id, origin, scene.grains, np.arange(1, len(scene.grains) + 1, dtype=np.int32))
    envelope = np.zeros(padded, np.uint8)
    _paint(envelope, origin, scene.bubbles, 1)
    labels = np.where(grain_id > 0, np.uint8(1), np.where(envelope == 1, np.uint8(2), np.uint8(0)))
    level = np.concatenate([[p.intensity[0]], scene.grain_level]).astype(np.float32)
    density = np.where(labels == 2, np.float32(p.intensity[2]), level[grain_id])
    if max(sigma) > 0:
        density = ndimage.gaussian_filter(density, sigma, mode="nearest", truncate=4.0)
    inner = tuple(slice(m, m + r.stop - r.start) for r, m in zip(region, margin))
    density = density[inner]
    gain = 1.0 + p.shading_gain * _shading(scene, region, 1)
    value = density * gain + p.shading_offset * _shading(scene, region, 0)
    value += p.noise_sigma * _noise(scene, region)
    if p.slice_noise_sigma > 0:  # one Gaussian offset per z-slice, from the slice index alone
        z = np.arange(region[0].start, region[0].stop, dtype=np.uint64) * np.uint64(2)
        u1, u2 = _hash_uniform(z, scene.seed + 7919), _hash_uniform(z + np.uint64(1), scene.seed + 7919)
        offset = np.sqrt(-2.0 * np.log(u1)) * np.cos(2 * np.pi * u2)
        value += (p.slice_noise_sigma * offset).astype(np.float32)[:, None, None]
    image = np.clip(value * 40000.0 + 8000.0, 0, 65535).round().astype(np.uint16)
    return image, labels[inner]


def make_volume(shape: Sequence[int] | int = 64, seed: int = 0,
                params: SceneParams | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic SXCT-like volume in memory: (image uint16, labels uint8 in {0, 1, 2}).

    For small volumes (tests, notebooks); :func:`write_demo_data` streams large ones to Zarr.
    """
    shape3 = (shape,) * 3 if isinstance(shape, int) else tuple(shape)
    scene = Scene.build(shape3, seed, params)
    return render_block(scene, tuple(slice(0, s) for s in scene.shape))  # type: ignore[arg-type]


def _write_block(block_info_dummy: np.ndarray, scene: Scene, image: object, labels: object,
                 block_info: dict | None = None) -> np.ndarray:
    assert block_info is not None
    region = tuple(slice(a, b) for a, b in block_info[0]["array-location"])
    img, lab = render_block(scene, region)  # type: ignore[arg-type]
    image[region] = img  # type: ignore[index]
    labels[region] = lab  # type: ignore[index]
    return np.zeros((1, 1, 1), np.uint8)


def write_demo_data(
    out_dir: str | os.PathLike[str],
    shape: Sequence[int] | int = 256,
    seed: int = 0,
    *,
    chunks: int = 128,
    params: SceneParams | None = None,
    overwrite: bool = False,
    progress: bool = False,
    prefix: str = "",
) -> tuple[Path, Path]:
    """Write a synthetic volume and its labels as Zarr v3, block by block through dask.

    Parameters
    ----------
    out_dir
        Folder for ``{prefix}image.zarr`` and ``{prefix}labels.zarr`` (created if missing).
    shape
        Volume shape (an int gives a cube).
    seed
        Scene seed; the same seed and shape give the same volume.
    chunks
        Zarr chunk edge; generation holds one block (plus a 4-voxel margin) per dask thread.
    overwrite, progress
        Replace existing outputs; show a progress bar.

    Returns
    -------
    (image_path, labels_path)
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape3 = (shape,) * 3 if isinstance(shape, int) else tuple(int(s) for s in shape)
    scene = Scene.build(shape3, seed, params)
    image_path, labels_path = out / f"{prefix}image.zarr", out / f"{prefix}labels.zarr"
    block = tuple(min(chunks, s) for s in shape3)
    attrs = outputs.provenance(kind="synthetic", seed=seed, scene=str(scene.params), classes=list(CLASS_NAMES))
    with outputs.atomic_output(image_path, overwrite=overwrite) as img_tmp, \
            outputs.atomic_output(labels_path, overwrite=overwrite) as lab_tmp:
        image = outputs.create_array(img_tmp, shape=shape3, dtype=np.uint16, chunks=block,
                                   dimension_names=("z", "y", "x"), attrs=attrs)
        labels = outputs.create_array(lab_tmp, shape=shape3, dtype=np.uint8, chunks=block,
                                    dimension_names=("z", "y", "x"), attrs={**attrs, "kind": "labels"})
        grid = da.zeros(shape3, dtype=np.uint8, chunks=block)
        done = grid.map_blocks(_write_block, scene, image, labels, dtype=np.uint8, chunks=(1, 1, 1))
        compute(done, progress=progress)
        outputs.mark_complete(image)
        outputs.mark_complete(labels)
    log.info("wrote synthetic volume %s (seed %d) to %s and %s", shape3, seed, image_path, labels_path)
    return image_path, labels_path
