"""Peak memory and time of ``convert`` on a volumetric tiled TIFF: one page holding the whole volume.

For each size (default 512³ and 1024³ uint8) the script writes the CT-like cube of
``bench_convert.make_input`` as a volumetric TIFF (one page, ``ImageDepth``, tiles 16 × 64 × 64, as
``tifffile.imwrite(..., tile=(16, 64, 64))`` writes it; uncompressed unless ``--compression``),
streamed tile by tile, then converts it to Zarr v3 (128³ chunks, zstd 5) in a fresh child process
per run and tree. ``--tree NAME=PATH`` puts ``PATH`` first on the child's ``PYTHONPATH``, so another
checkout's reader can be measured on the same file; the reader before issue 16 (item 5), which
decoded the whole page on every read, is commit 26f9875::

    git archive 26f9875 volseg_dask | tar -x -C /tmp/old
    .venv/bin/python -m benchmarks.bench_tiff --sizes 512 1024 --tree new=. --tree old=/tmp/old

Reported per run: convert seconds, the process tree's peak RSS (polled), the child's kernel
high-water mark ``VmHWM`` and its baseline after imports and opening the volume (the growth is what
the conversion itself holds). Medians over ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import default_workdir, median, run_measured, table, vm_hwm_mb, write_results
from benchmarks.bench_convert import make_input

REPO = Path(__file__).resolve().parents[1]
TILE = (16, 64, 64)


def _child(src: Path, dst: Path) -> dict[str, Any]:
    import volseg_dask
    from volseg_dask.io import convert, open_volume

    vol = open_volume(src)
    base = vm_hwm_mb()
    start = time.perf_counter()
    convert(src, dst, chunks=128, codec="zstd", clevel=5)
    return {"seconds": time.perf_counter() - start, "vm_hwm_mb": vm_hwm_mb(), "baseline_hwm_mb": base,
            "read_chunks": list(vol.chunksize), "package": str(Path(volseg_dask.__file__).parent)}


def write_volumetric_tiff(path: Path, npy: Path, compression: str | None) -> float:
    """The NPY cube as one tiled volumetric page, tiles taken from its memory map in file order; seconds."""
    import tifffile

    cube = np.load(npy, mmap_mode="r")
    n = cube.shape[0]
    starts = [range(0, n, t) for t in TILE]
    tiles = (np.ascontiguousarray(cube[z:z + TILE[0], y:y + TILE[1], x:x + TILE[2]])
             for z in starts[0] for y in starts[1] for x in starts[2])
    start = time.perf_counter()
    tifffile.imwrite(path, tiles, shape=cube.shape, dtype=cube.dtype, tile=TILE, compression=compression,
                     bigtiff=cube.nbytes > 2**31)
    return time.perf_counter() - start


def _run(tree: Path, src: Path, dst: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(REPO)])}
    res = run_measured([sys.executable, "-m", "benchmarks.bench_tiff", "--child", str(src), str(dst)],
                       env=env, cwd=tree, timeout=3600)  # -m puts the cwd first on sys.path
    shutil.rmtree(dst, ignore_errors=True)
    if res["returncode"] != 0:
        raise SystemExit(f"child on {src} with {tree} failed ({res['returncode']}):\n{res['output']}")
    last = json.loads([line for line in res["output"].splitlines() if line.startswith("{")][-1])
    if Path(last["package"]).parent != tree:
        raise SystemExit(f"the child imported {last['package']}, not the one in {tree}")
    return {"peak_rss_mb": res["peak_rss_mb"], **last}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="cube edges (uint8 voxels)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tree", action="append", default=None, metavar="NAME=PATH",
                        help="a checkout whose volseg_dask the child imports (repeatable; default: this one)")
    parser.add_argument("--compression", default=None, help="TIFF tile compression (default none)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(*args.child)), flush=True)
        return 0
    if args.tree is None:
        args.tree = [f"this={REPO}"]

    trees = dict(t.split("=", 1) for t in args.tree)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=args.workdir or default_workdir(), prefix="bench_tiff_") as tmp:
        work = Path(tmp)
        for n in sorted(set(args.sizes)):
            npy, src = work / f"cube{n}.npy", work / f"cube{n}.tif"
            make_input(npy, n)
            write_s = write_volumetric_tiff(src, npy, args.compression)
            npy.unlink()
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
            for _ in range(args.repeats):  # trees alternate within each repeat
                for name, tree in trees.items():
                    runs[name].append(_run(Path(tree).resolve(), src, work / "out.zarr"))
            for name, got in runs.items():
                rows.append({
                    "size": n, "tree": name, "tiff_mb": round(src.stat().st_size / 2**20, 1),
                    "write_s": round(write_s, 1), "read_chunks": got[0]["read_chunks"],
                    "convert_s": median([r["seconds"] for r in got]),
                    "peak_rss_mb": median([r["peak_rss_mb"] for r in got]),
                    "vm_hwm_mb": median([r["vm_hwm_mb"] for r in got]),
                    "growth_mb": median([r["vm_hwm_mb"] - r["baseline_hwm_mb"] for r in got]),
                    "package": got[0]["package"], "runs": got,
                })
            src.unlink()
    print(table(rows, ["size", "tree", "tiff_mb", "read_chunks", "convert_s", "peak_rss_mb", "vm_hwm_mb",
                       "growth_mb"]))
    if not args.no_save:
        write_results("bench_tiff", {"tile": TILE, "compression": args.compression, "trees": trees, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
