"""Prediction: per-axis slab inference over blocks with an in-plane halo, then a blockwise vote.

The rooms, in the order data flows through them: :mod:`.plan` (inputs checked before any graph, the
block grid, the run key), :mod:`.reads` (block + halo straight from the input), :mod:`.inference`
(the slab function: a block -> uint8 probabilities on the device), :mod:`.tasks` (one task per
block and axis, or per block when fused), :mod:`.upsample` (coarse probabilities back to the native
grid), :mod:`.votes` (the merge kernels), :mod:`.fusion` (the learned fusion's parameters and kernels),
:mod:`.merging` (the ``merge`` verb), :mod:`.run` (the ``predict`` verb), :mod:`.overlap`
(``predict_array``, the lazy ``map_overlap`` path), and, to fit a fusion, :mod:`.fusion_samples` (the
voxels) and :mod:`.fusion_fit` (the ``fit_fusion`` verb).
"""

from __future__ import annotations

from .._lazy import lazy_attributes

# public name -> submodule (imported on first use: `merge` runs without torch, `predict` needs it)
_NAMES = {"Plan": "plan", "plan_prediction": "plan", "PredictResult": "run", "predict": "run", "merge": "merging",
          "predict_array": "overlap", "fit_fusion": "fusion_fit"}

__all__ = sorted(_NAMES)
__getattr__, __dir__ = lazy_attributes(__name__, _NAMES, globals())
