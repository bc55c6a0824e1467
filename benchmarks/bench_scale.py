"""The user's volume size end to end: 2120 × 2520 × 2520 (13.5 Gvoxel) uint8, with a kill and a resume.

For each ``--sizes`` volume (default the user's, and 1024³ for a same-run ratio) the script

1. writes a synthetic CT-like uint8 volume to Zarr v3 (128³ chunks, zstd 5: ``volseg convert``'s
   defaults), streamed chunk by chunk through dask (a few minutes at 13.5 Gvoxel on 2 cores);
2. predicts it with the cheapest network a model file can hold (an smp Unet on a three-stage
   MobileNetV3-small ×0.5 encoder, decoder 8/4/2, random weights; the figures are about the machinery,
   not the network) in ``--fused`` mode along ``--axes`` with the package defaults otherwise (blocks 256³,
   halo 32, 2 threads, batch auto), as a child process whose process tree's peak RSS is polled;
3. kills that child with SIGKILL once about half of the blocks are done (read off the done-markers) and
   runs the same prediction again, which resumes;
4. reports the wall time of both attempts, Mvoxel/s over the predicted axes, the peak RSS of each
   attempt's process tree, the number of tasks and the time to build the task graph, the disk used by
   the input and the output, and the agreement of the stored labels with an in-memory prediction
   (``predict_array`` on the block and its halo held in memory, merged by max) on ``--check-blocks``
   blocks drawn at random.

Results go to ``benchmarks/results/bench_scale.json`` after every size (a long run keeps what it finished).
Run from the repository root (the 13.5-Gvoxel size needs ~25 GB of disk and, with three axes on 2 CPU
cores, hours; ``--axes z`` is one third of that)::

    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python -m benchmarks.bench_scale --axes z
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
USER_SIZE = (2120, 2520, 2520)
CHEAPEST = {"architecture": "Unet", "encoder": "tu-mobilenetv3_small_050", "encoder_depth": 3,
            "decoder_channels": [8, 4, 2]}


# ---- inputs ----------------------------------------------------------------------------------------


def _phases(block: np.ndarray, block_info: dict[Any, Any] | None = None) -> np.ndarray:
    """One chunk of the synthetic volume: three grey phases of a smooth field, shading and noise."""
    assert block_info is not None
    (z0, z1), (y0, y1), (x0, x1) = block_info[None]["array-location"]
    z = np.arange(z0, z1, dtype=np.float32)[:, None, None]
    y = np.arange(y0, y1, dtype=np.float32)[None, :, None]
    x = np.arange(x0, x1, dtype=np.float32)[None, None, :]
    phase = np.sin(z / 23.0) * np.cos(y / 31.0) + np.sin((x + y) / 37.0)
    grey = np.where(phase > 0.6, 170.0, np.where(phase < -0.7, 40.0, 110.0)).astype(np.float32)
    grey += 12.0 * np.cos((x - y + z) / 180.0)
    rng = np.random.default_rng([z0, y0, x0])
    grey += rng.normal(0.0, 6.0, grey.shape).astype(np.float32)
    return np.clip(grey, 0, 255).astype(np.uint8)


def make_volume(path: Path, shape: tuple[int, int, int], threads: int) -> float:
    """Write the synthetic volume to ``path`` (Zarr v3, 128³ chunks, zstd 5); return the seconds taken."""
    import dask
    import dask.array as da

    from volseg_dask import outputs

    t0 = time.perf_counter()
    template = da.zeros(shape, dtype=np.uint8, chunks=(128, 128, 128))
    with outputs.atomic_output(path, overwrite=True) as tmp:
        arr = outputs.create_array(tmp, shape=shape, dtype=np.uint8, chunks=(128, 128, 128), codec="zstd", clevel=5,
                                   dimension_names=("z", "y", "x"), attrs=outputs.provenance(kind="volume"))
        with dask.config.set(scheduler="threads", num_workers=threads):
            da.store(template.map_blocks(_phases, dtype=np.uint8), arr, lock=False)
        outputs.mark_complete(arr)
    return time.perf_counter() - t0


def make_model(path: Path) -> Path:
    import torch

    from volseg_dask.config import ModelSettings
    from volseg_dask.models import ModelMeta, build_model, pad_multiple, save_model
    from volseg_dask.normalize import Normalization

    settings = ModelSettings(**CHEAPEST)
    torch.manual_seed(0)
    model = build_model(settings, classes=3)
    return save_model(path, model.eval(), ModelMeta(model=settings, label_values=(0, 1, 2),
                                                    normalization=Normalization(0.0, 255.0),
                                                    pad_multiple=pad_multiple(model, settings)))


# ---- the child: one prediction attempt -----------------------------------------------------------------


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import dask

    import volseg_dask.prediction.run as run_mod
    from volseg_dask.config import Settings

    built: list[float] = []
    real = run_mod._tasks

    def timed_tasks(plan: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return real(plan)
        finally:
            built.append(time.perf_counter() - t0)

    run_mod._tasks = timed_tasks
    settings = Settings().with_overrides({"predict.axes": spec["axes"], "predict.fused": True,
                                          "predict.device": "cpu"})
    with dask.config.set(scheduler="threads", num_workers=spec["threads"]):
        result = run_mod.predict(spec["volume"], spec["model"], spec["out"], settings)
    return {"seconds": result.seconds, "blocks_computed": result.blocks_computed,
            "blocks_skipped": result.blocks_skipped, "graph_build_s": built[0] if built else None,
            "voxels": result.voxels}


# ---- the parent ------------------------------------------------------------------------------------------


def _attempt(spec: dict[str, Any], kill_at: float | None) -> dict[str, Any]:
    """Run the child, polling its process tree's RSS; with ``kill_at``, SIGKILL it once that share of the
    blocks has its done-marker."""
    import psutil

    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0.0
    stop = threading.Event()
    killed = {"at_blocks": None}
    done_dir = Path(spec["out"]) / ".volseg" / "done"

    def poll() -> None:
        nonlocal peak
        parent = psutil.Process(proc.pid)
        last = 0.0
        while not stop.is_set():
            try:
                total = parent.memory_info().rss + sum(c.memory_info().rss for c in parent.children(recursive=True))
                peak = max(peak, total / 2**20)
            except psutil.NoSuchProcess:
                return
            if kill_at is not None and killed["at_blocks"] is None and time.monotonic() - last > 2:
                last = time.monotonic()
                done = sum(1 for p in done_dir.rglob("*") if p.is_file()) if done_dir.exists() else 0
                if done >= kill_at * spec["blocks"]:
                    killed["at_blocks"] = done
                    os.kill(proc.pid, signal.SIGKILL)
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    output, _ = proc.communicate()
    stop.set()
    thread.join()
    wall = time.perf_counter() - t0
    record: dict[str, Any] = {"wall_s": wall, "peak_rss_mb": peak, "returncode": proc.returncode}
    if killed["at_blocks"] is not None:
        record["killed_after_blocks"] = killed["at_blocks"]
        return record
    if proc.returncode != 0:
        raise SystemExit(f"prediction failed ({proc.returncode}):\n{output[-4000:]}")
    record.update(json.loads([line for line in output.splitlines() if line.startswith("{")][-1]))
    return record


def check_blocks(volume: Path, model: Path, out: Path, axes: str, n: int, seed: int) -> dict[str, Any]:
    """Stored labels vs ``predict_array`` on ``n`` random blocks held in memory with their halo."""
    import dask
    import zarr

    from volseg_dask.config import Settings
    from volseg_dask.grid import BlockGrid
    from volseg_dask.prediction import predict_array
    from volseg_dask.prediction.votes import merge_block

    src = zarr.open_array(str(volume), mode="r")
    labels = zarr.open_array(str(out / "labels" / "0"), mode="r")
    ps = Settings().predict
    grid = BlockGrid(src.shape, tuple(ps.chunks), 1, ps.halo)
    indices = grid.indices()
    rng = np.random.default_rng(seed)
    rows = []
    for i in rng.choice(len(indices), min(n, len(indices)), replace=False):
        block = grid.native_block(indices[int(i)])
        lo = [max(0, a - ps.halo) for a, _ in block]
        hi = [min(s, b + ps.halo) for (_, b), s in zip(block, src.shape)]
        crop = np.asarray(src[tuple(slice(a, b) for a, b in zip(lo, hi))])
        settings = Settings().with_overrides({"predict.chunks": list(crop.shape), "predict.device": "cpu"})
        with dask.config.set(scheduler="sync"):
            probs = [predict_array(crop, model, axis=a, settings=settings).compute() for a in axes]
        inner = tuple(slice(a - c, b - c) for (a, b), c in zip(block, lo))
        want = merge_block(*(p[(slice(None), *inner)] for p in probs), method="max", label_values=[0, 1, 2])[0]
        got = np.asarray(labels[tuple(slice(a, b) for a, b in block)])
        rows.append({"block": [list(b) for b in block], "equal": float(np.mean(got == want))})
    return {"blocks": rows, "min_equal": min(r["equal"] for r in rows)}


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1024,1024,1024", ",".join(map(str, USER_SIZE))])
    parser.add_argument("--axes", default="zyx", help="predicted axes (fused): zyx, or z for a third of the time")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kill-at", type=float, default=0.5, help="share of the blocks done at the kill")
    parser.add_argument("--check-blocks", type=int, default=4)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the volumes and outputs")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return

    from benchmarks._common import default_workdir, write_results

    work = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=args.workdir or default_workdir()))
    model = make_model(work / "cheapest.pt")
    results: dict[str, Any] = {"axes": args.axes, "threads": args.threads, "network": CHEAPEST, "sizes": []}
    try:
        for text in args.sizes:
            shape = tuple(int(s) for s in text.split(","))
            volume, out = work / f"vol-{'x'.join(map(str, shape))}.zarr", work / "seg.zarr"
            print(f"{shape}: writing the volume ...", flush=True)
            gen_s = make_volume(volume, shape, args.threads)  # type: ignore[arg-type]
            blocks = int(np.prod([-(-s // 256) for s in shape]))
            spec = {"volume": str(volume), "model": str(model), "out": str(out), "axes": args.axes,
                    "threads": args.threads, "blocks": blocks}
            print(f"{shape}: {blocks} blocks; predicting, killed at {args.kill_at:.0%} ...", flush=True)
            first = _attempt(spec, args.kill_at)
            print(f"  killed after {first.get('killed_after_blocks')} blocks, {first['wall_s']:.0f} s, peak "
                  f"{first['peak_rss_mb']:.0f} MB; resuming ...", flush=True)
            second = _attempt(spec, None)
            voxels = float(np.prod(shape))
            wall = first["wall_s"] + second["wall_s"]
            check = check_blocks(volume, model, out, args.axes, args.check_blocks, seed=0)
            row = {"shape": list(shape), "gvoxel": voxels / 1e9, "blocks": blocks, "generate_s": gen_s,
                   "first_attempt": first, "resumed_attempt": second, "wall_s": wall,
                   "mvox_per_s": voxels / wall / 1e6, "mvox_axes_per_s": voxels * len(args.axes) / wall / 1e6,
                   "peak_rss_mb": max(first["peak_rss_mb"], second["peak_rss_mb"]),
                   "tasks": blocks, "graph_build_s": second.get("graph_build_s"),
                   "disk_input_gb": _du(volume) / 1e9, "disk_output_gb": _du(out) / 1e9, "agreement": check}
            results["sizes"].append(row)
            print(f"  {shape}: {wall:.0f} s in all ({row['mvox_per_s']:.2f} Mvoxel/s, "
                  f"{row['mvox_axes_per_s']:.2f} Mvoxel-axes/s), peak RSS {row['peak_rss_mb']:.0f} MB, "
                  f"{blocks} tasks, graph {row['graph_build_s']:.2f} s, disk in {row['disk_input_gb']:.1f} GB out "
                  f"{row['disk_output_gb']:.1f} GB, labels equal to in-memory on {len(check['blocks'])} blocks: "
                  f"min {check['min_equal']:.5f}", flush=True)
            if len(results["sizes"]) > 1:
                a, b = results["sizes"][0], results["sizes"][-1]
                results["ratios"] = {"peak_rss": b["peak_rss_mb"] / a["peak_rss_mb"],
                                     "throughput": b["mvox_per_s"] / a["mvox_per_s"]}
                print(f"  same-run ratios {b['shape']} / {a['shape']}: peak RSS {results['ratios']['peak_rss']:.2f}, "
                      f"throughput {results['ratios']['throughput']:.2f}", flush=True)
            if not args.no_save:
                write_results("bench_scale", results)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(volume, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
