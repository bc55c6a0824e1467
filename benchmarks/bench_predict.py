"""Prediction throughput and peak memory of ``volseg_dask.predict`` against the raw model on the same planes.

Parts (``--parts``, default all):

``throughput`` (a)
    On one volume (default 256 × 512 × 512 uint8, four 256³ blocks, halo 32, batch 4) the pipeline
    predicts along z, y and x separately and along all three (``zyx``, merge and pyramids
    included). Each run is compared with the *raw* model on the same planes, defined as: the same
    model object (``inference.get_model``: ``channels_last``, ``inference_mode``), the planes already
    normalised to float32 and held in memory, fed batch by batch (same batch size) to the forward pass
    only (no softmax, no uint8, no dask, no zarr), with the same CPU budget as the pipeline's two dask
    threads × one torch thread each: a pool of 2 Python threads each running the model with 1 torch
    thread (``pool``), and also one caller with 2 torch intra-op threads (``intra``). Two sets of planes:

    ``whole``: the volume's own planes, once each (what an ideal tool computes), and
    ``halo``: exactly the halo'd tiles the pipeline feeds ((block + 2·halo)² per plane per block,
    read by the same mirrored read), so pipeline / raw-halo is the pure dask + zarr + I/O +
    normalise/softmax/uint8 overhead, while pipeline / raw-whole also pays the halo recomputation,
    (1 + 2·halo/block)² in pixels (1.5625 at 256/32).

    The pipeline's time is that of its task graph (``compute`` of the per-block tasks, model
    already loaded and warmed up in the process, as the raw side is); the end-to-end time of
    ``predict()`` (plan, arrays, tasks, merge, pyramid) is reported beside it. Ratios are taken
    within a repeat (runs back to back, alternating order) and their median reported; CPU-time
    ratios (user + system of the child) are less sensitive to other load on a shared machine.
``profile``
    One task per axis taken apart with the same calls the task makes (read with halo, gather +
    normalise, forward, softmax + crop, uint8, reorder, zarr write), in one thread with one torch
    thread, plus the real task's time for the same block.
``memory`` (b)
    Peak RSS of the whole process tree of ``predict`` (same settings) at 256³, 512³ and 768³ (3 axes) and
    at 1024³ (1.07 Gvoxel; one axis, z, to bound the time) with 256³ along z beside it.
``sweep`` (c)
    Throughput and peak RSS along z vs block size (64, 128, 256; halo 32) and batch size (2, 4, 8,
    16), and a fused vs per-axis row (3 axes: time, peak RSS, bytes written).

Every measured run is its own child process (``run_measured``: wall time and peak RSS of the child's
process tree polled every 20 ms; the child reports its kernel high-water mark ``VmHWM`` and its own
timings). The pipeline runs on dask's threaded scheduler with ``--threads`` threads (default 2, the
cores here) and one torch thread per dask thread (the package default). The cheap model is a Unet
with the demo's encoder family at a third of its width and three stages (``tu-mobilenetv3_small_050``,
depth 3, decoder 8/4/2, random weights); ``--models tiny demo`` adds the demo's own network
(``volseg_dask/demo_settings.yaml``: ``tu-mobilenetv3_small_100``, 5 stages, decoder 128..16), about 6×
costlier per pixel, for the throughput part. A cheap model is the hard case for the overhead ratio
(fixed per-voxel costs weigh more). Run from the repository root::

    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python -m benchmarks.bench_predict
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
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
PARTS = ("throughput", "profile", "memory", "sweep")
GOAL_RATIO = 0.85
GOAL_RSS_RATIO = 1.3
MODELS: dict[str, dict[str, Any]] = {
    "tiny": {"architecture": "Unet", "encoder": "tu-mobilenetv3_small_050", "encoder_depth": 3,
             "decoder_channels": [8, 4, 2]},
    "demo": {},  # filled from volseg_dask/demo_settings.yaml
}


# ---- inputs ---------------------------------------------------------------------------------------


def make_model(path: Path, kind: str, seed: int = 0) -> Path:
    """A random-weight model file of the given kind, normalisation for uint8 input (0..255)."""
    import torch
    import yaml

    from volseg_dask.config import ModelSettings
    from volseg_dask.models import ModelMeta, build_model, pad_multiple, save_model
    from volseg_dask.normalize import Normalization

    spec = dict(MODELS[kind])
    if kind == "demo":
        raw = yaml.safe_load((REPO / "volseg_dask" / "demo_settings.yaml").read_text())
        spec = dict(raw["model"])
    settings = ModelSettings(**spec)
    torch.manual_seed(seed)
    model = build_model(settings, classes=3)
    meta = ModelMeta(model=settings, label_values=(0, 1, 2), normalization=Normalization(0.0, 255.0),
                     pad_multiple=pad_multiple(model, settings))
    return save_model(path, model.eval(), meta)


def make_volume(path: Path, shape: tuple[int, int, int], seed: int = 0) -> Path:
    """A CT-like uint8 volume (a few grey phases, shading, noise) as Zarr v3 via ``io.convert`` (128³ chunks)."""
    from volseg_dask.io import convert

    npy = path.with_suffix(".npy")
    out = np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=shape)
    rng = np.random.default_rng(seed)
    y = np.arange(shape[1], dtype=np.float32)[:, None]
    x = np.arange(shape[2], dtype=np.float32)[None, :]
    step = 16
    for z0 in range(0, shape[0], step):
        z = np.arange(z0, min(shape[0], z0 + step), dtype=np.float32)[:, None, None]
        phase = np.sin(z / 23.0) * np.cos(y / 31.0) + np.sin((x + y) / 37.0)
        grey = np.where(phase > 0.6, 170.0, np.where(phase < -0.7, 40.0, 110.0)).astype(np.float32)
        grey += 12.0 * np.cos((x - y + z) / 180.0)
        grey += rng.normal(0.0, 6.0, grey.shape).astype(np.float32)
        out[z0:z0 + step] = np.clip(grey, 0, 255).astype(np.uint8)
    out.flush()
    del out
    convert(npy, path, chunks=128, codec="zstd", clevel=5, overwrite=True)
    npy.unlink()
    return path


# ---- child helpers --------------------------------------------------------------------------------


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20





def _warm_model(model_path: str, threads: int, batch: int, side: int) -> None:
    """Load the model into the process cache and run one batch, under the pipeline's thread settings."""
    import dask
    import torch

    from volseg_dask.device import select_device
    from volseg_dask.prediction.inference import get_model, predict_planes, set_torch_threads

    with dask.config.set(scheduler="threads", num_workers=threads):
        set_torch_threads(None)
    model, _ = get_model(model_path, select_device("cpu"))
    planes = np.zeros((batch, 1, side, side), np.float32)
    predict_planes(model, planes, device=torch.device("cpu"), batch_size=batch)


class _Timer:
    """Wraps a module-level function and adds up the wall and CPU seconds of its calls."""

    def __init__(self, module: Any, name: str) -> None:
        self.seconds = 0.0
        self.cpu = 0.0
        self.calls = 0
        original = getattr(module, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            t0, c0 = time.perf_counter(), cpu_seconds()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.cpu += cpu_seconds() - c0
                self.calls += 1

        setattr(module, name, wrapped)


def child_predict(spec: dict[str, Any]) -> dict[str, Any]:
    """One ``predict`` run; timings of its stages (task graph, merge, pyramid) and memory."""
    import dask

    import volseg_dask.ngff as ngff
    import volseg_dask.prediction.merging as merging
    import volseg_dask.prediction.run as prediction
    from volseg_dask.config import PredictSettings

    rss_imports = _rss_mb()
    settings = PredictSettings(axes=spec["axes"], chunks=[spec["block"]] * 3, halo=spec["halo"],
                               batch_size=spec["batch"], device="cpu", fused=spec.get("fused", False),
                               keep_probabilities=True)
    if spec.get("warm", True):
        _warm_model(spec["model"], spec["threads"], spec["batch"], spec["block"] + 2 * spec["halo"])
    rss_warm = _rss_mb()
    tasks = _Timer(prediction, "compute")
    merge = _Timer(merging, "compute")
    pyramid = _Timer(ngff, "compute")
    out = Path(spec["out"])
    with dask.config.set(scheduler="threads", num_workers=spec["threads"]):
        c0 = cpu_seconds()
        result = prediction.predict(spec["volume"], spec["model"], out, settings, overwrite=True)
        cpu = cpu_seconds() - c0
    written = disk_bytes(out)
    probs = disk_bytes(out / "probabilities") if (out / "probabilities").exists() else 0
    return {
        "seconds": result.seconds, "cpu_s": cpu, "tasks_s": tasks.seconds, "tasks_cpu_s": tasks.cpu,
        "merge_s": merge.seconds, "pyramid_s": pyramid.seconds, "blocks": result.blocks_computed,
        "voxels": result.voxels, "bytes_written": written, "probability_bytes": probs,
        "rss_after_imports_mb": rss_imports, "rss_after_warmup_mb": rss_warm, "vm_hwm_mb": vm_hwm_mb(),
    }


def _plan_blocks(spec: dict[str, Any]) -> tuple[Any, list[tuple[tuple[int, int], ...]]]:
    from volseg_dask.config import PredictSettings
    from volseg_dask.prediction import plan_prediction

    settings = PredictSettings(axes=spec["axis"], chunks=[spec["block"]] * 3, halo=spec["halo"],
                               batch_size=spec["batch"], device="cpu")
    plan = plan_prediction(spec["volume"], spec["model"], Path(spec["scratch"]) / "unused.zarr", settings)
    return plan, [plan.grid.block(i) for i in plan.grid.indices()]


def _task_read(plan: Any, block: tuple[tuple[int, int], ...], ax: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The block plus context exactly as the pipeline's per-axis task reads it, and that context."""
    from volseg_dask.prediction import tasks

    half = (plan.spec.n_slices - 1) // 2
    context = tasks.block_context(block, plan.grid.shape, plan.grid.halo, ax, half)
    return tasks.read_block(plan.volume, plan.grid, block, context), context


def _raw_planes(spec: dict[str, Any]) -> tuple[list[np.ndarray], int]:
    """Normalised float32 planes (N, 1, H, W) in memory: the volume's own planes or the pipeline's tiles."""
    from volseg_dask.grid import AXES
    from volseg_dask.normalize import apply
    from volseg_dask.prediction.reads import read_padded

    plan, blocks = _plan_blocks(spec)
    ax = AXES[spec["axis"]]
    batches: list[np.ndarray] = []
    if spec["planes"] == "whole":
        vol = read_padded(spec["volume"], [0, 0, 0], list(plan.grid.shape))
        planes = np.ascontiguousarray(np.moveaxis(apply(vol, plan.spec.normalization), ax, 0))[:, None]
        batches = [planes[s:s + spec["batch"]] for s in range(0, len(planes), spec["batch"])]
    else:
        for block in blocks:
            data, _ = _task_read(plan, block, ax)
            planes = np.ascontiguousarray(np.moveaxis(apply(data, plan.spec.normalization), ax, 0))[:, None]
            batches += [planes[s:s + spec["batch"]] for s in range(0, len(planes), spec["batch"])]
    return batches, int(np.prod(plan.grid.shape))


def child_raw(spec: dict[str, Any]) -> dict[str, Any]:
    """The model alone on in-memory planes: a pool of threads × 1 torch thread, or 1 caller × N torch threads."""
    import torch

    from volseg_dask.prediction.inference import _pad_to_multiple, get_model

    batches, voxels = _raw_planes(spec)
    device = torch.device("cpu")
    model, meta = get_model(spec["model"], device)
    multiple = meta.pad_multiple

    def run(batch: np.ndarray) -> int:
        with torch.inference_mode():
            x, _ = _pad_to_multiple(torch.from_numpy(batch), multiple)
            model(x.contiguous(memory_format=torch.channels_last))
        return batch.shape[0] * batch.shape[-1] * batch.shape[-2]

    threads = spec["threads"]
    if spec["mode"] == "pool":
        torch.set_num_threads(1)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, batches[:threads]))  # warm-up, as the pipeline's run is warmed up
            t0, c0 = time.perf_counter(), cpu_seconds()
            pixels = sum(pool.map(run, batches))
            seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    else:
        torch.set_num_threads(threads)
        run(batches[0])
        t0, c0 = time.perf_counter(), cpu_seconds()
        pixels = sum(run(b) for b in batches)
        seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return {"seconds": seconds, "cpu_s": cpu, "pixels": pixels, "voxels": voxels, "vm_hwm_mb": vm_hwm_mb()}


def child_profile(spec: dict[str, Any]) -> dict[str, Any]:
    """One block along one axis, taken apart stage by stage with the calls ``_axis_task`` makes."""
    import dask
    import torch
    import zarr

    from volseg_dask import outputs
    from volseg_dask.grid import AXES
    from volseg_dask.normalize import apply
    from volseg_dask.prediction.inference import _pad_to_multiple, get_model, to_uint8
    from volseg_dask.prediction.run import _create_arrays, _prepare_output, _tasks

    _warm_model(spec["model"], spec["threads"], spec["batch"], spec["block"] + 2 * spec["halo"])
    torch.set_num_threads(1)  # as in the pipeline's tasks: one torch thread (here in one thread only)
    plan, _ = _plan_blocks(spec)
    index = plan.grid.indices()[spec.get("block_index", 0)]
    block = plan.grid.block(index)
    ax = AXES[spec["axis"]]
    device = torch.device("cpu")
    model, meta = get_model(spec["model"], device)
    multiple = meta.pad_multiple
    t: dict[str, float] = dict.fromkeys(("read", "normalize", "forward", "softmax_crop", "uint8", "reorder",
                                         "write"), 0.0)
    clock = time.perf_counter
    c0, start = cpu_seconds(), clock()
    s0 = clock()
    data, context = _task_read(plan, block, ax)
    t["read"] += clock() - s0
    x = np.moveaxis(data, ax, 0)
    h, w = x.shape[1], x.shape[2]
    (pa, pb), (qa, qb) = (context[d] for d in range(3) if d != ax)
    out = np.empty((x.shape[0], plan.classes, h - pa - pb, w - qa - qb), np.uint8)
    with torch.inference_mode():
        for s in range(0, x.shape[0], spec["batch"]):
            s0 = clock()
            centre = np.arange(s, min(s + spec["batch"], x.shape[0]))[:, None]
            planes = apply(x[centre + np.zeros((1, 1), int)], plan.spec.normalization)  # the task's gather
            s1 = clock()
            xt, (hh, ww) = _pad_to_multiple(torch.from_numpy(np.ascontiguousarray(planes)), multiple)
            logits = model(xt.contiguous(memory_format=torch.channels_last))
            s2 = clock()
            probs = np.concatenate([torch.softmax(logits.float(), dim=1)[..., :hh, :ww].cpu().numpy()])
            s3 = clock()
            out[s:s + len(planes)] = to_uint8(probs[:, :, pa:h - pb, qa:w - qb])
            s4 = clock()
            t["normalize"] += s1 - s0
            t["forward"] += s2 - s1
            t["softmax_crop"] += s3 - s2
            t["uint8"] += s4 - s3
    s0 = clock()
    result = np.ascontiguousarray(np.moveaxis(out, 0, ax + 1))
    t["reorder"] += clock() - s0
    scratch = Path(spec["scratch"]) / f"profile-{spec['axis']}.zarr"
    shutil.rmtree(scratch, ignore_errors=True)
    arr = outputs.create_array(zarr.open_group(str(scratch), mode="w", zarr_format=3), name="p",
                               shape=(plan.classes, *plan.grid.shape), dtype=np.uint8,
                               chunks=(plan.classes, *plan.grid.chunks), codec=plan.settings.probability_codec,
                               clevel=5)
    arr = arr.with_config({"write_empty_chunks": True})  # as the task writes (outputs.open_for_writing)
    s0 = clock()
    arr[(slice(None), *(slice(a, b) for a, b in block))] = result
    t["write"] += clock() - s0
    staged_s, staged_cpu = clock() - start, cpu_seconds() - c0
    # the real task on the same block (fresh output), for comparison with the sum of the stages
    out_dir = Path(spec["scratch"]) / f"profile-task-{spec['axis']}.zarr"
    shutil.rmtree(out_dir, ignore_errors=True)
    real_plan = dataclasses.replace(plan, output=out_dir)
    with dask.config.set(scheduler="synchronous"):
        group, _ = _prepare_output(real_plan, overwrite=True)
        _create_arrays(group, real_plan)
        task = _tasks(real_plan)[spec.get("block_index", 0)]  # the real per-axis task of this block
        s0 = clock()
        task.compute(scheduler="synchronous")
        task_s = clock() - s0
    voxels = int(np.prod([b - a for a, b in block]))
    return {"stages_s": t, "staged_total_s": staged_s, "staged_cpu_s": staged_cpu, "task_s": task_s,
            "block": [list(b) for b in block], "voxels": voxels, "tile": [h, w]}


CHILDREN = {"predict": child_predict, "raw": child_raw, "profile": child_profile}


# ---- driver ---------------------------------------------------------------------------------------





def _run(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return run_child("bench_predict", ["--child", kind, "--spec", json.dumps(spec)], timeout=7200)


def _edge_text(shape: tuple[int, ...]) -> str:
    return f"{shape[0]}³" if len(set(shape)) == 1 else "×".join(map(str, shape))


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.volumes: dict[tuple[int, int, int], Path] = {}
        self.models: dict[str, Path] = {}
        self.inputs: dict[str, Any] = {}

    def volume(self, shape: tuple[int, int, int]) -> Path:
        if shape not in self.volumes:
            t0 = time.perf_counter()
            path = make_volume(self.work / f"vol-{'x'.join(map(str, shape))}.zarr", shape)
            self.inputs[_edge_text(shape)] = {"shape": list(shape), "generate_s": time.perf_counter() - t0,
                                              "stored_mb": disk_bytes(path) / 2**20}
            print(f"input {_edge_text(shape)} written in {time.perf_counter() - t0:.1f} s", flush=True)
            self.volumes[shape] = path
        return self.volumes[shape]

    def model(self, kind: str) -> Path:
        if kind not in self.models:
            self.models[kind] = make_model(self.work / f"{kind}.pt", kind)
        return self.models[kind]

    def predict(self, shape: tuple[int, int, int], model: str, axes: str, *, block: int = 256, halo: int = 32,
                batch: int = 4, fused: bool = False, keep: bool = False) -> dict[str, Any]:
        out = self.work / "out.zarr"
        spec = {"volume": str(self.volume(shape)), "model": str(self.model(model)), "out": str(out),
                "axes": axes, "block": block, "halo": halo, "batch": batch, "fused": fused,
                "threads": self.args.threads}
        res = _run("predict", spec)
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
        return {"shape": _edge_text(shape), "model": model, "axes": axes, "block": block, "halo": halo,
                "batch": batch, "fused": fused, **res}

    def raw(self, shape: tuple[int, int, int], model: str, axis: str, planes: str, mode: str, *, block: int = 256,
            halo: int = 32, batch: int = 4) -> dict[str, Any]:
        spec = {"volume": str(self.volume(shape)), "model": str(self.model(model)), "axis": axis, "planes": planes,
                "mode": mode, "block": block, "halo": halo, "batch": batch, "threads": self.args.threads,
                "scratch": str(self.work)}
        return {"shape": _edge_text(shape), "model": model, "axis": axis, "planes": planes, "mode": mode,
                "block": block, "halo": halo, "batch": batch, **_run("raw", spec)}


def _shape(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.lower().replace("x", ",").split(",")]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r}: give N or Z,Y,X")
    return parts[0], parts[1], parts[2]


RAW_KINDS = (("whole", "pool"), ("halo", "pool"), ("whole", "intra"), ("halo", "intra"))


def part_throughput(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    shape = args.throughput_shape
    runs: list[dict[str, Any]] = []
    for model in args.models:
        axes_list = ["z", "y", "x", "zyx"] if model == "tiny" else ["z"]
        for r in range(args.repeats):
            for axes in axes_list:
                kinds: list[tuple[str, str] | None] = [None, *(RAW_KINDS if len(axes) == 1 else ())]
                if r % 2:
                    kinds.reverse()
                for kind in kinds:
                    if kind is None:
                        run = bench.predict(shape, model, axes)
                        run.update(kind="pipeline", repeat=r)
                        print(f"  {model} {axes:3s} pipeline  #{r}: tasks {run['tasks_s']:6.2f} s "
                              f"(cpu {run['tasks_cpu_s']:6.2f})  end-to-end {run['seconds']:6.2f} s  "
                              f"merge {run['merge_s']:.2f}  pyramid {run['pyramid_s']:.2f}  "
                              f"peak {run['peak_rss_mb']:.0f} MB", flush=True)
                    else:
                        run = bench.raw(shape, model, axes, *kind)
                        run.update(kind=f"raw_{kind[0]}_{kind[1]}", repeat=r)
                        print(f"  {model} {axes:3s} raw {kind[0]:5s} {kind[1]:5s} #{r}: {run['seconds']:6.2f} s "
                              f"(cpu {run['cpu_s']:6.2f})", flush=True)
                    runs.append(run)
    rows: list[dict[str, Any]] = []
    voxels = int(np.prod(shape))
    for model in args.models:
        for axes in ("z", "y", "x", "zyx"):
            pipe = [r for r in runs if r["model"] == model and r["axes" if "axes" in r else "axis"] == axes
                    and r["kind"] == "pipeline"]
            if not pipe:
                continue
            row: dict[str, Any] = {
                "model": model, "axes": axes, "runs": len(pipe),
                "tasks_s": median([p["tasks_s"] for p in pipe]),
                "pipeline_mvox_s": median([voxels * len(axes) / p["tasks_s"] / 1e6 for p in pipe]),
                "end_to_end_s": median([p["seconds"] for p in pipe]),
                "end_to_end_mvox_s": median([voxels / p["seconds"] / 1e6 for p in pipe]),
                "merge_s": median([p["merge_s"] for p in pipe]),
                "pyramid_s": median([p["pyramid_s"] for p in pipe]),
                "peak_rss_mb": median([p["peak_rss_mb"] for p in pipe]),
            }
            for planes, mode in RAW_KINDS:
                raw = {r["repeat"]: r for r in runs if r["model"] == model and r.get("axis") == axes
                       and r["kind"] == f"raw_{planes}_{mode}"}
                pairs = [(p, raw[p["repeat"]]) for p in pipe if p["repeat"] in raw]
                if not pairs:
                    continue
                row[f"raw_{planes}_{mode}_mvox_s"] = median([voxels / r["seconds"] / 1e6 for _, r in pairs])
                row[f"ratio_{planes}_{mode}"] = median([r["seconds"] / p["tasks_s"] for p, r in pairs])
                row[f"cpu_ratio_{planes}_{mode}"] = median([r["cpu_s"] / p["tasks_cpu_s"] for p, r in pairs])
            rows.append(row)
    return {"shape": list(shape), "voxels": voxels, "rows": rows, "runs": runs}


def part_profile(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    shape = args.throughput_shape
    rows = []
    for axis in "zyx":
        spec = {"volume": str(bench.volume(shape)), "model": str(bench.model("tiny")), "axis": axis, "block": 256,
                "halo": 32, "batch": 4, "scratch": str(bench.work), "block_index": 0, "threads": args.threads}
        res = _run("profile", spec)
        total = sum(res["stages_s"].values())
        row = {"axis": axis, "task_s": res["task_s"], "staged_total_s": total,
               **{f"{k}_s": v for k, v in res["stages_s"].items()},
               **{f"{k}_pct": 100 * v / total for k, v in res["stages_s"].items()}}
        rows.append(row)
        print("  profile " + axis + ": " + ", ".join(f"{k} {v:.2f} s" for k, v in res["stages_s"].items())
              + f"; real task {res['task_s']:.2f} s", flush=True)
    return {"shape": list(shape), "block": 256, "halo": 32, "batch": 4, "model": "tiny", "rows": rows}


def part_memory(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    cases = [(n, "zyx") for n in args.memory_sizes] + [(n, "z") for n in args.memory_single_axis_sizes]
    for n, axes in cases:
        run = bench.predict((n, n, n), "tiny", axes)
        rows.append(run)
        print(f"  {n}³ {axes:3s}: {run['seconds']:7.1f} s  peak RSS {run['peak_rss_mb']:6.0f} MB "
              f"(VmHWM {run['vm_hwm_mb']:.0f}, after imports {run['rss_after_imports_mb']:.0f}, "
              f"warm model {run['rss_after_warmup_mb']:.0f})  tasks {run['tasks_s']:.1f} s  merge "
              f"{run['merge_s']:.1f} s  pyramid {run['pyramid_s']:.1f} s", flush=True)
    criteria: dict[str, Any] = {}
    multi = {int(r["shape"].rstrip("³")): r for r in rows if r["axes"] == "zyx"}
    if len(multi) >= 2:
        lo, hi = min(multi), max(multi)
        ratio = multi[hi]["peak_rss_mb"] / multi[lo]["peak_rss_mb"]
        criteria = {"small": lo, "large": hi, "peak_rss_small_mb": multi[lo]["peak_rss_mb"],
                    "peak_rss_large_mb": multi[hi]["peak_rss_mb"], "ratio": ratio, "limit": GOAL_RSS_RATIO,
                    "pass": ratio <= GOAL_RSS_RATIO}
        # a 256³ volume is one 256³ block: its merge runs on one thread, every larger one on all of them
        several = [n for n in multi if n >= 2 * 256]
        if len(several) >= 2:
            a, b = min(several), max(several)
            criteria["several_blocks"] = {"small": a, "large": b,
                                          "ratio": multi[b]["peak_rss_mb"] / multi[a]["peak_rss_mb"]}
    return {"rows": rows, "criteria": criteria}


def part_sweep(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    shape = args.sweep_shape
    rows = []
    voxels = int(np.prod(shape))
    for block in args.blocks:
        for batch in args.batches:
            run = bench.predict(shape, "tiny", "z", block=block, batch=batch)
            run["mvox_s"] = voxels / run["tasks_s"] / 1e6
            rows.append(run)
            print(f"  block {block:4d} batch {batch:3d}: tasks {run['tasks_s']:6.2f} s  {run['mvox_s']:5.2f} Mvox/s  "
                  f"peak RSS {run['peak_rss_mb']:6.0f} MB", flush=True)
    fused_rows = []
    for fused in (False, True):
        run = bench.predict(args.throughput_shape, "tiny", "zyx", fused=fused)
        run["mvox_s"] = int(np.prod(args.throughput_shape)) / run["seconds"] / 1e6
        fused_rows.append(run)
        print(f"  {'fused' if fused else 'per-axis':8s} zyx: {run['seconds']:6.2f} s  peak RSS "
              f"{run['peak_rss_mb']:6.0f} MB  written {run['bytes_written'] / 2**20:7.1f} MB", flush=True)
    return {"shape": list(shape), "rows": rows, "fused_shape": list(args.throughput_shape), "fused_rows": fused_rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--models", nargs="+", default=["tiny"], choices=tuple(MODELS),
                        help="models for the throughput part (tiny: cheap; demo: the demo's network)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the throughput part")
    parser.add_argument("--results-name", default="bench_predict",
                        help="results/NAME.json (another name keeps the other parts' latest figures)")
    parser.add_argument("--threads", type=int, default=2, help="dask threads (and the raw side's CPU budget)")
    parser.add_argument("--throughput-shape", type=_shape, default=(256, 512, 512), help="N or Z,Y,X")
    parser.add_argument("--sweep-shape", type=_shape, default=(256, 512, 512), help="N or Z,Y,X")
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=[256, 512, 768], help="cubes, 3 axes")
    parser.add_argument("--memory-single-axis-sizes", type=int, nargs="*", default=[256, 1024],
                        help="cubes, axis z only")
    parser.add_argument("--blocks", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--child", choices=tuple(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(CHILDREN[args.child](json.loads(args.spec))), flush=True)
        return 0

    base = args.workdir or default_workdir()
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_predict-", dir=base))
    results: dict[str, Any] = {}
    t_start = time.perf_counter()
    bench = Bench(args, work)
    try:
        for part in args.parts:
            print(f"== {part}", flush=True)
            results[part] = {"throughput": part_throughput, "profile": part_profile, "memory": part_memory,
                             "sweep": part_sweep}[part](bench, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["total_wall_s"] = time.perf_counter() - t_start
    verdict = report(results)
    if not args.no_save:
        write_results(args.results_name, {
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
                         if k not in ("child", "spec", "workdir", "no_save", "results_name")},
            "models": {k: (v or "volseg_dask/demo_settings.yaml model section") for k, v in MODELS.items()},
            "definitions": {
                "pipeline": "volseg_dask.predict, dask threaded scheduler with --threads threads, 1 torch thread "
                            "per dask thread; time of the per-block task graph (model loaded and warmed up before), "
                            "end-to-end = the whole predict() call",
                "raw": "same model object, normalised float32 planes in memory, forward pass only, same batch "
                       "size; pool = --threads Python threads x 1 torch thread; intra = 1 caller x --threads "
                       "torch threads; whole = the volume's planes once; halo = the pipeline's halo'd tiles",
                "ratio": "raw seconds / pipeline task seconds in the same repeat (1.0 = no overhead), median",
            },
            "inputs": bench.inputs,
            "verdict": verdict,
            **results,
        })
    return 0


def report(results: dict[str, Any]) -> list[str]:
    verdict: list[str] = []
    if "throughput" in results:
        print()
        print(f"(a) throughput on {_edge_text(tuple(results['throughput']['shape']))} (block 256, halo 32, batch 4)")
        rows = results["throughput"]["rows"]
        print(table(rows, ["model", "axes", "runs", "tasks_s", "pipeline_mvox_s", "end_to_end_mvox_s",
                           "raw_whole_pool_mvox_s", "raw_halo_pool_mvox_s", "raw_whole_intra_mvox_s",
                           "ratio_whole_pool", "ratio_halo_pool", "ratio_whole_intra", "ratio_halo_intra",
                           "cpu_ratio_whole_pool", "cpu_ratio_halo_pool"]))
        for row in rows:
            if "ratio_whole_pool" in row:
                for key, what in (("ratio_whole_pool", "whole planes"), ("ratio_halo_pool", "halo'd tiles")):
                    ok = row[key] >= GOAL_RATIO
                    verdict.append(f"{row['model']} axis {row['axes']}: pipeline / raw on {what} = {row[key]:.2f} "
                                   f"({'meets' if ok else 'misses'} the {GOAL_RATIO} goal)")
    if "profile" in results:
        print()
        print("profile of one 256³ task (halo 32, batch 4, tiny model, 1 thread)")
        print(table(results["profile"]["rows"], ["axis", "task_s", "staged_total_s", "read_pct", "normalize_pct",
                                                 "forward_pct", "softmax_crop_pct", "uint8_pct", "reorder_pct",
                                                 "write_pct"]))
    if "memory" in results:
        print()
        print("(b) peak RSS vs volume size (block 256, halo 32, batch 4, tiny model)")
        print(table(results["memory"]["rows"], ["shape", "axes", "seconds", "tasks_s", "merge_s", "pyramid_s",
                                                "peak_rss_mb", "vm_hwm_mb", "rss_after_warmup_mb"]))
        c = results["memory"]["criteria"]
        if c:
            verdict.append(f"peak RSS {c['large']}³ / {c['small']}³ (3 axes) = {c['peak_rss_large_mb']:.0f} / "
                           f"{c['peak_rss_small_mb']:.0f} MB = {c['ratio']:.2f} "
                           f"({'PASS' if c['pass'] else 'FAIL'}: limit {c['limit']})")
            if "several_blocks" in c:
                m = c["several_blocks"]
                verdict.append(f"peak RSS {m['large']}³ / {m['small']}³ (both several blocks per thread) = "
                               f"{m['ratio']:.2f}")
    if "sweep" in results:
        print()
        print(f"(c) block and batch size along z on {_edge_text(tuple(results['sweep']['shape']))} (halo 32)")
        print(table(results["sweep"]["rows"], ["block", "batch", "tasks_s", "mvox_s", "peak_rss_mb", "vm_hwm_mb"]))
        print()
        print("fused vs per-axis (3 axes, merge and pyramids included)")
        print(table(results["sweep"]["fused_rows"], ["fused", "seconds", "mvox_s", "tasks_s", "merge_s",
                                                      "pyramid_s", "peak_rss_mb", "bytes_written",
                                                      "probability_bytes"]))
    print()
    for line in verdict:
        print(line)
    return verdict


if __name__ == "__main__":
    sys.exit(main())
