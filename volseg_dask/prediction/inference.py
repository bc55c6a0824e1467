"""The slab function: a block of a volume -> class probabilities along one axis.

A block arrives with its halo (context around it, cropped after inference). Its planes
perpendicular to the axis go through the network in mini-batches, each padded to the network's
multiple (reflect) and cropped back; optional test-time variants (rotations by 90°, flips) are
undone and combined inside the task. Probabilities leave as uint8, ``round(p * 255)``.

The model is loaded once per process (cache keyed by path, file time and device), so dask tasks
carry only the model file's path. On CUDA the forward pass runs under float16 autocast; on the CPU
in float32 with ``channels_last`` and ``inference_mode``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..device import autocast, select_device
from ..grid import AXES
from ..models import ModelMeta, model_from_meta, read_model_file
from ..normalize import Normalization, apply
from .votes import combine

log = logging.getLogger(__name__)

__all__ = ["AXES", "SlabSpec", "get_model", "infer_block", "predict_planes", "set_torch_threads"]


_CACHE: dict[tuple[Any, ...], tuple[torch.nn.Module, ModelMeta]] = {}
_CACHE_LOCK = threading.Lock()
_THREADS_SET: list[int] = []


def set_torch_threads(n: int | None) -> None:
    """Set torch's intra-op threads for this process, once.

    ``None`` means one torch thread per dask thread: on the local threaded scheduler the cores are
    divided among its threads; on a ``distributed`` worker torch already follows the
    ``OMP_NUM_THREADS=1`` its nanny sets, and is left alone.
    """
    if _THREADS_SET:
        return
    if n is None:
        try:
            from distributed import get_worker

            get_worker()
            _THREADS_SET.append(torch.get_num_threads())
            return
        except (ImportError, ValueError):
            pass
        import dask

        dask_threads = int(dask.config.get("num_workers", None) or os.cpu_count() or 1)
        n = max(1, (os.cpu_count() or 1) // max(1, dask_threads))
    torch.set_num_threads(n)
    _THREADS_SET.append(n)
    log.debug("torch intra-op threads: %d", n)


def get_model(path: str | os.PathLike[str], device: torch.device) -> tuple[torch.nn.Module, ModelMeta]:
    """The model of ``path`` on ``device``, loaded once per process and shared by its threads."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_mtime_ns, st.st_size, str(device))
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is None:
            state, meta = read_model_file(p)
            model = model_from_meta(state, meta, p).to(device)
            if device.type == "cpu":
                model = model.to(memory_format=torch.channels_last)
            hit = (model.eval(), meta)
            _CACHE.clear()  # one model per process at a time: a new file replaces the old one
            _CACHE[key] = hit
            log.debug("loaded model %s on %s", p, device)
    return hit


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (h, w)


def _logits(model: torch.nn.Module, planes: np.ndarray, device: torch.device, multiple: int) -> torch.Tensor:
    """Logits (N, C, H, W) of one batch of normalised planes, padded to ``multiple`` and cropped back.

    Call under ``torch.inference_mode()`` and :func:`volseg_dask.device.autocast`.
    """
    memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    x = torch.from_numpy(np.ascontiguousarray(planes)).to(device)
    x, (h, w) = _pad_to_multiple(x, multiple)
    logits = model(x.contiguous(memory_format=memory_format))
    if logits.shape[-2:] != x.shape[-2:]:
        raise RuntimeError(f"the network returned {tuple(logits.shape[-2:])} for an input of "
                           f"{tuple(x.shape[-2:])}; its architecture does not keep the input size")
    return logits[..., :h, :w]


def predict_planes(model: torch.nn.Module, planes: np.ndarray, *, device: torch.device, batch_size: int = 4,
                   multiple: int = 32, amp: bool = True) -> np.ndarray:
    """Softmax probabilities (N, C, H, W) float32 of normalised planes (N, channels, H, W)."""
    out: list[np.ndarray] = []
    with torch.inference_mode(), autocast(device, amp):
        for start in range(0, len(planes), batch_size):
            logits = _logits(model, planes[start:start + batch_size], device, multiple)
            out.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    if len(out) == 1:
        return out[0]
    return np.concatenate(out) if out else np.empty((0, 0, 0, 0), np.float32)


def _uint8_probabilities(model: torch.nn.Module, planes: np.ndarray, crop: tuple[slice, slice], *,
                         device: torch.device, multiple: int, amp: bool) -> np.ndarray:
    """``to_uint8`` of the cropped softmax of one batch, computed on the device (bit-identical to it):
    the crop comes first, so the softmax and the conversion skip the halo and 1 byte per value leaves."""
    with torch.inference_mode(), autocast(device, amp):
        logits = _logits(model, planes, device, multiple)[(..., *crop)]
        probs = torch.softmax(logits.float(), dim=1)
        return probs.mul_(255.0).round_().to(torch.uint8).cpu().numpy()


@dataclass(frozen=True)
class SlabSpec:
    """Everything a task needs besides the block: plain values, cheap to send to workers."""

    model_path: str
    normalization: Normalization
    n_slices: int = 1
    batch_size: int = 4
    device: str = "auto"
    amp: bool = True
    rotations: tuple[int, ...] = (0,)
    flips: bool = False
    combine: str = "max"
    torch_threads: int | None = None
    multiple: int = 32


def _variants(spec: SlabSpec) -> list[tuple[int, bool]]:
    return [(k, f) for k in spec.rotations for f in ((False, True) if spec.flips else (False,))]


def infer_block(block: np.ndarray, axis: str, spec: SlabSpec, crop: Sequence[tuple[int, int]]) -> np.ndarray:
    """Class probabilities of ``block`` predicted along ``axis``, cropped; uint8 ``(C, z, y, x)``.

    Planes are normalised, predicted and cropped one batch at a time, straight into the uint8
    result, so a task holds the raw block, its uint8 probabilities and one batch in float32.

    Parameters
    ----------
    block
        Raw intensities (z, y, x) including the halo.
    axis
        ``"z"``, ``"y"`` or ``"x"``: the network sees planes perpendicular to it.
    spec
        Model path, normalisation, batch size, device, test-time variants.
    crop
        ``(before, after)`` voxels to remove from each of z, y, x after inference (the halo).
        Along ``axis`` it must be at least ``(n_slices - 1) / 2`` on each side: those slices are the
        2.5D context of the outermost planes, never predicted themselves.
    """
    set_torch_threads(spec.torch_threads)
    device = select_device(spec.device)
    model, meta = get_model(spec.model_path, device)
    ax = AXES[axis]
    half = (spec.n_slices - 1) // 2
    if crop[ax][0] < half or crop[ax][1] < half:
        raise ValueError(f"2.5D with {spec.n_slices} slices needs {half} context slices along {axis}")
    x = np.moveaxis(block, ax, 0)  # (n, h, w) view: planes perpendicular to the axis
    (lo, hi), (pa, pb), (qa, qb) = crop[ax], *(crop[d] for d in range(3) if d != ax)
    n, h, w = x.shape[0] - lo - hi, x.shape[1], x.shape[2]
    kept = [size - a - b for size, (a, b) in zip(block.shape, crop)]
    result = np.empty((meta.classes, *kept), np.uint8)  # (C, z, y, x)
    out = np.moveaxis(result, ax + 1, 1)  # (C, n, h', w') view: batches land in their final place
    offsets = np.arange(-half, half + 1)[None, :]
    variants = _variants(spec)
    for s in range(0, n, spec.batch_size):
        centre = np.arange(lo + s, lo + min(s + spec.batch_size, n))[:, None]
        planes = apply(x[centre + offsets], spec.normalization)  # (b, n_slices, h, w) float32
        if variants == [(0, False)]:
            probs8 = _uint8_probabilities(model, planes, (slice(pa, h - pb), slice(qa, w - qb)), device=device,
                                          multiple=spec.multiple, amp=spec.amp)
            out[:, s:s + len(centre)] = probs8.transpose(1, 0, 2, 3)
            continue
        results = []
        for k, flip in variants:
            v = np.rot90(planes, k, axes=(2, 3))
            if flip:
                v = v[..., ::-1]
            p = predict_planes(model, v, device=device, batch_size=spec.batch_size, multiple=spec.multiple,
                               amp=spec.amp)
            if flip:
                p = p[..., ::-1]
            results.append(np.rot90(p, -k, axes=(2, 3)))
        probs = results[0] if len(results) == 1 else combine(
            results, "mean" if spec.combine == "vote" else spec.combine, class_axis=1)
        out[:, s:s + len(centre)] = to_uint8(probs[:, :, pa:h - pb, qa:w - qb]).transpose(1, 0, 2, 3)
    return result


def to_uint8(probs: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] -> uint8 ``round(p * 255)``."""
    return np.rint(probs * 255.0).astype(np.uint8)
