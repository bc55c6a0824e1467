"""The GPU check: one prepared run on a GPU machine (at most ~8 minutes), or a dry run on the CPU.

What it measures, in order (each stage is skipped, and says so, once the time budget is spent):

1. ``train``: the demo network (``volseg_dask/demo_settings.yaml``) trained on the GPU for ``--train-s``
   seconds on a labelled 128³ synthetic volume (so the labels compared below come from a network that has
   learned something; a random one sits on ties that float16 flips).
2. ``agreement``: a 256³ unseen synthetic volume predicted along z, y, x (max merge) on CUDA (defaults:
   float16 autocast, auto batch, device thread) and on the CPU: share of equal labels (goal >= 99.9 %),
   per-class Dice of both against the ground truth.
3. ``raw``: the bare forward pass of the demo network and of a resnet34 U-Net on planes already on the GPU
   (320², the tile of a 256³ block with its 32-voxel halo), batch 8 / 16 / 32 / auto, float16 autocast and
   float32: Mvoxel/s and peak GPU memory.
4. ``pipeline``: ``predict`` of a ``--shape`` volume (uint8, 128³ chunks) along z at batch 8 / 16 / 32 /
   auto (float16), along y and x at auto, float32 at auto, and all three axes at auto: Mvoxel/s per axis
   (of the task graph, the merge apart), pipeline / raw, peak GPU memory and peak host RSS, for both networks;
   ``--compile`` adds a ``torch.compile`` row.
5. ``projection``: the time for 2520 × 2520 × 2120 × 3 axes from the measured per-axis rates (tasks, then
   the merge at the rate measured here).

Results go to ``benchmarks/results/gpu_check.json`` (``--dry``: ``gpu_check_dry.json``, or nowhere with
``--no-save``). On the GPU machine (no package registry; see ``../shared/tools/device-wheels``)::

    python3 -m pip install -q --no-index --no-deps .device-wheels/*.whl
    PYTHONPATH=. python3 -m benchmarks.gpu_check

``--dry`` runs every stage on the CPU at toy sizes in well under a minute (the test suite does, so the
script cannot rot).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TARGET = (2120, 2520, 2520)
NETWORKS = {
    "demo": None,  # from volseg_dask/demo_settings.yaml
    "resnet34_unet": {"architecture": "Unet", "encoder": "resnet34"},
    "tiny": {"architecture": "Unet", "encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [16, 8, 4]},
}


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


class RssPeak:
    """Peak resident set of this process while the block runs (polled every 20 ms)."""

    def __enter__(self) -> RssPeak:
        import psutil

        self.peak = 0.0
        self._stop = threading.Event()
        proc = psutil.Process()

        def poll() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, proc.memory_info().rss / 2**20)
                time.sleep(0.02)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _gpu_peak_reset(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _gpu_peak_mb(device: Any) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def model_file(path: Path, kind: str) -> Path:
    """A random-weight model file of ``kind`` (normalisation for uint8 input)."""
    import torch

    from volseg_dask.config import ModelSettings
    from volseg_dask.demo import demo_settings
    from volseg_dask.models import ModelMeta, build_model, pad_multiple, save_model
    from volseg_dask.normalize import Normalization

    settings = demo_settings().model if NETWORKS[kind] is None else ModelSettings(**NETWORKS[kind])
    torch.manual_seed(0)
    model = build_model(settings, classes=3)
    meta = ModelMeta(model=settings, label_values=(0, 1, 2), normalization=Normalization(0.0, 255.0),
                     pad_multiple=pad_multiple(model, settings))
    return save_model(path, model.eval(), meta)


def stage_train(work: Path, args: argparse.Namespace, device: str) -> dict[str, Any]:
    from volseg_dask.demo import demo_settings
    from volseg_dask.synthetic import write_demo_data
    from volseg_dask.training import train

    size = 48 if args.dry else 128
    image, labels = write_demo_data(work / "train", size, 0, chunks=64, overwrite=True)
    settings = demo_settings().with_overrides({"train.max_minutes": args.train_s / 60, "train.device": device,
                                               "train.torch_threads": None})
    if args.dry:
        settings = settings.with_overrides({"model.encoder": "resnet18", "model.encoder_depth": 3,
                                            "model.decoder_channels": [16, 8, 4], "data.image_size": 32,
                                            "train.epochs": 1, "train.samples_per_epoch": 8,
                                            "train.learning_rate": 1e-3})
    t0 = time.perf_counter()
    fit = train([(image, labels)], work / "demo.pt", settings, overwrite=True)
    return {"model": str(fit.model_path), "seconds": time.perf_counter() - t0, "epochs": fit.epochs_run,
            "val_dice": fit.val_dice, "stop_reason": fit.stop_reason}


def _predict(volume: Path, model: Path, out: Path, threads: int, **predict: Any) -> dict[str, Any]:
    import dask

    import volseg_dask.prediction.run as run_mod
    from volseg_dask.config import Settings

    settings = Settings().with_overrides({f"predict.{k}": v for k, v in predict.items()})
    calls: list[float] = []
    real = run_mod.compute

    def timed(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            calls.append(time.perf_counter() - t0)

    run_mod.compute = timed
    try:
        with dask.config.set(scheduler="threads", num_workers=threads), RssPeak() as rss:
            result = run_mod.predict(volume, model, out, settings, overwrite=True)
    finally:
        run_mod.compute = real
    tasks_s = calls[0]
    return {"seconds": result.seconds, "tasks_s": tasks_s, "merge_s": result.seconds - tasks_s,
            "mvox_per_s_per_axis": result.voxels * len(result.axes) / tasks_s / 1e6, "host_rss_peak_mb": rss.peak,
            "voxels": result.voxels, "axes": result.axes}


def stage_agreement(work: Path, args: argparse.Namespace, model: Path, device: Any) -> dict[str, Any]:
    import zarr

    from volseg_dask.metrics import evaluate
    from volseg_dask.synthetic import write_demo_data

    size = 48 if args.dry else 256
    image, truth = write_demo_data(work / "unseen", size, 1, chunks=128, overwrite=True)
    common = {"chunks": [128 if args.dry else 256] * 3, "halo": 8 if args.dry else 32}
    _gpu_peak_reset(device)
    # dry: the CPU through the device thread (the GPU's path) against the CPU inline
    gpu = _predict(image, model, work / "gpu.zarr", args.threads, device=str(device),
                   **({"pipeline": "device-thread"} if args.dry else {}), **common)
    gpu["gpu_peak_mb"] = _gpu_peak_mb(device)
    cpu = _predict(image, model, work / "cpu.zarr", os.cpu_count() or 1, device="cpu", **common)
    a = zarr.open_array(str(work / "gpu.zarr" / "labels" / "0"), mode="r")[...]
    b = zarr.open_array(str(work / "cpu.zarr" / "labels" / "0"), mode="r")[...]
    equal = float(np.mean(a == b))
    scores = {name: evaluate(work / f"{name}.zarr" / "labels", truth).dice for name in ("gpu", "cpu")}
    return {"size": size, "labels_equal": equal, "goal": 0.999, "pass": equal >= 0.999, "dice": scores,
            "gpu": gpu, "cpu": cpu}


def stage_raw(model_path: Path, device: Any, args: argparse.Namespace, batches: list[int | str]) -> list[dict]:
    import torch

    from volseg_dask.device import autocast
    from volseg_dask.prediction.inference import SlabSpec, get_engine

    spec = SlabSpec(model_path=str(model_path), normalization=_norm(), device=str(device))
    engine = get_engine(spec)
    side = 64 if args.dry else 320
    rows = []
    for amp in (True, False):
        for batch in batches if amp else ["auto"]:
            b = engine.batch_size(SlabSpec(**{**spec.__dict__, "amp": amp, "batch_size": None
                                              if batch == "auto" else int(batch)}), 1, side, side)
            x = torch.randn(b, 1, side, side, device=device).contiguous(memory_format=torch.channels_last)
            _gpu_peak_reset(device)
            with torch.inference_mode(), autocast(device, amp):
                engine.model(x)  # warm-up (cudnn.benchmark picks its kernels here)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                reps, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < (0.5 if args.dry else 3.0) or reps < 3:
                    engine.model(x)
                    reps += 1
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - t0
            rows.append({"amp": amp, "batch": batch, "planes": b, "mvox_per_s": reps * b * side * side / seconds / 1e6,
                         "gpu_peak_mb": _gpu_peak_mb(device)})
    return rows


def _norm() -> Any:
    from volseg_dask.normalize import Normalization

    return Normalization(0.0, 255.0)


def stage_pipeline(volume: Path, model: Path, work: Path, args: argparse.Namespace, device: Any,
                   batches: list[int | str], budget: Budget) -> list[dict[str, Any]]:
    block = 64 if args.dry else 256
    common = {"chunks": [block] * 3, "halo": 8 if args.dry else 32, "device": str(device)}
    runs: list[tuple[str, dict[str, Any]]] = [(f"z, batch {b}", {"axes": "z", "batch_size": b}) for b in batches]
    runs += [("y, batch auto", {"axes": "y"}), ("x, batch auto", {"axes": "x"}),
             ("z, float32", {"axes": "z", "amp": False}), ("zyx, batch auto", {"axes": "zyx"})]
    if args.compile:
        runs.append(("z, torch.compile", {"axes": "z", "compile": True}))
    rows = []
    for label, extra in runs:
        if budget.left() < 20:
            rows.append({"run": label, "skipped": "time budget"})
            continue
        _gpu_peak_reset(device)
        res = _predict(volume, model, work / "p.zarr", args.threads, **common, **extra)
        res["gpu_peak_mb"] = _gpu_peak_mb(device)
        rows.append({"run": label, **res})
        shutil.rmtree(work / "p.zarr", ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="the CPU at toy sizes (the test suite runs this)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="stop starting stages after this")
    parser.add_argument("--train-s", type=float, default=45.0)
    parser.add_argument("--shape", default="256,512,1024", help="Z,Y,X of the pipeline volume")
    parser.add_argument("--threads", type=int, default=None, help="dask threads (default: the GPU worker's)")
    parser.add_argument("--compile", action="store_true", help="also a torch.compile row")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    budget = Budget(args.budget_s)

    import torch

    from benchmarks.bench_predict import make_volume
    from volseg_dask.cluster import GPU_WORKER_THREADS

    if args.threads is None:
        args.threads = GPU_WORKER_THREADS
    if not args.dry and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run it with --dry on the CPU, or on a GPU machine")
    device = torch.device("cpu") if args.dry else torch.device("cuda", 0)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=args.workdir))
    shape = (32, 64, 96) if args.dry else tuple(int(s) for s in args.shape.split(","))
    batches: list[int | str] = [2, 4, "auto"] if args.dry else [8, 16, 32, "auto"]
    report: dict[str, Any] = {"dry": args.dry, "device": str(device), "threads": args.threads,
                              "torch": torch.__version__, "shape": list(shape),
                              "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
                              "gpu_memory_mb": torch.cuda.get_device_properties(0).total_memory / 2**20
                              if device.type == "cuda" else None, "stages": {}}
    stages = report["stages"]
    try:
        t0 = time.perf_counter()
        stages["train"] = stage_train(work, args, str(device))
        print(f"train: {stages['train']['epochs']} epochs in {stages['train']['seconds']:.0f} s, val Dice "
              f"{stages['train']['val_dice']}", flush=True)
        stages["agreement"] = stage_agreement(work, args, Path(stages["train"]["model"]), device)
        agreement = stages["agreement"]
        print(f"agreement: labels equal {agreement['labels_equal']:.5f} (goal 0.999), Dice gpu "
              f"{agreement['dice']['gpu']} cpu {agreement['dice']['cpu']}", flush=True)
        volume = make_volume(work / "vol.zarr", shape)  # type: ignore[arg-type]
        for kind in (["tiny"] if args.dry else ["demo", "resnet34_unet"]):
            if budget.left() < 30:
                stages[kind] = {"skipped": "time budget"}
                continue
            path = model_file(work / f"{kind}.pt", kind)
            raw = stage_raw(path, device, args, batches)
            pipe = stage_pipeline(volume, path, work, args, device, batches, budget)
            raw_auto = next(r["mvox_per_s"] for r in raw if r["batch"] == "auto" and r["amp"])
            for row in pipe:
                if "mvox_per_s_per_axis" in row:
                    row["ratio_to_raw_auto"] = row["mvox_per_s_per_axis"] / raw_auto
            axes = [r["mvox_per_s_per_axis"] for r in pipe if r["run"] in ("z, batch auto", "y, batch auto",
                                                                              "x, batch auto")
                    and "mvox_per_s_per_axis" in r]
            three = next((r for r in pipe if r["run"] == "zyx, batch auto" and "tasks_s" in r), None)
            projection: dict[str, Any] = {}
            if axes:
                voxels = float(np.prod(TARGET))
                rate = statistics.median(axes) * 1e6
                projection["tasks_s"] = 3 * voxels / rate
                if three is not None:
                    projection["merge_s"] = three["merge_s"] * voxels / three["voxels"]
                projection["total_h"] = sum(projection.values()) / 3600
            stages[kind] = {"raw": raw, "pipeline": pipe, "projection_2520x2520x2120x3": projection}
            print(f"{kind}: raw Mvoxel/s " + ", ".join(f"batch {r['batch']} {'fp16' if r['amp'] else 'fp32'} "
                                                       f"{r['mvox_per_s']:.3g}" for r in raw), flush=True)
            for row in pipe:
                print(f"  {row['run']}: " + (f"{row['mvox_per_s_per_axis']:.3g} Mvoxel/s per axis, "
                                             f"{row.get('ratio_to_raw_auto', float('nan')):.2f} of raw, GPU peak "
                                             f"{row['gpu_peak_mb']} MB, host peak {row['host_rss_peak_mb']:.0f} MB"
                                             if "mvox_per_s_per_axis" in row else row.get("skipped", "")),
                      flush=True)
            print(f"  projected 2520 x 2520 x 2120 x 3 axes: {projection}", flush=True)
        report["seconds"] = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"seconds": report.get("seconds")}))
    if not args.no_save:
        sys.path.insert(0, str(REPO))
        from benchmarks._common import write_results

        write_results("gpu_check_dry" if args.dry else "gpu_check", report)


if __name__ == "__main__":
    main()
