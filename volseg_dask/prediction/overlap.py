"""``predict_array``: lazy class probabilities of a dask array along one axis, as one ``map_overlap``.

For notebooks and pipelines that already hold a dask array; :func:`~volseg_dask.prediction.predict`
is the path for volumes on disk (it reads each block's halo straight from the store, which holds
less memory).
"""

from __future__ import annotations

import os
from typing import Any

import dask.array as da
import numpy as np
from dask.array.overlap import ensure_minimum_chunksize

from ..config import PredictSettings, Settings
from ..errors import ConfigError, VolsegError
from ..models import read_model_file
from ..normalize import Normalization
from ..resample import downsample_array
from .inference import AXES, SlabSpec, infer_block
from .plan import predict_settings, slab_spec

__all__ = ["predict_array"]


def predict_array(volume: da.Array | np.ndarray, model: str | os.PathLike[str], *, axis: str = "z",
                  settings: Settings | PredictSettings | None = None,
                  normalization: Normalization | None = None) -> da.Array:
    """Lazy class probabilities ``(C, z, y, x)`` uint8 of a dask array along one axis (``map_overlap``).

    Blocks overlap their neighbours by the halo; at the volume's border there is no halo (a plane
    meets the edge as in a whole-volume prediction), exactly as in :func:`predict`, so both give the
    same probabilities. With a model trained at 1/N resolution (``data.downsample``) the array is
    averaged over N×N×N cubes first and the probabilities are on that coarse grid, as
    :func:`predict`'s per-axis ``probabilities``.
    """
    if axis not in AXES:
        raise ConfigError(f"axis: {axis!r} is not one of z, y, x")
    ps = predict_settings(settings)
    vol = volume if isinstance(volume, da.Array) else da.from_array(volume, chunks=tuple(ps.chunks))
    if vol.ndim != 3:
        raise VolsegError(f"predict_array: expected a 3D array (z, y, x), found shape {vol.shape}")
    _, meta = read_model_file(model)
    vol = downsample_array(vol, meta.downsample)
    half = (meta.n_slices - 1) // 2
    ax = AXES[axis]
    depth = {d: (half if d == ax else -(-ps.halo // meta.downsample)) for d in range(3)}
    for d, c in enumerate(vol.chunksize):
        if depth[d] > c and len(vol.chunks[d]) > 1:
            raise ConfigError(f"predict.halo: {depth[d]} is larger than the chunk ({c}) along {'zyx'[d]}; "
                              "rechunk to larger chunks or use a smaller halo")
    spec = slab_spec(model, meta, ps, normalization or meta.normalization)
    # map_overlap merges chunks smaller than the overlap into their neighbours; do it first, so the output
    # chunks given below are the ones it computes
    vol = vol.rechunk(tuple(ensure_minimum_chunksize(depth[d], c) if depth[d] else c for d, c in enumerate(vol.chunks)))
    # mirrored 2.5D context along the axis; in-plane, overlap only between chunks (as predict does)
    boundary = {d: ("reflect" if d == ax else "none") for d in range(3)}
    return da.map_overlap(
        _infer_overlapped, vol, axis=axis, spec=spec, overlap=depth, depth=depth, boundary=boundary, trim=False,
        new_axis=0, chunks=((meta.classes,), *vol.chunks), dtype=np.uint8, meta=np.empty((0, 0, 0, 0), np.uint8),
    )


def _infer_overlapped(block: np.ndarray, axis: str, spec: SlabSpec, overlap: dict[int, int],
                      block_info: dict[Any, Any] | None = None) -> np.ndarray:
    """map_overlap's slab function: crop the overlap a block actually received (none at the border)."""
    assert block_info is not None  # dask always passes it to a function that accepts it
    location, counts = block_info[0]["chunk-location"], block_info[0]["num-chunks"]
    ax = AXES[axis]
    crop = [(overlap[d], overlap[d]) if d == ax else (overlap[d] if i > 0 else 0, overlap[d] if i < n - 1 else 0)
            for d, (i, n) in enumerate(zip(location, counts))]
    return infer_block(block, axis, spec, crop)
