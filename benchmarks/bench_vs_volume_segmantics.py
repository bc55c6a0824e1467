"""volseg_dask against the published tool it rebuilds: volume-segmantics 0.4.0 (issue 5).

Both tools are trained with matched settings on the same synthetic training volume and predict the
same unseen volume (3 axes, max-probability merge) at two or more sizes. Side by side: per-class Dice
against the ground truth, training time, prediction time and prediction peak RSS (the resident set of
the whole process tree, polled every 20 ms by ``run_measured``). volume-segmantics holds the whole
volume and its per-axis results in RAM, so its peak grows with the volume; ours should not.

The peer
    ``volume-segmantics==0.4.0`` plus ``rich`` (imported by it, not declared) are installed with pip into
    their own virtual environment (``--peer-venv``, default ``/work/peer-venv``, outside the repository;
    reused when it already imports). Its ``torch<2.11`` pin makes pip take the torch 2.10 CUDA build
    (~8 GB, ~4 min); it runs on the CPU. If the peer cannot be installed the script stops with an error:
    it never skips the peer silently.

    Its CLIs read ``<data_dir>/volseg-settings/2d_model_{train,predict}_settings.yaml``, which the wheel
    does not ship; this script writes both (``model.encoder_weights: null``: pretrained weights cannot be
    downloaded here, and ours starts from a random encoder too). Its default (Lightning) trainer ignores
    the model type, the LR finder and the augmentation settings, so training uses ``--legacy-trainer``,
    which honours them but refuses the CPU ("Found no NVIDIA driver"): a small driver module, written
    into the work folder at run time and run with the peer's Python, patches the trainer *in-process*
    (device ``"cpu"`` instead of CUDA device 0, checkpoints reloaded to the CPU) and then calls the
    peer's own ``main()``. The installed package is never edited. ``NO_ALBUMENTATIONS_UPDATE=1`` and
    ``HF_HUB_OFFLINE=1`` are set for every peer process: nothing is downloaded at run time.

    Matched settings: the same architecture and encoder (default U-Net + resnet18), no pretrained
    encoder, the same number of epochs (the peer's ``num_cyc_frozen: 0`` -- freezing a random encoder is
    meaningless -- and ``num_cyc_unfrozen: EPOCHS``; both run their LR range test first), the same
    image size, batch size 8 (the peer's fixed CPU batch), slices along all three axes, patience =
    epochs (no early stop), seed 0. Augmentations: each tool's defaults. Prediction: the peer's
    ``quality: medium`` (z, y and x planes, per voxel the label of the axis with the highest maximum
    probability) against ours ``--axes zyx --merge max``.

Ours
    ``volseg train IMAGE LABELS -o model.pt -c settings.yaml``, ``volseg predict VOLUME MODEL -o OUT.zarr
    --axes zyx --merge max`` and ``volseg evaluate OUT.zarr/labels TRUTH.zarr --json`` (``run_ours``).

Dice is computed by this script with numpy from each tool's label volume against the ground truth, the
same function for both (``volseg evaluate``'s own JSON is stored beside it for ours). Times are wall
times of whole commands (interpreter start-up and imports included; the peer's import time is measured
once and reported as ``startup_s``). Training time includes each tool's data preparation (the peer
slices the volume into PNG files first).

Run from the repository root (``--peer-only`` runs just the peer side)::

    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python -m benchmarks.bench_vs_volume_segmantics --sizes 128 256
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import median, run_measured, table, write_results

PEER_PACKAGE = "volume-segmantics"
PEER_VERSION = "0.4.0"
PEER_EXTRA = ("rich",)  # imported by volume-segmantics 0.4.0, missing from its dependencies
PEER_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}
N_CLASSES = 3  # the synthetic scene: brine 0, grain 1, gas 2
SEED_TRAIN, SEED_UNSEEN = 0, 1

# The driver runs in the peer's virtual environment. It patches the peer in memory only.
DRIVER = '''"""Driver for volume-segmantics, written by benchmarks/bench_vs_volume_segmantics.py (peer's venv).

python _peer_driver.py train   ARGS...   -> model-train-2d ARGS (legacy trainer allowed on the CPU)
python _peer_driver.py predict ARGS...   -> model-predict-2d ARGS
python _peer_driver.py imports           -> import both entry points and exit (start-up time)
"""
import functools
import logging
import sys


def allow_cpu_for_legacy_trainer():
    """Let ``--legacy-trainer`` run without CUDA, in this process only (the installed files are untouched).

    VolSeg2dTrainer keeps ``int(settings.cuda_device)`` as its device and moves the model and every batch
    there (CUDA device 0 -> "Found no NVIDIA driver"), and reloads its checkpoints with
    ``map_location="cuda:N"``. After construction the trainer and its model manager get the device "cpu";
    checkpoints are reloaded to the CPU. Nothing else changes.
    """
    import torch

    if torch.cuda.is_available():
        return False
    from volume_segmantics.model.operations import vol_seg_2d_trainer as module

    cls = module.VolSeg2dTrainer
    for name in ("__init__", "_load_in_weights"):
        if not hasattr(cls, name):
            raise SystemExit(f"peer driver: VolSeg2dTrainer.{name} not found; this driver fits volume-segmantics 0.4.0")
    original_init, original_load = cls.__init__, cls._load_in_weights

    @functools.wraps(original_init)
    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.model_device_num = "cpu"
        self.model_manager.model_device_num = "cpu"

    @functools.wraps(original_load)
    def load_in_weights(self, output_path, optimizer=False, gpu=True):
        return original_load(self, output_path, optimizer=optimizer, gpu=False)

    cls.__init__, cls._load_in_weights = init, load_in_weights
    return True


def main():
    command, args = sys.argv[1], sys.argv[2:]
    if command == "imports":
        from volume_segmantics.scripts import predict_2d_model, train_2d_model  # noqa: F401
        return
    if command == "train":
        patched = allow_cpu_for_legacy_trainer()
        from volume_segmantics.scripts import train_2d_model as script
        sys.argv = ["model-train-2d", *args]
    elif command == "predict":
        from volume_segmantics.scripts import predict_2d_model as script
        sys.argv = ["model-predict-2d", *args]
    else:
        raise SystemExit(f"peer driver: unknown command {command!r}")
    if command == "train" and patched:
        print("peer driver: legacy trainer patched in-process to run on the CPU", flush=True)
    script.main()


if __name__ == "__main__":
    main()
'''


class PeerUnavailable(RuntimeError):
    """volume-segmantics could not be installed or run: the comparison cannot be made."""


# ---- data -----------------------------------------------------------------------------------------------


def prepare_volume(data_dir: Path, name: str, size: int, seed: int) -> dict[str, Path]:
    """Synthetic image + labels as Zarr (ours) and HDF5 ``/data`` (the peer); reused when present."""
    import h5py
    import zarr

    from volseg_dask.synthetic import write_demo_data

    prefix = f"{name}_s{seed}_{size}_"
    paths = {"image_zarr": data_dir / f"{prefix}image.zarr", "labels_zarr": data_dir / f"{prefix}labels.zarr",
             "image_h5": data_dir / f"{prefix}image.h5", "labels_h5": data_dir / f"{prefix}labels.h5"}
    if all(p.exists() for p in paths.values()):
        return paths
    write_demo_data(data_dir, size, seed, prefix=prefix, overwrite=True)
    for src, dst in ((paths["image_zarr"], paths["image_h5"]), (paths["labels_zarr"], paths["labels_h5"])):
        arr = zarr.open_array(str(src), mode="r")
        tmp = dst.with_suffix(".part.h5")
        with h5py.File(tmp, "w") as fh:
            out = fh.create_dataset("data", shape=arr.shape, dtype=arr.dtype)
            for z in range(0, arr.shape[0], 64):
                out[z:z + 64] = arr[z:z + 64]
        tmp.replace(dst)
    return paths


def confusion(pred_slabs: Any, truth_zarr: Path, n_classes: int = N_CLASSES) -> np.ndarray:
    """Confusion matrix (truth rows, prediction columns) from an array-like prediction, slab by slab."""
    import zarr

    truth = zarr.open_array(str(truth_zarr), mode="r")
    if tuple(pred_slabs.shape) != tuple(truth.shape):
        raise ValueError(f"prediction shape {pred_slabs.shape} != truth shape {truth.shape}")
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    for z in range(0, truth.shape[0], 32):
        t = np.asarray(truth[z:z + 32]).astype(np.int64).ravel()
        p = np.asarray(pred_slabs[z:z + 32]).astype(np.int64).ravel()
        if p.min() < 0 or p.max() >= n_classes:
            raise ValueError(f"prediction has labels outside 0..{n_classes - 1}: {np.unique(p)}")
        cm += np.bincount(t * n_classes + p, minlength=n_classes**2).reshape(n_classes, n_classes)
    return cm


def dice_from_confusion(cm: np.ndarray) -> dict[str, float]:
    tp = np.diag(cm).astype(float)
    denom = cm.sum(0) + cm.sum(1)
    dice = {str(k): float(2 * tp[k] / denom[k]) if denom[k] else float("nan") for k in range(len(tp))}
    dice["mean"] = float(np.mean([dice[str(k)] for k in range(len(tp))]))
    dice["accuracy"] = float(tp.sum() / cm.sum())
    return dice


# ---- the peer: volume-segmantics 0.4.0 --------------------------------------------------------------------


def peer_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PEER_ENV)
    return env


def _peer_version(python: Path) -> str | None:
    """The installed peer's version if its entry points and ``rich`` import, else None."""
    if not python.exists():
        return None
    probe = ("import importlib.metadata as m, rich, torch, volume_segmantics.scripts.train_2d_model, "
             "volume_segmantics.scripts.predict_2d_model; print(m.version('volume-segmantics'), torch.__version__)")
    done = subprocess.run([str(python), "-c", probe], env=peer_env(), capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def ensure_peer(venv: Path, reinstall: bool = False) -> dict[str, Any]:
    """A working volume-segmantics ``PEER_VERSION`` in ``venv`` (installed with pip if needed); else raise."""
    python = venv / "bin" / "python"
    found = None if reinstall else _peer_version(python)
    if found and found.split()[0] == PEER_VERSION:
        return {"venv": str(venv), "installed_now": False, "versions": found}
    print(f"installing {PEER_PACKAGE}=={PEER_VERSION} into {venv} (torch CUDA build, ~8 GB, several minutes) ...",
          flush=True)
    start = time.perf_counter()
    if reinstall and venv.exists():
        shutil.rmtree(venv)
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(python), "-m", "pip", "install", f"{PEER_PACKAGE}=={PEER_VERSION}", *PEER_EXTRA]]
    for cmd in steps:
        done = subprocess.run(cmd, env=peer_env(), capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
            raise PeerUnavailable(f"could not install the peer: {' '.join(cmd)} exited {done.returncode}\n{tail}")
    found = _peer_version(python)
    if not found or found.split()[0] != PEER_VERSION:
        raise PeerUnavailable(f"{PEER_PACKAGE} {PEER_VERSION} installed into {venv} but does not import "
                              f"(found {found!r}); run with --reinstall-peer or remove {venv}")
    return {"venv": str(venv), "installed_now": True, "install_s": time.perf_counter() - start, "versions": found}


def peer_train_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The peer's 2d_model_train_settings.yaml: its own defaults except where matched to ours."""
    return {
        "data_im_dirname": "data", "seg_im_out_dirname": "seg", "model_output_fn": "bench_model",
        "data_hdf5_path": "/data", "seg_hdf5_path": "/data",
        "clip_data": True, "st_dev_factor": 2.575, "minmax_norm": False, "use_imagenet_norm": True,
        "normalization_debug_mode": False, "random_seed": 0,
        "training_axes": "All", "image_size": args.image_size, "downsample": False,
        "training_set_proportion": 0.85, "cuda_device": 0,
        "num_cyc_frozen": 0, "num_cyc_unfrozen": args.epochs, "patience": args.epochs,
        "model": {"type": args.peer_model_type, "encoder_name": args.encoder, "encoder_weights": None,
                  "encoder_depth": 5},
        "lr_find_epochs": 1, "lr_reduce_factor": 500, "encoder_lr_multiplier": 0.1, "pct_lr_inc": 0.3,
        "starting_lr": 5e-5, "end_lr": 1e-3,
        "loss_criterion": "CombinedCEDiceLoss", "alpha": 0.5, "beta": 0.5, "dice_weight_mode": "inverse_sqrt_freq",
        "exclude_background_from_dice": False, "ce_weight": 0.2, "dice_weight": 0.8,
        "eval_metric": "MeanIoU", "dice_averaging": "macro",
        "plot_lr_graph": False, "use_sam": False, "adaptive_sam": True,
        "encoder_weights_path": False, "full_weights_path": False,
        "augmentation_library": "albumentations", "use_monai_datasets": True,
        "use_2_5d_slicing": False, "num_slices": 3, "slice_file_format": "png", "skip_border_slices": False,
        "use_multitask": False, "use_semi_supervised": False, "use_pseudo_labeling": False,
    }


def peer_predict_settings() -> dict[str, Any]:
    """The peer's 2d_model_predict_settings.yaml: 3 axes (``quality: medium``), labels only."""
    return {
        "quality": "medium", "output_probs": False, "output_entropy": False, "cuda_device": 0,
        "downsample": False, "one_hot": False, "prediction_axis": "Z", "output_size": 512,
        "data_hdf5_path": "/data", "clip_data": True, "st_dev_factor": 2.575, "minmax_norm": False,
        "use_imagenet_norm": True, "augmentation_library": "albumentations",
        "use_2_5d_prediction": False, "num_slices": 3, "prediction_padding_factor": 1.0,
        "use_sliding_window": False, "sw_roi_size": [512, 512], "sw_overlap": 0.25, "sw_batch_size": 4,
        "sw_mode": "gaussian",
    }


def measured(cmd: list[str], **kwargs: Any) -> dict[str, Any]:
    """``run_measured`` plus the peak PSS of the process tree and the 1-minute load average before and after.

    ``run_measured``'s peak RSS adds up the resident sets of all processes of the tree, so pages that
    forked data-loader workers share with their parent count once per worker (the peer trains with 8
    persistent workers per loader). PSS (proportional set size, polled every 0.5 s from smaps) divides
    shared pages between the processes that map them: the tree's PSS sum is its real footprint.
    """
    import threading

    import psutil

    me, stop = psutil.Process(), threading.Event()
    peak = {"pss": 0, "procs": 0}

    def poll() -> None:
        while not stop.is_set():
            total, procs = 0, me.children(recursive=True)
            for proc in procs:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    total += proc.memory_full_info().pss
            peak["pss"], peak["procs"] = max(peak["pss"], total), max(peak["procs"], len(procs))
            stop.wait(0.5)

    thread = threading.Thread(target=poll, daemon=True)
    before = os.getloadavg()[0]
    thread.start()
    try:
        run = run_measured(cmd, **kwargs)
    finally:
        stop.set()
        thread.join()
    run["load_1min"] = [round(before, 2), round(os.getloadavg()[0], 2)]
    run["peak_pss_mb"], run["max_processes"] = peak["pss"] / 2**20, peak["procs"]
    return run


def _check(run: dict[str, Any], what: str, log: Path) -> None:
    log.write_text(run["output"])
    if run["returncode"] != 0:
        tail = "\n".join(run["output"].splitlines()[-25:])
        raise PeerUnavailable(f"{what} exited {run['returncode']} (log: {log})\n{tail}")


def setup_peer(args: argparse.Namespace) -> dict[str, Any]:
    """Install (or reuse) the peer, write its settings and driver, measure its start-up (imports)."""
    import yaml

    install = ensure_peer(args.peer_venv, args.reinstall_peer)
    root = args.work_dir / "peer"
    settings_dir = root / "volseg-settings"
    for stale in ("data", "seg", "lightning_logs"):
        shutil.rmtree(root / stale, ignore_errors=True)
    settings_dir.mkdir(parents=True, exist_ok=True)
    train_settings, predict_settings = peer_train_settings(args), peer_predict_settings()
    (settings_dir / "2d_model_train_settings.yaml").write_text(
        "# written by benchmarks/bench_vs_volume_segmantics.py\n" + yaml.safe_dump(train_settings, sort_keys=False))
    (settings_dir / "2d_model_predict_settings.yaml").write_text(
        "# written by benchmarks/bench_vs_volume_segmantics.py\n" + yaml.safe_dump(predict_settings, sort_keys=False))
    driver = root / "_peer_driver.py"
    driver.write_text(DRIVER)
    env = peer_env()
    if args.peer_workers is not None:
        env["VOLSEG_NUM_WORKERS"] = str(args.peer_workers)
    ctx = {"python": str(args.peer_venv / "bin" / "python"), "root": root, "driver": str(driver), "env": env}
    startup = measured([ctx["python"], ctx["driver"], "imports"], env=env, cwd=root)
    _check(startup, "peer imports", root / "imports.log")
    ctx["record"] = {
        "tool": f"{PEER_PACKAGE} {PEER_VERSION}", "install": install,
        "settings": {"train": train_settings, "predict": predict_settings},
        "startup_s": startup["wall_s"], "startup_peak_rss_mb": startup["peak_rss_mb"],
        "startup_peak_pss_mb": startup["peak_pss_mb"], "predict": {},
    }
    return ctx


def train_peer(ctx: dict[str, Any], args: argparse.Namespace, train: dict[str, Path]) -> None:
    """Train the peer (legacy trainer patched onto the CPU), or take ``--peer-model``."""
    root, env = ctx["root"], ctx["env"]
    if args.peer_model is not None:  # predict only, with a model this script trained before
        model = args.peer_model.resolve()
        if not model.is_file():
            raise PeerUnavailable(f"--peer-model {model} does not exist")
        ctx["model"] = model
        ctx["record"]["train"] = {"reused_model": str(model), "model_mb": model.stat().st_size / 2**20}
        return
    for stale in root.glob("*.pytorch"):
        stale.unlink()
    print(f"peer: training ({args.epochs} epochs, {args.architecture}/{args.encoder}, "
          f"{args.image_size} px) on {train['image_h5'].name} ...", flush=True)
    fit = measured([ctx["python"], ctx["driver"], "train", "--data", str(train["image_h5"]), "--labels",
                    str(train["labels_h5"]), "--data_dir", str(root), "--legacy-trainer"], env=env, cwd=root)
    _check(fit, "peer training", root / "train.log")
    if "legacy trainer patched in-process" not in fit["output"]:
        raise PeerUnavailable("peer training ran without the CPU patch: is there a GPU? (see train.log)")
    models = sorted(root.glob("*_bench_model.pytorch"))
    if len(models) != 1:
        raise PeerUnavailable(f"expected one trained model in {root}, found {models}")
    ctx["model"] = models[0]
    ctx["record"]["train"] = _train_record(fit, models[0], train["image_h5"])
    print(f"peer: trained in {fit['wall_s']:.0f} s", flush=True)


def _peer_outputs(root: Path, paths: dict[str, Path]) -> list[Path]:
    return sorted(root.glob(f"*_{paths['image_h5'].stem}_2d_model_vol_pred.tif"))


def predict_peer(ctx: dict[str, Any], size: int, paths: dict[str, Path], rep: int) -> dict[str, Any]:
    """One prediction of the peer (3 axes, ``quality: medium``): its run record."""
    root = ctx["root"]
    for stale in _peer_outputs(root, paths):
        stale.unlink()
    print(f"peer: predicting {size}^3 (repeat {rep + 1}) ...", flush=True)
    run = measured([ctx["python"], ctx["driver"], "predict", str(ctx["model"]), str(paths["image_h5"]),
                    "--data_dir", str(root)], env=ctx["env"], cwd=root)
    _check(run, f"peer prediction {size}^3", root / f"predict_{size}_{rep}.log")
    return _run_record(run)


def score_peer(ctx: dict[str, Any], paths: dict[str, Path]) -> np.ndarray:
    """Confusion matrix of the peer's last prediction of ``paths`` against the truth."""
    import tifffile

    preds = _peer_outputs(ctx["root"], paths)
    if len(preds) != 1:
        raise PeerUnavailable(f"expected one prediction for {paths['image_h5'].stem} in {ctx['root']}, "
                              f"found {preds}")
    return confusion(tifffile.imread(preds[0]), paths["labels_zarr"])


def _train_record(fit: dict[str, Any], model: Path, volume: Path) -> dict[str, Any]:
    """Training wall time, peak RSS and PSS of the process tree (see ``measured``), model file size, volume."""
    return {**_run_record(fit), "model_mb": model.stat().st_size / 2**20, "volume": volume.name}


def _run_record(run: dict[str, Any]) -> dict[str, Any]:
    return {k: run[k] for k in ("wall_s", "peak_rss_mb", "peak_pss_mb", "max_processes", "load_1min")}


def _summary(size: int, runs: list[dict[str, float]], cm: np.ndarray) -> dict[str, Any]:
    peak = median([r["peak_rss_mb"] for r in runs])
    return {"shape": [size] * 3, "runs": runs, "wall_s": median([r["wall_s"] for r in runs]), "peak_rss_mb": peak,
            "peak_pss_mb": median([r["peak_pss_mb"] for r in runs]),
            "bytes_per_voxel": peak * 2**20 / size**3, "dice": dice_from_confusion(cm),
            "confusion_matrix": cm.tolist()}


# ---- ours: volseg_dask through its CLI --------------------------------------------------------------------


def ours_env() -> dict[str, str]:
    return {**os.environ, **PEER_ENV}


def volseg_command() -> list[str]:
    exe = Path(sys.executable).parent / "volseg"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "volseg_dask.cli"]


def ours_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Our settings YAML, matched to the peer's (see the module docstring)."""
    return {
        "model": {"architecture": args.architecture, "encoder": args.encoder, "encoder_weights": None},
        "data": {"image_size": args.image_size},
        "train": {"epochs": args.epochs, "batch_size": 8, "patience": args.epochs, "frozen_epochs": 0, "seed": 0},
        # our prediction defaults (blocks 256^3, halo 32, uint8 per-axis probabilities merged blockwise)
        # except the batch: 8 planes per forward pass, as the peer's
        "predict": {"axes": "zyx", "merge": "max", "batch_size": 8},
    }


#: what every ``volseg predict`` imports before it predicts (torch, smp, the package): the baseline
OURS_IMPORTS = ("import torch, segmentation_models_pytorch, dask.array, zarr, volseg_dask.cli, "
                "volseg_dask.prediction, volseg_dask.inference, volseg_dask.votes")


def setup_ours(args: argparse.Namespace) -> dict[str, Any]:
    """Write our settings YAML; measure the import baseline (torch + smp + volseg_dask) as for the peer."""
    import yaml

    root = args.work_dir / "ours"
    root.mkdir(parents=True, exist_ok=True)
    settings = ours_settings(args)
    config = root / "settings.yaml"
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    startup = measured([sys.executable, "-c", OURS_IMPORTS], env=ours_env())
    if startup["returncode"] != 0:
        raise RuntimeError(f"importing volseg_dask failed:\n{startup['output'][-3000:]}")
    return {"root": root, "config": config, "volseg": volseg_command(), "model": root / "model.pt",
            "record": {"tool": "volseg_dask", "settings": settings, "startup_s": startup["wall_s"],
                       "startup_peak_rss_mb": startup["peak_rss_mb"], "startup_peak_pss_mb": startup["peak_pss_mb"],
                       "predict": {}}}


def train_ours(ctx: dict[str, Any], args: argparse.Namespace, train: dict[str, Path]) -> None:
    """``volseg train`` as a user runs it."""
    print(f"ours: training ({args.epochs} epochs) on {train['image_zarr'].name} ...", flush=True)
    fit = measured([*ctx["volseg"], "train", str(train["image_zarr"]), str(train["labels_zarr"]),
                    "-o", str(ctx["model"]), "-c", str(ctx["config"]), "--overwrite"], env=ours_env())
    (ctx["root"] / "train.log").write_text(fit["output"])
    if fit["returncode"] != 0:
        raise RuntimeError(f"volseg train exited {fit['returncode']}:\n{fit['output'][-3000:]}")
    ctx["record"]["train"] = _train_record(fit, ctx["model"], train["image_zarr"])
    print(f"ours: trained in {fit['wall_s']:.0f} s", flush=True)


def predict_ours(ctx: dict[str, Any], size: int, paths: dict[str, Path], rep: int) -> dict[str, Any]:
    """One ``volseg predict --axes zyx --merge max``: its run record (plus the CLI's own summary line)."""
    target = ctx["root"] / f"pred_{size}.zarr"
    print(f"ours: predicting {size}^3 (repeat {rep + 1}) ...", flush=True)
    run = measured([*ctx["volseg"], "predict", str(paths["image_zarr"]), str(ctx["model"]), "-o", str(target),
                    "-c", str(ctx["config"]), "--axes", "zyx", "--merge", "max", "--overwrite"], env=ours_env())
    (ctx["root"] / f"predict_{size}_{rep}.log").write_text(run["output"])
    if run["returncode"] != 0:
        raise RuntimeError(f"volseg predict exited {run['returncode']}:\n{run['output'][-3000:]}")
    record = _run_record(run)
    record["summary"] = next((line for line in run["output"].splitlines() if line.startswith("wrote ")), None)
    return record


def score_ours(ctx: dict[str, Any], size: int, paths: dict[str, Path]) -> tuple[np.ndarray, dict[str, Any]]:
    """Confusion matrix of our prediction against the truth, and ``volseg evaluate``'s own JSON."""
    import zarr

    target = ctx["root"] / f"pred_{size}.zarr"
    scores_json = ctx["root"] / f"evaluate_{size}.json"
    ev = subprocess.run([*ctx["volseg"], "evaluate", str(target / "labels"), str(paths["labels_zarr"]),
                         "--json", str(scores_json)], capture_output=True, text=True, env=ours_env())
    if ev.returncode != 0:
        raise RuntimeError(f"volseg evaluate exited {ev.returncode}:\n{ev.stdout}{ev.stderr}")
    # level 0 of the OME-Zarr label pyramid
    cm = confusion(zarr.open_array(str(target / "labels" / "0"), mode="r"), paths["labels_zarr"])
    return cm, json.loads(scores_json.read_text())


# ---- report -----------------------------------------------------------------------------------------------


def rows(result: dict[str, Any], name: str) -> list[dict[str, Any]]:
    out = []
    for size, p in result["predict"].items():
        out.append({"tool": name, "volume": f"{size}^3", "dice_brine": p["dice"]["0"], "dice_grain": p["dice"]["1"],
                    "dice_gas": p["dice"]["2"], "dice_mean": p["dice"]["mean"],
                    "train_s": result["train"].get("wall_s", "reused"),
                    "predict_s": p["wall_s"], "peak_rss_gb": p["peak_rss_mb"] / 1024,
                    "peak_pss_gb": p["peak_pss_mb"] / 1024,
                    "bytes/voxel": p["bytes_per_voxel"]})
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", type=Path, default=Path("/work/bench-vs-volume-segmantics"),
                    help="Data, models, settings, logs and predictions (outside the repository).")
    ap.add_argument("--peer-venv", type=Path, default=Path("/work/peer-venv"),
                    help="Virtual environment of volume-segmantics (reused when it imports).")
    ap.add_argument("--reinstall-peer", action="store_true", help="Recreate the peer's environment.")
    ap.add_argument("--peer-only", action="store_true", help="Run only the peer side.")
    ap.add_argument("--ours-only", action="store_true", help="Run only our side.")
    ap.add_argument("--train-size", type=int, default=128, help="Edge of the synthetic training cube (seed 0).")
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256],
                    help="Edges of the unseen cubes to predict (seed 1).")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--architecture", default="Unet", help="smp class name (ours).")
    ap.add_argument("--peer-model-type", default="U_Net", help="The peer's name for the same architecture.")
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--repeats", type=int, default=1, help="Predictions per size (medians reported).")
    ap.add_argument("--peer-workers", type=int, default=None,
                    help="VOLSEG_NUM_WORKERS for the peer's training data loader (default: its own, 8).")
    ap.add_argument("--peer-model", type=Path, default=None,
                    help="Skip the peer's training and predict with this model (from an earlier run of this script).")
    ap.add_argument("--name", default=None, help="Results file name (default by side).")
    args = ap.parse_args(argv)
    if args.peer_only and args.ours_only:
        ap.error("--peer-only and --ours-only exclude each other")
    if args.image_size % 32:
        ap.error("--image-size must be a multiple of 32")
    args.work_dir, args.peer_venv = args.work_dir.resolve(), args.peer_venv.absolute()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data_dir = args.work_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    print(f"data in {data_dir} ...", flush=True)
    train = prepare_volume(data_dir, "train", args.train_size, SEED_TRAIN)
    unseen = {s: prepare_volume(data_dir, "unseen", s, SEED_UNSEEN) for s in args.sizes}
    results: dict[str, Any] = {
        "setup": {"train_volume": [args.train_size] * 3, "train_seed": SEED_TRAIN, "unseen_sizes": args.sizes,
                  "unseen_seed": SEED_UNSEEN, "epochs": args.epochs, "image_size": args.image_size,
                  "architecture": args.architecture, "encoder": args.encoder, "encoder_weights": None,
                  "merge": "3 axes, max probability", "repeats": args.repeats, "classes": ["brine", "grain", "gas"],
                  "order": "peer trains, then ours; predictions alternate (ABBA over sizes and repeats)"},
        "log": [],
    }
    name = args.name or ("bench_vs_volume_segmantics_peer" if args.peer_only else
                         "bench_vs_volume_segmantics_ours" if args.ours_only else "bench_vs_volume_segmantics")
    tools: dict[str, dict[str, Any]] = {}

    def save(step: str) -> None:  # after every step: a crash or a kill loses at most the running step
        results["log"].append({"step": step, "time": time.strftime("%H:%M:%S")})
        for key, ctx in tools.items():
            results[key] = ctx["record"]
        write_results(name, results)

    try:
        if not args.ours_only:
            tools["peer"] = setup_peer(args)
            train_peer(tools["peer"], args, train)
            save("peer trained")
        if not args.peer_only:
            tools["ours"] = setup_ours(args)
            train_ours(tools["ours"], args, train)
            save("ours trained")
        predictors = {"peer": predict_peer, "ours": predict_ours}
        runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
        turn = 0
        for size, paths in unseen.items():
            for rep in range(args.repeats):
                order = list(tools) if turn % 2 == 0 else list(tools)[::-1]
                turn += 1
                for key in order:
                    runs.setdefault((key, size), []).append(predictors[key](tools[key], size, paths, rep))
                    save(f"{key} predicted {size}^3 (repeat {rep + 1})")
            for key, ctx in tools.items():
                if key == "peer":
                    cm, extra = score_peer(ctx, paths), {}
                else:
                    cm, scores = score_ours(ctx, size, paths)
                    extra = {"volseg_evaluate": scores}
                summary = ctx["record"]["predict"][str(size)] = {**_summary(size, runs[key, size], cm), **extra}
                print(f"{key}: {size}^3 in {summary['wall_s']:.0f} s, peak {summary['peak_rss_mb'] / 1024:.2f} GB, "
                      f"mean Dice {summary['dice']['mean']:.3f}", flush=True)
            save(f"{size}^3 scored")
    except PeerUnavailable as exc:
        print(f"ERROR: the peer ({PEER_PACKAGE} {PEER_VERSION}) could not be run: {exc}", file=sys.stderr)
        return 2
    table_rows = []
    for key, label in (("peer", f"vs {PEER_VERSION}"), ("ours", "volseg_dask")):
        if key in tools:
            table_rows += rows(tools[key]["record"], label)
    print()
    print(table(table_rows, ["tool", "volume", "dice_brine", "dice_grain", "dice_gas", "dice_mean", "train_s",
                             "predict_s", "peak_rss_gb", "peak_pss_gb", "bytes/voxel"]))
    for key in tools:
        rec = tools[key]["record"]
        print(f"{key}: import baseline {rec['startup_s']:.1f} s, peak RSS {rec['startup_peak_rss_mb'] / 1024:.2f} GB")
    if len(tools) == 2:
        print()
        print(table(comparison(results), ["volume", "dice_mean_diff", "predict_time_ratio", "peak_rss_ratio",
                                          "peak_rss_ratio_above_baseline"]))
    return 0


def comparison(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Ours relative to the peer per size: Dice difference, time ratio, peak RSS ratio (also above each
    tool's import baseline)."""
    peer, ours = results["peer"], results["ours"]
    out = []
    for size, p in peer["predict"].items():
        o = ours["predict"].get(size)
        if o is None:
            continue
        above = ((o["peak_rss_mb"] - ours["startup_peak_rss_mb"])
                 / max(1e-9, p["peak_rss_mb"] - peer["startup_peak_rss_mb"]))
        out.append({"volume": f"{size}^3", "dice_mean_diff": o["dice"]["mean"] - p["dice"]["mean"],
                    "predict_time_ratio": o["wall_s"] / p["wall_s"],
                    "peak_rss_ratio": o["peak_rss_mb"] / p["peak_rss_mb"],
                    "peak_rss_ratio_above_baseline": above})
    return out


if __name__ == "__main__":
    sys.exit(main())
