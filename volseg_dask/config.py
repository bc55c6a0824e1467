"""Settings: one dataclass tree, loaded from and written to YAML, validated on load.

A settings file has up to five sections, each optional; whatever is missing keeps its default::

    model:    {architecture: Unet, encoder: resnet34}
    data:     {image_size: 256, ignore_label: null}
    augment:  {flip: 0.5}
    train:    {epochs: 30}
    predict:  {axes: zyx, merge: max}

Every section is checked when it is constructed, from YAML or in Python alike
(``PredictSettings(halo=-5)`` raises): unknown keys, wrong types and out-of-range values raise
:class:`~volseg_dask.errors.ConfigError` with a message that names the key, what was found and what
is allowed. Architecture names are checked against the installed segmentation-models-pytorch's own
registry, so architectures a newer smp adds are accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import itertools
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

import yaml

from .errors import ConfigError

__all__ = [
    "AugmentSettings",
    "DataSettings",
    "ModelSettings",
    "PredictSettings",
    "Settings",
    "TrainSettings",
    "load_settings",
    "settings_reference_markdown",
    "smp_architectures",
]

DEVICE_PATTERN = r"auto|cpu|cuda(:[0-9]+)?|mps"


@functools.lru_cache(maxsize=1)
def smp_architectures() -> tuple[str, ...]:
    """Class names of the architectures the installed segmentation-models-pytorch offers (its registry)."""
    import segmentation_models_pytorch as smp

    return tuple(cls.__name__ for cls in smp.MODEL_ARCHITECTURES_MAPPING.values())


def _opt(default: Any = dataclasses.MISSING, *, help: str, factory: Any = None, **rules: Any) -> Any:
    """A dataclass field with its help text and validation rules (min, max, multiple_of, odd)."""
    meta = {"help": help, **rules}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


class _Section:
    """Base of the settings sections: every field is checked (and coerced) when a section is constructed."""

    section: ClassVar[str]

    def __post_init__(self) -> None:
        hints = _hints(type(self).__name__)
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = _check_value(getattr(self, f.name), hints[f.name], f.metadata, f"{self.section}.{f.name}")
            object.__setattr__(self, f.name, value)


@functools.cache
def _hints(section_class: str) -> dict[str, Any]:
    return typing.get_type_hints(globals()[section_class])


@dataclass
class ModelSettings(_Section):
    """Which smp network is built and how it is initialised."""

    section: ClassVar[str] = "model"
    architecture: str = _opt(
        "Unet", help="smp architecture by class name (case-insensitive): any the installed "
        "segmentation-models-pytorch offers, e.g. Unet, UnetPlusPlus, FPN, DeepLabV3Plus, Segformer; "
        "`volseg models` lists them.",
        choices=smp_architectures,
    )
    encoder: str = _opt(
        "resnet34",
        help="smp encoder name (e.g. resnet18, resnet34, efficientnet-b0, tu-resnet10t, "
        "tu-tf_efficientnet_lite0); `volseg models` lists them.",
    )
    encoder_weights: str | None = _opt(
        None,
        help="Local file of pretrained encoder weights (a state_dict). null: random initialisation. "
        "Nothing is ever downloaded.",
    )
    encoder_depth: int = _opt(5, help="Number of encoder stages (3-5); the input is padded to 2**depth.",
                              min=3, max=5)
    decoder_channels: list[int] | None = _opt(
        None, help="Decoder widths for Unet-like models (one per encoder stage); null keeps smp's default."
    )
    n_slices: int = _opt(
        1, help="Adjacent slices fed as channels (2.5D). 1 = plain 2D; must be odd.", min=1, max=15, odd=True
    )
    init_from: str | None = _opt(
        None, help="Fine-tune: a model file (.pt) whose network (architecture, encoder, channels, 2.5D slices) and "
        "weights training starts from. Model settings left at their defaults follow the file; any other value "
        "must match it. Label values the file does not know get a freshly initialised output layer (the rows of "
        "the values it knows are kept). The new file records its parent (path and sha256).",
    )


@dataclass
class DataSettings(_Section):
    """How training slices are drawn and how intensities are normalised."""

    section: ClassVar[str] = "data"
    image_size: int = _opt(
        256, help="Side of the square training crops, in voxels of the volume the network sees (native, or "
        "downsampled by data.downsample), never by resizing slices (multiple of 32).",
        min=32, max=4096, multiple_of=32,
    )
    downsample: int = _opt(
        1, help="Train and predict at 1/N resolution: the image is averaged over N×N×N cubes (labels: their "
        "mode), as volume-segmantics' `downsample`. 2 makes prediction about 8× cheaper where the structures "
        "are coarse; the merged labels still come back at full resolution (probabilities upsampled linearly). "
        "Stored in the model file. 1 = native resolution.", min=1, max=4,
    )
    axis_weights: dict[str, float] = _opt(
        help="Relative frequency of slices along z, y and x (0 excludes an axis).",
        factory=lambda: {"z": 1.0, "y": 1.0, "x": 1.0},
        keys=("z", "y", "x"), min=0.0,
    )
    ignore_label: int | None = _opt(
        None, help="Label value left out of the loss and the metrics (unlabelled voxels in sparse annotations)."
    )
    normalization: Literal["percentile", "mean_std"] = _opt(
        "percentile",
        help="Intensity clip before scaling to [0, 1]: 'percentile' (clip_percentiles) or 'mean_std' "
        "(mean ± std_factor × sd, as volume-segmantics).",
    )
    clip_percentiles: list[float] = _opt(
        help="Lower and upper percentile for the 'percentile' clip.", factory=lambda: [0.5, 99.5],
        length=2, min=0.0, max=100.0, increasing=True,
    )
    std_factor: float = _opt(2.575, help="Width of the 'mean_std' clip in standard deviations.", min=0.1)
    normalization_from: Literal["model", "recompute"] = _opt(
        "model", help="With model.init_from: 'model' reuses the parent model's intensity window (the network sees "
        "intensities as it learned them); 'recompute' measures the new training images (another contrast).",
    )
    stats_sample_voxels: int = _opt(
        2_000_000, help="Voxels sampled (whole chunks, spread over the volume) for intensity statistics.",
        min=1000,
    )
    validation_fraction: float = _opt(
        0.15, help="Share of slice positions held out for validation, in contiguous blocks along each axis.",
        min=0.0, max=0.9,
    )
    validation_block: int = _opt(
        16, help="Slices per contiguous train/validation block; neighbours of a validation slice never train.",
        min=1,
    )
    cache_mb: int = _opt(
        512, help="Bound of the sampler's in-memory cache of Zarr slabs, per DataLoader worker (MB).", min=16
    )
    region_slices: int | None = _opt(
        None, help="Training slices drawn near each other (same axis and cached block) before moving on, so "
        "volumes larger than the cache are not re-read for every slice; null: 1 when the volumes fit in "
        "cache_mb, else 8.", min=1, max=256,
    )


@dataclass
class AugmentSettings(_Section):
    """Albumentations pipeline applied to image and mask together (probabilities per transform)."""

    section: ClassVar[str] = "augment"
    enabled: bool = _opt(True, help="Switch augmentation off entirely.")
    flip: float = _opt(0.5, help="Probability of a horizontal and (independently) a vertical flip.", min=0, max=1)
    rotate90: float = _opt(0.5, help="Probability of a random multiple-of-90° rotation.", min=0, max=1)
    affine: float = _opt(0.3, help="Probability of a small affine (scale ±10%, rotate ±15°, shift ±5%).",
                         min=0, max=1)
    elastic: float = _opt(0.1, help="Probability of a mild elastic deformation.", min=0, max=1)
    brightness_contrast: float = _opt(0.5, help="Probability of brightness/contrast jitter (±15%).",
                                      min=0, max=1)
    gamma: float = _opt(0.3, help="Probability of a gamma change (0.8-1.2).", min=0, max=1)
    noise: float = _opt(0.3, help="Probability of additive Gaussian noise.", min=0, max=1)
    blur: float = _opt(0.2, help="Probability of a slight Gaussian blur.", min=0, max=1)


@dataclass
class TrainSettings(_Section):
    """The fit loop."""

    section: ClassVar[str] = "train"
    epochs: int = _opt(30, help="Maximum number of epochs (early stopping may end sooner).", min=1)
    samples_per_epoch: int | None = _opt(
        None, help="Slices drawn per epoch; null = as many as the training volumes have slice positions.",
        min=1,
    )
    batch_size: int = _opt(8, help="Slices per optimisation step.", min=1)
    loss: Literal["dice_ce", "dice", "cross_entropy", "focal", "tversky", "lovasz"] = _opt(
        "dice_ce", help="Loss from smp: Dice + cross-entropy (default), Dice, cross-entropy, focal, Tversky, Lovász."
    )
    learning_rate: float | None = _opt(
        None, help="Peak learning rate; null runs the learning-rate range test and picks one.", min=0.0
    )
    lr_finder_range: list[float] = _opt(
        help="Start and end learning rate of the range test.", factory=lambda: [1e-6, 1.0],
        length=2, min=0.0, increasing=True,
    )
    lr_finder_steps: int = _opt(100, help="Steps of the learning-rate range test.", min=10)
    schedule: Literal["one_cycle", "cosine", "constant"] = _opt(
        "one_cycle", help="Learning-rate schedule over the epochs."
    )
    weight_decay: float = _opt(1e-4, help="AdamW weight decay.", min=0.0)
    patience: int = _opt(5, help="Epochs without validation-loss improvement before stopping.", min=1)
    frozen_epochs: int = _opt(
        4, help="With pretrained encoder weights: epochs with the encoder frozen before fine-tuning all.",
        min=0,
    )
    encoder_lr_factor: float = _opt(
        0.1, help="With pretrained weights, after unfreezing: encoder LR = this × decoder LR.", min=0.0, max=1.0
    )
    max_minutes: float | None = _opt(
        None, help="Stop after this much wall time (the best checkpoint is kept); a resumed run counts the time of "
        "every attempt up to its last checkpoint.", min=0.0
    )
    checkpoint_every: int = _opt(
        1, help="Write a checkpoint beside the model (MODEL.ckpt) every N epochs; rerunning the same command "
        "resumes from it (`--restart` starts afresh); it is removed once the model file is written. 0 = never.",
        min=0,
    )
    distributed_timeout: float = _opt(
        10.0, help="Under torchrun or srun (several processes): minutes a process waits for the others in a "
        "collective operation before the run fails with an error, so a hung process cannot stall the rest.",
        min=0.1,
    )
    seed: int | None = _opt(0, help="Seed for sampling, augmentation, split and initialisation; null = random.")
    num_workers: int = _opt(0, help="DataLoader worker processes (0 reads in the main process).", min=0)
    torch_threads: int | None = _opt(
        None, help="Torch intra-op threads while training; null keeps torch's default (one per core). On a "
        "machine shared with other jobs, fewer threads than cores avoids threads waiting on each other.", min=1
    )
    device: str = _opt("auto", help="'auto' (CUDA, then MPS, then CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'.",
                       pattern=DEVICE_PATTERN, expected="auto, cpu, cuda, cuda:N or mps")
    amp: bool = _opt(True, help="Mixed precision (autocast) on GPU; never used on the CPU.")


@dataclass
class PredictSettings(_Section):
    """Out-of-core prediction and the vote across axes."""

    section: ClassVar[str] = "predict"
    axes: str = _opt(
        "zyx", help="Axes to predict along: any of 'z', 'y', 'x' (e.g. 'zyx', 'z'), or 'all12' "
        "(3 axes × 4 rotations of 90°).",
        pattern=r"all12|(?!.*(.).*\1)[zyx]{1,3}", expected="'all12' or 1-3 distinct letters of 'zyx'",
    )
    tta_flips: bool = _opt(False, help="Also predict the flipped planes and combine (test-time augmentation).")
    merge: Literal["auto", "max", "mean", "vote", "learned"] = _opt(
        "auto", help="Across axes: 'max' (class of the single highest probability), 'mean' (soft vote), "
        "'vote' (majority of per-axis labels), 'learned' (the model file's fusion, fitted by `volseg fuse fit` "
        "on a labelled volume); 'auto': 'learned' when the model file has a fusion for these axes, else 'max'."
    )
    chunks: list[int] = _opt(
        help="Block (= output chunk) shape z, y, x in voxels; memory grows with it.",
        factory=lambda: [256, 256, 256], length=3, min=8,
    )
    halo: int = _opt(32, help="In-plane context added around each block and cropped after inference (px).",
                     min=0)
    batch_size: int | Literal["auto"] = _opt(
        "auto", help="Planes per forward pass; 'auto': 4 on the CPU, on a GPU the largest power of two whose "
        "activations fit half of its free memory (measured once per plane size).", min=1)
    device: str = _opt("auto", help="'auto' (CUDA, then MPS, then CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'.",
                       pattern=DEVICE_PATTERN, expected="auto, cpu, cuda, cuda:N or mps")
    amp: bool = _opt(True, help="Autocast on CUDA (never on the CPU, where it is slower).")
    amp_dtype: Literal["float16", "bfloat16"] = _opt(
        "float16", help="Precision of the autocast on CUDA: float16, or bfloat16 (wider range, fewer digits).")
    pipeline: Literal["auto", "device-thread", "inline"] = _opt(
        "auto", help="'device-thread': one thread per worker process feeds the device while the worker's dask "
        "threads read and write other blocks; 'inline': each task runs its blocks itself; 'auto': the device "
        "thread on a GPU, inline on the CPU.")
    compile: bool = _opt(False, help="torch.compile the network before predicting (slow to start; "
                                     "`benchmarks/gpu_check.py` measures whether it pays off on a GPU).")
    fused: bool = _opt(
        False, help="Predict all axes of a block in one task and write only labels and confidence "
        "(no per-axis probabilities on disk)."
    )
    keep_probabilities: bool = _opt(True, help="Keep the per-axis probability arrays after the merge.")
    confidence: bool = _opt(True, help="Write the merged per-voxel confidence (uint8, 255 = certain).")
    entropy: bool = _opt(False, help="Write the per-voxel entropy of the merged probabilities (uint8).")
    disagreement: bool = _opt(False, help="Write the share of axes whose label differs from the merged one.")
    normalization: Literal["model", "recompute"] = _opt(
        "model", help="'model' reuses the training intensity statistics; 'recompute' measures this volume."
    )
    probability_codec: Literal["lz4", "zstd"] = _opt(
        "lz4", help="Blosc codec for the probability arrays (lz4 writes ~3× faster; zstd is smaller)."
    )
    torch_threads: int | None = _opt(
        None, help="Torch threads per dask worker thread; null divides the cores among the dask threads.", min=1
    )


@dataclass
class Settings:
    """All settings: model, data, augment, train and predict sections."""

    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    predict: PredictSettings = field(default_factory=PredictSettings)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            cls, value = _SECTION_TYPES[f.name], getattr(self, f.name)
            if isinstance(value, Mapping):  # Settings(train={"epochs": 5})
                value = _build_section(cls, value, f.name)
            elif not isinstance(value, cls):
                raise ConfigError(f"{f.name}: expected {cls.__name__} or a mapping of its keys, found "
                                  f"{type(value).__name__}")
            setattr(self, f.name, value)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None, *, source: str = "settings") -> Settings:
        """Build validated settings from a nested mapping (missing keys keep their defaults)."""
        raw = {} if raw is None else raw
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: expected a mapping of sections, found {type(raw).__name__}")
        sections = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for name, value in raw.items():
            if name not in sections:
                raise ConfigError(f"{source}: {_unknown_key_message(str(name), list(sections), '')}")
            try:
                kwargs[name] = _build_section(_SECTION_TYPES[name], value, name)
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from None
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML- and JSON-serialisable)."""
        return dataclasses.asdict(self)

    def with_overrides(self, overrides: Mapping[str, Any], *, source: str = "command line") -> Settings:
        """Return a copy with dotted keys (``"train.epochs"``) replaced, validated like a file.

        ``None`` values are skipped, so unset CLI options pass straight through.
        """
        merged = self.to_dict()
        for dotted, value in overrides.items():
            if value is None:
                continue
            section, _, key = dotted.partition(".")
            if section not in merged or not key:
                raise ConfigError(f"{source}: unknown setting {dotted!r}")
            merged[section][key] = value
        return Settings.from_dict(merged, source=source)

    def save(self, path: str | Path) -> None:
        """Write the settings as YAML, with each key's help text as a comment."""
        Path(path).write_text(self.to_yaml())

    def to_yaml(self) -> str:
        """The settings as commented YAML."""
        lines = ["# volseg_dask settings. Every key is optional; missing keys keep their defaults.", ""]
        for section in dataclasses.fields(self):
            obj = getattr(self, section.name)
            lines.append(f"{section.name}:  # {type(obj).__doc__}")
            for f in dataclasses.fields(obj):
                value = yaml.safe_dump(getattr(obj, f.name), default_flow_style=True, width=200).strip()
                value = value.removesuffix("\n...").removesuffix("...").strip()
                lines.append(f"  {f.name}: {value}  # {f.metadata['help']}")
            lines.append("")
        return "\n".join(lines)


_SECTION_TYPES: dict[str, type] = {
    "model": ModelSettings,
    "data": DataSettings,
    "augment": AugmentSettings,
    "train": TrainSettings,
    "predict": PredictSettings,
}


def load_settings(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Load settings from a YAML file (or the defaults when ``path`` is None) and apply overrides.

    Parameters
    ----------
    path
        YAML file; ``None`` gives the defaults.
    overrides
        Dotted keys such as ``{"train.epochs": 5}``; ``None`` values are ignored.

    Returns
    -------
    Settings
        Validated settings.

    Raises
    ------
    ConfigError
        For a missing or unparsable file, an unknown key, a wrong type or an out-of-range value.
    """
    if path is None:
        settings = Settings()
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: settings file not found; write one with `volseg config write-defaults {p}`")
        try:
            raw = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({exc}); fix the syntax or regenerate it with "
                              "`volseg config write-defaults`") from None
        settings = Settings.from_dict(raw, source=str(p))
    if overrides:
        settings = settings.with_overrides(overrides)
    return settings


# ---- validation ----------------------------------------------------------------------------------


def _unknown_key_message(key: str, valid: list[str], where: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key {where}{key!r}{hint} Valid keys: {', '.join(valid)}"


def _build_section(cls: type, raw: Any, name: str) -> Any:
    """Section ``name`` from a mapping of its keys (unknown keys refused; values checked by the section)."""
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{name}: expected a mapping of keys, found {type(raw).__name__} {raw!r}")
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in fields:
            raise ConfigError(_unknown_key_message(str(key), fields, f"{name}."))
    return cls(**raw)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _check_value(value: Any, tp: Any, meta: Mapping[str, Any], key: str) -> Any:
    """Coerce ``value`` to ``tp`` or raise a ConfigError naming ``key``."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: must not be null; expected {_type_name(tp)}")
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _check_value(value, non_none[0], meta, key)
        literal = [a for a in non_none if get_origin(a) is Literal and value in get_args(a)]
        if literal:  # int | Literal["auto"]: the word first, then the number's own checks
            return value
        if isinstance(value, str):
            words = " or ".join(repr(w) for a in non_none if get_origin(a) is Literal for w in get_args(a))
            raise ConfigError(f"{key}: expected a number or {words}, found {value!r}")
        return _check_value(value, next(a for a in non_none if get_origin(a) is not Literal), meta, key)
    if value is None:
        raise ConfigError(f"{key}: must not be null; expected {_type_name(tp)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, found {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, found {value!r}")
        _check_range(value, meta, key)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, found {value!r}")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{key}: expected a finite number, found {value!r}")
        _check_range(value, meta, key)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, found {value!r}")
        choices = meta.get("choices")
        if callable(choices):
            choices = choices()
        if choices:
            match = [c for c in choices if c.lower() == value.lower()]
            if not match:
                raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(choices)}")
            return match[0]
        pattern = meta.get("pattern")
        if pattern and not re.fullmatch(pattern, value):
            raise ConfigError(f"{key}: {value!r} is not allowed; expected {meta['expected']}")
        return value
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, found {value!r}")
        length = meta.get("length")
        if length is not None and len(value) != length:
            raise ConfigError(f"{key}: expected {length} values, found {len(value)} ({value!r})")
        item_meta = {k: v for k, v in meta.items() if k in ("min", "max", "multiple_of")}
        out = [_check_value(v, item_tp, item_meta, f"{key}[{i}]") for i, v in enumerate(value)]
        if meta.get("increasing") and any(b <= a for a, b in itertools.pairwise(out)):
            raise ConfigError(f"{key}: values must increase, found {out!r}")
        return out
    if origin is dict:
        _, val_tp = get_args(tp)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, found {value!r}")
        keys = meta.get("keys")
        out_d = {}
        for k, v in value.items():
            if keys is not None and k not in keys:
                raise ConfigError(f"{key}: unknown key {k!r}; valid keys: {', '.join(keys)}")
            out_d[str(k)] = _check_value(v, val_tp, {"min": meta.get("min")}, f"{key}.{k}")
        if keys is not None:
            for k in keys:
                out_d.setdefault(k, 0.0)
            if not any(out_d.values()):
                raise ConfigError(f"{key}: at least one weight must be positive, found {out_d!r}")
        return out_d
    raise ConfigError(f"{key}: unsupported setting type {tp!r}")  # pragma: no cover - programming error


def _check_range(value: float, meta: Mapping[str, Any], key: str) -> None:
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        raise ConfigError(f"{key}: {value!r} is below the minimum {lo!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}: {value!r} is above the maximum {hi!r}")
    mult = meta.get("multiple_of")
    if mult and value % mult:
        raise ConfigError(f"{key}: {value!r} must be a multiple of {mult} (e.g. {int(value) // mult * mult or mult})")
    if meta.get("odd") and value % 2 == 0:
        raise ConfigError(f"{key}: {value!r} must be odd (the centre slice is the one predicted)")


def settings_reference_markdown() -> str:
    """The settings reference (one table per section) as Markdown, generated from the dataclasses."""
    out = []
    defaults = Settings()
    for section in dataclasses.fields(Settings):
        obj = getattr(defaults, section.name)
        out.append(f"### `{section.name}` — {type(obj).__doc__}\n")
        out.append("| key | default | meaning |")
        out.append("| --- | --- | --- |")
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            default = yaml.safe_dump(getattr(obj, f.name), default_flow_style=True).strip()
            default = default.removesuffix("\n...").removesuffix("...").strip()
            help_text = f.metadata["help"].replace("|", "\\|")
            out.append(f"| `{f.name}` | `{default}` | {help_text} ({_type_name(hints[f.name])}) |")
        out.append("")
    return "\n".join(out)
