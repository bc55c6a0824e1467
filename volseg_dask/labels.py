"""Label values <-> contiguous classes, the dtype of label outputs, and the index of ignored voxels.

Any integer label values (0, 2, 255, ...) are mapped to contiguous classes ``0 .. K-1`` for training
(:class:`LabelMapping`; the original values travel in the model file) and mapped back on output.
``ignore_label`` voxels, padding and voxels held out for validation become :data:`IGNORE_INDEX`,
which every loss and metric skips.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import VolumeValueError

__all__ = ["IGNORE_INDEX", "MAX_CLASSES", "LabelMapping", "label_dtype", "label_mapping"]

IGNORE_INDEX = 255
"""Class index of voxels left out of loss and metrics (ignore_label, padding, held-out voxels)."""
MAX_CLASSES = 255


def label_dtype(values: Sequence[int]) -> np.dtype:
    """The dtype of a label output holding ``values``: uint8 when they fit, else uint16."""
    return np.dtype(np.uint8 if max((int(v) for v in values), default=0) <= 255 else np.uint16)


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

