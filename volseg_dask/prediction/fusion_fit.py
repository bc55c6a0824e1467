"""``fit_fusion``: fit a learned fusion of the per-axis probabilities on a labelled volume, write a model file.

The fit takes a prediction of a labelled volume the network did not train on (``volseg predict`` with
its per-axis probabilities kept) and that volume's labels; it samples voxels blockwise
(:mod:`~.fusion_samples`), fits the fusion model (:mod:`~.fusion`) with torch on the CPU, and writes a new
model file: the same network plus the fusion parameters (:class:`~volseg_dask.models.ModelMeta`).

Both models are multinomial logistic regressions of the true class on the (patch of) per-axis
probabilities, ``linear`` on each voxel's own ``A·C`` values with one weight per (axis, class),
``conv`` on its 3×3×3 neighbourhood (``27·A·C`` values): a convex problem, solved by L-BFGS over the
whole sample (in chunks, so memory holds the uint8 sample and one float chunk). The sample is drawn
equally from every class so that rare classes are seen; each voxel is weighted back to the truth's
class frequencies, so the fit estimates the volume's own risk and the fused probabilities are not
biased toward the rare classes. Starting point: equal weights and no bias, the ``mean`` merge.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Settings
from ..errors import ConfigError, ModelFileError, VolumeFormatError
from ..io.volume import open_volume
from ..models import model_from_meta, read_model_file, save_model
from ..outputs import OutputLock, check_output_path, file_sha256, now
from .fusion import KINDS, Fusion, fused_logits, prediction_network
from .fusion_samples import Samples, sample_voxels
from .merging import open_prediction
from .plan import network_digest, predict_settings
from .run import predict

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_SAMPLES", "FusionFitResult", "check_labelled_volume", "fit_fusion", "fit_fusion_on_volume",
           "fit_parameters"]

DEFAULT_SAMPLES = 200_000
"""Voxels sampled for a fit (split equally among the classes labelled)."""


@dataclass
class FusionFitResult:
    """What :func:`fit_fusion` did."""

    model_path: Path
    kind: str
    samples: int
    seconds: float
    loss: float
    """Weighted cross-entropy of the fused probabilities on the sample, after the fit."""
    accuracy: dict[str, float]
    """Weighted accuracy on the sample of the fitted fusion (``learned``) and of the ``max`` and ``mean`` merges."""

    def summary(self) -> str:
        acc = ", ".join(f"{k} {v:.4f}" for k, v in self.accuracy.items())
        return (f"wrote {self.model_path} ({self.kind} fusion fitted on {self.samples:,} voxels in "
                f"{self.seconds:.1f} s; accuracy on them: {acc})")


def check_labelled_volume(image: Any, labels: Any) -> None:
    """Refuse an image/labels pair that cannot be predicted and scored (missing, other shapes, labels not
    integers) before any work.

    Raises
    ------
    VolumeNotFoundError, VolumeFormatError
        A volume is missing or unreadable, the shapes differ, or the labels are not integers.
    """
    vol, truth = open_volume(image), open_volume(labels)
    if vol.shape != truth.shape:
        raise VolumeFormatError(f"{labels}: shape {truth.shape} differs from the image {image} {vol.shape}; give the "
                                "labels of exactly that volume")
    if truth.dtype.kind not in "biu":
        raise VolumeFormatError(f"{labels}: labels must be integers, found {truth.dtype}")


def _features(patches: Any, kind: str, n_axes: int, n_classes: int) -> Any:
    """float32 features of uint8 patches (a torch tensor chunk): linear ``(n, A, C)``, conv ``(n, A·C·k³)``."""
    import torch

    x = patches.to(torch.float32).div_(255.0)
    return x.reshape(len(x), n_axes, n_classes) if kind == "linear" else x.reshape(len(x), -1)


def _whitening(patches: Any, weight: Any, chunk: int) -> tuple[Any, Any, Any]:
    """Weighted mean ``mu`` of the conv features and the Cholesky factor ``L`` of their covariance (plus a small
    ridge: the classes of an axis sum to one), and its inverse: ``(x - mu) @ inv(L).T`` has unit covariance."""
    import torch

    total = float(weight.sum())
    first = torch.zeros(patches[0].numel(), dtype=torch.float64)
    second = torch.zeros(len(first), len(first), dtype=torch.float64)
    for s in range(0, len(patches), chunk):
        x = patches[s:s + chunk].reshape(-1, len(first)).to(torch.float64).div_(255.0)
        xw = x * weight[s:s + chunk, None].to(torch.float64)
        first += xw.sum(dim=0)
        second += xw.T @ x
    mu = first / total
    cov = second / total - torch.outer(mu, mu)
    cov += torch.eye(len(mu), dtype=torch.float64) * (1e-4 * float(cov.diagonal().mean()) + 1e-12)
    chol = torch.linalg.cholesky(cov)
    inverse = torch.linalg.solve_triangular(chol, torch.eye(len(mu), dtype=torch.float64), upper=False)
    return mu.float(), chol.float(), inverse.float()


def fit_parameters(samples: Samples, kind: str, n_axes: int, n_classes: int, *, iterations: int = 50,
                   l2: float = 1e-5, chunk: int = 32768) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Fit a fusion's float weights (shaped as :attr:`.Fusion.weights`) and bias on ``samples``.

    Weighted multinomial logistic regression (weights from :attr:`.Samples.weights`) with an L2 penalty
    ``l2·Σw²`` on the weights, by L-BFGS (strong Wolfe line search, at most ``iterations`` steps), on the
    CPU, in chunks of ``chunk`` samples. Starts from equal weights and no bias (the ``mean`` merge). The
    conv model's 27·A·C strongly correlated features are whitened for the solver (the weights are
    optimised as ``W = V·inv(L)``, the same problem, several times fewer steps).
    """
    import torch

    k3 = samples.patches[0, 0].size
    patches = torch.from_numpy(np.ascontiguousarray(samples.patches))
    target = torch.from_numpy(samples.classes)
    weight = torch.from_numpy(samples.weights.astype(np.float32))
    total_weight = float(weight.sum())
    b = torch.zeros(n_classes, dtype=torch.float32)
    if kind == "linear":
        v = torch.ones(n_classes, n_axes, dtype=torch.float32)
        mu = inverse = None
    else:  # the centre voxel of each axis's own class: (C, A, C, k³) flattened like the patches
        start = torch.zeros(n_classes, n_axes, n_classes, k3, dtype=torch.float32)
        for c in range(n_classes):
            start[c, :, c, k3 // 2] = 1.0
        w0 = start.reshape(n_classes, -1)
        mu, chol, inverse = _whitening(patches, weight, chunk)
        v, b = w0 @ chol, b + w0 @ mu  # the same logits: (x - mu)·(V·inv(L))ᵀ + b'
    v.requires_grad_(True)
    b.requires_grad_(True)
    slices = [slice(s, s + chunk) for s in range(0, len(patches), chunk)]

    def weights() -> Any:
        return v if inverse is None else v @ inverse

    def objective(backward: bool) -> float:
        w = weights()
        shift = b if mu is None else b - w @ mu
        total = 0.0
        for part in slices:
            x = _features(patches[part], kind, n_axes, n_classes)
            z = ((x * w.T[None]).sum(dim=1) if kind == "linear" else x @ w.T) + shift
            loss = (torch.nn.functional.cross_entropy(z, target[part], reduction="none") * weight[part]).sum()
            loss = loss / total_weight
            if backward:
                loss.backward(retain_graph=True)
            total += loss.item()
        penalty = l2 * (w ** 2).sum()
        if backward:
            penalty.backward()
        return total + penalty.item()

    optimizer = torch.optim.LBFGS([v, b], lr=1.0, max_iter=iterations, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-7, tolerance_change=1e-9)

    evaluations = []

    def closure() -> Any:
        optimizer.zero_grad()
        evaluations.append(1)
        return torch.tensor(objective(True))

    with torch.no_grad():
        before = objective(False)
    optimizer.step(closure)
    with torch.no_grad():
        after = objective(False)
        w = weights()
        bias = b if mu is None else b - w @ mu
    steps = int(optimizer.state[optimizer.param_groups[0]["params"][0]].get("n_iter", 0))
    shape = (n_classes, n_axes) if kind == "linear" else (n_classes, n_axes, n_classes, 3, 3, 3)
    return (w.detach().numpy().astype(np.float64).reshape(shape), bias.detach().numpy().astype(np.float64),
            {"loss_start": round(before, 6), "loss": round(after, 6), "iterations": steps,
             "evaluations": len(evaluations), "l2": l2})


def _accuracy(samples: Samples, predicted: np.ndarray) -> float:
    w = samples.weights
    return float((w * (predicted == samples.classes)).sum() / max(w.sum(), 1e-12))


def _sample_accuracies(samples: Samples, fusion: Fusion, n_axes: int, n_classes: int,
                       chunk: int = 16384) -> dict[str, float]:
    """Weighted accuracy on the sample of the fitted (rounded) fusion, and of the max and mean merges."""
    n = len(samples.classes)
    k = samples.patches.shape[-1]
    centre = samples.patches[(slice(None), slice(None), *(k // 2,) * 3)].reshape(n, n_axes, n_classes)
    fused = np.empty(n, np.int64)
    for s in range(0, n, chunk):
        part = samples.patches[s:s + chunk]
        m = len(part)
        # the patches side by side along y, one fused voxel each: per axis (C, k, m·k, k)
        per_axis = [np.moveaxis(part[:, a * n_classes:(a + 1) * n_classes], 0, 2).reshape(n_classes, k, m * k, k)
                    for a in range(n_axes)]
        fused[s:s + m] = fused_logits(per_axis, fusion)[:, 0, ::k, 0].argmax(axis=0)
    return {"learned": _accuracy(samples, fused),
            "max": _accuracy(samples, centre.reshape(n, -1).argmax(axis=1) % n_classes),
            "mean": _accuracy(samples, centre.astype(np.int64).sum(axis=1).argmax(axis=1))}


def fit_fusion(
    prediction: str | os.PathLike[str],
    truth: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str],
    kind: str = "conv",
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    ignore_label: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> FusionFitResult:
    """Fit a learned fusion of a prediction's per-axis probabilities to the labels of that volume.

    Parameters
    ----------
    prediction
        A complete ``volseg predict`` output of a labelled volume the network did not train on, with its
        per-axis probabilities kept (not ``--fused``, not ``--no-keep-probabilities``).
    truth
        The labels of that volume (any format :func:`~volseg_dask.io.open_volume` reads; same shape).
    output
        The model file to write: the network of ``model`` plus the fusion parameters.
    model
        The model file that made ``prediction`` (checked by the network hash the prediction recorded).
    kind
        ``linear`` (a weight per axis and class, a bias per class) or ``conv`` (a 3×3×3 convolution
        over the stacked per-axis probabilities).
    samples
        Voxels sampled (blockwise, ``samples // classes`` per labelled class), never the whole volume.
    seed
        Seed of the sample: the same seed, truth and prediction give the same voxels.
    ignore_label
        Truth value left out of the fit (besides the model's own ``ignore_label``).
    overwrite
        Replace an existing ``output`` (written atomically when the fit is done).
    progress
        Show progress bars.

    Returns
    -------
    FusionFitResult
        The model file, the fit's time, loss and accuracies on the sample.

    Raises
    ------
    ModelFileError
        ``prediction`` was made by another network than ``model``'s.
    VolumeFormatError, VolumeValueError, IncompleteOutputError
        Shapes differ, labels not integers or not the model's label values, fewer than two classes
        labelled; ``prediction`` incomplete or without per-axis probabilities.
    """
    t0 = time.perf_counter()
    if kind not in KINDS:
        raise ConfigError(f"fuse fit: kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if samples < 100:
        raise ConfigError(f"fuse fit: samples must be at least 100, not {samples}")
    out, pred = Path(output), Path(prediction)
    check_output_path(out, overwrite)
    state, meta = read_model_file(model)
    _, info, axes, grid = open_prediction(pred)
    network = network_digest(meta, file_sha256(model))
    made_by = prediction_network(info)
    if made_by != network:
        raise ModelFileError(f"{pred}: its per-axis probabilities come from another network (sha256 "
                             f"{str(made_by)[:12]}) than {model} ({network[:12]}); predict the labelled volume with "
                             f"{model}, keeping the probabilities, or give the model file that made {pred}")
    labels = open_volume(truth)
    if tuple(labels.shape) != tuple(grid.native_shape):
        raise VolumeFormatError(f"{truth}: shape {tuple(labels.shape)} differs from the prediction {pred} "
                                f"{tuple(grid.native_shape)}; give the labels of the predicted volume")
    if labels.dtype.kind not in "biu":
        raise VolumeFormatError(f"{truth}: labels must be integers, found {labels.dtype}")
    ignored = ignore_label if ignore_label is not None else meta.ignore_label
    with OutputLock(out):
        drawn = sample_voxels(str(pred), axes, grid, labels, meta.label_values, ignored, samples=samples, seed=seed,
                              radius=1 if kind == "conv" else 0, source=str(truth), progress=progress)
        t_fit = time.perf_counter()
        weights, bias, details = fit_parameters(drawn, kind, len(axes), meta.classes)
        fit_seconds = time.perf_counter() - t_fit
        record = {"prediction": str(pred.resolve()), "truth": str(truth), "ignore_label": ignored, "seed": seed,
                  "samples": len(drawn.classes), "samples_per_class": drawn.per_class.tolist(),
                  "class_voxels": drawn.class_voxels.tolist(), "prediction_settings": info.get("settings", {}),
                  "fit_seconds": round(fit_seconds, 2), "date": now(), **details}
        fusion = Fusion.quantize(kind, axes, weights, bias, network, record)
        accuracy = _sample_accuracies(drawn, fusion, len(axes), meta.classes)
        fusion = dataclasses.replace(fusion, fit={**record, "accuracy": {k: round(v, 6) for k, v in accuracy.items()}})
        save_model(out, model_from_meta(state, meta, model), dataclasses.replace(meta, fusion=fusion))
    seconds = time.perf_counter() - t0
    log.info("%s fusion fitted on %d voxels in %.1f s (loss %.4f -> %.4f)", kind, len(drawn.classes), seconds,
             details["loss_start"], details["loss"])
    return FusionFitResult(out, kind, len(drawn.classes), seconds, float(details["loss"]), accuracy)


def fit_fusion_on_volume(
    model: str | os.PathLike[str],
    image: str | os.PathLike[str],
    labels: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    kind: str = "conv",
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    settings: Settings | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> FusionFitResult:
    """Predict a labelled volume with ``model`` (probabilities kept, in a temporary folder beside the
    output), fit a fusion on it and write ``output`` (default: ``model`` itself, replaced atomically).

    ``settings``' ``predict`` section sets the blocks, halo, axes and device of the prediction (its merge
    and outputs are not used). The other parameters are those of :func:`fit_fusion`. The temporary
    prediction is removed afterwards, also on errors.
    """
    check_labelled_volume(image, labels)
    out = Path(output) if output is not None else Path(model)
    replace_model = out.resolve() == Path(model).resolve()
    check_output_path(out, overwrite or replace_model)
    ps = dataclasses.replace(predict_settings(settings), merge="max", fused=False, keep_probabilities=True,
                             confidence=False, entropy=False, disagreement=False)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.fusion-", dir=out.parent))
    try:
        log.info("predicting the labelled volume %s with %s for the fusion fit", image, model)
        predict(image, model, work / "prediction.zarr", ps, progress=progress)
        return fit_fusion(work / "prediction.zarr", labels, out, model=model, kind=kind, samples=samples, seed=seed,
                          overwrite=overwrite or replace_model, progress=progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
