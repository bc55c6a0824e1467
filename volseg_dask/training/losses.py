"""Training losses: smp's Dice, focal, Tversky and Lovász, torch's cross-entropy, Dice + cross-entropy."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..labels import IGNORE_INDEX

__all__ = ["make_loss"]


class _SumLoss(nn.Module):
    def __init__(self, *parts: nn.Module) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum((part(logits, target) for part in self.parts), torch.zeros((), device=logits.device))


def make_loss(name: str, ignore_index: int = IGNORE_INDEX) -> nn.Module:
    """The training loss ``name`` (multiclass, logits in, ``ignore_index`` voxels skipped).

    ``dice_ce`` (default) is smp's Dice loss plus cross-entropy; ``dice``, ``focal``, ``tversky``
    and ``lovasz`` are smp's; ``cross_entropy`` is torch's (its mean runs over labelled voxels only).
    """
    from segmentation_models_pytorch import losses

    mode = "multiclass"
    factories: dict[str, Any] = {
        "dice_ce": lambda: _SumLoss(losses.DiceLoss(mode, ignore_index=ignore_index),
                                    nn.CrossEntropyLoss(ignore_index=ignore_index)),
        "dice": lambda: losses.DiceLoss(mode, ignore_index=ignore_index),
        "cross_entropy": lambda: nn.CrossEntropyLoss(ignore_index=ignore_index),
        "focal": lambda: losses.FocalLoss(mode, ignore_index=ignore_index),
        "tversky": lambda: losses.TverskyLoss(mode, ignore_index=ignore_index),
        "lovasz": lambda: losses.LovaszLoss(mode, ignore_index=ignore_index),
    }
    if name not in factories:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(factories)}")
    return factories[name]()

