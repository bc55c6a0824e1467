"""Convert throughput and peak memory of ``volseg_dask.io.convert`` against plain ``dask.array.to_zarr``.

For each size (default 512³ and 1024³ uint8, 128 MB and 1 GB) the script writes a CT-like ``.npy``
volume into a work folder, then converts it to Zarr v3 ``repeats`` times with each of

``convert``
    ``volseg_dask.io.convert(npy, zarr, chunks=128³, codec="zstd", clevel=5)``;
``to_zarr``
    the plain dask baseline ``da.from_array(np.load(npy, mmap_mode="r"), chunks=128³).to_zarr(...)``,
    as a user would write it;
``to_zarr_name_false``
    the same with ``from_array(..., name=False)``, which skips hashing the whole volume to name the
    array (about 0.8 s of 4.6 s of graph construction at 1024³ here).

Both baselines hold the whole volume in memory: this dask's ``from_array`` copies any array-like
that has ``.copy()`` (``x = x.copy()``), a memory map included, before building the graph (at 1024³:
+1 GB anonymous memory, and the 1 GB of file pages it read stay mapped), so their peak RSS is about
twice the volume. They are the throughput reference, not a memory one.

Each run is a fresh child process (``run_measured`` polls the resident set size of the child's
process tree; the child also reports its own kernel high-water mark ``VmHWM``). The comparison is
fair by construction: the same array, the same Zarr v3 chunk grid (128³), the same Blosc codec object
(``outputs.blosc("zstd", 5)``: zstd level 5, no shuffle for one-byte voxels), the same fill value, the same
dask threaded scheduler with the same number of threads, the same warm page cache (the input is read
once before timing), a fresh output folder per run, and alternating order (A B, B A, ...) so that load
drift from other users of the machine falls on all. Throughput is input bytes over the time of the
whole call (graph construction included; interpreter start-up and imports excluded); the throughput
ratio convert / baseline (= baseline seconds / convert seconds, > 1 means convert is faster) is taken
within each repeat (runs back to back) and its median reported.

Pass criterion (issue 2): median peak RSS of ``convert`` at the largest size < 1.5x the one at the
smallest size. Run from the repository root::

    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python -m benchmarks.bench_convert --sizes 512 1024 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import default_workdir, disk_bytes, median, run_child, table, write_results

REPO = Path(__file__).resolve().parents[1]
METHODS = ("convert", "to_zarr", "to_zarr_name_false")
BASELINES = METHODS[1:]
CRITERION_RSS_RATIO = 1.5
POOR_THROUGHPUT_RATIO = 0.8


# ---- the measured step (runs in a child process) --------------------------------------------------


def _child(method: str, src: Path, dst: Path, chunk: int, codec: str, clevel: int) -> dict[str, Any]:
    import dask
    import dask.array as da
    import psutil
    import zarr

    from volseg_dask import io, outputs

    rss_before = psutil.Process().memory_info().rss
    cpu_before = _cpu_seconds()
    start = time.perf_counter()
    if method == "convert":
        io.convert(src, dst, chunks=chunk, codec=codec, clevel=clevel)
    elif method in BASELINES:
        mm = np.load(src, mmap_mode="r")
        name = False if method == "to_zarr_name_false" else None
        arr = da.from_array(mm, chunks=(chunk,) * mm.ndim, name=name)
        arr.to_zarr(str(dst), compressors=[outputs.blosc(codec, clevel, mm.dtype.itemsize)], fill_value=0,
                    dimension_names=("z", "y", "x"), zarr_format=3)
    else:
        raise SystemExit(f"unknown method {method!r}")
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "cpu_s": _cpu_seconds() - cpu_before,
        "rss_before_mb": rss_before / 2**20,
        "vm_hwm_mb": _vm_hwm() / 2**20,
        "threads": dask.config.get("num_workers", None) or os.cpu_count(),
        "zarr": zarr.__version__,
        "dask": dask.__version__,
    }


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all threads): less sensitive than wall time to other load."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _vm_hwm() -> int:
    """The kernel's peak resident set of this process image (``VmHWM``; unlike ``ru_maxrss`` it does not
    carry over the parent's peak across fork + exec)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- input volume ---------------------------------------------------------------------------------


def make_input(path: Path, n: int, seed: int = 0) -> None:
    """A CT-like uint8 cube: smooth structure (a few grey phases, shading) plus noise; written slab by slab.

    Compresses about as real CT does with zstd (noise keeps it well above 1 byte/voxel/10); generation
    holds one 16-plane slab in memory.
    """
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, n, n))
    rng = np.random.default_rng(seed)
    y = np.arange(n, dtype=np.float32)[:, None]
    x = np.arange(n, dtype=np.float32)[None, :]
    step = 16
    for z0 in range(0, n, step):
        z = np.arange(z0, min(n, z0 + step), dtype=np.float32)[:, None, None]
        phase = np.sin(z / 23.0) * np.cos(y / 31.0) + np.sin((x + y) / 37.0)  # blobs, -2..2
        grey = np.where(phase > 0.6, 170.0, np.where(phase < -0.7, 40.0, 110.0)).astype(np.float32)
        grey += 12.0 * np.cos((x - y + z) / 180.0)  # low-frequency shading
        grey += rng.normal(0.0, 6.0, grey.shape).astype(np.float32)
        out[z0:z0 + step] = np.clip(grey, 0, 255).astype(np.uint8)
    out.flush()
    del out


def _warm(path: Path) -> None:
    """Read the file once so every run starts with it in the page cache."""
    with open(path, "rb") as fh:
        while fh.read(64 * 2**20):
            pass


def _check_output(dst: Path, src: Path, chunk: int, samples: int = 6) -> None:
    """Compare a few chunks of the written array with the source (outside the timings)."""
    import zarr

    arr = zarr.open_array(str(dst), mode="r")
    ref = np.load(src, mmap_mode="r")
    rng = np.random.default_rng(1)
    for _ in range(samples):
        z, y, x = (int(rng.integers(0, max(1, s - chunk + 1))) for s in ref.shape)
        region = (slice(z, z + chunk), slice(y, y + chunk), slice(x, x + chunk))
        if not np.array_equal(arr[region], ref[region]):
            raise SystemExit(f"{dst}: output differs from {src} in {region}")





# ---- driver ---------------------------------------------------------------------------------------





def _run_one(method: str, src: Path, dst: Path, args: argparse.Namespace) -> dict[str, Any]:
    return {"method": method, **run_child("bench_convert", [
        "--child", method, "--src", str(src), "--dst", str(dst), "--chunk", str(args.chunk), "--codec", args.codec,
        "--clevel", str(args.clevel)])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="cube edges (uint8 voxels)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per method and size")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="folder for the inputs and outputs (a temporary folder is made inside it and removed; "
                             "default /work, else the system temp folder)")
    parser.add_argument("--chunk", type=int, default=128, help="Zarr chunk edge")
    parser.add_argument("--codec", default="zstd")
    parser.add_argument("--clevel", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--keep", action="store_true", help="keep the generated inputs")
    parser.add_argument("--no-save", action="store_true", help="do not write results/bench_convert.json")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dst", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(_child(args.child, args.src, args.dst, args.chunk, args.codec, args.clevel)), flush=True)
        return 0

    sizes = sorted(set(args.sizes))
    base = args.workdir or default_workdir()
    need = sum(2 * n**3 for n in sizes) + 2**30  # inputs + one uncompressed-size output + margin
    free = shutil.disk_usage(base).free
    print(f"work folder under {base}: {free / 2**30:.1f} GB free, {need / 2**30:.1f} GB needed")
    if free < need:
        raise SystemExit(f"{base}: not enough free disk ({free / 2**30:.1f} GB < {need / 2**30:.1f} GB); "
                         "choose another --workdir")
    work = Path(tempfile.mkdtemp(prefix="bench_convert-", dir=base))
    runs: list[dict[str, Any]] = []
    inputs: dict[int, dict[str, Any]] = {}
    try:
        for n in sizes:
            src = work / f"vol{n}.npy"
            t0 = time.perf_counter()
            make_input(src, n)
            _warm(src)
            inputs[n] = {"path": str(src), "bytes": n**3, "generate_s": time.perf_counter() - t0}
            print(f"{n}³: input {n**3 / 2**20:.0f} MB written in {inputs[n]['generate_s']:.1f} s", flush=True)
            for r in range(args.repeats):
                order = list(args.methods) if r % 2 == 0 else list(reversed(args.methods))
                for method in order:
                    dst = work / f"out{n}-{method}-{r}.zarr"
                    run = _run_one(method, src, dst, args)
                    run.update(size=n, repeat=r, mb_s=n**3 / 2**20 / run["seconds"],
                               stored_mb=disk_bytes(dst) / 2**20)
                    if r == 0:
                        _check_output(dst, src, args.chunk)
                    shutil.rmtree(dst)
                    runs.append(run)
                    print(f"  {method:18s} #{r}: {run['seconds']:6.2f} s  {run['mb_s']:6.1f} MB/s  "
                          f"cpu {run['cpu_s']:6.2f} s  "
                          f"peak RSS {run['peak_rss_mb']:6.0f} MB (VmHWM {run['vm_hwm_mb']:.0f}, "
                          f"after imports {run['rss_before_mb']:.0f})", flush=True)
            if not args.keep:
                src.unlink()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    summary = _summarise(runs, sizes, args.methods)
    print()
    columns = ["size", "method", "runs", "median_s", "median_mb_s", "median_cpu_s",
               *(f"x_{b}" for b in BASELINES if b in args.methods),
               "median_peak_rss_mb", "median_vm_hwm_mb", "rss_after_imports_mb", "stored_mb"]
    print(table(summary["rows"], columns))
    print()
    for line in summary["verdict"]:
        print(line)
    if not args.no_save:
        write_results("bench_convert", {
            "settings": {"sizes": sizes, "repeats": args.repeats, "chunk": args.chunk, "codec": args.codec,
                         "clevel": args.clevel, "dtype": "uint8", "methods": list(args.methods),
                         "workdir": str(base)},
            "fairness": ("same array, Zarr v3 chunks, Blosc codec and fill value; dask threaded scheduler "
                         "with default threads in all; warm page cache; fresh child process and output "
                         "per run; alternating order; time of the whole call (graph construction included, "
                         "interpreter start-up and imports excluded); ratio = baseline s / convert s per "
                         "repeat, median"),
            "inputs": inputs,
            "summary": summary["rows"],
            "criteria": summary["criteria"],
            "runs": runs,
        })
    return 0 if summary["criteria"].get("rss_ratio_pass", True) else 1


def _summarise(runs: list[dict[str, Any]], sizes: list[int], methods: list[str]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for n in sizes:
        for method in methods:
            mine = [r for r in runs if r["size"] == n and r["method"] == method]
            if not mine:
                continue
            row: dict[str, Any] = {
                "size": f"{n}³", "edge": n, "method": method, "runs": len(mine),
                "median_s": median([r["seconds"] for r in mine]),
                "median_mb_s": median([r["mb_s"] for r in mine]),
                "median_cpu_s": median([r["cpu_s"] for r in mine]),
                "median_peak_rss_mb": median([r["peak_rss_mb"] for r in mine]),
                "median_vm_hwm_mb": median([r["vm_hwm_mb"] for r in mine]),
                "rss_after_imports_mb": median([r["rss_before_mb"] for r in mine]),
                "stored_mb": median([r["stored_mb"] for r in mine]),
            }
            for base in BASELINES:
                pairs = [(c, b) for c in mine for b in runs
                         if b["size"] == n and b["method"] == base and b["repeat"] == c["repeat"]]
                if method == "convert" and pairs:
                    row[f"x_{base}"] = median([b["seconds"] / c["seconds"] for c, b in pairs])
            rows.append(row)
    criteria: dict[str, Any] = {}
    verdict: list[str] = []
    conv = {row["edge"]: row for row in rows if row["method"] == "convert"}
    if len(conv) >= 2:
        lo, hi = min(conv), max(conv)
        passed = []
        for key, label in (("median_peak_rss_mb", "peak RSS (polled, process tree)"),
                           ("median_vm_hwm_mb", "VmHWM (kernel high-water mark)")):
            ratio = conv[hi][key] / conv[lo][key]
            passed.append(ratio < CRITERION_RSS_RATIO)
            criteria[key.removeprefix("median_").removesuffix("_mb")] = {
                f"{lo}": conv[lo][key], f"{hi}": conv[hi][key], "ratio": ratio, "pass": passed[-1]}
            verdict.append(f"convert {label} {hi}³ / {lo}³ = {conv[hi][key]:.0f} / {conv[lo][key]:.0f} MB "
                           f"= {ratio:.2f} ({'PASS' if passed[-1] else 'FAIL'}: limit {CRITERION_RSS_RATIO})")
        criteria.update(rss_ratio_limit=CRITERION_RSS_RATIO, rss_ratio_pass=all(passed))
    for n, row in sorted(conv.items()):
        for base in BASELINES:
            if f"x_{base}" in row:
                r = row[f"x_{base}"]
                criteria[f"throughput_ratio_{n}_vs_{base}"] = r
                poor = f"; below {POOR_THROUGHPUT_RATIO}" if r < POOR_THROUGHPUT_RATIO else ""
                verdict.append(f"convert / {base} throughput at {n}³: {r:.2f} (median over repeats{poor})")
    return {"rows": rows, "criteria": criteria, "verdict": verdict}


if __name__ == "__main__":
    sys.exit(main())
