"""The train/validation split: slabs of voxels held out along each axis, with guard bands.

Slices along different axes intersect, so holding out slice *positions* of one axis is not enough:
a y-slice crosses every held-out z-slice. The split therefore holds out *slabs of voxels*: along each
sampled axis, a few blocks of at most ``validation_block`` consecutive positions (spread over the
axis, together about ``validation_fraction`` of the voxels once the slabs of all axes are united). A
voxel is a validation voxel when it lies in any slab. Training slices are drawn only at training
positions of their own axis, and every voxel of theirs inside another axis's slab is set to
``IGNORE_INDEX``: validation labels never reach the loss. A guard band of ``1 + n_slices // 2``
positions on each side of every slab is neither trained nor validated, so no training slice (nor its
2.5D context) is a neighbour of a validation slice. Validation slices are whole-slab planes and are
the same every epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..config import DataSettings
from ..errors import ConfigError

__all__ = ["AXES", "GUARD", "TRAIN", "VAL", "make_split", "split_summary"]

AXES = ("z", "y", "x")
TRAIN, VAL, GUARD = 0, 1, 2
"""Roles of a slice position along one axis (see :func:`make_split`)."""


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



def split_summary(volumes: Sequence[Any]) -> list[dict[str, Any]]:
    """Per volume: positions per role and axis (for logs and the model's metadata)."""
    out = []
    for vol in volumes:
        out.append({AXES[a]: {"train": int((r == TRAIN).sum()), "val": int((r == VAL).sum()),
                              "guard": int((r == GUARD).sum())} for a, r in enumerate(vol.roles)})
    return out
