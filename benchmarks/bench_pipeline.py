"""The accelerator pipeline: the host's work per block outside the device, and how busy a device stays.

Today's code (a git worktree of ``--baseline``, default the last commit before the pipeline) and the
working tree run side by side in one run, each in child processes of their own (``PYTHONPATH`` set to
the code under test), on the same volume (default 256 × 512 × 512 uint8, 128³ chunks), model, blocks
(256, halo 32, batch 4) and three axes.

Parts (``--parts``):

``cpu``
    CPU-seconds (user + system of the child, all threads) per Mvoxel-axis of the prediction tasks on the
    local threaded scheduler (``--threads``), with the device's work replaced by a free stub that returns
    valid uint8 probabilities (a fixed, realistically compressible pattern, so the writes cost what real
    ones do):

    ``device``: what a GPU takes over is free: today that is ``_uint8_probabilities`` (forward, softmax,
    crop and uint8 on the device; today's numpy gather and normalisation stay on the host, as they would on
    a GPU node); in the new code ``Engine.compute`` (gather, normalise, pad, forward, softmax, crop, uint8
    and the reorder all on the device). What is left is each block's host work: read, stage, copy back,
    write. This is the issue's CPU-side cost; goal new / today <= 0.5.

    ``forward``: only the network's forward pass is free; all the rest runs on the CPU in both, as on a
    machine without a GPU (``auto`` runs inline there).
``sim``
    A simulated accelerator: the same stubs, taking ``plane_s`` of wall time per plane in ``time.sleep``
    (holding neither a core nor the GIL, as a GPU kernel runs beside the host; one device: a lock keeps two
    threads' work from overlapping on it), set to 70 % of each code's own CPU-side rate in the same set-up
    (planes per second of its ``device``-stubbed run on the same volume, scheduler and threads, measured
    first), so a perfect overlap keeps it busy 100 % of the time; and, as a second row for the new code, the
    device at 70 % of today's rate (the same device for both). Each set-up is calibrated on its own: a
    ``LocalCluster`` worker's CPU side is slower than the local scheduler's (distributed's default
    ``MALLOC_TRIM_THRESHOLD_``, which the new code's clusters drop; the scheduler on the same cores), and a
    device calibrated on the local rate would outrun any overlap there; the ratio of the two rates is reported.
    Device-busy fraction = simulated device seconds / wall seconds of the prediction tasks, for: 1 thread
    and ``--threads`` threads on the local scheduler, a ``LocalCluster`` worker with ``--threads`` threads and
    ``resources={"GPU": 1}`` (the GPU-node set-up), and ``--more-threads`` for the new code. The new code
    runs with ``predict.pipeline: device-thread`` (its GPU default). On ``--sim-shape`` (default 16 blocks).
    Goal: new >= 0.85 with 2 threads.
``e2e``
    End to end on the CPU with the demo network (``volseg_dask/demo_settings.yaml``), defaults otherwise:
    new / today's ``predict`` wall time, median of ``--repeats`` alternating runs. Goal >= 0.97 in speed
    (new time / today's time <= 1 / 0.97).

Run from the repository root::

    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python -m benchmarks.bench_pipeline
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BASELINE = "26f9875"
"""The layout commit of issue 12: the last one before the accelerator pipeline."""
PARTS = ("cpu", "sim", "e2e")
SETUPS = ("local1", "local", "cluster", "more")
PIPELINE: dict[str, dict[str, Any]] = {"today": {}, "new": {"pipeline": "device-thread"}}
"""The new code runs with its GPU default; today's has no such setting."""
CLASSES = 3


# ---- the child: one prediction under a stub ---------------------------------------------------------


def _pattern(shape: tuple[int, ...]) -> Any:
    """Fixed uint8 'probabilities' of ``shape`` (C, ...) that compress like real ones (smooth phases)."""
    import numpy as np

    key = ("p", shape)
    if key not in _CACHE:
        grid = np.indices(shape[1:], dtype=np.float32).sum(axis=0)
        field = (np.sin(grid / 23.0) + 1.0) / 2.0
        probs = np.stack([field, 1.0 - field, np.zeros_like(field)][: shape[0]])
        _CACHE[key] = np.ascontiguousarray(np.rint(probs * 255.0).astype(np.uint8))
    return _CACHE[key]


_CACHE: dict[Any, Any] = {}
STATE = {"device_s": 0.0, "planes": 0, "calls": 0}
DEVICE = threading.Lock()
"""One simulated device: two threads' work on it runs one after the other, as on one GPU."""


def install_stub(stub: str | None, plane_s: float) -> None:
    """Replace the device's work (``device``) or the forward pass (``forward``) with a stub in this process."""
    import numpy as np
    import torch

    from volseg_dask.prediction import inference as inf

    def device_time(planes: int) -> None:
        STATE["planes"] += planes
        STATE["calls"] += 1
        if plane_s > 0:
            with DEVICE:
                t0 = time.perf_counter()
                time.sleep(plane_s * planes)
                STATE["device_s"] += time.perf_counter() - t0

    if stub == "device" and hasattr(inf, "Engine"):  # the new code
        axes = {"z": 0, "y": 1, "x": 2}

        def compute(self: Any, raw: Any, unsigned: Any, axis: str, crop: Any, spec: Any) -> Any:
            shape = tuple(s - a - b for s, (a, b) in zip(raw.shape, crop))
            device_time(shape[axes[axis]])
            return torch.from_numpy(_pattern((CLASSES, *shape)))

        inf.Engine.compute = compute  # type: ignore[method-assign]
    elif stub == "device":  # today's code: forward, softmax, crop and uint8 are its device part

        def uint8_probabilities(model: Any, planes: Any, crop: Any, **kw: Any) -> Any:
            h, w = (len(range(*c.indices(n))) for c, n in zip(crop, planes.shape[-2:]))
            device_time(planes.shape[0])
            return _pattern((CLASSES, planes.shape[0], h, w)).transpose(1, 0, 2, 3)

        inf._uint8_probabilities = uint8_probabilities
    elif stub == "forward":
        real = inf.get_model

        class FreeForward(torch.nn.Module):
            def forward(self, x: Any) -> Any:
                device_time(x.shape[0])
                key = ("f", tuple(x.shape))
                if key not in _CACHE:
                    _CACHE[key] = torch.from_numpy(np.random.default_rng(0).normal(
                        0, 3, (x.shape[0], CLASSES, *x.shape[2:])).astype(np.float32))
                return _CACHE[key]

        def get_model(path: Any, device: Any) -> Any:
            _, meta = real(path, device)
            return FreeForward(), meta

        inf.get_model = get_model


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One prediction with ``spec``'s stub; timings of its task graph and the simulated device."""
    import dask

    import volseg_dask as vs
    import volseg_dask.prediction.run as run_mod
    from volseg_dask.config import Settings

    install_stub(spec["stub"], spec["plane_s"])

    def warm_up(client: Any) -> None:
        """One small prediction first: the model loads and the threads start outside the measured run."""
        warm = Path(spec["out"] + ".warm")
        vs.predict(spec["volume"], spec["model"], warm, settings, overwrite=True)
        shutil.rmtree(warm, ignore_errors=True)

    overrides = {"predict.axes": spec["axes"], "predict.chunks": [spec["block"]] * 3, "predict.halo": spec["halo"],
                 "predict.device": "auto" if spec.get("cluster") else "cpu"}
    if spec.get("batch"):
        overrides["predict.batch_size"] = spec["batch"]
    if spec.get("pipeline") and "pipeline" in Settings().predict.__dataclass_fields__:
        overrides["predict.pipeline"] = spec["pipeline"]
    settings = Settings().with_overrides(overrides)
    calls: list[tuple[float, float]] = []  # (wall, CPU seconds of this process) of each compute call
    real = run_mod.compute

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0, c0 = time.perf_counter(), os.times()
        try:
            return real(*args, **kwargs)
        finally:
            c1 = os.times()
            calls.append((time.perf_counter() - t0, c1.user - c0.user + c1.system - c0.system))

    run_mod.compute = timed
    out = Path(spec["out"])
    shutil.rmtree(out, ignore_errors=True)
    if spec.get("cluster"):
        from distributed import Client, LocalCluster, WorkerPlugin

        class Stub(WorkerPlugin):
            """Loads this file as a module in the worker (nothing of the parent's state is pickled)."""

            def __init__(self, path: str, stub: str | None, plane_s: float) -> None:
                self.path, self.stub, self.plane_s = path, stub, plane_s

            def setup(self, worker: Any) -> None:
                import importlib.util

                spec_ = importlib.util.spec_from_file_location("bench_pipeline_stub", self.path)
                assert spec_ is not None and spec_.loader is not None
                module = importlib.util.module_from_spec(spec_)
                sys.modules["bench_pipeline_stub"] = module
                spec_.loader.exec_module(module)
                module.install_stub(self.stub, self.plane_s)

        def state() -> dict[str, Any]:
            return dict(sys.modules["bench_pipeline_stub"].STATE)

        try:  # the workers' dask config the package's own clusters use, where the code has one
            from volseg_dask.cluster import WORKER_CONFIG
        except ImportError:
            WORKER_CONFIG = {}
        with dask.config.set(WORKER_CONFIG), LocalCluster(n_workers=1, threads_per_worker=spec["threads"],
                                                          processes=True, resources={"GPU": 1},
                                                          dashboard_address=":0") as cluster, Client(cluster) as client:
            client.register_plugin(Stub(str(Path(__file__).resolve()), spec["stub"], spec["plane_s"]))
            warm_up(client)
            calls.clear()
            before = client.run(state)
            usage0 = os.times()
            result = vs.predict(spec["volume"], spec["model"], out, settings, overwrite=True)
            usage1 = os.times()
            device = {k: {f: v[f] - before[k][f] for f in v} for k, v in client.run(state).items()}
        device_s = sum(d["device_s"] for d in device.values())
        planes = sum(d["planes"] for d in device.values())
    else:
        with dask.config.set(scheduler="threads", num_workers=spec["threads"]):
            warm_up(None)
            calls.clear()
            before = dict(STATE)
            usage0 = os.times()
            result = vs.predict(spec["volume"], spec["model"], out, settings, overwrite=True)
            usage1 = os.times()
        device_s, planes = STATE["device_s"] - before["device_s"], STATE["planes"] - before["planes"]
    shutil.rmtree(out, ignore_errors=True)
    cpu_predict = (usage1.user - usage0.user) + (usage1.system - usage0.system)
    tasks_s, cpu = calls[0]  # the first compute of predict() is its task graph (the merge's is in merging.py)
    mvox_axes = result.voxels * len(spec["axes"]) / 1e6
    return {"tasks_s": tasks_s, "seconds": result.seconds, "cpu_s": cpu, "cpu_s_per_mvox_axis": cpu / mvox_axes,
            "cpu_s_predict": cpu_predict,
            "device_s": device_s, "planes": planes, "busy": device_s / tasks_s if tasks_s else 0.0,
            "planes_per_s": planes / tasks_s if tasks_s else 0.0, "mvox_axes": mvox_axes}


# ---- the parent ------------------------------------------------------------------------------------


def _worktree(rev: str, work: Path) -> Path:
    path = work / f"baseline-{rev}"
    if not (path / "volseg_dask").is_dir():
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(path), rev], check=True,
                       capture_output=True)
    return path


def _run(code: Path, spec: dict[str, Any]) -> dict[str, Any]:
    from benchmarks._common import run_measured

    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(code)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    res = run_measured(cmd, env=env, cwd=code, timeout=3600)
    if res["returncode"] != 0:
        raise SystemExit(f"child failed ({res['returncode']}):\n{res['output'][-4000:]}")
    last = [line for line in res["output"].splitlines() if line.startswith("{")][-1]
    return {"peak_rss_mb": res["peak_rss_mb"], **json.loads(last)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--baseline", default=BASELINE, help="git revision of 'today's code'")
    parser.add_argument("--shape", default="256,512,512", help="Z,Y,X of the volume")
    parser.add_argument("--sim-shape", default="256,1024,1024",
                        help="Z,Y,X of the volume of the simulated-device part (16 blocks: a real volume has "
                        "hundreds, so the first read, which nothing can overlap, weighs little)")
    parser.add_argument("--more-threads", type=int, nargs="*", default=[4],
                        help="extra thread counts for the new code in the simulated-device part")
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--halo", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=SETUPS,
                        help="set-ups of the simulated-device part (the summary's goal needs local and cluster)")
    parser.add_argument("--results-name", default="bench_pipeline", help="file name in benchmarks/results/")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return

    from benchmarks._common import default_workdir, median, table, write_results
    from benchmarks.bench_predict import make_model, make_volume

    shape = tuple(int(s) for s in args.shape.split(","))
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-", dir=args.workdir or default_workdir()))
    codes = {"today": _worktree(args.baseline, work), "new": REPO}
    volume = make_volume(work / "vol.zarr", shape)  # type: ignore[arg-type]
    tiny = make_model(work / "tiny.pt", "tiny")
    base = {"volume": str(volume), "model": str(tiny), "out": str(work / "out.zarr"), "axes": "zyx",
            "block": args.block, "halo": args.halo, "batch": args.batch, "plane_s": 0.0}
    results: dict[str, Any] = {"shape": list(shape), "baseline": args.baseline, "block": args.block,
                               "halo": args.halo, "batch": args.batch, "threads": args.threads}
    summary: list[str] = []

    def both(spec: dict[str, Any], new_extra: dict[str, Any] | None = None) -> dict[str, list[dict[str, Any]]]:
        runs: dict[str, list[dict[str, Any]]] = {"today": [], "new": []}
        for r in range(args.repeats):
            order = ("today", "new") if r % 2 == 0 else ("new", "today")
            for name in order:
                runs[name].append(_run(codes[name], {**spec, **(new_extra or {} if name == "new" else {})}))
        return runs

    if "cpu" in args.parts:
        rows = []
        for stub in ("device", "forward"):
            runs = both({**base, "stub": stub, "threads": args.threads},
                        {"pipeline": "device-thread"} if stub == "device" else None)
            row: dict[str, Any] = {"stub": stub}
            for name in ("today", "new"):
                row[f"{name}_cpu_s_per_mvox_axis"] = median([r["cpu_s_per_mvox_axis"] for r in runs[name]])
                row[f"{name}_tasks_s"] = median([r["tasks_s"] for r in runs[name]])
            row["ratio_new_today"] = row["new_cpu_s_per_mvox_axis"] / row["today_cpu_s_per_mvox_axis"]
            row["runs"] = runs
            rows.append(row)
        results["cpu"] = rows
        print("\n(cpu) CPU-seconds per Mvoxel-axis of the prediction tasks, device work stubbed "
              f"({args.threads} threads, median of {args.repeats})")
        print(table(rows, ["stub", "today_cpu_s_per_mvox_axis", "new_cpu_s_per_mvox_axis", "ratio_new_today",
                           "today_tasks_s", "new_tasks_s"]))
        dev = rows[0]["ratio_new_today"]
        summary.append(f"CPU-side cost (device stubbed) new/today = {dev:.2f} (goal <= 0.5: "
                       f"{'PASS' if dev <= 0.5 else 'FAIL'})")
        if len(rows) > 1:
            summary.append(f"CPU cost with only the forward stubbed new/today = {rows[1]['ratio_new_today']:.2f}")
    if "sim" in args.parts:
        rows = []
        sim_base = base
        if args.sim_shape != args.shape:
            sim_shape = tuple(int(s) for s in args.sim_shape.split(","))
            sim_base = {**base, "volume": str(make_volume(work / "vol-sim.zarr", sim_shape))}  # type: ignore[arg-type]
        setups = [("local, 1 thread", 1, False)] if "local1" in args.setups else []
        setups += [(f"local, {args.threads} threads", args.threads, False)] if "local" in args.setups else []
        setups += ([(f"LocalCluster 1 worker x {args.threads} threads, GPU=1", args.threads, True)]
                   if "cluster" in args.setups else [])
        setups += [(f"local, {n} threads", n, False) for n in args.more_threads] if "more" in args.setups else []
        for label, threads, cluster in setups:
            row: dict[str, Any] = {"setup": label}
            names = ("new",) if threads in args.more_threads else ("today", "new")
            setup_spec = {**sim_base, "stub": "device", "threads": threads, "cluster": cluster}
            # this set-up's own CPU-side rate (the device free), the one a perfect overlap keeps busy
            setup_rates: dict[str, float] = {}
            for name in names:
                free = [_run(codes[name], {**setup_spec, "plane_s": 0.0, **PIPELINE[name]})
                        for _ in range(args.repeats)]
                setup_rates[name] = median([r["planes_per_s"] for r in free])
                row[f"{name}_cpu_side_planes_per_s"] = setup_rates[name]
                row[f"{name}_free_runs"] = free
            for name, calibration in (("today", "today"), ("new", "new"), ("new_at_today_rate", "today")):
                if calibration not in setup_rates:
                    continue
                plane_s = 1.0 / (0.7 * setup_rates[calibration])  # the device at 70 % of a CPU-side rate
                which = "today" if name == "today" else "new"
                specs = {**setup_spec, "plane_s": plane_s, **PIPELINE[which]}
                runs = [_run(codes[which], specs) for _ in range(args.repeats)]
                row[f"{name}_busy"] = median([r["busy"] for r in runs])
                row[f"{name}_plane_ms"] = plane_s * 1e3
                row[f"{name}_runs"] = runs
            rows.append(row)
        results["sim"] = {"shape": args.sim_shape, "rows": rows}
        print(f"\n(sim) device-busy fraction on {args.sim_shape}: the simulated device at 70 % of each code's "
              f"CPU-side rate in the same set-up, and the new code with today's device (median of {args.repeats})")
        print(table(rows, ["setup", "today_busy", "new_busy", "new_at_today_rate_busy", "today_cpu_side_planes_per_s",
                           "new_cpu_side_planes_per_s", "today_plane_ms", "new_plane_ms"]))
        # the goal is for the set-ups with --threads threads: 1 thread cannot feed a device at 70 % of 2 cores
        two = [r for r in rows if r["setup"].startswith((f"local, {args.threads} ", "LocalCluster"))]
        for r in rows:
            if "today_busy" in r:
                summary.append(f"device busy, {r['setup']}: new {r['new_busy']:.2f}, today {r['today_busy']:.2f}")
        if two:
            worst = min(r["new_busy"] for r in two)
            summary.append(f"goal new >= 0.85 with {args.threads} threads: {'PASS' if worst >= 0.85 else 'FAIL'}")
        if len(two) == 2:
            local, cluster = (r["new_cpu_side_planes_per_s"] for r in two)
            summary.append(f"CPU-side rate of the new code, LocalCluster worker / local scheduler ({args.threads} "
                           f"threads, device free) = {cluster / local:.2f}")
    if "e2e" in args.parts:
        demo = make_model(work / "demo.pt", "demo")
        runs = both({**base, "model": str(demo), "stub": None, "threads": args.threads, "batch": None})
        row = {name: median([r["seconds"] for r in runs[name]]) for name in ("today", "new")}
        row["speed_new_today"] = row["today"] / row["new"]
        row["peak_rss_mb_today"] = median([r["peak_rss_mb"] for r in runs["today"]])
        row["peak_rss_mb_new"] = median([r["peak_rss_mb"] for r in runs["new"]])
        results["e2e"] = {**row, "runs": runs}
        print(f"\n(e2e) demo network on the CPU, predict() seconds (median of {args.repeats})")
        print(table([row], ["today", "new", "speed_new_today", "peak_rss_mb_today", "peak_rss_mb_new"]))
        summary.append(f"CPU end to end (demo network) speed new/today = {row['speed_new_today']:.2f} (goal >= 0.97: "
                       f"{'PASS' if row['speed_new_today'] >= 0.97 else 'FAIL'})")
    print("\n" + "\n".join(summary))
    results["summary"] = summary
    if not args.no_save:
        write_results(args.results_name, results)
    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(codes["today"])],
                   capture_output=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
