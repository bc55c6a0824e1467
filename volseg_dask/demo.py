"""``volseg demo``: the whole flow on the embedded synthetic SXCT-like volume."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from .io import convert, export, volume_info
from .synthetic import write_demo_data

log = logging.getLogger(__name__)

__all__ = ["run_demo"]


def run_demo(out: str | os.PathLike[str] = "demo-output", *, size: int = 128, seed: int = 0,
             overwrite: bool = True, progress: bool = False, echo: Any = print) -> dict[str, Any]:
    """Generate the demo volume, round-trip it through TIFF and Zarr, and describe it.

    Returns a summary dict with paths and timings.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    image, labels = write_demo_data(out, size, seed, overwrite=overwrite, progress=progress)
    timings["generate"] = time.perf_counter() - t0
    echo(f"synthetic SXCT-like volume {size}³ (seed {seed}): {image}, {labels}")

    t0 = time.perf_counter()
    tif = export(image, out / "image.tif", overwrite=overwrite, progress=progress)
    back = convert(tif, out / "image_from_tif.zarr", overwrite=overwrite, progress=progress)
    timings["tiff round trip"] = time.perf_counter() - t0
    info = volume_info(back)
    echo(f"converted {tif} -> {back}: shape {info['shape']} {info['dtype']}, chunks {info['chunks']}, "
         f"{info['size_on_disk_bytes'] / 2**20:.1f} MiB on disk, values {info['sample_range']}")
    for step, seconds in timings.items():
        echo(f"  {step:<16} {seconds:6.1f} s")
    return {"image": image, "labels": labels, "tiff": tif, "zarr": back, "timings": timings}
