"""Training: labelled volumes sliced lazily along z, y and x, augmented, fitted with an smp network.

The rooms, in the order data flows through them: :mod:`.volumes` (open and check the labelled
volumes), :mod:`.split` (validation slabs), :mod:`.cache` and :mod:`.dataset` (lazy slices through a
bounded chunk cache), :mod:`.augment` (albumentations), :mod:`.losses`, :mod:`.lr_finder` (the
learning-rate range test), :mod:`.step` and :mod:`.loop` (the fit), :mod:`.distributed` (several
processes under torchrun or srun), :mod:`.checkpoint` (resuming after a kill), :mod:`.finetune` (the
network from a parent model file), :mod:`.reports` (curves, samples, metrics files) and :mod:`.run`
(the ``train`` verb that runs them all).
"""

from __future__ import annotations

from .run import TrainResult, train

__all__ = ["TrainResult", "train"]
