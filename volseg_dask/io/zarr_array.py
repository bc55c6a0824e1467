"""Zarr v2/v3 arrays (or a group and the path of an array in it), refused when an unfinished run wrote them."""

from __future__ import annotations

import itertools
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
        try:
            return np.asarray(self._array[region])
        except Exception as exc:
            damaged = self._damaged_chunks(region)
            if not damaged:
                raise
            where = self.path / (self.array_path or "")
            names = ", ".join(f"{key} ({where / key})" for key in damaged[:3])
            more = f" and {len(damaged) - 3} more" if len(damaged) > 3 else ""
            raise VolumeFormatError(
                f"{where}: chunk {names}{more} cannot be decoded ({type(exc).__name__}: {exc}); the store is "
                "damaged: copy it again or convert the volume again"
            ) from exc

    def _damaged_chunks(self, region: tuple[slice, ...]) -> list[str]:
        """Keys of the stored chunks (shards) under ``region`` that fail to decode, read one by one."""
        arr = self._array
        grid = tuple(arr.shards or arr.chunks)
        spans = [range(r.start // g, -(-r.stop // g)) for r, g in zip(region, grid)]
        bad = []
        for index in itertools.product(*spans):
            try:
                arr[tuple(slice(i * g, min((i + 1) * g, n)) for i, g, n in zip(index, grid, arr.shape))]
            except Exception:
                bad.append(arr.metadata.encode_chunk_key(index))
        return bad

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


