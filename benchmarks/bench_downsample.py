"""What training and predicting at half resolution (``data.downsample: 2``) costs and buys.

Trains the demo network twice on the same labelled synthetic volume (seed 0, ``--train-size``), with
the same time budget (the demo's ``train.max_minutes``): at native resolution and with
``data.downsample: 2`` (the crop stays 128 px, so each crop covers twice the field of view). Both
models predict the same unseen volume (seed 1, ``--size``) along z, y and x with the max-probability
vote through ``volseg_dask.predict`` (blocks 128³ native, halo 32, 2 dask threads), in alternating
order ``--repeats`` times; the script reports per-class Dice against the ground truth, the median
prediction time and the ratio native / half. Run from the repository root::

    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python -m benchmarks.bench_downsample
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import default_workdir, median, table, write_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-size", type=int, default=160)
    parser.add_argument("--size", type=int, default=256, help="edge of the unseen volume")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)

    import dask

    import volseg_dask as vs
    from volseg_dask.demo import demo_settings
    from volseg_dask.synthetic import CLASS_NAMES

    work = Path(tempfile.mkdtemp(prefix="bench_downsample-", dir=args.workdir or default_workdir()))
    try:
        image, labels = vs.write_demo_data(work / "train", args.train_size, 0)
        unseen, truth = vs.write_demo_data(work / "unseen", args.size, 1)
        base = demo_settings().with_overrides({"predict.chunks": [128] * 3, "predict.halo": 32})
        models: dict[int, Any] = {}
        train_s: dict[int, float] = {}
        for factor in (1, 2):
            s = base.with_overrides({"data.downsample": factor})
            t0 = time.perf_counter()
            fit = vs.train([(image, labels)], work / f"model{factor}.pt", s)
            train_s[factor] = time.perf_counter() - t0
            models[factor] = (fit.model_path, s, fit)
            print(f"downsample {factor}: trained {fit.epochs_run} epochs in {train_s[factor]:.0f} s", flush=True)
        seconds: dict[int, list[float]] = {1: [], 2: []}
        scores: dict[int, Any] = {}
        with dask.config.set(scheduler="threads", num_workers=2):
            for r in range(args.repeats):
                for factor in ((1, 2) if r % 2 == 0 else (2, 1)):
                    path, s, _ = models[factor]
                    out = work / f"pred{factor}.zarr"
                    t0 = time.perf_counter()
                    vs.predict(unseen, path, out, s, overwrite=True)
                    seconds[factor].append(time.perf_counter() - t0)
                    scores[factor] = vs.evaluate(out / "labels", truth)
                    print(f"  downsample {factor} #{r}: {seconds[factor][-1]:.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for factor in (1, 2):
        ev, fit = scores[factor], models[factor][2]
        rows.append({"downsample": factor, **{CLASS_NAMES[k]: round(v, 4) for k, v in ev.dice.items()},
                     "mean_dice": round(sum(ev.dice.values()) / len(ev.dice), 4),
                     "predict_s": round(median(seconds[factor]), 1), "train_s": round(train_s[factor], 1),
                     "epochs": fit.epochs_run})
    ratio = median(seconds[1]) / median(seconds[2])
    print(table(rows, ["downsample", *CLASS_NAMES, "mean_dice", "predict_s", "train_s", "epochs"]))
    print(f"prediction at half resolution: {ratio:.1f}x faster (median of {args.repeats}); mean Dice "
          f"{rows[1]['mean_dice']:.4f} vs {rows[0]['mean_dice']:.4f} at native resolution")
    if not args.no_save:
        write_results("bench_downsample", {
            "settings": {"train_size": args.train_size, "unseen_size": args.size, "repeats": args.repeats,
                         "model": "volseg_dask/demo_settings.yaml", "predict": {"chunks": 128, "halo": 32,
                                                                                "axes": "zyx", "merge": "max"},
                         "dask_threads": 2},
            "rows": rows, "speedup_native_over_half": ratio,
            "predict_seconds": {str(k): v for k, v in seconds.items()},
        })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
