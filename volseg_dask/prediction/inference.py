"""The slab function: a block of a volume -> uint8 class probabilities along one axis, computed on the device.

Per-voxel work runs where the network runs. The raw block (uint8, uint16, float: as it was read) goes to
the device once, through a pinned host buffer and a non-blocking copy on CUDA; there its planes are
gathered with their 2.5D context, normalised, padded (reflect) to the network's multiple, predicted in
batches, softmaxed, cropped to the block and turned into uint8 ``round(p * 255)``, optional test-time
variants (rotations by 90°, flips) undone and combined; only the uint8 probabilities come back, already in
``(C, z, y, x)`` order. CUDA is asynchronous and nothing in the batch loop waits for the device.

Two ways to run a block (``predict.pipeline``):

``inline``
    in the calling task's thread: the CPU's way, where the cores are the device and every dask thread
    runs its own blocks (torch threads divided among them).
``device-thread``
    handed to one thread per process that owns the device, through a bounded queue: the dask threads of
    a worker read, decode, encode and write other blocks while the device computes (producers -> one
    device consumer -> writers, as in torch-em's pipelined prediction). The device never runs two blocks
    at once, and host memory stays bounded by the worker's threads and the queue.

``auto`` takes the device thread on CUDA and MPS and runs inline on the CPU. Both ways run the same
device-side code, so their results are identical.

The model is loaded once per process (cache keyed by path, file time and device), so dask tasks carry
only the model file's path. On CUDA the forward pass runs under float16 autocast (bfloat16 as an option)
with ``cudnn.benchmark``; on the CPU in float32 with ``channels_last`` and ``inference_mode``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..device import autocast, select_device
from ..grid import AXES
from ..models import ModelMeta, model_from_meta, read_model_file
from ..normalize import Normalization

log = logging.getLogger(__name__)

__all__ = ["AXES", "Engine", "SlabSpec", "get_engine", "get_model", "infer_block", "pipelined",
           "predict_planes", "set_torch_threads", "submit_block"]

CPU_BATCH = 4
"""Planes per forward pass on the CPU when ``predict.batch_size`` is ``auto``."""

MAX_AUTO_BATCH = 64
"""Largest batch the ``auto`` batch size picks on a GPU."""

QUEUE_BLOCKS = 4
"""Block-axes waiting for a device thread (beyond the one it computes); submitters wait when it is full. They
hold no memory of their own: the raw block is the submitting task's, staged for the device only when taken."""


@dataclass(frozen=True)
class SlabSpec:
    """Everything a task needs besides the block: plain values, cheap to send to workers.

    ``batch_size`` None means ``auto`` (from the device's free memory on a GPU, :data:`CPU_BATCH` on
    the CPU).
    """

    model_path: str
    normalization: Normalization
    n_slices: int = 1
    batch_size: int | None = None
    device: str = "auto"
    amp: bool = True
    amp_dtype: str = "float16"
    rotations: tuple[int, ...] = (0,)
    flips: bool = False
    combine: str = "max"
    torch_threads: int | None = None
    multiple: int = 32
    pipeline: str = "auto"
    compile: bool = False


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


# ---- host <-> device -----------------------------------------------------------------------------


def to_device(t: Any, device: torch.device) -> Any:
    """Move a host tensor (without waiting: a pinned source on CUDA) or a module to ``device``.

    The one place that places things on the device (tests of the GPU path mock it, and ``_event``, on a
    machine without one).
    """
    if isinstance(t, torch.Tensor):
        return t.to(device, non_blocking=True)
    return t.to(device)


def _event() -> Any:
    """A CUDA event recorded on the current stream (when it has passed, the work queued before it is done)."""
    event = torch.cuda.Event()
    event.record()
    return event


class _PinnedPool:
    """Reusable page-locked host buffers (allocating them costs milliseconds per MB), one per size in use."""

    def __init__(self) -> None:
        self._free: dict[int, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            stack = self._free.get(nbytes)
            if stack:
                return stack.pop()
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def give(self, buffer: torch.Tensor) -> None:
        with self._lock:
            stack = self._free.setdefault(buffer.numel(), [])
            if len(stack) < 2 * QUEUE_BLOCKS + 2:
                stack.append(buffer)


def _as_torch(raw: np.ndarray) -> tuple[torch.Tensor, str | None]:
    """A host tensor over ``raw``'s bytes (no copy, strides kept) and how to widen it on the device (the
    unsigned types torch computes little with travel as the signed type of their size)."""
    if raw.dtype == np.uint16:
        return torch.from_numpy(raw.view(np.int16)), "uint16"
    if raw.dtype == np.uint32:
        return torch.from_numpy(raw.view(np.int32)), "uint32"
    if raw.dtype.kind == "b":
        return torch.from_numpy(raw.view(np.uint8)), None
    if raw.dtype.kind not in "iuf" or raw.dtype == np.uint64 or raw.dtype.itemsize > 8:
        return torch.from_numpy(raw.astype(np.float64)), None
    return torch.from_numpy(raw), None


def _widen(t: torch.Tensor, unsigned: str | None) -> torch.Tensor:
    """float32 values of a device tensor whose bytes are ``unsigned`` integers viewed as signed ones."""
    if unsigned == "uint16":
        return t.to(torch.int32).bitwise_and_(0xFFFF).to(torch.float32)
    if unsigned == "uint32":
        return t.to(torch.int64).bitwise_and_(0xFFFFFFFF).to(torch.float32)
    return t.to(torch.float32)


# ---- the engine: one model on one device -----------------------------------------------------------


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (h, w)


def _variants(spec: SlabSpec) -> list[tuple[int, bool]]:
    return [(k, f) for k in spec.rotations for f in ((False, True) if spec.flips else (False,))]


class Engine:
    """One model on one device in this process: turns raw blocks into uint8 probabilities.

    Parameters
    ----------
    model_path
        Model file.
    device
        Where the network runs.
    compile
        ``torch.compile`` the network.
    """

    def __init__(self, model_path: str | os.PathLike[str], device: torch.device, *, compile: bool = False) -> None:
        self.device = device
        self.model, self.meta = get_model(model_path, device)
        if compile:
            self.model = torch.compile(self.model, dynamic=True)  # type: ignore[assignment]
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.pinned = _PinnedPool() if device.type == "cuda" else None
        self._auto_batch: dict[tuple[int, int, int], int] = {}
        self._thread: _DeviceThread | None = None
        self._lock = threading.Lock()

    # -- transfers ---------------------------------------------------------------------------------
    def upload(self, raw: np.ndarray) -> tuple[torch.Tensor, str | None, Any]:
        """``raw`` on the device as it is (no conversion on the host); and the staging buffer in use, if any."""
        host, unsigned = _as_torch(raw)
        if self.pinned is None:
            return to_device(host, self.device), unsigned, None
        staging = self.pinned.take(host.numel() * host.element_size())
        staged = staging.view(host.dtype).view(host.shape)
        staged.copy_(host)
        return to_device(staged, self.device), unsigned, staging

    def download(self, out: torch.Tensor) -> tuple[np.ndarray, Any]:
        """Start copying the uint8 ``out`` to the host; (the host array once :meth:`wait` says so, event)."""
        if self.pinned is None:
            return out.cpu().numpy(), None
        buffer = self.pinned.take(out.numel())
        host = buffer.view(out.shape)
        host.copy_(out, non_blocking=True)
        return host.numpy(), (_event(), buffer)

    def finish(self, host: np.ndarray, pending: Any, staging: Any) -> np.ndarray:
        """Wait for a download started by :meth:`download`; return an array of its own, give buffers back."""
        if pending is None:
            return host
        event, buffer = pending
        event.synchronize()
        result = host.copy()
        assert self.pinned is not None
        self.pinned.give(buffer)
        if staging is not None:  # the upload finished before the download that followed it
            self.pinned.give(staging)
        return result

    # -- the computation ---------------------------------------------------------------------------
    def batch_size(self, spec: SlabSpec, channels: int, h: int, w: int) -> int:
        """Planes per forward pass: the setting, or ``auto`` (free device memory on a GPU)."""
        if spec.batch_size:
            return spec.batch_size
        if self.device.type != "cuda":
            return CPU_BATCH
        key = (channels, h + (-h) % spec.multiple, w + (-w) % spec.multiple)
        if key not in self._auto_batch:
            self._auto_batch[key] = self._probe_batch(spec, *key)
        return self._auto_batch[key]

    def _probe_batch(self, spec: SlabSpec, channels: int, h: int, w: int) -> int:
        """The largest power of two planes whose activations fit half of the free device memory."""
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        probe = to_device(torch.zeros((2, channels, h, w)), self.device)
        with torch.inference_mode(), autocast(self.device, spec.amp, spec.amp_dtype):
            self.model(probe.contiguous(memory_format=torch.channels_last))
        torch.cuda.synchronize(self.device)
        per_plane = max(1, (torch.cuda.max_memory_allocated(self.device) - before) // 2)
        free, _ = torch.cuda.mem_get_info(self.device)
        fit = int(0.5 * free // per_plane)
        batch = 1 << max(0, min(fit, MAX_AUTO_BATCH).bit_length() - 1)
        log.info("auto batch size on %s for %dx%d planes: %d (%.0f MB activations per plane, %.0f MB free)",
                 self.device, h, w, batch, per_plane / 2**20, free / 2**20)
        return batch

    def _uint8(self, planes: torch.Tensor, crop: tuple[slice, slice], spec: SlabSpec) -> torch.Tensor:
        """uint8 cropped probabilities ``(b, C, h', w')`` of normalised planes ``(b, channels, h, w)``."""
        variants = _variants(spec)
        combined: torch.Tensor | None = None
        best: torch.Tensor | None = None
        for k, flip in variants:
            x = torch.rot90(planes, k, dims=(2, 3)) if k else planes
            if flip:
                x = x.flip(-1)
            x, (h, w) = _pad_to_multiple(x, spec.multiple)
            with autocast(self.device, spec.amp, spec.amp_dtype):
                logits = self.model(x.contiguous(memory_format=torch.channels_last))
            if logits.shape[-2:] != x.shape[-2:]:
                raise RuntimeError(f"the network returned {tuple(logits.shape[-2:])} for an input of "
                                   f"{tuple(x.shape[-2:])}; its architecture does not keep the input size")
            logits = logits[..., :h, :w]
            if flip:
                logits = logits.flip(-1)
            if k:
                logits = torch.rot90(logits, -k, dims=(2, 3))
            logits = logits[(..., *crop)]
            probs = torch.softmax(logits.float(), dim=1)
            if len(variants) == 1:
                combined = probs
            elif spec.combine == "max":  # the variant with the highest top probability, voxel by voxel
                top = probs.amax(dim=1, keepdim=True)
                if combined is None or best is None:
                    combined, best = probs, top
                else:
                    take = top > best
                    combined = torch.where(take, probs, combined)
                    best = torch.where(take, top, best)
            else:  # mean (the vote of variants is their mean)
                combined = probs if combined is None else combined + probs
        assert combined is not None
        if len(variants) > 1 and spec.combine != "max":
            combined = combined / len(variants)
        return combined.mul_(255.0).round_().to(torch.uint8)

    def compute(self, raw: torch.Tensor, unsigned: str | None, axis: str, crop: Sequence[tuple[int, int]],
                spec: SlabSpec) -> torch.Tensor:
        """uint8 probabilities ``(C, z, y, x)`` (contiguous, on the device) of a raw block on the device."""
        ax = AXES[axis]
        half = (spec.n_slices - 1) // 2
        if crop[ax][0] < half or crop[ax][1] < half:
            raise ValueError(f"2.5D with {spec.n_slices} slices needs {half} context slices along {axis}")
        x = raw.movedim(ax, 0)  # (n, h, w) view: planes perpendicular to the axis
        (lo, hi), (pa, pb), (qa, qb) = crop[ax], *(crop[d] for d in range(3) if d != ax)
        n, h, w = x.shape[0] - lo - hi, x.shape[1], x.shape[2]
        norm = spec.normalization
        scale = 1.0 / (norm.high - norm.low)
        # ((clip(x, low, high) - low) * scale - mean) / std, as one multiply-add after the clip
        gain, offset = scale / norm.std, -(norm.low * scale + norm.mean) / norm.std
        dev = raw.device  # (self.device, unless a test keeps the tensors on the host)
        out = torch.empty((self.meta.classes, n, h - pa - pb, w - qa - qb), dtype=torch.uint8, device=dev)
        offsets = torch.arange(-half, half + 1, device=dev)[None, :]
        batch = self.batch_size(spec, spec.n_slices, h, w)
        crop2 = (slice(pa, h - pb), slice(qa, w - qb))
        with torch.inference_mode():
            for s in range(0, n, batch):
                centre = torch.arange(lo + s, lo + min(s + batch, n), device=dev)[:, None]
                planes = _widen(x[centre + offsets], unsigned)  # (b, n_slices, h, w) float32
                planes.clamp_(norm.low, norm.high).mul_(gain).add_(offset)
                out[:, s:s + centre.shape[0]] = self._uint8(planes, crop2, spec).transpose(0, 1)
            return out.movedim(1, ax + 1).contiguous()

    def run(self, block: np.ndarray, axis: str, crop: Sequence[tuple[int, int]], spec: SlabSpec) -> np.ndarray:
        """:meth:`compute` for a host block, in the calling thread; the result on the host."""
        raw, unsigned, staging = self.upload(block)
        out = self.compute(raw, unsigned, axis, crop, spec)
        host, pending = self.download(out)
        return self.finish(host, pending, staging)

    # -- the device thread -------------------------------------------------------------------------
    def close(self) -> None:
        """Stop this engine's device thread (after the blocks already queued)."""
        with self._lock:
            if self._thread is not None:
                self._thread.close()
                self._thread = None

    def submit(self, block: np.ndarray, axis: str, crop: Sequence[tuple[int, int]], spec: SlabSpec) -> Future:
        """Queue a block for this process's device thread (waits while its queue is full)."""
        with self._lock:
            if self._thread is None or not self._thread.alive():
                self._thread = _DeviceThread(self)
        return self._thread.submit(block, axis, crop, spec)


class _DeviceThread:
    """The one thread that feeds the device: uploads, computes and starts each block's download while a
    second thread waits for finished downloads, so the device is never idle waiting for the host."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.jobs: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_BLOCKS)
        self.done: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_BLOCKS)
        self.busy = 0  # blocks on the device now (0 or 1: this thread runs one at a time)
        self.max_busy = 0
        self._threads = [threading.Thread(target=self._feed, name="volseg-device", daemon=True),
                         threading.Thread(target=self._drain, name="volseg-device-results", daemon=True)]
        for t in self._threads:
            t.start()

    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    def close(self) -> None:
        """End both threads once the blocks queued before are done."""
        self.jobs.put(None)

    def submit(self, block: np.ndarray, axis: str, crop: Sequence[tuple[int, int]], spec: SlabSpec) -> Future:
        future: Future = Future()
        self.jobs.put((future, block, axis, tuple(crop), spec))
        return future

    def _feed(self) -> None:
        engine = self.engine
        with _device_context(engine.device):
            while True:
                job = self.jobs.get()
                if job is None:
                    self.done.put(None)
                    return
                future, block, axis, crop, spec = job
                try:
                    self.busy += 1
                    self.max_busy = max(self.max_busy, self.busy)
                    raw, unsigned, staging = engine.upload(block)
                    del block
                    out = engine.compute(raw, unsigned, axis, crop, spec)
                    host, pending = engine.download(out)
                    del raw, out
                    self.done.put((future, host, pending, staging))
                except BaseException as exc:
                    future.set_exception(exc)
                finally:
                    self.busy -= 1

    def _drain(self) -> None:
        while True:
            item = self.done.get()
            if item is None:
                return
            future, host, pending, staging = item
            try:
                future.set_result(self.engine.finish(host, pending, staging))
            except BaseException as exc:
                future.set_exception(exc)


@contextlib.contextmanager
def _device_context(device: torch.device) -> Iterator[None]:
    """Make ``device`` current in this thread (CUDA keeps the current device per thread)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield


# ---- per-process caches and the entry points -------------------------------------------------------

_MODELS: dict[tuple[Any, ...], tuple[torch.nn.Module, ModelMeta]] = {}
_ENGINES: dict[tuple[Any, ...], Engine] = {}
_CACHE_LOCK = threading.RLock()


def _file_key(path: str | os.PathLike[str]) -> tuple[Any, ...]:
    p = Path(path)
    st = p.stat()
    return (str(p.resolve()), st.st_mtime_ns, st.st_size)


def get_model(path: str | os.PathLike[str], device: torch.device) -> tuple[torch.nn.Module, ModelMeta]:
    """The model of ``path`` on ``device``, loaded once per process and shared by its threads."""
    key = (*_file_key(path), str(device))
    with _CACHE_LOCK:
        hit = _MODELS.get(key)
        if hit is None:
            state, meta = read_model_file(path)
            model = to_device(model_from_meta(state, meta, path), device).to(memory_format=torch.channels_last)
            hit = (model.eval(), meta)
            _MODELS.clear()  # one model per process at a time: a new file replaces the old one
            _MODELS[key] = hit
            log.debug("loaded model %s on %s", path, device)
    return hit


def get_engine(spec: SlabSpec) -> Engine:
    """This process's engine for ``spec``'s model and device (created on first use)."""
    set_torch_threads(spec.torch_threads)
    device = select_device(spec.device)
    key = (*_file_key(spec.model_path), str(device), spec.compile)
    with _CACHE_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            for old in _ENGINES.values():  # one engine per process at a time, as one model
                old.close()
            _ENGINES.clear()
            engine = _ENGINES[key] = Engine(spec.model_path, device, compile=spec.compile)
    return engine


def _uses_device_thread(spec: SlabSpec, device: torch.device) -> bool:
    if spec.pipeline == "device-thread":
        return True
    if spec.pipeline == "inline":
        return False
    return device.type in ("cuda", "mps")


def pipelined(spec: SlabSpec) -> bool:
    """Whether blocks of ``spec`` go to a device thread (so a task can have several in flight)."""
    return _uses_device_thread(spec, get_engine(spec).device)


def submit_block(block: np.ndarray, axis: str, spec: SlabSpec, crop: Sequence[tuple[int, int]]) -> Future:
    """:func:`infer_block` that returns at once: a future of the probabilities (already done when inline)."""
    engine = get_engine(spec)
    if _uses_device_thread(spec, engine.device):
        return engine.submit(block, axis, crop, spec)
    future: Future = Future()
    try:
        future.set_result(engine.run(block, axis, crop, spec))
    except BaseException as exc:
        future.set_exception(exc)
    return future


def infer_block(block: np.ndarray, axis: str, spec: SlabSpec, crop: Sequence[tuple[int, int]]) -> np.ndarray:
    """Class probabilities of ``block`` predicted along ``axis``, cropped; uint8 ``(C, z, y, x)``.

    Parameters
    ----------
    block
        Raw intensities (z, y, x) including the halo, in the dtype they were read.
    axis
        ``"z"``, ``"y"`` or ``"x"``: the network sees planes perpendicular to it.
    spec
        Model path, normalisation, batch size, device, precision, test-time variants, pipeline.
    crop
        ``(before, after)`` voxels to remove from each of z, y, x after inference (the halo).
        Along ``axis`` it must be at least ``(n_slices - 1) / 2`` on each side: those slices are the
        2.5D context of the outermost planes, never predicted themselves.
    """
    return submit_block(block, axis, spec, crop).result()


def predict_planes(model: torch.nn.Module, planes: np.ndarray, *, device: torch.device, batch_size: int = 4,
                   multiple: int = 32, amp: bool = True) -> np.ndarray:
    """Softmax probabilities (N, C, H, W) float32 of normalised planes (N, channels, H, W), on the host.

    The network alone on planes already in memory (benchmarks and the demo's 2D scores use it).
    """
    out: list[np.ndarray] = []
    with torch.inference_mode(), autocast(device, amp):
        for start in range(0, len(planes), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(planes[start:start + batch_size])).to(device)
            x, (h, w) = _pad_to_multiple(x, multiple)
            logits = model(x.contiguous(memory_format=torch.channels_last))[..., :h, :w]
            out.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    if len(out) == 1:
        return out[0]
    return np.concatenate(out) if out else np.empty((0, 0, 0, 0), np.float32)


def to_uint8(probs: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] -> uint8 ``round(p * 255)``."""
    return np.rint(probs * 255.0).astype(np.uint8)
