"""Throughput and memory of the lazy slice sampler (issue 3).

Measured on synthetic SXCT-like volumes written as Zarr v3 with the default 128³ chunks:

``lazy zarr``
    ``sampling.SliceDataset`` over the Zarr pair: slices cut from chunk-aligned blocks in its bounded
    LRU cache (``data.cache_mb``, default 512 MB); the first pass includes the cold block reads,
    "warm" is the median of later passes.
``in-memory numpy``
    the same dataset class over the same volumes loaded into numpy arrays (the upper bound).
``lazy, no cache``
    the same over Zarr with the cache bypassed: every slice reads its region through dask, which
    decompresses every chunk the region crosses (the read amplification the cache removes).
``train step``
    slices per second consumed by one optimisation step of the network at the default batch size
    (8): the default Unet/resnet34 at the default 256² crops, and the demo settings' model.

Each sampler draws the same slices (same seed): random z/y/x slices of 256² (default settings),
with and without the default augmentation. Peak memory: a child process per case opens a 256³ or
512³ pair, measures its intensity window, scans its labels and draws 400 training slices
(``run_measured`` polls the resident set of the child); with the default 512 MB cache and with a
128 MB one, so that the bound shows on a volume larger than the cache.

Pass: lazy / in-memory >= 0.8 warm (with and without augmentation; lazy and in-memory passes
alternate so that load drift on a shared machine falls on both); the loader (first pass, cold
blocks included) at least 5x faster than the default train step. Run from the repository root::

    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python -m benchmarks.bench_sampling
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import median, run_measured, table, write_results

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
CRITERION_RATIO = 0.8
CRITERION_LOADER_OVER_STEP = 5.0


def _dataset(pairs: list[tuple[Any, Any]], settings: Any, *, augment: bool, length: int, seed: int = 0) -> Any:
    from volseg_dask.labels import label_mapping
    from volseg_dask.normalize import Normalization
    from volseg_dask.training.augment import Augmenter
    from volseg_dask.training.dataset import SliceDataset
    from volseg_dask.training.split import make_split
    from volseg_dask.training.volumes import open_training_volumes

    vols = open_training_volumes(pairs, settings.data)
    mapping = label_mapping(np.unique(np.concatenate([v.scan.values for v in vols])), None, "bench")
    for v in vols:
        v.roles = make_split(v.shape, settings.data, seed=0)
    norm = Normalization(low=10000.0, high=45000.0)
    return SliceDataset(vols, mapping, norm, settings.data, role="train", length=length,
                        augment=Augmenter(settings.augment) if augment else None, seed=seed)


def _uncached(ds: Any) -> Any:
    for reader in (*ds._images, *ds._labels):
        reader.grid = None  # every read goes straight through dask to the chunks it crosses
    return ds


def _rate(ds: Any, n: int) -> float:
    """Slices per second over draws ``0 .. n-1``."""
    t0 = time.perf_counter()
    for i in range(n):
        ds[i]
    return n / (time.perf_counter() - t0)


def _amplification(ds: Any, n: int) -> float:
    """Bytes of the chunks an uncached read decompresses / bytes of the slices returned."""
    vol = ds.volumes[0]
    chunks = vol.image.chunks
    item = vol.image.dtype.itemsize + 1  # image + uint8 labels
    read = returned = 0
    for i in range(n):
        spec = ds.spec(i)
        d1, d2 = (d for d in range(3) if d != spec.axis)
        bounds = {spec.axis: (spec.position, spec.position + 1)}
        for d, o in zip((d1, d2), spec.offset):
            bounds[d] = (max(0, o), min(vol.shape[d], o + ds.size))
        touched = 1
        for d in range(3):
            edges = np.cumsum((0, *chunks[d]))
            lo, hi = bounds[d]
            touched *= int(np.searchsorted(edges, hi, "left") - np.searchsorted(edges, lo, "right") + 1)
        read += touched * int(np.prod([max(c) for c in chunks])) * item
        returned += (bounds[d1][1] - bounds[d1][0]) * (bounds[d2][1] - bounds[d2][0]) * item
    return read / returned


def _step_rate(settings: Any, steps: int = 3) -> dict[str, Any]:
    import torch

    from volseg_dask.models import build_model
    from volseg_dask.training.losses import make_loss

    model = build_model(settings.model, classes=3)
    loss_fn = make_loss(settings.train.loss)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    size, batch = settings.data.image_size, settings.train.batch_size
    x = torch.randn(batch, settings.model.n_slices, size, size)
    y = torch.randint(0, 3, (batch, size, size))
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    step = median(times[1:])
    return {"model": f"{settings.model.architecture}/{settings.model.encoder}", "image_size": size, "batch": batch,
            "step_s": step, "slices_per_s": batch / step, "torch_threads": torch.get_num_threads()}


def child(image: str, labels: str, cache_mb: int, samples: int) -> None:
    """Measured in a child process: open, scan, normalise and sample ``samples`` slices."""
    import resource

    from volseg_dask.config import Settings
    from volseg_dask.normalize import compute_normalization

    settings = Settings().with_overrides({"data.cache_mb": cache_mb})
    t0 = time.perf_counter()
    ds = _dataset([(image, labels)], settings, augment=True, length=samples)
    compute_normalization(ds.volumes[0].image, settings.data)
    for i in range(samples):
        ds[i]
    stats = ds.cache.stats()
    print(json.dumps({"seconds": time.perf_counter() - t0, "cache_mb_used": stats["bytes"] / 2**20,
                      "cache_blocks": stats["blocks"], "hits": stats["hits"], "misses": stats["misses"],
                      "vm_hwm_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="Where the volumes are written (kept).")
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3, help="Alternating passes of lazy and in-memory.")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="Edges for the memory cases.")
    parser.add_argument("--child", nargs=4, metavar=("IMAGE", "LABELS", "CACHE_MB", "SAMPLES"), help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]), int(args.child[3]))
        return 0

    from volseg_dask.config import Settings, load_settings
    from volseg_dask.io import open_volume
    from volseg_dask.synthetic import write_demo_data

    work = args.workdir or Path(tempfile.gettempdir()) / "volseg_bench_sampling"
    work.mkdir(parents=True, exist_ok=True)
    volumes = {}
    for size in sorted({256, *args.sizes}):
        folder = work / f"v{size}"
        if not (folder / "labels.zarr").exists():
            print(f"writing {size}³ synthetic volume to {folder} ...", flush=True)
            write_demo_data(folder, size, seed=0, overwrite=True)
        volumes[size] = (str(folder / "image.zarr"), str(folder / "labels.zarr"))

    settings = Settings()
    image, labels = volumes[256]
    in_memory = (open_volume(image).compute(), open_volume(labels).compute())
    n = args.samples
    rows = []
    rates: dict[str, float] = {}
    for augment in (False, True):
        suffix = " + augment" if augment else ""
        lazy = _dataset([(image, labels)], settings, augment=augment, length=n)
        eager = _dataset([in_memory], settings, augment=augment, length=n)
        uncached = _uncached(_dataset([(image, labels)], settings, augment=augment, length=n // 4))
        rates["lazy cold" + suffix] = _rate(lazy, n)  # the first pass reads every block once
        rounds: dict[str, list[float]] = {"lazy": [], "eager": []}
        for _ in range(args.rounds):  # alternate, so that load drift on the machine falls on both
            rounds["lazy"].append(_rate(lazy, n))
            rounds["eager"].append(_rate(eager, n))
        rates["lazy" + suffix] = median(rounds["lazy"])
        rates["in-memory" + suffix] = median(rounds["eager"])
        rates["no cache" + suffix] = _rate(uncached, len(uncached))
        stats = lazy.cache.stats()
        rows += [
            {"sampler": "lazy zarr, first pass" + suffix, "slices_per_s": rates["lazy cold" + suffix],
             "cache_misses": stats["misses"], "cache_hits": stats["hits"]},
            {"sampler": "lazy zarr, warm" + suffix, "slices_per_s": rates["lazy" + suffix]},
            {"sampler": "in-memory numpy" + suffix, "slices_per_s": rates["in-memory" + suffix]},
            {"sampler": "lazy zarr, no cache" + suffix, "slices_per_s": rates["no cache" + suffix]},
        ]
    ds = _dataset([(image, labels)], settings, augment=False, length=n)
    amplification = _amplification(ds, n)
    print(f"\nsampler throughput, 256³ volume, 256² slices along z/y/x ({n} draws per pass; warm = median of "
          f"{args.rounds} passes alternating with the in-memory sampler):")
    print(table(rows, ["sampler", "slices_per_s", "cache_misses", "cache_hits"]))
    ratios = {
        "lazy/in-memory (read only, warm)": rates["lazy"] / rates["in-memory"],
        "lazy/in-memory (read only, first pass)": rates["lazy cold"] / rates["in-memory"],
        "lazy/in-memory (with augmentation, warm)": rates["lazy + augment"] / rates["in-memory + augment"],
        "lazy/in-memory (with augmentation, first pass)": rates["lazy cold + augment"] / rates["in-memory + augment"],
        "lazy/no cache (read only, warm)": rates["lazy"] / rates["no cache"],
    }
    for k, v in ratios.items():
        print(f"  {k:<42} {v:6.2f}")
    print(f"  uncached read amplification: {amplification:.0f}x the bytes of the slices are decompressed")

    steps = [_step_rate(settings)]
    demo = load_settings(REPO / "volseg_dask" / "demo_settings.yaml")
    steps.append(_step_rate(demo))
    loader = rates["lazy cold + augment"]
    print("\ntrain step (forward + backward + AdamW, CPU) vs the loader (lazy zarr + augmentation, one process):")
    print(table([{**s, "loader_over_step": loader / s["slices_per_s"]} for s in steps],
                ["model", "image_size", "batch", "torch_threads", "step_s", "slices_per_s", "loader_over_step"]))
    # the loader at the demo's crop size, for the demo row
    demo_ds = _dataset([(image, labels)], demo, augment=True, length=n)
    demo_loader = _rate(demo_ds, n)
    print(f"  loader at the demo's {demo.data.image_size}² crops: {demo_loader:.0f} slices/s "
          f"= {demo_loader / steps[1]['slices_per_s']:.0f}x the demo model's step rate")

    memory = []
    for size in args.sizes:
        for cache_mb in (512, 128):
            img, lab = volumes[size]
            res = run_measured([sys.executable, "-m", "benchmarks.bench_sampling", "--child", img, lab, str(cache_mb),
                                str(n)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
            if res["returncode"] != 0:
                print(res["output"])
                raise SystemExit(f"child failed for {size}³")
            report = json.loads(res["output"].strip().splitlines()[-1])
            volume_mb = size ** 3 * 3 / 2**20  # uint16 image + uint8 labels
            memory.append({"volume": f"{size}³", "volume_mb": volume_mb, "cache_mb": cache_mb,
                           "peak_rss_mb": res["peak_rss_mb"], "cache_mb_used": report["cache_mb_used"],
                           "misses": report["misses"], "seconds": report["seconds"]})
    print(f"\npeak memory of a process that opens, scans, normalises and draws {n} slices (child processes):")
    print(table(memory, ["volume", "volume_mb", "cache_mb", "cache_mb_used", "peak_rss_mb", "misses", "seconds"]))
    by = {(m["volume"], m["cache_mb"]): m["peak_rss_mb"] for m in memory}
    sizes = [f"{s}³" for s in args.sizes]
    passed = (ratios["lazy/in-memory (read only, warm)"] >= CRITERION_RATIO
              and ratios["lazy/in-memory (with augmentation, warm)"] >= CRITERION_RATIO
              and loader / steps[0]["slices_per_s"] >= CRITERION_LOADER_OVER_STEP)
    print(f"\ncriterion: lazy/in-memory >= {CRITERION_RATIO} and loader >= {CRITERION_LOADER_OVER_STEP}x the default "
          f"train step: {'PASS' if passed else 'FAIL'}")
    if len(sizes) == 2:
        for cache_mb in (512, 128):
            a, b = by[(sizes[0], cache_mb)], by[(sizes[1], cache_mb)]
            print(f"  cache {cache_mb} MB: peak RSS {sizes[1]} / {sizes[0]} = {b / a:.2f} "
                  f"(+{b - a:.0f} MB for {8 if args.sizes[1] == 2 * args.sizes[0] else '?'}x the voxels)")
    if not args.no_write:
        write_results("bench_sampling", {
            "samples": n, "rounds": args.rounds, "image_size": settings.data.image_size, "throughput": rows,
            "slices_per_s": rates, "ratios": ratios,
            "uncached_read_amplification": amplification, "train_steps": steps, "demo_loader_slices_per_s": demo_loader,
            "memory": memory, "criterion_ratio": CRITERION_RATIO, "passed": passed,
        })
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
