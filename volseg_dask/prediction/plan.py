"""A validated prediction: inputs checked before any graph, the block grid, the slab spec and the run key.

The run key hashes everything that decides the output (input fingerprint, model file hash, blocks,
halo, axes, normalisation, fused mode): a rerun with the same key resumes an unfinished output, any
other key is refused rather than mixed in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from ..config import ConfigError, PredictSettings, Settings
from ..errors import VolumeValueError
from ..grid import BlockGrid
from ..io.reader import split_key
from ..io.volume import open_volume
from ..models import ModelMeta, read_model_file
from ..normalize import Normalization, compute_normalization
from ..outputs import file_sha256
from ..resample import downsample_array
from .fusion import LEARNED, Fusion, check_fusion
from .inference import AXES, SlabSpec

log = logging.getLogger(__name__)

__all__ = ["AUTO", "Plan", "network_digest", "plan_prediction", "predict_settings", "resolve_merge",
           "rotations_of", "slab_spec"]


@dataclass
class Plan:
    """A validated prediction: inputs, the block grid, the slab spec and the run key that guards resumes."""

    volume: str
    model: str
    output: Path
    grid: BlockGrid
    axes: tuple[str, ...]
    settings: PredictSettings
    spec: SlabSpec
    meta: ModelMeta
    run_key: str = ""
    key_fields: dict[str, Any] = field(default_factory=dict)

    @property
    def classes(self) -> int:
        return self.meta.classes

    @property
    def label_values(self) -> list[int]:
        return list(self.meta.label_values)

    @property
    def network_sha256(self) -> str:
        """The network whose probabilities this prediction makes (see :class:`~volseg_dask.models.ModelMeta`)."""
        return network_digest(self.meta, self.key_fields["model_sha256"])

    @property
    def fusion(self) -> Fusion | None:
        """The model file's fusion when the merge is ``learned`` (checked by :func:`plan_prediction`), else None."""
        return self.meta.fusion if self.settings.merge == LEARNED else None

    @property
    def extras(self) -> tuple[str, ...]:
        """Merged outputs besides the labels (confidence, entropy, disagreement)."""
        s = self.settings
        return tuple(name for name, on in (("confidence", s.confidence), ("entropy", s.entropy),
                                           ("disagreement", s.disagreement)) if on)


def network_digest(meta: ModelMeta, sha256: str) -> str:
    """The network of a model file: its fusion's ``network_sha256``, or the file's own sha256 without fusion."""
    return meta.fusion.network_sha256 if meta.fusion is not None else sha256


def _input_fingerprint(path: str) -> dict[str, Any]:
    file, key = split_key(path)
    target = file / (key or "") / "zarr.json" if file.is_dir() and (file / (key or "") / "zarr.json").exists() \
        else file
    st = os.stat(target)
    return {"path": str(Path(path).resolve()) if not key else path, "mtime_ns": st.st_mtime_ns, "size": st.st_size}


def predict_settings(settings: Settings | PredictSettings | None) -> PredictSettings:
    if settings is None:
        return Settings().predict
    if isinstance(settings, Settings):
        return settings.predict
    return settings


def rotations_of(axes_setting: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    if axes_setting == "all12":
        return ("z", "y", "x"), (0, 1, 2, 3)
    return tuple(axes_setting), (0,)


AUTO = "auto"
"""The default merge: ``learned`` when the model file has a fusion for the predicted axes, else ``max``."""


def resolve_merge(merge: str, meta: ModelMeta, axes: Sequence[str], model: str | os.PathLike[str]) -> str:
    """The merge a prediction runs: ``auto`` becomes ``learned`` or ``max``; any other method stays."""
    if merge != AUTO:
        return merge
    if meta.fusion is None:
        return "max"
    if sorted(meta.fusion.axes) == sorted(axes):
        return LEARNED
    log.warning("%s: its fusion was fitted on the axes %s, this prediction is along %s: merging by max", model,
                "".join(meta.fusion.axes), "".join(axes))
    return "max"


def plan_prediction(volume: str | os.PathLike[str], model: str | os.PathLike[str],
                    output: str | os.PathLike[str], settings: Settings | PredictSettings | None = None) -> Plan:
    """Check every input before any graph is built, and describe the work.

    Raises
    ------
    VolsegError
        Missing or unreadable volume or model, an incomplete input, a model that does not fit the
        data, a halo larger than the blocks, NaN in the normalisation sample, merge ``learned`` with a
        model file without fusion parameters (or fitted on other axes).
    """
    ps = predict_settings(settings)
    vol = open_volume(volume)
    if vol.dtype.kind not in "biuf":
        raise VolumeValueError(f"{volume}: dtype {vol.dtype} is not numeric; convert it first")
    model_path = os.fspath(model)
    _, meta = read_model_file(model_path)
    factor = meta.downsample
    native_chunks = [min(int(c), int(s)) for c, s in zip(ps.chunks, vol.shape)]
    if any(c % factor and c < s for c, s in zip(native_chunks, vol.shape)):
        fixed = [max(factor, c - c % factor) for c in ps.chunks]
        raise ConfigError(f"predict.chunks: {list(ps.chunks)} must be multiples of {factor}, the downsampling "
                          f"factor of {model_path} (its data.downsample); use e.g. {fixed}")
    grid = BlockGrid(tuple(vol.shape), tuple(native_chunks), factor, int(ps.halo))
    axes, _ = rotations_of(ps.axes)
    ps = dataclasses.replace(ps, merge=cast(Any, resolve_merge(ps.merge, meta, axes, model_path)))
    if ps.merge == LEARNED:
        check_fusion(meta.fusion, model_path, axes=axes, classes=meta.classes)
    in_plane = set(range(3)) if ps.fused else {d for a in axes for d in range(3) if d != AXES[a]}
    for d, (c, s) in enumerate(zip(grid.chunks, grid.shape)):
        if d in in_plane and grid.halo > c and s > c:
            raise ConfigError(f"predict.halo: {ps.halo} is larger than the block ({c * factor} voxels along "
                              f"{'zyx'[d]}); use a halo of at most the block size (32-64 is typical) or larger "
                              "predict.chunks")
    if ps.normalization == "recompute":
        norm = compute_normalization(downsample_array(vol, factor), source=os.fspath(volume))
    else:
        norm = meta.normalization
    plan = Plan(os.fspath(volume), model_path, Path(output), grid, axes, ps, slab_spec(model_path, meta, ps, norm),
                meta)
    plan.key_fields = {
        "input": _input_fingerprint(os.fspath(volume)),
        "input_shape": list(grid.native_shape), "input_dtype": str(vol.dtype),
        "model_sha256": file_sha256(model_path),
        "chunks": list(grid.native_chunks), "halo": int(ps.halo), "axes": ps.axes, "tta_flips": ps.tta_flips,
        "normalization": norm.to_dict(), "fused": ps.fused,
        "merge": ps.merge if ps.fused else None,
    }
    plan.run_key = hashlib.sha256(json.dumps(plan.key_fields, sort_keys=True).encode()).hexdigest()[:16]
    return plan


def slab_spec(model_path: str | os.PathLike[str], meta: ModelMeta, settings: PredictSettings,
              normalization: Normalization) -> SlabSpec:
    """The slab function's settings for a model file, its metadata and the prediction settings."""
    merge = resolve_merge(settings.merge, meta, rotations_of(settings.axes)[0], model_path)
    return SlabSpec(
        model_path=str(Path(model_path).resolve()), normalization=normalization, n_slices=meta.n_slices,
        batch_size=None if settings.batch_size == "auto" else int(settings.batch_size), device=settings.device,
        amp=settings.amp, amp_dtype=settings.amp_dtype, rotations=rotations_of(settings.axes)[1],
        flips=settings.tta_flips, combine="mean" if merge == LEARNED else merge,  # TTA variants: never learned
        torch_threads=settings.torch_threads, multiple=meta.pad_multiple, pipeline=settings.pipeline,
        compile=settings.compile,
    )
