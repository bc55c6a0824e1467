"""Fine-tuning (``model.init_from``): the network and its weights from a parent model file.

Users label in rounds (annotate, train, look, annotate more); each round starts from the last
model instead of from scratch. The parent file fixes the network (architecture, encoder, depth,
decoder channels, 2.5D slices): model settings left at their defaults follow it, any other value is
an error naming it. With the same label values every weight is reused; with new or other label
values the output layer (smp's ``segmentation_head``) gets one row per new class, freshly
initialised, while the rows of the values the parent knew and everything else are reused. The
intensity window is the parent's unless ``data.normalization_from: recompute``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import ModelSettings, Settings
from ..errors import ConfigError, ModelFileError
from ..models import ModelMeta, read_model_file
from ..outputs import file_sha256

log = logging.getLogger(__name__)

__all__ = ["HEAD", "Parent", "load_parent_weights", "read_parent", "settings_from_parent"]

HEAD = "segmentation_head."
"""Prefix of the output layer's tensors in every smp model (one row per class)."""


@dataclass
class Parent:
    """The model file a run fine-tunes: where it is, its hash, its weights and metadata."""

    path: str
    sha256: str
    state: dict[str, torch.Tensor]
    meta: ModelMeta


def read_parent(path: str | os.PathLike[str]) -> Parent:
    """Read the parent model file of ``model.init_from`` (``weights_only``: nothing in it runs).

    Raises
    ------
    ModelFileError
        Missing, truncated, foreign or code-carrying file, a checkpoint, or damaged metadata.
    """
    state, meta = read_model_file(path)
    return Parent(str(Path(path).resolve()), file_sha256(path), state, meta)


def settings_from_parent(settings: Settings, parent: Parent) -> Settings:
    """``settings`` with the parent's network; refuse model settings that ask for another one.

    Raises
    ------
    ConfigError
        A model setting other than its default that differs from the parent's, or
        ``model.encoder_weights`` (the parent's weights initialise the encoder).
    """
    defaults, mine, theirs = ModelSettings(), settings.model, parent.meta.model
    conflicts = []
    for f in dataclasses.fields(ModelSettings):
        name = f.name
        if name == "init_from":
            continue
        value = getattr(mine, name)
        if name == "encoder_weights":
            if value:
                conflicts.append(f"model.encoder_weights: {value!r} (the encoder's weights come from the file)")
        elif value != getattr(defaults, name) and value != getattr(theirs, name):
            conflicts.append(f"model.{name}: {value!r} (the file's: {getattr(theirs, name)!r})")
    if conflicts:
        raise ConfigError(f"model.init_from {parent.path}: the network comes from this model file, but the settings "
                          f"ask for another: {'; '.join(conflicts)}; remove these keys from the settings (or set "
                          "them to the file's values), or train from scratch without model.init_from")
    if settings.data.downsample != parent.meta.downsample:
        log.warning("fine-tuning %s, trained at data.downsample %d, at data.downsample %d", parent.path,
                    parent.meta.downsample, settings.data.downsample)
    model = dataclasses.replace(theirs, encoder_weights=None, init_from=mine.init_from)
    return dataclasses.replace(settings, model=model)


def load_parent_weights(model: nn.Module, parent: Parent, label_values: tuple[int, ...]) -> str:
    """Copy the parent's weights into ``model`` (built for ``label_values``); return what was reused.

    Raises
    ------
    ModelFileError
        The parent's weights do not fit its own architecture (a damaged file).
    """
    old = parent.meta.label_values
    target = model.state_dict()
    if tuple(label_values) == tuple(old):
        _load(model, parent.state, parent.path)
        return "every weight (same label values)"
    rows = [(new, old.index(value)) for new, value in enumerate(label_values) if value in old]
    state = {}
    for key, value in parent.state.items():
        if key.startswith(HEAD) and key in target and value.ndim and value.shape[0] == len(old) \
                and target[key].shape[1:] == value.shape[1:]:
            fresh = target[key].clone()  # the new classes keep their fresh initialisation
            for new, was in rows:
                fresh[new] = value[was]
            state[key] = fresh
        else:
            state[key] = value
    _load(model, state, parent.path)
    known = [label_values[new] for new, _ in rows]
    added = [v for v in label_values if v not in old]
    return (f"label values {list(old)} -> {list(label_values)}: output layer freshly initialised for "
            f"{added or 'none'}, kept for {known or 'none'}; every other weight reused")


def _load(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelFileError(f"{path}: its weights do not fit the network its metadata describes ({exc}); the file "
                             "is damaged") from None
