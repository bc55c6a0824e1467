"""volseg_dask: 2D segmentation models trained on small labelled volumes, applied out-of-core.

The public API takes and returns paths, dask arrays and :class:`Settings`::

    import volseg_dask as vs
    vs.convert("raw.h5:/data", "raw.zarr")
    vs.train([("raw.zarr", "labels.zarr")], "model.pt")
    vs.predict("big.zarr", "model.pt", "seg.zarr")
    seg = vs.open_volume("seg.zarr/labels")          # lazy dask array

Heavy modules (torch) are imported on first use, so ``import volseg_dask`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (imported lazily)
_API = {
    "open_volume": "io",
    "convert": "io",
    "export": "io",
    "volume_info": "io",
    "Settings": "config",
    "load_settings": "config",
    "make_volume": "synthetic",
    "write_demo_data": "synthetic",
    "train": "training",
    "load_model": "models",
    "predict": "prediction",
    "predict_array": "prediction",
    "merge": "votes",
    "evaluate": "metrics",
    "VolsegError": "errors",
}

__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'volseg_dask' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
