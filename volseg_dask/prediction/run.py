"""``predict``: per axis, one task per block, stored as per-axis probability Zarr; then the merge.

Output layout (``OUT.zarr``, a Zarr v3 group)::

    probabilities/z   (C, Z, Y, X) uint8   one per predicted axis, round(p * 255)
    probabilities/y
    probabilities/x
    labels            (Z, Y, X)            original label values, merged across axes
    confidence        (Z, Y, X) uint8      merged probability of the chosen class (optional)
    entropy, disagreement                  optional uncertainty maps

Every array shares one chunk grid (the prediction blocks), so the merge is a pure blockwise pass.
The tasks (:mod:`~volseg_dask.prediction.tasks`) write one chunk each and drop a done-marker; a
rerun of the same command skips marked blocks (resume after a kill), and refuses to mix in blocks
made with other settings (:mod:`~volseg_dask.prediction.plan`). Arrays, and the group, are marked
complete only when fully written.

``--fused`` runs all axes of a block inside one task (halo in all three dims) and writes only the
merged outputs: no per-axis probabilities touch the disk.

A model trained at 1/N resolution (``data.downsample``) predicts on the volume averaged over N×N×N
cubes: blocks, halo and the per-axis probabilities are on that coarse grid (block ``i`` of it is
block ``i`` of the outputs, N times smaller; :class:`~volseg_dask.grid.BlockGrid`), and the merge
upsamples each block's probabilities linearly to full resolution before the vote.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr

from ..cluster import active_client, compute
from ..config import PredictSettings, Settings
from ..errors import (
    IncompleteOutputError,
    OutputExistsError,
    VolsegError,
    VolumeFormatError,
    VolumeValueError,
    WriteFailedError,
)
from ..io.volume import open_volume, volume_voxel_size
from ..labels import label_dtype
from ..ngff import create_multiscale, finish_multiscale
from ..outputs import (
    OutputLock,
    check_output_path,
    create_array,
    mark_complete,
    provenance,
    set_status,
    status,
)
from .inference import SlabSpec
from .merging import write_merged
from .plan import Plan, plan_prediction
from .tasks import block_task, done_marker, fused_task

log = logging.getLogger(__name__)

__all__ = ["PredictResult", "predict"]


@dataclass
class PredictResult:
    """What :func:`predict` did."""

    output: Path
    blocks_computed: int
    """Block-axes predicted by this run (blocks, when fused)."""
    blocks_skipped: int
    """Block-axes found done by an earlier run (resume)."""
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


def _gpu_resources(spec: SlabSpec) -> dict[str, float] | None:
    """What each block task asks of the active cluster when its workers declare GPUs and the model runs on one.

    Block tasks run only on workers that declare ``GPU``. With a device thread (the GPU default) every
    thread of such a worker may run a block task: the worker's one device thread feeds its GPU, the
    threads read and write around it, so a task asks for ``GPU / threads`` of the worker. Run inline, a task
    holds the whole GPU (``GPU=1``): two inferences never share one device.
    """
    client = active_client()
    if client is None or spec.device == "cpu":
        return None
    workers = [w for w in client.scheduler_info().get("workers", {}).values() if "GPU" in (w.get("resources") or {})]
    if not workers:
        return None
    if spec.pipeline == "inline":
        return {"GPU": 1}
    share = min(float(w["resources"]["GPU"]) / max(1, int(w.get("nthreads", 1))) for w in workers)
    return {"GPU": share}


def _prepare_output(plan: Plan, overwrite: bool) -> tuple[zarr.Group, bool]:
    """Create the output group, or reopen it to resume; refuse to mix runs."""
    out = plan.output
    if out.exists():
        group = None
        with contextlib.suppress(Exception):
            group = zarr.open_group(str(out), mode="r+")
        info = status(group) if group is not None else None
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
        check_output_path(out, overwrite)
    group = zarr.open_group(str(out), mode="w", zarr_format=3)
    set_status(group, **provenance(
        kind="prediction", complete=False, run_key=plan.run_key, key_fields=plan.key_fields,
        input=plan.volume, model=str(Path(plan.model).resolve()), network_sha256=plan.network_sha256,
        axes=list(plan.axes), merge=plan.settings.merge,
        outputs=list(plan.extras), label_values=plan.label_values, settings=plan.settings.__dict__,
        shape=list(plan.grid.native_shape), chunks=list(plan.grid.native_chunks), downsample=plan.grid.factor,
        voxel_size=volume_voxel_size(plan.volume), resume_hint="rerun the same `volseg predict` command to finish"))
    return group, False


def _create_arrays(group: zarr.Group, plan: Plan) -> None:
    voxel_size = volume_voxel_size(plan.volume)
    attrs = provenance(input=plan.volume, model=plan.model, run_key=plan.run_key, voxel_size=voxel_size,
                       resume_hint="rerun the same `volseg predict` command to finish")
    grid = plan.grid
    if plan.settings.fused:
        for name in ("labels", *plan.extras):
            create_multiscale(group, name, shape=grid.native_shape,
                              dtype=label_dtype(plan.label_values) if name == "labels" else np.uint8,
                              chunks=grid.native_chunks, attrs={**attrs, "kind": name, "merge": plan.settings.merge})
        return
    for axis in plan.axes:
        name = f"probabilities/{axis}"
        if name not in group:
            create_array(group, name=name, shape=(plan.classes, *grid.shape), dtype=np.uint8,
                         chunks=(plan.classes, *grid.chunks), codec=plan.settings.probability_codec,
                         clevel=3 if plan.settings.probability_codec == "zstd" else 5,
                         dimension_names=("c", "z", "y", "x"),
                         attrs={**attrs, "kind": "probabilities", "axis": axis,
                                "label_values": plan.label_values, "downsample": grid.factor,
                                "voxel_size": [v * grid.factor for v in voxel_size] if voxel_size else None})


def _finish(group: zarr.Group, plan: Plan, progress: bool | str) -> None:
    """After the block tasks: the merge (or, fused, the pyramids), the per-axis arrays marked complete."""
    out, voxel_size = plan.output, volume_voxel_size(plan.volume)
    if plan.settings.fused:
        for name in ("labels", *plan.extras):
            finish_multiscale(group, name, voxel_size=voxel_size, progress=progress is True)
        return
    for axis in plan.axes:
        mark_complete(group[f"probabilities/{axis}"])
    write_merged(group, out, plan.axes, plan.grid, method=plan.settings.merge, label_values=plan.label_values,
                 extras=plan.extras, attrs={"merge": plan.settings.merge, "axes": list(plan.axes),
                                            "input": plan.volume, "model": plan.model},
                 voxel_size=voxel_size, progress=progress, fusion=plan.fusion)
    set_status(group, axes_done=list(plan.axes))
    if not plan.settings.keep_probabilities:
        shutil.rmtree(out / "probabilities", ignore_errors=True)
        set_status(group, probabilities_deleted=True)


def _count_done(plan: Plan) -> int:
    """Block-axes (blocks, fused) of this run with their done-marker."""
    names = ["fused"] if plan.settings.fused else [f"probabilities-{axis}" for axis in plan.axes]
    return sum(sum(1 for index in plan.grid.indices() if done_marker(plan.output, plan.run_key, name, index).exists())
               for name in names)


def _check_done(plan: Plan, units: int) -> None:
    """Every block (block-axis) has its done-marker: an output deleted or changed under a running prediction
    loses some, and must not be finished as if it were whole."""
    found = _count_done(plan)
    if not (plan.output / "zarr.json").exists():
        raise _write_failed(plan.output, None)
    if found != units:
        raise IncompleteOutputError(f"{plan.output}: {units - found} of {units} block results are missing after the "
                                    "run (was the output changed while it ran?); it stays marked incomplete: rerun the "
                                    "same command to compute them")


def _write_failed(out: Path, exc: OSError | None) -> WriteFailedError:
    """The error for a write that failed (``exc``) or an output that vanished, saying what is kept."""
    if exc is None or not (out / "zarr.json").exists():
        return WriteFailedError(f"{out}: the output folder disappeared while the prediction ran (was it deleted?); "
                                "nothing of it can be used: run the command again (with --overwrite if parts of the "
                                "folder were recreated)")
    return WriteFailedError(
        f"{out}: writing failed ({exc.strerror or exc}); every finished block is kept and the output stays marked "
        "incomplete: fix the cause (e.g. free disk space) and rerun the same command to resume")


def _tasks(plan: Plan) -> list[Any]:
    vol, out, spec, grid = plan.volume, str(plan.output), plan.spec, plan.grid
    if plan.settings.fused:
        fused = dask.delayed(fused_task, pure=False)
        return [fused(vol, out, plan.axes, index, grid, spec, plan.settings.merge, plan.label_values, plan.extras,
                      plan.fusion, plan.run_key,
                      dask_key_name=f"predict-fused-{'.'.join(map(str, index))}-{plan.run_key}")
                for index in grid.indices()]
    task = dask.delayed(block_task, pure=False)
    return [task(vol, out, plan.axes, index, grid, spec, plan.run_key,
                 dask_key_name=f"predict-{''.join(plan.axes)}-{'.'.join(map(str, index))}-{plan.run_key}")
            for index in grid.indices()]


def predict(
    volume: str | os.PathLike[str],
    model: str | os.PathLike[str],
    output: str | os.PathLike[str],
    settings: Settings | PredictSettings | None = None,
    *,
    overwrite: bool = False,
    progress: bool | str = False,
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
        ``True``: a progress bar; ``"lines"``: a line per ~5 % of the blocks with an ETA (batch jobs).

    Returns
    -------
    PredictResult
        Output path, blocks computed and skipped, timings; ``.labels`` opens the labels lazily.
    """
    t0 = time.perf_counter()
    plan = plan_prediction(volume, model, output, settings)
    out = plan.output
    check_output_path(out, overwrite=True)  # the folder must exist and be writable
    with OutputLock(out):
        group, resumed = _prepare_output(plan, overwrite)
        _create_arrays(group, plan)
        resources = _gpu_resources(plan.spec)
        with dask.annotate(resources=resources) if resources else contextlib.nullcontext():
            tasks = _tasks(plan)
        units = len(tasks) * (1 if plan.settings.fused else len(plan.axes))  # block-axes (blocks when fused)
        set_status(group, blocks_total=units)
        grid = plan.grid
        log.info("predicting %s %s along %s in %d blocks of %s (halo %d)%s%s", plan.volume, grid.native_shape,
                 "".join(plan.axes), len(grid.indices()), grid.native_chunks, plan.settings.halo,
                 f" at 1/{grid.factor} resolution" if grid.factor > 1 else "",
                 " [fused]" if plan.settings.fused else "")
        # resources also go to the client directly: graph optimisation may drop annotations
        extra: dict[str, Any] = {"resources": resources} if resources else {}
        skipped = _count_done(plan)  # done by an earlier run of this command (resume)
        computed = units - skipped
        try:
            compute(*tasks, progress=progress, label="predict", **extra)
            _check_done(plan, units)
            _finish(group, plan, progress)
        except (VolumeFormatError, VolumeValueError) as exc:  # the input, met by a task
            raise type(exc)(f"{exc}; the blocks finished before are kept: fix the input and rerun the same "
                            "command to resume") from exc
        except OSError as exc:
            if isinstance(exc, VolsegError):
                raise
            raise _write_failed(out, exc) from exc
        shutil.rmtree(out / ".volseg", ignore_errors=True)
        seconds = time.perf_counter() - t0
        mark_complete(group, blocks_done=units, blocks_computed=computed, blocks_skipped=skipped,
                      seconds=round(seconds, 2), resumed=resumed)
    log.info("prediction done: %d blocks computed, %d skipped, %.1f s", computed, skipped, seconds)
    return PredictResult(out, computed, skipped, seconds, int(np.prod(plan.grid.native_shape)), "".join(plan.axes))


