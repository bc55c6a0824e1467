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

from ._lazy import lazy_attributes
from ._version import __version__

# public name -> module that defines it (imported lazily)
_API = {
    "open_volume": "io.volume",
    "volume_info": "io.volume",
    "convert": "io.conversion",
    "export": "io.conversion",
    "Settings": "config",
    "load_settings": "config",
    "make_volume": "synthetic",
    "write_demo_data": "synthetic",
    "train": "training.run",
    "load_model": "models",
    "ModelMeta": "models",
    "predict": "prediction.run",
    "predict_array": "prediction.overlap",
    "merge": "prediction.merging",
    "fit_fusion": "prediction.fusion_fit",
    "evaluate": "metrics",
    "VolsegError": "errors",
}

__all__ = ["__version__", *sorted(_API)]


__getattr__, __dir__ = lazy_attributes(__name__, _API, globals())
