"""Does the multi-axis vote beat single-axis prediction? Per-class Dice on an unseen synthetic volume.

Predicts one unseen SXCT-like volume along z, y and x alone, then merged by max-probability, mean and
majority vote, and with the 12-way (3 axes x 4 rotations) mode, all with the same model; scores each
against the ground truth.

    python -m benchmarks.bench_axes_quality                    # trains the demo model first (~3 min)
    python -m benchmarks.bench_axes_quality --model model.pt   # reuse a model trained on seed 0
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks._common import table, write_results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model file (default: train the demo model on seed 0, 160³)")
    parser.add_argument("--size", type=int, default=192, help="edge of the unseen volume (seed 1)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--no-write", action="store_true", help="do not write benchmarks/results")
    args = parser.parse_args(argv)

    import volseg_dask as vs
    from volseg_dask.demo import demo_settings
    from volseg_dask.synthetic import CLASS_NAMES

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-axes-"))
    work.mkdir(parents=True, exist_ok=True)
    settings = demo_settings()
    model = args.model
    if model is None:
        image, labels = vs.write_demo_data(work / "train", 160, 0, overwrite=True)
        model = vs.train([(image, labels)], work / "model.pt", settings, overwrite=True).model_path
    image, truth = vs.write_demo_data(work / "unseen", args.size, 1, overwrite=True)

    runs = [("z", "max"), ("y", "max"), ("x", "max"), ("zyx", "max"), ("zyx", "mean"), ("zyx", "vote"),
            ("all12", "max")]
    rows = []
    for axes, method in runs:
        s = settings.with_overrides({"predict.axes": axes, "predict.merge": method, "predict.chunks": [96] * 3})
        t0 = time.perf_counter()
        result = vs.predict(image, model, work / f"pred-{axes}-{method}.zarr", s, overwrite=True)
        seconds = time.perf_counter() - t0
        scores = vs.evaluate(result.output / "labels", truth)
        row = {"axes": axes, "merge": method if len(axes) > 1 else "-", "seconds": round(seconds, 1)}
        row.update({CLASS_NAMES[k]: round(v, 4) for k, v in scores.dice.items()})
        row["mean"] = round(sum(scores.dice.values()) / len(scores.dice), 4)
        rows.append(row)
        print(row)
    columns = ["axes", "merge", *CLASS_NAMES, "mean", "seconds"]
    print(table(rows, columns))
    best_single = max(r["mean"] for r in rows if len(r["axes"]) == 1)
    merged = next(r["mean"] for r in rows if r["axes"] == "zyx" and r["merge"] == "max")
    print(f"3-axis max vote mean Dice {merged:.4f} vs best single axis {best_single:.4f}")
    if not args.no_write:
        write_results("bench_axes_quality", {"model": str(model), "unseen_size": args.size, "rows": rows,
                                             "three_axis_max_minus_best_single": round(merged - best_single, 4)})


if __name__ == "__main__":
    main()
