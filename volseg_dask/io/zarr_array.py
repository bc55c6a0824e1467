"""Zarr v2/v3 arrays (or a group and the path of an array in it), refused when an unfinished run wrote them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .. import outputs
from ..errors import VolumeFormatError, VolumeNotFoundError
from .reader import Reader

__all__ = ["ZarrReader", "open_zarr"]


class ZarrReader(Reader):
    kind = "zarr"

    def __init__(self, path: Path, array_path: str | None, shape: tuple[int, ...], dtype: np.dtype,
                 chunks: tuple[int, ...]) -> None:
        self.path, self.array_path, self.shape, self.dtype, self.zchunks = (
            path, array_path, tuple(shape), np.dtype(dtype), chunks)
        self._array: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_array"] = None
        return state

    def natural_chunks(self) -> tuple[int, ...]:
        return self.zchunks

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        if self._array is None:
            self._array = zarr.open_array(store=str(self.path), path=self.array_path or "", mode="r")
        return np.asarray(self._array[region])

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        # the chunk files change while the metadata file stays: tokenise by the metadata's time
        meta = self.path / (self.array_path or "") / "zarr.json"
        stamp = os.stat(meta).st_mtime_ns if meta.exists() else 0
        return (*super().__dask_tokenize__(), self.array_path, stamp)



def open_zarr(root: Path, key: str | None) -> Reader:
    try:
        node = zarr.open(store=str(root), path=key or "", mode="r")
    except FileNotFoundError as exc:
        raise VolumeNotFoundError(f"{root}: has no array {key!r}") from exc
    except Exception as exc:
        raise VolumeFormatError(f"{root}: not a readable Zarr store ({type(exc).__name__}: {exc})") from exc
    array_path = key
    if isinstance(node, zarr.Group):
        node, array_path = _pick_array(node, root, key)
    outputs.require_complete(node, root / (key or ""))
    outputs.require_complete_tree(root / (array_path or ""))
    chunks = tuple(node.shards or node.chunks)  # a shard is the unit a read decodes at once
    reader = ZarrReader(root, array_path, tuple(node.shape), node.dtype, chunks)
    reader.voxel_size = _zarr_voxel_size(node)
    return reader


def _pick_array(group: zarr.Group, root: Path, key: str | None) -> tuple[zarr.Array, str]:
    prefix = f"{key}/" if key else ""
    attrs: dict[str, Any] = dict(group.attrs)
    multiscales = attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")
    if multiscales:
        level0 = str(multiscales[0]["datasets"][0]["path"])
        return group[level0], prefix + level0  # type: ignore[return-value]
    arrays = [name for name, _ in group.arrays()]
    if "labels" in arrays and len(arrays) == 1:
        return group["labels"], prefix + "labels"  # type: ignore[return-value]
    if len(arrays) == 1:
        return group[arrays[0]], prefix + arrays[0]  # type: ignore[return-value]
    members = sorted(arrays) + sorted(f"{name}/" for name, _ in group.groups())
    raise VolumeFormatError(
        f"{root / (key or '')}: is a Zarr group, not an array; name one of its members, e.g. "
        f"{root / (key or '') / (members[0] if members else 'ARRAY')} (members: {', '.join(members) or 'none'})"
    )


def _zarr_voxel_size(node: zarr.Array) -> tuple[float, float, float] | None:
    value = (outputs.status(node) or {}).get("voxel_size")
    if isinstance(value, (list, tuple)) and len(value) == 3:
        return (float(value[0]), float(value[1]), float(value[2]))
    return None


