"""Acceptance of training (issue 3): Dice of a short CPU fit on held-out data vs the multi-Otsu baseline.

1. Write two synthetic SXCT-like volumes with ground truth (``write_demo_data``): seed 0 for
   training (``--train-size``, default 160³) and seed 1 for testing (``--test-size``, default 128³):
   a different scene, never seen in training nor in model selection.
2. Train with the demo settings (``volseg_dask/demo_settings.yaml``; a default-architecture Unet)
   through the public API ``volseg_dask.train``: validation slabs are held out of the training
   volume for early stopping and the best checkpoint.
3. Predict every z-, y- and x-slice of the test volume with the saved model at native resolution
   (``inference.predict_planes``: the production forward pass) and score per-class Dice over all
   slices of each axis, pooled over the three axes, and for the three axes' mean probability.
4. Baseline: ``skimage.filters.threshold_multiotsu`` with three classes on the test volume itself
   (which favours it), regions mapped dark -> gas (2), middle -> brine (0), bright -> grain (1).

Pass: every class's pooled Dice >= 0.90 and above the Otsu baseline's. Run from the repository root::

    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python -m benchmarks.bench_train_quality
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import table, write_results

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CRITERION = 0.90
CLASS_NAMES = ("brine", "grain", "gas")


def confusion(truth: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(truth.ravel().astype(np.int64) * k + pred.ravel(), minlength=k * k).reshape(k, k)


def dice(conf: np.ndarray) -> list[float]:
    tp = np.diag(conf).astype(float)
    return [float(v) for v in 2 * tp / (conf.sum(0) + conf.sum(1))]


def predict_axis(model: Any, meta: dict[str, Any], image: np.ndarray, axis: int, batch_size: int = 8) -> np.ndarray:
    """Class probabilities (C, z, y, x) float32 from 2D predictions of every slice along ``axis``."""
    import torch

    from volseg_dask.grid import mirror_indices
    from volseg_dask.normalize import apply
    from volseg_dask.prediction.inference import predict_planes

    norm = meta.normalization
    n_slices = meta.n_slices
    half = n_slices // 2
    planes = np.moveaxis(image, axis, 0)
    out = np.empty((meta.classes, *planes.shape), np.float32)
    for s in range(0, len(planes), batch_size):
        idx = np.arange(s, min(s + batch_size, len(planes)))
        stack = np.stack([planes[mirror_indices(i - half, i + half + 1, len(planes))] for i in idx])
        probs = predict_planes(model, apply(stack, norm), device=torch.device("cpu"), batch_size=batch_size,
                               multiple=meta.pad_multiple, amp=False)
        out[:, idx] = probs.transpose(1, 0, 2, 3)
    return np.moveaxis(out, 1, axis + 1)


def otsu(image: np.ndarray) -> np.ndarray:
    from skimage.filters import threshold_multiotsu

    # float input: skimage histograms it into 256 bins (an integer image gets one bin per grey value,
    # 65536 for uint16, and a lookup table of their square: gigabytes and minutes)
    image = image.astype(np.float32)
    regions = np.digitize(image, threshold_multiotsu(image, classes=3, nbins=256))
    return np.array([2, 0, 1], np.uint8)[regions]  # dark -> gas, middle -> brine, bright -> grain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-size", type=int, default=160)
    parser.add_argument("--test-size", type=int, default=128)
    parser.add_argument("--settings", type=Path, default=None, help="Default: volseg_dask/demo_settings.yaml.")
    parser.add_argument("--max-minutes", type=float, default=None, help="Override train.max_minutes.")
    parser.add_argument("--torch-threads", type=int, default=None, help="Override train.torch_threads.")
    parser.add_argument("--workdir", type=Path, default=None, help="Keep data and model here (default: temp).")
    parser.add_argument("--no-write", action="store_true", help="Do not write results JSON.")
    args = parser.parse_args(argv)

    import logging

    import torch

    import volseg_dask
    from volseg_dask.config import load_settings
    from volseg_dask.models import load_model
    from volseg_dask.synthetic import make_volume, write_demo_data
    from volseg_dask.training import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    settings_path = args.settings or Path(volseg_dask.__file__).with_name("demo_settings.yaml")
    settings = load_settings(settings_path, {"train.max_minutes": args.max_minutes,
                                             "train.torch_threads": args.torch_threads})
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_train_quality-"))
    work.mkdir(parents=True, exist_ok=True)
    image, labels = write_demo_data(work / "train", args.train_size, seed=0, overwrite=True)

    t0 = time.perf_counter()
    result = train([(image, labels)], work / "model.pt", settings, overwrite=True, progress=sys.stderr.isatty())
    train_seconds = time.perf_counter() - t0
    print(f"trained in {train_seconds:.0f} s: {result.epochs_run} epochs, best {result.best_epoch}, stop "
          f"{result.stop_reason}, learning rates {result.learning_rates}")

    test_image, test_labels = make_volume(args.test_size, seed=1)
    model, meta = load_model(result.model_path)
    if settings.train.torch_threads:
        torch.set_num_threads(settings.train.torch_threads)
    t1 = time.perf_counter()
    probs = [predict_axis(model, meta, test_image, axis) for axis in range(3)]
    infer_seconds = time.perf_counter() - t1
    k = meta.classes
    per_axis = {name: dice(confusion(test_labels, p.argmax(0).astype(np.uint8), k)) for name, p in zip("zyx", probs)}
    pooled_conf = sum(confusion(test_labels, p.argmax(0).astype(np.uint8), k) for p in probs)
    pooled = dice(pooled_conf)  # type: ignore[arg-type]
    merged = dice(confusion(test_labels, np.mean(probs, axis=0).argmax(0).astype(np.uint8), k))
    baseline = dice(confusion(test_labels, otsu(test_image), k))

    rows = []
    for c, name in enumerate(CLASS_NAMES):
        rows.append({"class": f"{c} {name}", "fraction": float((test_labels == c).mean()), "pooled_2d": pooled[c],
                     **{f"axis_{a}": per_axis[a][c] for a in "zyx"}, "mean_3_axes": merged[c],
                     "otsu": baseline[c]})
    print(table(rows, ["class", "fraction", "pooled_2d", "axis_z", "axis_y", "axis_x", "mean_3_axes", "otsu"]))
    passed = all(pooled[c] >= CRITERION and pooled[c] > baseline[c] for c in range(k))
    print(f"criterion: every class's pooled held-out Dice >= {CRITERION} and above Otsu: "
          f"{'PASS' if passed else 'FAIL'} (training {train_seconds:.0f} s wall, inference {infer_seconds:.0f} s)")
    payload = {
        "settings_file": str(settings_path),
        "settings": {"model": settings.to_dict()["model"], "data": settings.to_dict()["data"],
                     "train": settings.to_dict()["train"]},
        "train_volume": {"shape": [args.train_size] * 3, "seed": 0},
        "test_volume": {"shape": [args.test_size] * 3, "seed": 1},
        "train_seconds": round(train_seconds, 1),
        "training": result.metrics,
        "history": result.history,
        "test_dice": {"pooled_2d": pooled, "per_axis": per_axis, "mean_3_axes": merged, "otsu": baseline},
        "classes": list(CLASS_NAMES),
        "criterion": CRITERION,
        "passed": passed,
        "torch_threads": torch.get_num_threads(),
    }
    if not args.no_write:
        write_results("bench_train_quality", payload)
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
