"""Votes across axes (and test-time variants), blockwise.

Methods, per voxel:

``max``  (default, as Volume Segmantics) the class of the single highest probability over all axes;
         the merged probability vector is that axis's vector.
``mean`` the soft vote: argmax of the mean probability vector.
``vote`` the majority of the per-axis labels; ties go to the highest mean probability.

Besides labels, a merge can write a confidence (merged probability of the chosen class), the
normalised entropy of the merged probability vector, and the number of axes that disagree with the
merged label. All are uint8 and computed in one blockwise pass over the per-axis probability arrays,
which share the labels' chunk grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..labels import label_dtype

__all__ = ["EXTRA_OUTPUTS", "METHODS", "combine", "merge_block", "normalised_entropy"]


METHODS = ("max", "mean", "vote")
EXTRA_OUTPUTS = ("confidence", "entropy", "disagreement")


def combine(probs: Sequence[np.ndarray], method: str = "max", class_axis: int = 0) -> np.ndarray:
    """Combine probability arrays of the same shape into one (``max`` or ``mean``)."""
    stack = np.stack([np.asarray(p, dtype=np.float32) for p in probs])
    if method == "mean":
        return stack.mean(axis=0)
    if method != "max":
        raise ValueError(f"combine: method must be 'max' or 'mean', not {method!r}")
    ca = class_axis + 1
    best = stack.max(axis=ca, keepdims=True).argmax(axis=0)  # variant with the highest top probability
    return np.take_along_axis(stack, best[None], axis=0)[0]


#: voxels merged at a time inside a block: the temporaries (a few bytes per voxel each) stay in the
#: CPU cache and a task holds little beyond its inputs and output, whatever the block size
SLAB_VOXELS = 1 << 17


def merge_block(*probs: np.ndarray, method: str, label_values: Sequence[int],
                outputs: Sequence[str] = ()) -> np.ndarray:
    """Merge per-axis uint8 probabilities ``(C, z, y, x)`` into ``(1 + len(outputs), z, y, x)``.

    Row 0 holds the labels (original label values), the next rows the requested ``outputs``
    (``confidence``, ``entropy``, ``disagreement``) as uint8. The dtype is that of the labels.

    The block is merged in slabs of about :data:`SLAB_VOXELS` voxels along its first spatial axis with
    elementwise uint8 operations (ties go to the first class and the first axis, as ``argmax``), so
    the temporaries are a few bytes per slab voxel, not tens of bytes per block voxel.
    """
    if method not in METHODS:
        raise ValueError(f"merge: method must be one of {', '.join(METHODS)}, not {method!r}")
    for name in outputs:
        if name not in EXTRA_OUTPUTS:
            raise ValueError(f"merge: unknown output {name!r}; choose from {', '.join(EXTRA_OUTPUTS)}")
    arrays = [np.asarray(p) for p in probs]
    first = arrays[0]
    for p in arrays[1:]:
        if p.shape != first.shape:
            raise ValueError(f"merge: per-axis blocks differ in shape ({p.shape} vs {first.shape})")
    lut = np.asarray(label_values)
    dtype = label_dtype(label_values)
    out = np.empty((1 + len(outputs), *first.shape[1:]), dtype=dtype)
    if first.ndim < 2 or first.shape[1] == 0:
        return out
    plane = max(1, int(np.prod(first.shape[2:])))
    step = max(1, SLAB_VOXELS // plane)
    for start in range(0, first.shape[1], step):
        part = slice(start, start + step)
        _merge_slab([p[:, part] for p in arrays], method, lut, tuple(outputs), out[:, part])
    return out


def _maximum(arrays: Sequence[np.ndarray]) -> np.ndarray:
    top = arrays[0].copy()
    for a in arrays[1:]:
        np.maximum(top, a, out=top)
    return top


def _first_index(arrays: Sequence[np.ndarray], top: np.ndarray, values: Sequence[int] | None = None) -> np.ndarray:
    """Per voxel, ``values[i]`` (default ``i``) of the first ``i`` with ``arrays[i] == top``: ``argmax``'s
    tie rule when ``top`` is their maximum.

    Branch-free: each array votes ``((n - i) << bits) | values[i]`` where it equals ``top`` and the
    largest vote wins (masked copies are many times slower on scattered masks).
    """
    n = len(arrays)
    values = list(range(n)) if values is None else [int(v) for v in values]
    bits = max(1, max(values).bit_length())
    total = bits + n.bit_length()
    dtype = np.uint8 if total <= 8 else np.uint16 if total <= 16 else np.uint32
    code = np.zeros(top.shape, dtype)
    term = np.empty(top.shape, dtype)
    equal = np.empty(top.shape, bool)
    for i, a in enumerate(arrays):
        np.equal(a, top, out=equal)
        np.multiply(equal, dtype((n - i) << bits | values[i]), out=term)
        np.maximum(code, term, out=code)
    code &= (1 << bits) - 1
    return code.astype(np.uint8 if bits <= 8 else np.uint16, copy=False)


def _pick(index: np.ndarray, arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Per voxel, ``arrays[index]`` (exact: one term of the sum is not zero)."""
    picked = np.zeros_like(arrays[0])
    equal = np.empty(index.shape, bool)
    for i, a in enumerate(arrays):
        np.equal(index, i, out=equal)
        picked += equal * a
    return picked


def normalised_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy of the (unnormalised) probability vectors ``p`` ``(C, ...)``, as uint8 (255 = uniform)."""
    p = p / np.maximum(p.sum(axis=0, keepdims=True), 1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(np.where(p > 0, p * np.log(p), 0.0)).sum(axis=0)
    return np.rint(np.clip(h / np.log(max(p.shape[0], 2)), 0, 1) * 255.0)


def _merge_slab(probs: Sequence[np.ndarray], method: str, lut: np.ndarray, outputs: tuple[str, ...],
                out: np.ndarray) -> None:
    """:func:`merge_block` on one slab; writes into ``out`` (``(1 + len(outputs), ...)``)."""
    n_axes, n_classes = len(probs), probs[0].shape[0]
    shape = probs[0].shape[1:]
    per_axis = [_first_index(list(p), _maximum(list(p))) for p in probs] \
        if method == "vote" or "disagreement" in outputs else []
    merged: list[np.ndarray] = []  # the merged probability vector, float32 per class, when needed
    if method == "max":
        # the single highest probability over all axes; its class is that of the first (axis, class) holding it,
        # i.e. argmax within the first axis whose top probability is the highest
        flat = [p[c] for p in probs for c in range(n_classes)]
        confidence = _maximum(flat)
        classes = _first_index(flat, confidence, [c for _ in probs for c in range(n_classes)])
        if "entropy" in outputs:
            axis = _first_index(flat, confidence, [a for a in range(n_axes) for _ in range(n_classes)])
            merged = [_pick(axis, [p[c] for p in probs]).astype(np.float32) for c in range(n_classes)]
    else:
        zero = np.zeros(shape, np.uint16 if n_axes <= 257 else np.uint32)
        sums = [sum((p[c] for p in probs), zero) for c in range(n_classes)]  # exact integers
        # the mean as numpy computes it: float32 sum of integers (exact), divided by the count in float32
        if method == "vote" or "entropy" in outputs:
            merged = [s.astype(np.float32) / n_axes for s in sums]
        if method == "mean":  # integer sums have the float means' order and ties
            top = _maximum(sums)
            classes = _first_index(sums, top)
            confidence = np.rint(top.astype(np.float32) / n_axes)
        else:  # vote: most votes; among tied classes the highest mean probability (< 256 keeps the vote order)
            counts = [sum((a == c for a in per_axis), np.zeros(shape, np.uint16)) for c in range(n_classes)]
            keys = [n.astype(np.float32) * 256.0 + m for n, m in zip(counts, merged)]
            classes = _first_index(keys, _maximum(keys))
            confidence = np.rint(_pick(classes, merged))
    out[0] = classes if np.array_equal(lut, np.arange(n_classes)) else lut[classes]
    for i, name in enumerate(outputs, start=1):
        if name == "confidence":
            out[i] = confidence
        elif name == "entropy":
            out[i] = normalised_entropy(np.stack(merged) / 255.0)
        else:  # disagreement: axes whose label differs from the merged one
            out[i] = sum((a != classes for a in per_axis), np.zeros(shape, np.uint16))

