"""``volseg demo``: the whole flow on the embedded synthetic SXCT-like volume.

1. generate a labelled training volume and a larger unseen volume (other seed, same physics);
2. train the demo network (``demo_settings.yaml``: a default-architecture Unet with a light encoder,
   about three minutes on two CPU cores);
3. predict the unseen volume out-of-core along z, y and x, merged by maximum probability;
4. score it against its ground truth, next to a multi-Otsu global-threshold baseline;
5. write a figure of orthogonal slices (image | truth | prediction) beside the training curves.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .config import Settings, load_settings
from .io.volume import open_volume
from .synthetic import CLASS_NAMES, write_demo_data

log = logging.getLogger(__name__)

__all__ = ["cpu_settings", "demo_settings", "otsu_baseline", "run_demo"]


def demo_settings() -> Settings:
    """The settings the demo trains and predicts with (shipped with the package)."""
    with resources.as_file(resources.files("volseg_dask") / "demo_settings.yaml") as path:
        return load_settings(path)


def cpu_settings() -> Settings:
    """The demo's light network and slice size as a starting point for CPU-only machines: the demo's
    settings without its three-minute limit and its one torch thread (both about the demo's machine)."""
    s = demo_settings()
    return dataclasses.replace(s, train=dataclasses.replace(s.train, max_minutes=None, torch_threads=None))


def otsu_baseline(image: np.ndarray, truth: np.ndarray) -> dict[int, float]:
    """Per-class Dice of three-class multi-Otsu thresholds (gas < brine < grain) on the whole volume."""
    from skimage.filters import threshold_multiotsu

    # a 256-bin histogram: on uint16 data skimage would otherwise search every integer level (minutes)
    counts, edges = np.histogram(image, bins=256)
    thresholds = threshold_multiotsu(classes=3, hist=(counts, (edges[:-1] + edges[1:]) / 2))
    pred = np.array([2, 0, 1], np.uint8)[np.digitize(image, thresholds)]
    return {c: float(2 * np.sum((pred == c) & (truth == c)) / max(1, np.sum(pred == c) + np.sum(truth == c)))
            for c in range(3)}


def _figure(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    centre = [s // 2 for s in image.shape]
    fig, grid = plt.subplots(3, 3, figsize=(11, 11))
    for row, axis in enumerate("zyx"):
        index = [slice(None)] * 3
        index[row] = centre[row]
        for col, (name, vol, cmap) in enumerate((("image", image, "gray"), ("truth", truth, "viridis"),
                                                 ("prediction", pred, "viridis"))):
            ax = grid[row, col]
            ax.imshow(vol[tuple(index)], cmap=cmap, interpolation="nearest",
                      **({} if name == "image" else {"vmin": 0, "vmax": 2}))
            ax.set_title(f"{name}, {axis} = {centre[row]}")
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_demo(out: str | os.PathLike[str] = "demo-output", *, size: int = 192, train_size: int = 160,
             seed: int = 0, minutes: float | None = None, progress: bool = False,
             echo: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run the whole flow; return a summary (also written to ``OUT/summary.json``).

    Parameters
    ----------
    out
        Folder for every output (created; the demo's own files in it are replaced).
    size
        Edge of the unseen volume that is predicted out-of-core.
    train_size
        Edge of the labelled training volume.
    seed
        Scene seed of the training volume (the unseen volume uses ``seed + 1``).
    minutes
        Training time budget; default from the demo settings (3 minutes).
    """
    from .metrics import evaluate
    from .prediction import predict
    from .training import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = demo_settings()
    if minutes is not None:
        settings = settings.with_overrides({"train.max_minutes": minutes})
    block = max(32, min(128, size // 2))
    settings = settings.with_overrides({"predict.chunks": [block] * 3})
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    train_image, train_labels = write_demo_data(out / "train", train_size, seed, overwrite=True, progress=progress)
    image, truth = write_demo_data(out / "unseen", size, seed + 1, overwrite=True, progress=progress)
    timings["generate volumes"] = time.perf_counter() - t0
    echo(f"1/4 synthetic SXCT-like volumes: training {train_size}³ (seed {seed}), unseen {size}³ (seed {seed + 1}) "
         f"in {out}")

    t0 = time.perf_counter()
    echo(f"2/4 training {settings.model.architecture}/{settings.model.encoder} for up to "
         f"{settings.train.max_minutes} min on {train_image.parent} ...")
    fit = train([(train_image, train_labels)], out / "model.pt", settings, overwrite=True, progress=progress)
    timings["train"] = time.perf_counter() - t0
    echo(f"    {fit.epochs_run} epochs, best {fit.best_epoch}, stopped: {fit.stop_reason}; held-out Dice "
         + ", ".join(f"{CLASS_NAMES[int(k)]} {v:.3f}" for k, v in fit.val_dice.items() if v is not None))

    t0 = time.perf_counter()
    echo(f"3/4 predicting {image} out-of-core along z, y, x in {block}³ blocks ...")
    result = predict(image, fit.model_path, out / "prediction.zarr", settings, overwrite=True, progress=progress)
    timings["predict"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    scores = evaluate(result.output / "labels", truth, json_path=out / "scores.json")
    image_np = open_volume(image).compute()
    truth_np = open_volume(truth).compute()
    baseline = otsu_baseline(image_np, truth_np)
    pred_np = result.labels.compute()
    _figure(image_np, truth_np, pred_np, out / "demo.png",
            f"unseen volume {size}³: mean Dice {np.mean(list(scores.dice.values())):.3f}")
    timings["evaluate"] = time.perf_counter() - t0

    echo(f"4/4 unseen volume {size}³, {result.voxels_per_second / 1e6:.2f} Mvoxel/s over 3 axes:")
    echo(f"    {'class':<8} {'Dice':>6}  {'IoU':>6}  {'multi-Otsu Dice':>15}")
    for value in scores.values:
        echo(f"    {CLASS_NAMES[value]:<8} {scores.dice[value]:6.3f}  {scores.iou[value]:6.3f}  "
             f"{baseline.get(value, float('nan')):15.3f}")
    for step, seconds in timings.items():
        echo(f"    {step:<17} {seconds:7.1f} s")
    echo(f"    figures: {out / 'demo.png'}, {fit.outputs.get('curves', out / 'model.curves.png')}")
    summary = {
        "dice": {CLASS_NAMES[k]: v for k, v in scores.dice.items()},
        "iou": {CLASS_NAMES[k]: v for k, v in scores.iou.items()},
        "otsu_dice": {CLASS_NAMES[k]: v for k, v in baseline.items()},
        "training": fit.metrics,
        "prediction": {"voxels_per_second": result.voxels_per_second, "blocks": result.blocks_computed},
        "timings_s": timings,
        "paths": {"model": str(fit.model_path), "prediction": str(result.output), "figure": str(out / "demo.png")},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
