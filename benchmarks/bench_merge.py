"""Merge throughput and peak memory of ``volseg_dask.merge`` against plain reading of the same Zarr arrays.

For each size (default 512³ and 1024³) the script writes a prediction output folder holding three
per-axis probability arrays ``probabilities/{z,y,x}`` ``(3, N, N, N)`` uint8 — smooth class regions
with per-axis noise, softmax, ``round(p * 255)``, Blosc lz4 as ``predict`` writes them, chunks
``(3, 256, 256, 256)`` — then, ``repeats`` times, in alternating order, runs in fresh child processes:

``merge``
    ``volseg_dask.merge(OUT)``: the blockwise max-probability vote writing ``labels`` and
    ``confidence`` (the defaults), then their OME-Zarr pyramids. Its time is split into the
    blockwise merge (``prediction.merging.write_merged``' store of level 0) and the pyramid levels, timed apart;
``read``
    the baseline: ``da.from_zarr`` of the three arrays (same chunks) and
    ``dask.compute(*(a.max() for a in arrays))``: every chunk read and decompressed, nothing written.

Both on dask's threaded scheduler with ``--threads`` threads (default 2, the cores here), warm page
cache (the arrays are read once before timing), imports excluded. The ratio merge / read throughput
(= read seconds / merge seconds, blockwise merge without the pyramid) is taken within each repeat
and its median reported; the goal (issue 4) is ≥ 0.7. Peak RSS is that of the child's process tree
(``run_measured``) and its kernel high-water mark. After the first merge at each size, a few blocks
of the labels and confidence are checked against a plain ``argmax`` implementation of the
max-probability vote. Run from the repository root::

    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python -m benchmarks.bench_merge
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import (
    cpu_seconds,
    default_workdir,
    disk_bytes,
    median,
    run_child,
    table,
    vm_hwm_mb,
    write_results,
)

REPO = Path(__file__).resolve().parents[1]
AXES = "zyx"
CLASSES = 3
GOAL_RATIO = 0.7
METHODS = ("merge", "read")


# ---- input: a prediction output with per-axis probabilities ----------------------------------------


def _probability_block(block: np.ndarray, axis: int, block_info: dict[Any, Any] | None = None) -> np.ndarray:
    """uint8 probabilities (3, z, y, x) of one chunk: three phases of a smooth field, per-axis noise."""
    assert block_info is not None
    (_, _), *ranges = block_info[None]["array-location"]
    z, y, x = (np.arange(a, b, dtype=np.float32) for a, b in ranges)
    field = (np.sin(z / 23.0)[:, None, None] * np.cos(y / 31.0)[None, :, None]
             + np.sin((x[None, None, :] + y[None, :, None]) / 37.0))
    rng = np.random.default_rng(abs(hash((axis, *(a for a, _ in ranges)))) % 2**32)
    noise = rng.normal(0.0, 0.35, field.shape).astype(np.float32)
    logits = np.stack([4.0 * (field - 0.6), -4.0 * np.abs(field) + 1.0, 4.0 * (-0.7 - field)]) + noise
    logits -= logits.max(axis=0, keepdims=True)
    e = np.exp(logits)
    return np.rint(e / e.sum(axis=0, keepdims=True) * 255.0).astype(np.uint8)


def make_prediction_output(path: Path, n: int, chunk: int) -> None:
    import dask
    import dask.array as da
    import zarr

    from volseg_dask import outputs

    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    outputs.set_status(group, **outputs.provenance(
        kind="prediction", complete=False, axes=list(AXES), axes_done=list(AXES), merge="max",
        outputs=["confidence"], label_values=list(range(CLASSES)), voxel_size=None, run_key="bench"))
    for a, axis in enumerate(AXES):
        arr = outputs.create_array(group, name=f"probabilities/{axis}", shape=(CLASSES, n, n, n), dtype=np.uint8,
                                 chunks=(CLASSES, chunk, chunk, chunk), codec="lz4", clevel=5,
                                 dimension_names=("c", "z", "y", "x"),
                                 attrs={"kind": "probabilities", "axis": axis, "label_values": list(range(CLASSES))})
        template = da.zeros((CLASSES, n, n, n), dtype=np.uint8, chunks=(CLASSES, chunk, chunk, chunk))
        probs = template.map_blocks(_probability_block, a, dtype=np.uint8)
        with dask.config.set(scheduler="threads"):
            da.store(probs, arr, lock=False)
        outputs.mark_complete(arr)


def _reference_max_vote(*probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The max-probability vote written plainly with argmax: (classes, confidence)."""
    stack = np.stack(probs)  # (A, C, z, y, x)
    best = stack.max(axis=1).argmax(axis=0)[None]
    classes = np.take_along_axis(stack.argmax(axis=1), best, axis=0)[0]
    merged = np.take_along_axis(stack, best[:, None], axis=0)[0]
    return classes, np.take_along_axis(merged, classes[None], axis=0)[0]


def check_merge(path: Path, chunk: int, samples: int = 3) -> int:
    """Compare a few merged chunks with :func:`_reference_max_vote`; return the number checked."""
    import zarr

    group = zarr.open_group(str(path), mode="r")
    n = group["probabilities/z"].shape[1]
    grid = [(i, j, k) for i in range(0, n, chunk) for j in range(0, n, chunk) for k in range(0, n, chunk)]
    rng = np.random.default_rng(0)
    picks = [grid[int(i)] for i in rng.choice(len(grid), min(samples, len(grid)), replace=False)]
    for i, j, k in picks:
        region = (slice(i, i + chunk), slice(j, j + chunk), slice(k, k + chunk))
        probs = [group[f"probabilities/{a}"][(slice(None), *region)] for a in AXES]
        classes, confidence = _reference_max_vote(*probs)
        if not (np.array_equal(group["labels/0"][region], classes)
                and np.array_equal(group["confidence/0"][region], confidence)):
            raise SystemExit(f"{path}: merged block at {(i, j, k)} differs from the plain argmax vote")
    return len(picks)


# ---- the measured step (a child process) ------------------------------------------------------------


def _child(method: str, path: str, threads: int) -> dict[str, Any]:
    import dask
    import dask.array as da
    import psutil
    import zarr

    import volseg_dask.ngff as ngff
    import volseg_dask.prediction.merging as merging

    rss_before = psutil.Process().memory_info().rss / 2**20
    stages: dict[str, float] = {"merge_s": 0.0, "pyramid_s": 0.0}

    def timed(module: Any, name: str, key: str) -> None:
        original = getattr(module, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                stages[key] += time.perf_counter() - t0

        setattr(module, name, wrapped)

    with dask.config.set(scheduler="threads", num_workers=threads):
        c0, t0 = cpu_seconds(), time.perf_counter()
        if method == "merge":
            timed(merging, "compute", "merge_s")
            timed(ngff, "compute", "pyramid_s")
            merging.merge(path)
        else:
            group = zarr.open_group(path, mode="r")
            arrays = [da.from_zarr(group[f"probabilities/{a}"]) for a in AXES]
            dask.compute(*(a.max() for a in arrays))
            stages["merge_s"] = time.perf_counter() - t0
        seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return {"seconds": seconds, "cpu_s": cpu, **stages, "rss_before_mb": rss_before, "vm_hwm_mb": vm_hwm_mb()}


# ---- driver -----------------------------------------------------------------------------------------








def _warm(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            f.read_bytes()


def _run_one(method: str, path: Path, threads: int) -> dict[str, Any]:
    return {"method": method, **run_child("bench_merge", ["--child", method, "--path", str(path),
                                                          "--threads", str(threads)])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024],
                        help="cube edges (at least 2 blocks per thread: a one-block volume merges on one thread)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=256, help="chunk edge of the per-axis arrays (predict's block)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(_child(args.child, args.path, args.threads)), flush=True)
        return 0

    base = args.workdir or default_workdir()
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_merge-", dir=base))
    runs: list[dict[str, Any]] = []
    inputs: dict[int, dict[str, Any]] = {}
    try:
        for n in sorted(set(args.sizes)):
            path = work / f"pred{n}.zarr"
            t0 = time.perf_counter()
            make_prediction_output(path, n, args.chunk)
            _warm(path / "probabilities")
            inputs[n] = {"generate_s": time.perf_counter() - t0,
                         "probabilities_mb": disk_bytes(path / "probabilities") / 2**20,
                         "probabilities_raw_mb": 3 * CLASSES * n**3 / 2**20}
            print(f"{n}³: per-axis probabilities written in {inputs[n]['generate_s']:.1f} s "
                  f"({inputs[n]['probabilities_mb']:.0f} MB on disk)", flush=True)
            for r in range(args.repeats):
                for method in (METHODS if r % 2 == 0 else tuple(reversed(METHODS))):
                    run = _run_one(method, path, args.threads)
                    run.update(size=n, repeat=r)
                    if method == "merge" and r == 0:
                        run["blocks_checked"] = check_merge(path, args.chunk)
                        run["written_mb"] = sum(disk_bytes(path / name) for name in ("labels", "confidence")) / 2**20
                    runs.append(run)
                    print(f"  {method:5s} #{r}: {run['seconds']:6.2f} s (blockwise {run['merge_s']:6.2f} s, "
                          f"pyramid {run['pyramid_s']:5.2f} s)  cpu {run['cpu_s']:6.2f} s  peak RSS "
                          f"{run['peak_rss_mb']:5.0f} MB (VmHWM {run['vm_hwm_mb']:.0f}, after imports "
                          f"{run['rss_before_mb']:.0f})", flush=True)
            shutil.rmtree(path)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows, criteria, verdict = _summarise(runs, sorted(set(args.sizes)))
    print()
    print(table(rows, ["size", "method", "runs", "median_s", "blockwise_s", "pyramid_s", "mvox_s", "ratio_vs_read",
                       "cpu_ratio_vs_read", "median_peak_rss_mb", "median_vm_hwm_mb"]))
    print()
    for line in verdict:
        print(line)
    if not args.no_save:
        write_results("bench_merge", {
            "settings": {"sizes": sorted(set(args.sizes)), "repeats": args.repeats, "chunk": args.chunk,
                         "threads": args.threads, "classes": CLASSES, "axes": AXES, "codec": "blosc lz4 5",
                         "method": "max", "outputs": ["confidence"], "workdir": str(base)},
            "fairness": ("same arrays, chunks and dask threaded scheduler; fresh child process per run; warm "
                         "page cache; alternating order; imports excluded; ratio = read s / merge blockwise s "
                         "in the same repeat, median; merge throughput counts volume voxels (3 per-axis arrays "
                         "read), as does the read"),
            "inputs": inputs,
            "summary": rows,
            "criteria": criteria,
            "verdict": verdict,
            "runs": runs,
        })
    return 0


def _summarise(runs: list[dict[str, Any]], sizes: list[int]) -> tuple[list[dict[str, Any]], dict[str, Any],
                                                                      list[str]]:
    rows: list[dict[str, Any]] = []
    criteria: dict[str, Any] = {}
    verdict: list[str] = []
    for n in sizes:
        reads = {r["repeat"]: r for r in runs if r["size"] == n and r["method"] == "read"}
        for method in METHODS:
            mine = [r for r in runs if r["size"] == n and r["method"] == method]
            if not mine:
                continue
            row: dict[str, Any] = {
                "size": f"{n}³", "edge": n, "method": method, "runs": len(mine),
                "median_s": median([r["seconds"] for r in mine]),
                "blockwise_s": median([r["merge_s"] for r in mine]),
                "pyramid_s": median([r["pyramid_s"] for r in mine]),
                "mvox_s": median([n**3 / r["merge_s"] / 1e6 for r in mine]),
                "median_peak_rss_mb": median([r["peak_rss_mb"] for r in mine]),
                "median_vm_hwm_mb": median([r["vm_hwm_mb"] for r in mine]),
            }
            if method == "merge":
                pairs = [(m, reads[m["repeat"]]) for m in mine if m["repeat"] in reads]
                if pairs:
                    row["ratio_vs_read"] = median([b["merge_s"] / m["merge_s"] for m, b in pairs])
                    row["cpu_ratio_vs_read"] = median([b["cpu_s"] / (m["cpu_s"] * m["merge_s"] / m["seconds"])
                                                       for m, b in pairs])
                    row["end_to_end_ratio_vs_read"] = median([b["merge_s"] / m["seconds"] for m, b in pairs])
                    ok = row["ratio_vs_read"] >= GOAL_RATIO
                    criteria[f"ratio_{n}"] = {"value": row["ratio_vs_read"], "goal": GOAL_RATIO, "pass": ok}
                    verdict.append(f"{n}³: merge (blockwise) / plain read throughput = {row['ratio_vs_read']:.2f} "
                                   f"({'PASS' if ok else 'FAIL'}: goal {GOAL_RATIO}); with the pyramid "
                                   f"{row['end_to_end_ratio_vs_read']:.2f}")
            rows.append(row)
    merges = {row["edge"]: row for row in rows if row["method"] == "merge"}
    if len(merges) >= 2:
        lo, hi = min(merges), max(merges)
        ratio = merges[hi]["median_peak_rss_mb"] / merges[lo]["median_peak_rss_mb"]
        criteria["peak_rss"] = {f"{lo}": merges[lo]["median_peak_rss_mb"], f"{hi}": merges[hi]["median_peak_rss_mb"],
                                "ratio": ratio}
        verdict.append(f"merge peak RSS {hi}³ / {lo}³ = {merges[hi]['median_peak_rss_mb']:.0f} / "
                       f"{merges[lo]['median_peak_rss_mb']:.0f} MB = {ratio:.2f}")
    return rows, criteria, verdict


if __name__ == "__main__":
    sys.exit(main())
