"""Fine-tuning (``--init-from``) vs training from scratch on a scan of another contrast (issue 14).

1. The demo model: the demo settings (``volseg_dask/demo_settings.yaml``, 3 minutes on the CPU) on
   the demo's synthetic volume (seed 0, ``--base-size``), or ``--base MODEL.pt`` to reuse one.
2. Another contrast: the same generator with other CT parameters (``SceneParams``: grains darker
   than the brine, more noise, stronger shading, more blur), a labelled training volume (seed 2,
   ``--train-size``) and a held-out one (seed 3, ``--test-size``), with the same label values.
3. Two runs of ``--minutes`` each (default 1) with the demo settings on the new volume: fine-tuning
   the demo model (``model.init_from``, ``data.normalization_from: recompute``, as the README advises
   for another contrast) and a new model from scratch.
4. For each: per-class Dice on the held-out volume (every z, y and x slice predicted in 2D and
   pooled, as ``bench_train_quality.py``), and the time from the start of ``train`` until the mean
   validation Dice (held-out slabs of the training volume, after each epoch) first reaches 0.9.

Run from the repository root (about 7 minutes on 2 cores, 4 with ``--base``)::

    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python -m benchmarks.bench_finetune
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import default_workdir, table, write_results
from benchmarks.bench_train_quality import CLASS_NAMES, confusion, dice, predict_axis

TARGET = 0.9
OTHER_CONTRAST = {"intensity": (0.58, 0.36, 0.12), "noise_sigma": 0.075, "shading_gain": 0.25, "blur_sigma": 1.3}
"""Brine, grain, gas: grains now darker than the brine; noisier, more shaded, blurrier."""


class EpochClock(logging.Handler):
    """Wall time of every epoch line of the training log (``volseg_dask.training.progress``)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.times: dict[int, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        match = re.match(r"epoch (\d+)/", record.getMessage())
        if match:
            self.times[int(match.group(1))] = time.perf_counter()


def fit(name: str, pairs: list[Any], out: Path, settings: Any) -> dict[str, Any]:
    import volseg_dask as vs

    clock = EpochClock()
    progress = logging.getLogger("volseg_dask.training.progress")
    progress.addHandler(clock)
    progress.setLevel(logging.INFO)
    t0 = time.perf_counter()
    try:
        result = vs.train(pairs, out, settings)
    finally:
        progress.removeHandler(clock)
    seconds = time.perf_counter() - t0
    reached = None
    for row in result.history:
        scores = [d for d in row["dice"] if d is not None]
        if scores and np.mean(scores) >= TARGET:
            reached = round(clock.times[row["epoch"]] - t0, 1)
            break
    print(f"{name}: {result.epochs_run} epochs in {seconds:.0f} s, stop {result.stop_reason}, "
          f"mean validation Dice >= {TARGET} after {reached} s", flush=True)
    return {"result": result, "seconds": round(seconds, 1), "to_target_s": reached}


def held_out(model_path: Path, image: np.ndarray, labels: np.ndarray) -> list[float]:
    from volseg_dask.models import load_model

    model, meta = load_model(model_path)
    k = meta.classes
    pooled = sum(confusion(labels, predict_axis(model, meta, image, axis).argmax(0).astype(np.uint8), k)
                 for axis in range(3))
    return dice(pooled)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=None, help="the demo model; default: train it (3 min)")
    parser.add_argument("--base-size", type=int, default=160)
    parser.add_argument("--base-minutes", type=float, default=None, help="default: the demo's (3)")
    parser.add_argument("--train-size", type=int, default=128)
    parser.add_argument("--test-size", type=int, default=128)
    parser.add_argument("--minutes", type=float, default=1.0, help="training time of each of the two runs")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    import torch

    import volseg_dask as vs
    from volseg_dask.demo import demo_settings
    from volseg_dask.synthetic import SceneParams, make_volume

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    work = Path(tempfile.mkdtemp(prefix="bench_finetune-", dir=args.workdir or default_workdir()))
    settings = demo_settings()
    torch.set_num_threads(settings.train.torch_threads or torch.get_num_threads())
    base = args.base
    base_info: dict[str, Any] = {"path": str(base) if base else None}
    try:
        if base is None:
            image, labels = vs.write_demo_data(work / "demo", args.base_size, 0)
            base = work / "demo.pt"
            demo = fit("demo model", [(image, labels)], base,
                       settings.with_overrides({"train.max_minutes": args.base_minutes}))
            base_info.update(trained_s=demo["seconds"], epochs=demo["result"].epochs_run,
                             val_dice=demo["result"].val_dice)
        params = SceneParams(**OTHER_CONTRAST)
        image, labels = vs.write_demo_data(work / "other", args.train_size, 2, params=params)
        test_image, test_labels = make_volume(args.test_size, seed=3, params=params)
        budget = settings.with_overrides({"train.max_minutes": args.minutes})
        runs = {
            "fine-tuned": budget.with_overrides({"model.init_from": str(base), "data.normalization_from": "recompute"}),
            "from scratch": budget,
        }
        rows, record = [], {}
        for name, s in runs.items():
            out = fit(name, [(image, labels)], work / f"{name.replace(' ', '_')}.pt", s)
            scores = held_out(work / f"{name.replace(' ', '_')}.pt", test_image, test_labels)
            result = out["result"]
            record[name] = {"held_out_dice": scores, "mean_held_out_dice": float(np.mean(scores)),
                            "seconds_to_val_dice_0.9": out["to_target_s"], "train_seconds": out["seconds"],
                            "epochs": result.epochs_run, "stop_reason": result.stop_reason,
                            "learning_rates": result.learning_rates, "history": result.history}
            rows.append({"run": name, **{f"dice {c}": v for c, v in zip(CLASS_NAMES, scores)},
                         "mean": float(np.mean(scores)), "epochs": result.epochs_run,
                         f"s to val {TARGET}": out["to_target_s"] if out["to_target_s"] is not None else "never"})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(rows, list(rows[0])))
    payload = {"base_model": base_info, "other_contrast": OTHER_CONTRAST, "minutes": args.minutes,
               "train_volume": {"shape": [args.train_size] * 3, "seed": 2},
               "test_volume": {"shape": [args.test_size] * 3, "seed": 3},
               "settings": {k: v for k, v in settings.to_dict().items() if k in ("model", "data", "train")},
               "classes": list(CLASS_NAMES), "target_val_dice": TARGET, "runs": record}
    if not args.no_write:
        write_results("bench_finetune", payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
