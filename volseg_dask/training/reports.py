"""What training writes beside the model: metrics as CSV and JSON, curves, sample slices, the range-test plot."""

from __future__ import annotations

import csv
import itertools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..labels import IGNORE_INDEX, LabelMapping
from .dataset import SliceDataset
from .lr_finder import LRFinderResult
from .split import AXES

__all__ = ["output_paths", "plot_curves", "plot_lr_finder", "plot_samples", "write_metrics"]


def output_paths(output: Path) -> dict[str, Path]:
    stem = output.with_suffix("") if output.suffix else output
    base = str(stem)
    return {
        "model": output,
        "curves": Path(base + ".curves.png"),
        "samples": Path(base + ".samples.png"),
        "metrics_csv": Path(base + ".metrics.csv"),
        "metrics_json": Path(base + ".metrics.json"),
        "lr_finder_0": Path(base + ".lr_finder.png"),
        "lr_finder_1": Path(base + ".lr_finder_finetune.png"),
        "checkpoint": Path(base + ".ckpt"),
    }



def write_metrics(history: Sequence[dict[str, Any]], lr_results: Sequence[LRFinderResult], paths: dict[str, Path],
                  *, classes: int, final: bool, summary: dict[str, Any] | None = None,
                  mapping: LabelMapping | None = None) -> None:
    """Per-epoch metrics as CSV and JSON (rewritten every epoch, so a long run can be watched)."""
    names = [str(v) for v in mapping.values] if mapping is not None else [str(c) for c in range(classes)]
    header = ["epoch", "phase", "lr", "train_loss", "val_loss", *(f"dice_{n}" for n in names), "mean_dice",
              "seconds"]
    rows = []
    for h in history:
        dice = h.get("dice") or []
        defined = [d for d in dice if d is not None]
        rows.append([h["epoch"], h["phase"], f"{h['lr']:.4g}", f"{h['train_loss']:.5f}",
                     f"{h['val_loss']:.5f}" if "val_loss" in h else "",
                     *("" if i >= len(dice) or dice[i] is None else f"{dice[i]:.4f}" for i in range(len(names))),
                     f"{np.mean(defined):.4f}" if defined else "", h["seconds"]])
    tmp = paths["metrics_csv"].with_name(paths["metrics_csv"].name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, paths["metrics_csv"])
    record = {"complete": final, "summary": summary, "label_values": mapping.values if mapping else None,
              "lr_finder": [r.to_dict() for r in lr_results], "history": list(history)}
    tmp = paths["metrics_json"].with_name(paths["metrics_json"].name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, paths["metrics_json"])


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_lr_finder(result: LRFinderResult, path: Path, *, title: str = "learning-rate range test") -> None:
    """Loss against learning rate (log scale), raw and smoothed, with the chosen rate marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    n = len(result.smoothed)
    ax.plot(result.lrs[:n], result.losses[:n], color="0.75", lw=1, label="loss")
    ax.plot(result.lrs[:n], result.smoothed, color="C0", lw=2, label="smoothed")
    ax.axvline(result.suggestion, color="C3", ls="--", label=f"chosen {result.suggestion:.2g} ({result.reason})")
    if result.minimum:
        ax.axvline(result.minimum, color="0.4", ls=":", label=f"minimum {result.minimum:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    if result.smoothed:
        top = max(result.smoothed[0], min(result.smoothed)) * 1.5
        ax.set_ylim(min(result.smoothed) * 0.9, top)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(history: Sequence[dict[str, Any]], mapping: LabelMapping, path: Path) -> None:
    """Training and validation loss, and per-class validation Dice, per epoch."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    epochs = [h["epoch"] for h in history]
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="training")
    if any("val_loss" in h for h in history):
        ax1.plot(epochs, [h.get("val_loss", np.nan) for h in history], "o-", label="validation")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.set_yscale("log")  # an early validation spike (batch-norm statistics at a high rate) dwarfs the rest
    ax1.legend()
    for c, value in enumerate(mapping.values):
        ys = [np.nan if len(h.get("dice") or []) <= c or h["dice"][c] is None else h["dice"][c] for h in history]
        ax2.plot(epochs, ys, "o-", label=f"label {value}")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation Dice")
    ax2.set_ylim(0, 1)
    ax2.legend(fontsize=8)
    for h0, h1 in itertools.pairwise(history):
        if h0["phase"] != h1["phase"]:
            for ax in (ax1, ax2):
                ax.axvline(h0["epoch"] + 0.5, color="0.6", ls=":")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_samples(model: nn.Module, dataset: SliceDataset, path: Path, mapping: LabelMapping, n: int = 6) -> None:
    """Validation slices as rows of image | truth | prediction (one or more per axis)."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap

    picks: list[int] = []
    by_axis: dict[int, list[int]] = {}
    for i in range(len(dataset)):
        by_axis.setdefault(dataset.spec(i).axis, []).append(i)
    while len(picks) < min(n, len(dataset)):
        for idx in by_axis.values():
            if idx and len(picks) < n:
                picks.append(idx.pop(0))
    device = next(model.parameters()).device
    colours = plt.get_cmap("tab10")(np.arange(max(mapping.classes, 1)) % 10)
    cmap = ListedColormap(colours)
    fig, axes = plt.subplots(len(picks), 3, figsize=(9, 3 * len(picks)), dpi=90, squeeze=False)
    for row, i in zip(axes, picks):
        x, y = dataset[i]
        with torch.inference_mode():
            pred = model(x[None].to(device)).argmax(1)[0].cpu().numpy()
        truth = np.ma.masked_equal(y.numpy(), IGNORE_INDEX)
        spec = dataset.spec(i)
        row[0].imshow(x[x.shape[0] // 2].numpy(), cmap="gray")
        row[0].set_title(f"{AXES[spec.axis]} = {spec.position}", fontsize=9)
        row[1].imshow(truth, cmap=cmap, vmin=-0.5, vmax=mapping.classes - 0.5, interpolation="nearest")
        row[1].set_title("truth", fontsize=9)
        row[2].imshow(pred, cmap=cmap, vmin=-0.5, vmax=mapping.classes - 0.5, interpolation="nearest")
        row[2].set_title("prediction", fontsize=9)
        for ax in row:
            ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
