"""Out-of-core prediction: per axis, one task per block, stored as per-axis probability Zarr; then merge.

Output layout (``OUT.zarr``, a Zarr v3 group)::

    probabilities/z   (C, Z, Y, X) uint8   one per predicted axis, round(p * 255)
    probabilities/y
    probabilities/x
    labels            (Z, Y, X)            original label values, merged across axes
    confidence        (Z, Y, X) uint8      merged probability of the chosen class (optional)
    entropy, disagreement                  optional uncertainty maps

Every array shares one chunk grid (the prediction blocks), so the merge is a pure blockwise pass.
Each task reads its own block plus halo straight from the input (halo toward neighbouring blocks only),
runs the slab function and writes exactly one output chunk, then drops a done-marker; a rerun of
the same command skips marked blocks (resume after a kill), and refuses to mix in blocks made
with other settings. Arrays, and the group, are marked complete only when fully written.

``--fused`` runs all axes of a block inside one task (halo in all three dims) and writes only the
merged outputs: no per-axis probabilities touch the disk.

A model trained at 1/N resolution (``data.downsample``) predicts on the volume averaged over N×N×N
cubes (:mod:`volseg_dask.resample`): blocks, halo and the per-axis probabilities are on that coarse
grid (block ``i`` of it is block ``i`` of the outputs, N times smaller), and the merge upsamples each
block's probabilities linearly to full resolution before the vote.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr
from dask.array.overlap import ensure_minimum_chunksize

from . import store
from .config import PredictSettings, Settings
from .errors import ConfigError, ModelFileError, OutputExistsError, VolsegError, VolumeValueError, WriteFailedError
from .inference import AXES, SlabSpec, infer_block
from .io import open_volume, read_downsampled, split_key, volume_voxel_size
from .memory import trim_memory
from .models import read_model_file
from .normalize import Normalization, compute_normalization
from .progress import active_client, compute
from .resample import coarse_shape, downsample_array, lerp_weights, region_reader, upsample_region
from .votes import write_merged, write_merged_block

log = logging.getLogger(__name__)

__all__ = ["Plan", "PredictResult", "plan_prediction", "predict", "predict_array"]

DONE_DIR = ".volseg/done"


@dataclass
class PredictResult:
    """What :func:`predict` did."""

    output: Path
    blocks_computed: int
    blocks_skipped: int
    seconds: float
    voxels: int
    axes: str

    @property
    def voxels_per_second(self) -> float:
        return self.voxels / self.seconds if self.seconds > 0 else float("nan")

    @property
    def labels(self) -> da.Array:
        """The merged labels, opened lazily."""
        return open_volume(self.output / "labels")


@dataclass
class Plan:
    """A validated prediction: inputs, block grid, slab spec and the run key that guards resumes."""

    volume: str
    model: str
    output: Path
    shape: tuple[int, int, int]
    chunks: tuple[int, int, int]
    halo: int
    axes: tuple[str, ...]
    settings: PredictSettings
    spec: SlabSpec
    meta: dict[str, Any]
    run_key: str = ""
    key_fields: dict[str, Any] = field(default_factory=dict)
    factor: int = 1
    native_shape: tuple[int, int, int] = (0, 0, 0)
    native_chunks: tuple[int, int, int] = (0, 0, 0)

    @property
    def grid(self) -> list[tuple[int, ...]]:
        return store.chunk_grid(self.shape, self.chunks)

    def block(self, index: Sequence[int]) -> tuple[tuple[int, int], ...]:
        """Block ``index`` on the grid the network sees (coarse when the model downsamples)."""
        return store.chunk_region(index, self.shape, self.chunks)

    def native_block(self, index: Sequence[int]) -> tuple[tuple[int, int], ...]:
        """Block ``index`` of the outputs, at the volume's resolution."""
        return store.chunk_region(index, self.native_shape, self.native_chunks)

    @property
    def classes(self) -> int:
        return int(self.meta["classes"])

    @property
    def label_values(self) -> list[int]:
        return [int(v) for v in self.meta["label_values"]]

    @property
    def outputs(self) -> tuple[str, ...]:
        s = self.settings
        return tuple(name for name, on in (("confidence", s.confidence), ("entropy", s.entropy),
                                           ("disagreement", s.disagreement)) if on)


def _file_digest(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(2**20), b""):
            h.update(chunk)
    return h.hexdigest()


def _input_fingerprint(path: str) -> dict[str, Any]:
    file, key = split_key(path)
    target = file / (key or "") / "zarr.json" if file.is_dir() and (file / (key or "") / "zarr.json").exists() \
        else file
    st = os.stat(target)
    return {"path": str(Path(path).resolve()) if not key else path, "mtime_ns": st.st_mtime_ns, "size": st.st_size}


def _settings_of(settings: Settings | PredictSettings | None) -> PredictSettings:
    if settings is None:
        return Settings().predict
    if isinstance(settings, Settings):
        return settings.predict
    return settings


def _rotations(axes_setting: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    if axes_setting == "all12":
        return ("z", "y", "x"), (0, 1, 2, 3)
    return tuple(axes_setting), (0,)


def plan_prediction(volume: str | os.PathLike[str], model: str | os.PathLike[str],
                    output: str | os.PathLike[str], settings: Settings | PredictSettings | None = None) -> Plan:
    """Check every input before any graph is built, and describe the work.

    Raises
    ------
    VolsegError
        Missing or unreadable volume or model, an incomplete input, a model that does not fit the
        data, a halo larger than the blocks, NaN in the normalisation sample.
    """
    ps = _settings_of(settings)
    vol = open_volume(volume)
    if vol.dtype.kind not in "biuf":
        raise VolumeValueError(f"{volume}: dtype {vol.dtype} is not numeric; convert it first")
    model_path = os.fspath(model)
    _, meta = read_model_file(model_path)
    n_slices = int(meta.get("n_slices", meta["in_channels"]))
    if int(meta["in_channels"]) != n_slices:
        raise VolsegError(f"{model_path}: the network takes {meta['in_channels']} channels but the model says "
                          f"{n_slices} slices; multi-channel volumes are not supported")
    if int(meta["classes"]) != len(meta["label_values"]) or int(meta["classes"]) < 2:
        raise VolsegError(f"{model_path}: {meta['classes']} classes but label values {meta['label_values']}; the "
                          "model file is damaged")
    native_shape = tuple(int(s) for s in vol.shape)
    native_chunks = tuple(min(int(c), s) for c, s in zip(ps.chunks, native_shape))
    factor = meta.get("downsample", 1)
    if not isinstance(factor, int) or not 1 <= factor <= 4:
        raise ModelFileError(f"{model_path}: downsample factor {factor!r} in its metadata is not 1-4; the file is "
                             "damaged")
    if any(c % factor and c < s for c, s in zip(native_chunks, native_shape)):
        fixed = [max(factor, c - c % factor) for c in ps.chunks]
        raise ConfigError(f"predict.chunks: {list(ps.chunks)} must be multiples of {factor}, the downsampling "
                          f"factor of {model_path} (its data.downsample); use e.g. {fixed}")
    # the network's grid: blocks, halo and shape in coarse voxels when the model downsamples
    shape = coarse_shape(native_shape, factor)
    chunks = tuple(-(-c // factor) for c in native_chunks)
    halo = -(-int(ps.halo) // factor)
    axes, rotations = _rotations(ps.axes)
    in_plane = set(range(3)) if ps.fused else {d for a in axes for d in range(3) if d != AXES[a]}
    for d, (c, s) in enumerate(zip(chunks, shape)):
        if d in in_plane and halo > c and s > c:
            raise ConfigError(f"predict.halo: {ps.halo} is larger than the block ({c * factor} voxels along "
                              f"{'zyx'[d]}); use a halo of at most the block size (32-64 is typical) or larger "
                              "predict.chunks")
    if ps.normalization == "recompute":
        norm = compute_normalization(downsample_array(vol, factor), source=os.fspath(volume))
    else:
        norm = Normalization.from_dict(meta["normalization"])
    spec = SlabSpec(
        model_path=str(Path(model_path).resolve()), normalization=norm, n_slices=n_slices,
        batch_size=ps.batch_size, device=ps.device, amp=ps.amp, rotations=rotations, flips=ps.tta_flips,
        combine=ps.merge, torch_threads=ps.torch_threads, multiple=int(meta.get("pad_multiple", 32)),
    )
    plan = Plan(os.fspath(volume), model_path, Path(output), shape, chunks, halo, axes,  # type: ignore[arg-type]
                ps, spec, meta, factor=factor, native_shape=native_shape,  # type: ignore[arg-type]
                native_chunks=native_chunks)  # type: ignore[arg-type]
    plan.key_fields = {
        "input": _input_fingerprint(os.fspath(volume)),
        "input_shape": list(native_shape), "input_dtype": str(vol.dtype),
        "model_sha256": _file_digest(model_path),
        "chunks": list(native_chunks), "halo": int(ps.halo), "axes": ps.axes, "tta_flips": ps.tta_flips,
        "normalization": norm.to_dict(), "fused": ps.fused,
        "merge": ps.merge if ps.fused else None,
    }
    plan.run_key = hashlib.sha256(json.dumps(plan.key_fields, sort_keys=True).encode()).hexdigest()[:16]
    return plan


# ---- tasks ---------------------------------------------------------------------------------------


def _context(block: tuple[tuple[int, int], ...], shape: Sequence[int], halo: int, axis: int,
             half: int) -> list[tuple[int, int]]:
    """Voxels of context on each side of a block for one axis's planes.

    In-plane, ``halo`` toward neighbouring blocks (as much of it as the volume holds) and none at the
    volume's border, where a whole plane sees the edge exactly as a whole-volume prediction does (and
    no time goes into mirrored halo). Along the axis, ``half`` slices of 2.5D context, mirrored at the
    border.
    """
    return [(half, half) if d == axis else (min(halo, a), min(halo, n - b))
            for d, ((a, b), n) in enumerate(zip(block, shape))]


def _read_block(volume: str, block: tuple[tuple[int, int], ...], pads: Sequence[tuple[int, int]],
                factor: int = 1) -> np.ndarray:
    start = [a - p for (a, _), (p, _) in zip(block, pads)]
    stop = [b + q for (_, b), (_, q) in zip(block, pads)]
    data = read_downsampled(volume, start, stop, factor)
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        where = ", ".join(f"{a * factor}:{b * factor}" for a, b in block)
        raise VolumeValueError(f"{volume}: NaN or infinite values in the block [{where}]; replace them "
                               "(e.g. with the background value) and run again")
    return data


def _marker(output: Path, name: str, index: Sequence[int]) -> Path:
    return output / DONE_DIR / name / ".".join(map(str, index))


def _axis_task(volume: str, output: str, axis: str, index: tuple[int, ...], block: tuple[tuple[int, int], ...],
               shape: tuple[int, ...], halo: int, spec: SlabSpec, factor: int = 1) -> int:
    marker = _marker(Path(output), f"probabilities-{axis}", index)
    if marker.exists():
        return 0
    try:
        (probs,) = _predict_axes(volume, (axis,), block, shape, halo, spec, factor)
        arr = store.open_for_writing(output, f"probabilities/{axis}")
        arr[(slice(None), *(slice(a, b) for a, b in block))] = probs
        del probs
    finally:
        trim_memory()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return 1


def _predict_axes(volume: str, axes: Sequence[str], block: tuple[tuple[int, int], ...], shape: tuple[int, ...],
                  halo: int, spec: SlabSpec, factor: int) -> list[np.ndarray]:
    """uint8 probabilities ``(C, ...)`` of ``block`` along each of ``axes``, from one read of block + context.

    Every axis sees exactly the region (block plus its own context) a single-axis task reads for it.
    """
    half = (spec.n_slices - 1) // 2
    contexts = [_context(block, shape, halo, AXES[axis], half) for axis in axes]
    pads = [(max(c[d][0] for c in contexts), max(c[d][1] for c in contexts)) for d in range(3)]
    data = _read_block(volume, block, pads, factor)
    per_axis = []
    for axis, context in zip(axes, contexts):
        sub = tuple(slice(p - c, data.shape[d] - q + e) for d, ((p, q), (c, e)) in enumerate(zip(pads, context)))
        per_axis.append(infer_block(data[sub], axis, spec, context))
    return per_axis


def _fused_task(volume: str, output: str, axes: tuple[str, ...], index: tuple[int, ...],
                block: tuple[tuple[int, int], ...], shape: tuple[int, ...], halo: int, spec: SlabSpec, method: str,
                label_values: list[int], outputs: tuple[str, ...], factor: int = 1,
                native_block: tuple[tuple[int, int], ...] | None = None) -> int:
    marker = _marker(Path(output), "fused", index)
    if marker.exists():
        return 0
    if factor == 1:
        per_axis = _predict_axes(volume, axes, block, shape, halo, spec, factor)
        region = tuple(slice(a, b) for a, b in block)
    else:  # the coarse voxels the native block's linear upsampling needs: its block and one more around it
        assert native_block is not None
        weights = [lerp_weights(a, b, factor, n) for (a, b), n in zip(native_block, shape)]
        around = tuple((int(j0.min()), int(j1.max()) + 1) for j0, j1, _ in weights)
        coarse = _predict_axes(volume, axes, around, shape, halo, spec, factor)
        origin = [a for a, _ in around]
        per_axis = [upsample_region(region_reader(p, origin), native_block, factor, shape) for p in coarse]
        del coarse
        region = tuple(slice(a, b) for a, b in native_block)
    write_merged_block(output, per_axis, region, method=method, label_values=label_values, outputs=outputs)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return 1


# ---- the verb ------------------------------------------------------------------------------------


def _gpu_resources(spec: SlabSpec) -> dict[str, float] | None:
    """``{"GPU": 1}`` when the active cluster's workers declare GPUs and the model runs on one."""
    client = active_client()
    if client is None or spec.device == "cpu":
        return None
    workers = client.scheduler_info().get("workers", {}).values()
    if any("GPU" in (w.get("resources") or {}) for w in workers):
        return {"GPU": 1}
    return None


def _prepare_output(plan: Plan, overwrite: bool) -> tuple[zarr.Group, bool]:
    """Create the output group, or reopen it to resume; refuse to mix runs."""
    out = plan.output
    if out.exists():
        group = None
        with contextlib.suppress(Exception):
            group = zarr.open_group(str(out), mode="r+")
        info = store.status(group) if group is not None else None
        if info is None or info.get("kind") != "prediction":
            if not overwrite:
                raise OutputExistsError(f"{out}: already exists and is not a prediction output; choose another "
                                        "output path or pass --overwrite")
        elif overwrite:
            pass
        elif info.get("complete"):
            raise OutputExistsError(f"{out}: already holds a complete prediction; pass --overwrite to redo it or "
                                    "choose another output path")
        elif info.get("run_key") != plan.run_key:
            before = info.get("key_fields", {})
            changed = sorted(k for k in set(before) | set(plan.key_fields) if before.get(k) != plan.key_fields.get(k))
            raise OutputExistsError(
                f"{out}: an unfinished prediction with other settings or inputs is there (differs in: "
                f"{', '.join(changed) or 'unknown'}); rerun with the original settings to finish it, or pass "
                "--overwrite to start again"
            )
        else:
            log.info("resuming the unfinished prediction in %s", out)
            return group, True  # type: ignore[return-value]
        shutil.rmtree(out)
    else:
        store.check_output_path(out, overwrite)
    group = zarr.open_group(str(out), mode="w", zarr_format=3)
    store.set_status(group, **store.provenance(
        kind="prediction", complete=False, run_key=plan.run_key, key_fields=plan.key_fields,
        input=plan.volume, model=str(Path(plan.model).resolve()), axes=list(plan.axes), merge=plan.settings.merge,
        outputs=list(plan.outputs), label_values=plan.label_values, settings=plan.settings.__dict__,
        shape=list(plan.native_shape), chunks=list(plan.native_chunks), downsample=plan.factor,
        voxel_size=volume_voxel_size(plan.volume), resume_hint="rerun the same `volseg predict` command to finish"))
    return group, False


def _create_arrays(group: zarr.Group, plan: Plan) -> None:
    voxel_size = volume_voxel_size(plan.volume)
    attrs = store.provenance(input=plan.volume, model=plan.model, run_key=plan.run_key, voxel_size=voxel_size,
                             resume_hint="rerun the same `volseg predict` command to finish")
    if plan.settings.fused:
        from .ngff import create_multiscale

        dtype = np.uint8 if max(plan.label_values) <= 255 else np.uint16
        for name in ("labels", *plan.outputs):
            create_multiscale(group, name, shape=plan.native_shape, dtype=dtype if name == "labels" else np.uint8,
                              chunks=plan.native_chunks, attrs={**attrs, "kind": name, "merge": plan.settings.merge})
        return
    for axis in plan.axes:
        name = f"probabilities/{axis}"
        if name not in group:
            store.create_array(group, name=name, shape=(plan.classes, *plan.shape), dtype=np.uint8,
                               chunks=(plan.classes, *plan.chunks), codec=plan.settings.probability_codec,
                               clevel=3 if plan.settings.probability_codec == "zstd" else 5,
                               dimension_names=("c", "z", "y", "x"),
                               attrs={**attrs, "kind": "probabilities", "axis": axis,
                                      "label_values": plan.label_values, "downsample": plan.factor,
                                      "voxel_size": [v * plan.factor for v in voxel_size] if voxel_size else None})


def _tasks(plan: Plan) -> list[Any]:
    vol, out, spec = plan.volume, str(plan.output), plan.spec
    tasks = []
    if plan.settings.fused:
        fused = dask.delayed(_fused_task, pure=False)
        for index in plan.grid:
            tasks.append(fused(vol, out, plan.axes, index, plan.block(index), plan.shape, plan.halo, spec,
                               plan.settings.merge, plan.label_values, plan.outputs, plan.factor,
                               plan.native_block(index),
                               dask_key_name=f"predict-fused-{'.'.join(map(str, index))}-{plan.run_key}"))
        return tasks
    axis_task = dask.delayed(_axis_task, pure=False)
    for axis in plan.axes:
        for index in plan.grid:
            tasks.append(axis_task(vol, out, axis, index, plan.block(index), plan.shape, plan.halo, spec, plan.factor,
                                   dask_key_name=f"predict-{axis}-{'.'.join(map(str, index))}-{plan.run_key}"))
    return tasks


def predict(
    volume: str | os.PathLike[str],
    model: str | os.PathLike[str],
    output: str | os.PathLike[str],
    settings: Settings | PredictSettings | None = None,
    *,
    overwrite: bool = False,
    progress: bool = False,
) -> PredictResult:
    """Segment a volume of any size with a trained model, out-of-core.

    Runs on the active dask scheduler (threads by default; a ``distributed.Client`` when one is
    active) and never creates a cluster. Peak memory per worker thread is about one block with its
    halo, its probabilities and the network's activations for one batch.

    Parameters
    ----------
    volume
        Any input :func:`volseg_dask.io.open_volume` reads; Zarr is best (region reads).
    model
        A model file written by :func:`volseg_dask.training.train`.
    output
        Output folder (``OUT.zarr``). Rerunning the same command on an unfinished output resumes it.
    settings
        :class:`Settings` or its ``predict`` section; default settings otherwise.
    overwrite
        Replace an existing output.
    progress
        Show a progress bar.

    Returns
    -------
    PredictResult
        Output path, blocks computed and skipped, timings; ``.labels`` opens the labels lazily.
    """
    t0 = time.perf_counter()
    plan = plan_prediction(volume, model, output, settings)
    out = plan.output
    store.check_output_path(out, overwrite=True)  # the folder must exist and be writable
    with store.OutputLock(out):
        group, resumed = _prepare_output(plan, overwrite)
        _create_arrays(group, plan)
        resources = _gpu_resources(plan.spec)
        with dask.annotate(resources=resources) if resources else contextlib.nullcontext():
            tasks = _tasks(plan)
        store.set_status(group, blocks_total=len(tasks))
        log.info("predicting %s %s along %s in %d blocks of %s (halo %d)%s%s", plan.volume, plan.native_shape,
                 "".join(plan.axes), len(plan.grid), plan.native_chunks, plan.settings.halo,
                 f" at 1/{plan.factor} resolution" if plan.factor > 1 else "",
                 " [fused]" if plan.settings.fused else "")
        # resources also go to the client directly: graph optimisation may drop annotations
        try:
            counts = compute(*tasks, progress=progress, **({"resources": resources} if resources else {}))
        except OSError as exc:
            if isinstance(exc, VolsegError):
                raise
            raise WriteFailedError(
                f"{out}: writing failed ({exc.strerror or exc}); every finished block is kept and the output stays "
                "marked incomplete: fix the cause (e.g. free disk space) and rerun the same command to resume"
            ) from exc
        computed = int(sum(counts))
        skipped = len(tasks) - computed
        voxel_size = volume_voxel_size(plan.volume)
        if plan.settings.fused:
            from .ngff import finish_multiscale

            for name in ("labels", *plan.outputs):
                finish_multiscale(group, name, voxel_size=voxel_size, progress=progress)
        else:
            for axis in plan.axes:
                store.mark_complete(group[f"probabilities/{axis}"])
            write_merged(group, out, plan.axes, method=plan.settings.merge, label_values=plan.label_values,
                         outputs=plan.outputs, attrs={"merge": plan.settings.merge, "axes": list(plan.axes),
                                                      "input": plan.volume, "model": plan.model},
                         voxel_size=voxel_size, progress=progress, factor=plan.factor, shape=plan.native_shape,
                         chunks=plan.native_chunks)
            store.set_status(group, axes_done=list(plan.axes))
            if not plan.settings.keep_probabilities:
                shutil.rmtree(out / "probabilities", ignore_errors=True)
                store.set_status(group, probabilities_deleted=True)
        shutil.rmtree(out / ".volseg", ignore_errors=True)
        seconds = time.perf_counter() - t0
        store.mark_complete(group, blocks_done=len(tasks), blocks_computed=computed, blocks_skipped=skipped,
                            seconds=round(seconds, 2), resumed=resumed)
    log.info("prediction done: %d blocks computed, %d skipped, %.1f s", computed, skipped, seconds)
    return PredictResult(out, computed, skipped, seconds, int(np.prod(plan.native_shape)), "".join(plan.axes))


# ---- in-memory / dask-array API -----------------------------------------------------------------


def predict_array(volume: da.Array | np.ndarray, model: str | os.PathLike[str], *, axis: str = "z",
                  settings: Settings | PredictSettings | None = None,
                  normalization: Normalization | None = None) -> da.Array:
    """Lazy class probabilities ``(C, z, y, x)`` uint8 of a dask array along one axis (``map_overlap``).

    For notebooks and pipelines that already hold a dask array; :func:`predict` is the path for
    volumes on disk (it reads each block's halo straight from the store, which holds less memory).
    Blocks overlap their neighbours by the halo; at the volume's border there is no halo (a plane
    meets the edge as in a whole-volume prediction), exactly as in :func:`predict`, so both give the
    same probabilities. With a model trained at 1/N resolution (``data.downsample``) the array is
    averaged over N×N×N cubes first and the probabilities are on that coarse grid, as
    :func:`predict`'s per-axis ``probabilities``.
    """
    if axis not in AXES:
        raise ConfigError(f"axis: {axis!r} is not one of z, y, x")
    ps = _settings_of(settings)
    vol = volume if isinstance(volume, da.Array) else da.from_array(volume, chunks=tuple(ps.chunks))
    if vol.ndim != 3:
        raise VolsegError(f"predict_array: expected a 3D array (z, y, x), found shape {vol.shape}")
    _, meta = read_model_file(model)
    factor = int(meta.get("downsample", 1))
    vol = downsample_array(vol, factor)
    norm = normalization or Normalization.from_dict(meta["normalization"])
    n_slices = int(meta.get("n_slices", meta["in_channels"]))
    half = (n_slices - 1) // 2
    ax = AXES[axis]
    depth = {d: (half if d == ax else -(-ps.halo // factor)) for d in range(3)}
    for d, c in enumerate(vol.chunksize):
        if depth[d] > c and len(vol.chunks[d]) > 1:
            raise ConfigError(f"predict.halo: {depth[d]} is larger than the chunk ({c}) along {'zyx'[d]}; "
                              "rechunk to larger chunks or use a smaller halo")
    spec = SlabSpec(model_path=str(Path(model).resolve()), normalization=norm, n_slices=n_slices,
                    batch_size=ps.batch_size, device=ps.device, amp=ps.amp, flips=ps.tta_flips,
                    rotations=_rotations(ps.axes)[1], combine=ps.merge, torch_threads=ps.torch_threads,
                    multiple=int(meta.get("pad_multiple", 32)))
    classes = int(meta["classes"])
    # map_overlap merges chunks smaller than the overlap into their neighbours; do it first, so the output
    # chunks given below are the ones it computes
    vol = vol.rechunk(tuple(ensure_minimum_chunksize(depth[d], c) if depth[d] else c for d, c in enumerate(vol.chunks)))
    # mirrored 2.5D context along the axis; in-plane, overlap only between chunks (as predict does)
    boundary = {d: ("reflect" if d == ax else "none") for d in range(3)}
    return da.map_overlap(
        _infer_overlapped, vol, axis=axis, spec=spec, overlap=depth, depth=depth, boundary=boundary, trim=False,
        new_axis=0, chunks=((classes,), *vol.chunks), dtype=np.uint8, meta=np.empty((0, 0, 0, 0), np.uint8),
    )


def _infer_overlapped(block: np.ndarray, axis: str, spec: SlabSpec, overlap: dict[int, int],
                      block_info: dict[Any, Any] | None = None) -> np.ndarray:
    """map_overlap's slab function: crop the overlap a block actually received (none at the border)."""
    assert block_info is not None  # dask always passes it to a function that accepts it
    location, counts = block_info[0]["chunk-location"], block_info[0]["num-chunks"]
    ax = AXES[axis]
    crop = [(overlap[d], overlap[d]) if d == ax else (overlap[d] if i > 0 else 0, overlap[d] if i < n - 1 else 0)
            for d, (i, n) in enumerate(zip(location, counts))]
    return infer_block(block, axis, spec, crop)
