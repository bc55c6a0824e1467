"""smp model factory, local pretrained encoder weights, and the one-file model format.

A model file is a ``torch.save`` of a plain dict::

    {"format": "volseg_dask.model", "format_version": 1,
     "state_dict": {...tensors...}, "meta": {...plain Python values...}}

``meta`` says everything prediction needs: architecture, encoder and constructor arguments, the
number of classes and the original label values, the intensity normalisation, the settings used
and package versions, and a summary of training. Files are read with
``torch.load(weights_only=True)``, so a model file can never run code.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .config import ModelSettings
from .errors import ConfigError, ModelFileError

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "architectures",
    "build_model",
    "encoder_names",
    "load_encoder_weights",
    "load_model",
    "model_from_meta",
    "save_model",
]

FORMAT = "volseg_dask.model"
FORMAT_VERSION = 1


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
        Unknown architecture or encoder (the message lists the valid names), or a combination smp
        refuses.
    """
    archs = architectures()
    match = {name.lower(): name for name in archs}.get(settings.architecture.lower())
    if match is None:
        raise ConfigError(f"model.architecture: {settings.architecture!r} is not offered by the installed "
                          f"segmentation-models-pytorch; choose one of {', '.join(sorted(archs))}")
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
    """Adapt a first-conv kernel (out, 3, k, k) to ``dst_shape``'s input channels, as smp does."""
    if src.ndim != 4 or src.shape[0] != dst_shape[0] or src.shape[2:] != dst_shape[2:]:
        return None
    n_in = dst_shape[1]
    if n_in == 1:
        return src.sum(dim=1, keepdim=True)
    reps = -(-n_in // src.shape[1])
    return src.repeat(1, reps, 1, 1)[:, :n_in] * (src.shape[1] / n_in)


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


def save_model(path: str | os.PathLike[str], model: nn.Module, meta: Mapping[str, Any]) -> Path:
    """Write ``model``'s weights and ``meta`` to one file, atomically (temporary name, then rename)."""
    import json
    import platform

    import segmentation_models_pytorch as smp

    path = Path(path)
    plain_meta = json.loads(json.dumps(meta, default=str))  # only plain values: loadable with weights_only
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": {
            **plain_meta,
            "versions": {"volseg_dask": __version__, "torch": str(torch.__version__), "smp": smp.__version__,
                         "python": platform.python_version()},
        },
    }
    from .store import partial_name, remove_stale_partials

    remove_stale_partials(path)
    tmp = partial_name(path)
    try:
        torch.save(record, tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def read_model_file(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and check a model file: (state_dict, meta). Nothing in it is executed."""
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
    for key in ("model", "classes", "label_values", "normalization", "in_channels"):
        if key not in meta:
            raise ModelFileError(f"{path}: model metadata lacks {key!r}; the file is damaged")
    return dict(state), dict(meta)


def model_from_meta(state: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                    path: str | os.PathLike[str] = "model") -> nn.Module:
    """Rebuild the network described by ``meta`` and load ``state`` into it (eval mode)."""
    from .config import Settings

    settings = Settings.from_dict({"model": meta["model"]}, source=f"{path} metadata").model
    model = build_model(settings, classes=int(meta["classes"]), in_channels=int(meta["in_channels"]),
                        load_weights=False)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelFileError(f"{path}: weights do not fit the architecture in its metadata ({exc}); the file "
                             "is damaged") from exc
    return model.eval()


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a model file: (network in eval mode on ``device``, metadata dict).

    Raises
    ------
    ModelFileError
        Missing, truncated, foreign (or code-carrying) file, or a newer format version.
    """
    state, meta = read_model_file(path)
    model = model_from_meta(state, meta, path)
    return model.to(device), meta
