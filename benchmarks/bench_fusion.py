"""Learned fusion of the axes vs max / mean / vote: per-class Dice on unseen volumes, fit time and peak RSS.

The default merge ('auto': the model file's fusion when it has one, else max) rests on this benchmark: the
conv fusion fitted on the clean volume wins on all three unseen volumes.

The demo network (trained on seed 0, 160³) predicts, along z, y and x with the per-axis probabilities
kept: a labelled fitting volume (seed 2) and, as anisotropic SXCT data is, a labelled fitting volume
degraded along z (seed 5); two unseen volumes (seeds 1 and 3) and one unseen volume degraded along z
(seed 4; partial-volume blur 2.5 voxels along z instead of 1, plus an intensity offset per z-slice).
A linear (MultiPlanarUNet) and a 3×3×3 conv fusion are fitted on each fitting volume, each fit in a
child process of its own (time and peak RSS of that process tree). Every unseen volume is then merged
by max, mean, vote and each learned fusion, and scored against its ground truth; the connected
components of the labels (6-connected, all classes; the truth's for reference) count the speckles.

    python -m benchmarks.bench_fusion                    # trains the demo model first (~3 min)
    python -m benchmarks.bench_fusion --model model.pt   # reuse a model trained on seed 0
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import run_child, table, write_results

DEGRADED = {"blur_sigma_z": 2.5, "slice_noise_sigma": 0.04}
CLASS_NAMES = ("brine", "grain", "gas")


def child_fit(args: argparse.Namespace) -> None:
    """The measured child: one fit, its result as the last JSON line."""
    from volseg_dask.models import read_model_file
    from volseg_dask.prediction.fusion_fit import fit_fusion

    pred, truth, out, model, kind = args.child_fit
    result = fit_fusion(pred, truth, out, model=model, kind=kind, samples=args.samples, seed=0, overwrite=True)
    _, meta = read_model_file(out)
    assert meta.fusion is not None
    print(json.dumps({"seconds": result.seconds, "fit_seconds": meta.fusion.fit["fit_seconds"],
                      "samples": result.samples, "loss": result.loss, "loss_start": meta.fusion.fit["loss_start"],
                      "iterations": meta.fusion.fit["iterations"], "sample_accuracy": result.accuracy}))


def components(labels: np.ndarray) -> int:
    """Connected components (6-connected) of every class of ``labels``, summed."""
    from scipy import ndimage

    return int(sum(ndimage.label(labels == value)[1] for value in np.unique(labels)))


def dice(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    return {name: round(float(2 * np.sum((pred == c) & (truth == c)) / max(1, np.sum(pred == c) + np.sum(truth == c))),
                        4) for c, name in enumerate(CLASS_NAMES)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model file (default: train the demo model on seed 0, 160³)")
    parser.add_argument("--size", type=int, default=192, help="edge of the unseen volumes")
    parser.add_argument("--fit-size", type=int, default=160, help="edge of the labelled fitting volumes")
    parser.add_argument("--samples", type=int, default=200_000, help="voxels sampled per fit")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--no-write", action="store_true", help="do not write benchmarks/results")
    parser.add_argument("--child-fit", nargs=5, metavar=("PRED", "TRUTH", "OUT", "MODEL", "KIND"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_fit:
        child_fit(args)
        return

    import zarr

    import volseg_dask as vs
    from volseg_dask.demo import demo_settings
    from volseg_dask.synthetic import SceneParams

    t_start = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-fusion-"))
    work.mkdir(parents=True, exist_ok=True)
    settings = demo_settings().with_overrides({"predict.chunks": [96] * 3})
    model = args.model
    train_seconds = None
    if model is None:
        t0 = time.perf_counter()
        image, labels = vs.write_demo_data(work / "train", 160, 0, overwrite=True)
        model = vs.train([(image, labels)], work / "model.pt", settings, overwrite=True).model_path
        train_seconds = round(time.perf_counter() - t0, 1)
    degraded = SceneParams(**DEGRADED)
    volumes = {  # name: (seed, size, scene, role)
        "fit": (2, args.fit_size, None, "fit"), "fit-degraded-z": (5, args.fit_size, degraded, "fit"),
        "seed1": (1, args.size, None, "test"), "seed3": (3, args.size, None, "test"),
        "degraded-z": (4, args.size, degraded, "test"),
    }
    preds: dict[str, tuple[Path, Path]] = {}
    predict_seconds = {}
    for name, (seed, size, params, _) in volumes.items():
        image, truth = vs.write_demo_data(work / name, size, seed, overwrite=True, params=params)
        t0 = time.perf_counter()
        preds[name] = (vs.predict(image, model, work / f"{name}.zarr", settings, overwrite=True).output, truth)
        predict_seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"predicted {name} ({size}³, seed {seed}) in {predict_seconds[name]} s")

    fits: dict[str, dict[str, Any]] = {}
    for source in ("fit", "fit-degraded-z"):
        for kind in ("linear", "conv"):
            out = work / f"fused-{source}-{kind}.pt"
            res = run_child("bench_fusion", ["--child-fit", str(preds[source][0]), str(preds[source][1]), str(out),
                                             str(model), kind, "--samples", str(args.samples)])
            fits[f"{kind} ({source})"] = {"path": str(out), "kind": kind, "fitted_on": source,
                                          **{k: v for k, v in res.items() if k != "output"}}
            print(f"fit {kind} on {source}: {res['seconds']:.1f} s ({res['fit_seconds']:.1f} s L-BFGS, "
                  f"{res['iterations']} iterations), peak RSS {res['peak_rss_mb']:.0f} MB")

    rows = []
    for name, (*_, role) in volumes.items():
        if role != "test":
            continue
        out, truth_path = preds[name]
        truth = vs.open_volume(truth_path).compute()
        row_base = {"volume": name, "truth components": components(truth)}
        for axis in "zyx":
            single = zarr.open_array(str(out / "probabilities" / axis))[:].argmax(axis=0).astype(np.uint8)
            d = dice(single, truth)
            rows.append({**row_base, "merge": f"axis {axis} alone", **d,
                         "mean": round(float(np.mean(list(d.values()))), 4)})
        methods = [("max", None), ("mean", None), ("vote", None)]
        methods += [(f"learned {key}", Path(fit["path"])) for key, fit in fits.items()
                    if fit["fitted_on"] == "fit" or name.startswith("degraded")]
        for label, path in methods:
            t0 = time.perf_counter()
            vs.merge(out, method="learned" if path else label, model=path)
            seconds = round(time.perf_counter() - t0, 2)
            pred = vs.open_volume(out / "labels").compute()
            d = dice(pred, truth)
            rows.append({**row_base, "merge": label, **d, "mean": round(float(np.mean(list(d.values()))), 4),
                         "components": components(pred), "merge_s": seconds})
            print(rows[-1])

    columns = ["volume", "merge", *CLASS_NAMES, "mean", "components", "truth components", "merge_s"]
    print(table(rows, columns))
    verdict: dict[str, dict[str, dict[str, float]]] = {"best_fixed": {}, "max": {}}
    for name in ("seed1", "seed3", "degraded-z"):
        here = {r["merge"]: r["mean"] for r in rows if r["volume"] == name}
        for against, reference in (("best_fixed", max(here["max"], here["mean"], here["vote"])), ("max", here["max"])):
            verdict[against][name] = {key: round(here[f"learned {key}"] - reference, 4)
                                      for key in ("linear (fit)", "conv (fit)")}
    wins = {against: {key: all(v[key] > 0 for v in per_volume.values()) for key in ("linear (fit)", "conv (fit)")}
            for against, per_volume in verdict.items()}
    print("mean Dice of learned (fitted on the clean volume) minus the best of max/mean/vote, and minus max:",
          json.dumps(verdict))
    print("wins on all three volumes:", wins)
    fit_table = [{"fusion": k, "seconds": round(v["seconds"], 1), "fit_s": v["fit_seconds"], "samples": v["samples"],
                  "peak_rss_mb": round(v["peak_rss_mb"]), "iterations": v["iterations"]} for k, v in fits.items()]
    print(table(fit_table, ["fusion", "samples", "seconds", "fit_s", "iterations", "peak_rss_mb"]))
    total = round(time.perf_counter() - t_start, 1)
    print(f"total {total} s")
    if not args.no_write:
        write_results("bench_fusion", {
            "model": str(model), "train_seconds": train_seconds, "sizes": {"unseen": args.size, "fit": args.fit_size},
            "degraded_scene": DEGRADED, "samples": args.samples, "predict_seconds": predict_seconds, "fits": fits,
            "rows": rows, "learned_minus_best_fixed": verdict, "learned_wins_everywhere": wins, "total_seconds": total,
        })


if __name__ == "__main__":
    main()
