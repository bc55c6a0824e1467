"""Volumes in and out: readers per format, ``open_volume``/``volume_info``, ``convert``/``export``.

Every format is read through a small picklable reader (:mod:`.reader`) whose chunks follow the
format's natural read unit (a TIFF's own tiles or strips, z-slab × y-band regions for NPY/MRC and
uncompressed TIFF, the stored chunks for Zarr and HDF5), so every task reads from disk only what it
returns and a ``distributed`` worker can reopen the file by itself. See :mod:`.volume` for the supported inputs.
"""

from __future__ import annotations

from .conversion import DEFAULT_CHUNKS, convert, export, parse_region
from .reader import split_key
from .volume import open_volume, volume_info, volume_voxel_size

__all__ = ["DEFAULT_CHUNKS", "convert", "export", "open_volume", "parse_region", "split_key", "volume_info",
           "volume_voxel_size"]
