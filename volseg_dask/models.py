"""smp model factory, local pretrained encoder weights, and the one-file model format (:class:`ModelMeta`).

A model file is a ``torch.save`` of a plain dict::

    {"format": "volseg_dask.model", "format_version": 2,
     "state_dict": {...tensors...}, "meta": {...plain Python values...}}

``meta`` is :meth:`ModelMeta.to_dict`: everything prediction needs (architecture, encoder and
constructor arguments, the original label values, the intensity normalisation, the 2.5D slices, the
downsampling factor), the settings used, package versions and a summary of training.
:class:`ModelMeta` is the one owner of that schema: training writes it, prediction reads it, and every
check of a file's metadata is in :meth:`ModelMeta.from_dict`. Files are read with
``torch.load(weights_only=True)``, so a model file can never run code.

Format versions: 1, the first files (``downsample``, ``pad_multiple`` and ``n_slices`` may be
absent; they default to 1, 32 and ``in_channels``); 2, written by :class:`ModelMeta` (every field
present). A field added later gets a default, so older files keep loading (``fusion``, the learned
fusion of the axes, defaults to None); a file of a newer format is refused with a message to upgrade.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._version import __version__
from .config import ModelSettings
from .errors import ConfigError, ModelFileError
from .normalize import Normalization
from .prediction.fusion import Fusion

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ModelMeta",
    "architectures",
    "atomic_save",
    "build_model",
    "encoder_names",
    "load_encoder_weights",
    "load_model",
    "model_from_meta",
    "save_model",
]

FORMAT = "volseg_dask.model"
FORMAT_VERSION = 2
"""Model-file format written by this version (files of formats 1 .. FORMAT_VERSION load)."""
CHECKPOINT_FORMAT = "volseg_dask.checkpoint"
"""Marker of a training checkpoint (``MODEL.ckpt``): never a model file, refused where one is expected."""


def architectures() -> dict[str, type[nn.Module]]:
    """Every architecture the installed smp offers, by class name."""
    import segmentation_models_pytorch as smp

    return {cls.__name__: cls for cls in smp.MODEL_ARCHITECTURES_MAPPING.values()}


def encoder_names() -> list[str]:
    """Every encoder name the installed smp accepts (smp's own plus ``tu-`` timm encoders)."""
    import segmentation_models_pytorch as smp
    import timm

    return [*smp.encoders.get_encoder_names(), *(f"tu-{n}" for n in timm.list_models())]


def _check_encoder(name: str) -> None:
    import segmentation_models_pytorch as smp
    import timm

    if name.startswith("tu-"):
        if timm.is_model(name[3:]):
            return
        close = difflib.get_close_matches(name[3:], timm.list_models(), n=3)
        hint = f"; close matches: {', '.join('tu-' + c for c in close)}" if close else ""
        raise ConfigError(f"model.encoder: {name!r} is not a timm model{hint}; `volseg models` lists all")
    names = smp.encoders.get_encoder_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ConfigError(f"model.encoder: {name!r} is not an smp encoder{hint}; `volseg models` lists all "
                          "(timm encoders as tu-NAME)")


def build_model(settings: ModelSettings, *, classes: int, in_channels: int | None = None,
                load_weights: bool = True) -> nn.Module:
    """Build the smp network named by ``settings``.

    Parameters
    ----------
    settings
        Architecture, encoder, depth, decoder channels, 2.5D slices, optional local weights file.
    classes
        Number of output classes.
    in_channels
        Input channels; default ``settings.n_slices``.
    load_weights
        Load ``settings.encoder_weights`` when set (False when a full state_dict follows anyway).

    Raises
    ------
    ConfigError
        Unknown encoder (the message lists close names), or a combination smp refuses.
    """
    match = settings.architecture  # checked against smp's registry by ModelSettings
    archs = architectures()
    _check_encoder(settings.encoder)
    kwargs: dict[str, Any] = {
        "encoder_name": settings.encoder,
        "encoder_weights": None,  # never download; local weights are loaded below
        "in_channels": in_channels or settings.n_slices,
        "classes": classes,
    }
    if match not in ("Segformer", "DPT"):
        kwargs["encoder_depth"] = settings.encoder_depth
    if match == "PSPNet":  # smp's default upsampling assumes depth 3; keep the output at input size
        kwargs["upsampling"] = 2 ** settings.encoder_depth
    if settings.decoder_channels is not None:
        kwargs["decoder_channels"] = list(settings.decoder_channels)
    try:
        model = archs[match](**kwargs)
    except (TypeError, ValueError, KeyError, RuntimeError, AttributeError) as exc:
        raise ConfigError(f"model: smp cannot build {match} with encoder {settings.encoder!r} and "
                          f"{ {k: v for k, v in kwargs.items() if k != 'encoder_weights'} } ({exc})") from exc
    if load_weights and settings.encoder_weights:
        load_encoder_weights(model, settings.encoder_weights)
    return model


def pad_multiple(model: nn.Module, settings: ModelSettings) -> int:
    """The multiple each input side must be padded to (``2**depth``; 32 for 5-stage encoders)."""
    return int(getattr(getattr(model, "encoder", None), "output_stride", 2 ** settings.encoder_depth))


# ---- pretrained encoder weights -----------------------------------------------------------------

_PREFIXES = ("module.", "model.", "encoder.", "backbone.", "state_dict.")


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _fit_channels(src: torch.Tensor, dst_shape: torch.Size) -> torch.Tensor | None:
    """Adapt a first-conv kernel (out, 3, k, k) to ``dst_shape``'s input channels with smp's own
    ``patch_first_conv`` (summed over RGB for one channel, cycled and rescaled for more)."""
    if src.ndim != 4 or src.shape[0] != dst_shape[0] or src.shape[2:] != dst_shape[2:]:
        return None
    from segmentation_models_pytorch.encoders._utils import patch_first_conv

    conv = nn.Conv2d(src.shape[1], src.shape[0], (src.shape[2], src.shape[3]), bias=False)
    conv.weight = nn.Parameter(src.detach().clone(), requires_grad=False)
    patch_first_conv(conv, new_in_channels=dst_shape[1], default_in_channels=src.shape[1], pretrained=True)
    return conv.weight.detach()


def load_encoder_weights(model: nn.Module, path: str | os.PathLike[str]) -> int:
    """Load a local file of pretrained weights into ``model.encoder``; return the tensors loaded.

    The file may hold the encoder alone or a whole classification network (its head is ignored),
    saved by timm, torchvision, smp or another implementation of the same architecture. Tensors are
    matched by name (after removing ``module.``/``model.``/``encoder.`` prefixes); when the names
    differ but the architecture is the same, they are matched in order by shape. The first
    convolution is adapted to the input channels (summed over RGB for one channel).

    Raises
    ------
    ModelFileError
        The file is missing or unreadable, or its tensors do not fit the encoder.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: encoder weights file not found (model.encoder_weights); give a local "
                             "file, nothing is downloaded")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelFileError(f"{path}: not a readable weights file ({type(exc).__name__}: {exc})") from exc
    if isinstance(raw, Mapping) and "state_dict" in raw and isinstance(raw["state_dict"], Mapping):
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ModelFileError(f"{path}: holds no state_dict of tensors")
    encoder: nn.Module = model.encoder  # type: ignore[assignment]
    target = encoder.state_dict()
    source = {_strip(k): v for k, v in raw.items()}
    loaded = _match_by_name(target, source)
    how = "name"
    if len(loaded) < 0.9 * len(target):
        by_position = _match_by_position(target, list(source.values()))
        if len(by_position) > len(loaded):
            loaded, how = by_position, "position"
    if len(loaded) < 0.9 * len(target):
        raise ModelFileError(
            f"{path}: only {len(loaded)} of the encoder's {len(target)} tensors fit; these weights are not for "
            f"this encoder (model.encoder). Give weights of the same architecture"
        )
    encoder.load_state_dict({**target, **loaded})
    log.info("loaded %d of %d encoder tensors from %s (matched by %s)", len(loaded), len(target), path, how)
    return len(loaded)


def _match_by_name(target: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    stripped = {_strip(k): k for k in target}
    for short, full in stripped.items():
        value = source.get(short)
        if value is None:
            continue
        if value.shape == target[full].shape:
            out[full] = value
        elif (fitted := _fit_channels(value, target[full].shape)) is not None:
            out[full] = fitted
    return out


def _match_by_position(target: Mapping[str, torch.Tensor], source: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Pair tensors in order; a source tensor that does not fit is skipped (e.g. a classifier head)."""
    out: dict[str, Any] = {}
    j = 0
    for key, tensor in target.items():
        while j < len(source):
            value = source[j]
            j += 1
            if value.shape == tensor.shape:
                out[key] = value
                break
            if not out and (fitted := _fit_channels(value, tensor.shape)) is not None:  # first conv
                out[key] = fitted
                break
        else:
            break
    return out


# ---- model files --------------------------------------------------------------------------------


@dataclass
class ModelMeta:
    """What a model file says besides its weights; the one owner of the model-file schema.

    Parameters
    ----------
    model
        The network: architecture, encoder, depth, decoder channels, 2.5D slices.
    label_values
        Original label value of each class (``label_values[c]`` is class ``c``).
    normalization
        Intensity window and standardisation of the training images.
    in_channels
        Network input channels (= ``model.n_slices``; multi-channel volumes are not supported).
    ignore_label
        Label value that training left out of the loss, if any.
    downsample
        The network sees the volume averaged over this many voxels per side (``data.downsample``).
    pad_multiple
        Each input side is padded to a multiple of this (the encoder's output stride).
    settings
        Every setting of the run that trained it (plain values).
    training
        Summary and per-epoch history of training.
    train_data, validation_data
        The volumes it was trained and validated on (paths, shapes, split).
    versions
        Package versions that wrote the file (filled in by :func:`save_model`).
    parent_path, parent_sha256
        The model file this one was fine-tuned from (``model.init_from``), and the sha256 of its
        bytes; None for a model trained from scratch (and in files written before fine-tuning).
    fusion
        The learned fusion of the per-axis probabilities (:class:`~volseg_dask.prediction.fusion.Fusion`,
        written by ``volseg fuse fit``), or None; files without it load with None.

    Notes
    -----
    *Which network a fusion belongs to.* A file with fusion is the network of another file plus the
    fusion parameters, so its own sha256 differs from that network's. The network is identified by
    its *network hash*: for a file without fusion, the sha256 of the file; for a file with fusion,
    ``fusion.network_sha256``, which ``fuse fit`` copies from the model file it was given (that file's
    sha256, or its own network hash when it had a fusion already). A prediction records both the
    model file's sha256 (``key_fields["model_sha256"]``, part of its run key) and the network hash
    (``network_sha256``, in the output group's ``volseg_dask`` attribute); per-axis probabilities are
    fused, or used to fit a fusion, only when their network hash is the fusion's. So
    ``fuse fit PRED.zarr ... --model MODEL.pt`` checks that PRED.zarr came from MODEL.pt's network, a
    fused file predicts exactly as the file it was made from, and a fusion can be refitted.
    """

    model: ModelSettings
    label_values: tuple[int, ...]
    normalization: Normalization
    in_channels: int = 1
    ignore_label: int | None = None
    downsample: int = 1
    pad_multiple: int = 32
    settings: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    train_data: list[dict[str, Any]] = field(default_factory=list)
    validation_data: list[dict[str, Any]] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    parent_path: str | None = None
    parent_sha256: str | None = None
    fusion: Fusion | None = None

    def __post_init__(self) -> None:
        self.label_values = tuple(int(v) for v in self.label_values)

    @property
    def classes(self) -> int:
        """Number of classes the network predicts."""
        return len(self.label_values)

    @property
    def n_slices(self) -> int:
        """Adjacent slices the network sees as channels (2.5D)."""
        return int(self.model.n_slices)

    def to_dict(self) -> dict[str, Any]:
        """The ``meta`` record of a model file: plain values only (loadable with ``weights_only=True``)."""
        import json

        model = dataclasses.asdict(self.model)
        model.pop("init_from", None)  # recorded as parent_path: without the key, older versions read the file
        record = {
            "model": model,
            "classes": self.classes,
            "label_values": list(self.label_values),
            "ignore_label": self.ignore_label,
            "in_channels": self.in_channels,
            "n_slices": self.n_slices,
            "downsample": self.downsample,
            "normalization": self.normalization.to_dict(),
            "pad_multiple": self.pad_multiple,
            "settings": self.settings,
            "training": self.training,
            "train_data": self.train_data,
            "validation_data": self.validation_data,
            "versions": self.versions,
            "parent_path": self.parent_path,
            "parent_sha256": self.parent_sha256,
            "fusion": self.fusion.to_dict() if self.fusion is not None else None,
        }
        return dict(json.loads(json.dumps(record, default=str)))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, path: str | os.PathLike[str] = "model",
                  format_version: int = FORMAT_VERSION) -> ModelMeta:
        """Read and check the ``meta`` record of a model file of ``format_version``.

        Raises
        ------
        ModelFileError
            A required field is missing or does not make sense (the file is damaged), or the
            network takes channels other than its 2.5D slices.
        """
        required = ["model", "classes", "label_values", "normalization", "in_channels"]
        if format_version >= 2:
            required += ["n_slices", "downsample", "pad_multiple"]
        for key in required:
            if key not in raw:
                raise ModelFileError(f"{path}: model metadata lacks {key!r}; the file is damaged")
        try:
            from .config import Settings

            model = Settings.from_dict({"model": raw["model"]}, source=f"{path} metadata").model
            values = tuple(int(v) for v in raw["label_values"])
            normalization = Normalization.from_dict(dict(raw["normalization"]))
            in_channels = int(raw["in_channels"])
        except ConfigError as exc:
            raise ModelFileError(f"{exc}; the file is damaged or written by an incompatible version") from None
        except (TypeError, ValueError, KeyError) as exc:
            raise ModelFileError(f"{path}: model metadata is damaged ({type(exc).__name__}: {exc})") from None
        n_slices = int(raw.get("n_slices", in_channels))
        if in_channels != n_slices or model.n_slices != n_slices:
            raise ModelFileError(f"{path}: the network takes {in_channels} channels but the model says {n_slices} "
                                 "slices; multi-channel volumes are not supported")
        if int(raw["classes"]) != len(values) or len(values) < 2:
            raise ModelFileError(f"{path}: {raw['classes']} classes but label values {list(values)}; the model "
                                 "file is damaged")
        factor = raw.get("downsample", 1)
        if not isinstance(factor, int) or isinstance(factor, bool) or not 1 <= factor <= 4:
            raise ModelFileError(f"{path}: downsample factor {factor!r} in its metadata is not 1-4; the file is "
                                 "damaged")
        multiple = raw.get("pad_multiple", 32)
        if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1:
            raise ModelFileError(f"{path}: pad_multiple {multiple!r} in its metadata is not a positive integer; "
                                 "the file is damaged")
        return cls(model=model, label_values=values, normalization=normalization, in_channels=in_channels,
                   ignore_label=raw.get("ignore_label"), downsample=factor, pad_multiple=multiple,
                   settings=dict(raw.get("settings") or {}), training=dict(raw.get("training") or {}),
                   train_data=list(raw.get("train_data") or []),
                   validation_data=list(raw.get("validation_data") or []),
                   versions=dict(raw.get("versions") or {}), parent_path=raw.get("parent_path"),
                   parent_sha256=raw.get("parent_sha256"),
                   fusion=Fusion.from_dict(raw["fusion"], path=path, classes=len(values))
                   if raw.get("fusion") is not None else None)


def save_model(path: str | os.PathLike[str], model: nn.Module, meta: ModelMeta) -> Path:
    """Write ``model``'s weights and ``meta`` to one file, atomically (temporary name, then rename)."""
    import platform

    import segmentation_models_pytorch as smp

    meta = dataclasses.replace(meta, versions={"volseg_dask": __version__, "torch": str(torch.__version__),
                                               "smp": smp.__version__, "python": platform.python_version()})
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": meta.to_dict(),
    }
    return atomic_save(record, path)


def atomic_save(record: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """``torch.save`` ``record`` to ``path`` under a temporary name, then rename: never a half-written file."""
    from .outputs import partial_name, remove_stale_partials

    path = Path(path)
    remove_stale_partials(path)
    tmp = partial_name(path)
    try:
        torch.save(dict(record), tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def read_model_file(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], ModelMeta]:
    """Read and check a model file: (state_dict, metadata). Nothing in it is executed.

    Raises
    ------
    ModelFileError
        Missing, truncated, foreign (or code-carrying) file, a newer format version, or damaged metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found; train one with `volseg train`")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (zipfile.BadZipFile, EOFError, RuntimeError) as exc:
        raise ModelFileError(f"{path}: not a readable model file, or truncated ({exc}); re-copy it or train "
                             "again") from exc
    except Exception as exc:  # the weights_only unpickler refusing code, or garbage
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(f"{path}: refused: not a volseg_dask model file (it may contain code, which is "
                             f"never run: {first})") from exc
    if isinstance(raw, Mapping) and raw.get("format") == CHECKPOINT_FORMAT:
        raise ModelFileError(f"{path}: a training checkpoint, not a model file; rerun the `volseg train` command "
                             "that wrote it to resume training, which writes the model file beside it")
    if not isinstance(raw, Mapping) or raw.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a volseg_dask model file (no '{FORMAT}' marker); train one with "
                             "`volseg train`")
    version = raw.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelFileError(f"{path}: model format version {version} is newer than this volseg_dask "
                             f"({__version__}, format {FORMAT_VERSION}); upgrade volseg_dask")
    state, meta = raw.get("state_dict"), raw.get("meta")
    if not isinstance(state, Mapping) or not isinstance(meta, Mapping):
        raise ModelFileError(f"{path}: model file lacks its weights or metadata; it is damaged")
    return dict(state), ModelMeta.from_dict(meta, path=path, format_version=version)


def model_from_meta(state: Mapping[str, torch.Tensor], meta: ModelMeta,
                    path: str | os.PathLike[str] = "model") -> nn.Module:
    """Rebuild the network described by ``meta`` and load ``state`` into it (eval mode)."""
    model = build_model(meta.model, classes=meta.classes, in_channels=meta.in_channels, load_weights=False)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelFileError(f"{path}: weights do not fit the architecture in its metadata ({exc}); the file "
                             "is damaged") from exc
    return model.eval()


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[nn.Module, ModelMeta]:
    """Load a model file: (network in eval mode on ``device``, its :class:`ModelMeta`).

    Raises
    ------
    ModelFileError
        Missing, truncated, foreign (or code-carrying) file, or a newer format version.
    """
    state, meta = read_model_file(path)
    model = model_from_meta(state, meta, path)
    return model.to(device), meta
