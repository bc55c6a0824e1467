"""Learned fusion of the per-axis probabilities: the parameters, and their blockwise application.

Two models, both fitted on voxels of a labelled volume the network did not train on
(:mod:`~volseg_dask.prediction.fusion_fit`) and stored in the model file (:class:`Fusion`, part of
:class:`~volseg_dask.models.ModelMeta`):

``linear`` MultiPlanarUNet's fusion model (Perslev et al., 2019): per (axis, class) a weight and per
           class a bias, ``softmax_c(Σ_a W[c, a]·p[a, c] + b[c])``; no spatial context.
``conv``   a 3×3×3 convolution over the stacked per-axis probabilities (3·C → C channels, plus a bias):
           every voxel also sees its 26 neighbours along every axis, which lets the fusion smooth away
           the isolated voxels and stripes where the 2D predictions of the axes disagree.

Fixed-point weights make the fusion exact blockwise. The weights are stored as integers with one
scale per class, bounded so that ``Σ|w|·255 < 2**24``: every partial sum of integer weights times uint8
probabilities is then an integer that float32 holds exactly, so the logits do not depend on the
summation order, the block shape, the BLAS or the threads — a blockwise fusion equals a whole-volume
one bit for bit, as the max/mean/vote merges do. (The rounding costs < 0.1 % of each weight.) A linear
model with equal weights and zero bias therefore gives exactly the labels of the ``mean`` merge. The
conv model's sums are torch's CPU ``conv3d`` (oneDNN's direct convolution or an im2col product: every
partial sum exact; a Winograd or FFT convolution, or reduced-precision float32 math, would not be, which
``tests/test_fusion.py`` would see as a chunked merge that differs from the whole one).

The conv model needs one voxel of context around a block: it is read from the neighbouring blocks
(:func:`native_probabilities`), and at the volume's border the edge voxel is repeated.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError, ModelFileError
from ..grid import AXES, BlockGrid, Region
from ..labels import label_dtype
from .upsample import region_reader, upsample_region
from .votes import EXTRA_OUTPUTS, SLAB_VOXELS, normalised_entropy

__all__ = ["KINDS", "LEARNED", "WEIGHT_BUDGET", "Fusion", "check_fusion", "fuse_block", "fused_logits", "grow",
           "native_probabilities", "pad_edge", "prediction_network"]

LEARNED = "learned"
"""The merge method that applies a model file's fusion."""

KINDS = ("linear", "conv")

WEIGHT_BUDGET = (2**24 - 1) // 255
"""Largest ``Σ|w|`` of one class's integer weights: ``Σ|w|·255 < 2**24`` keeps every sum exact in float32."""

_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, eq=False)
class Fusion:
    """The fusion parameters of a model file (``meta["fusion"]``); plain values in the file.

    Parameters
    ----------
    kind
        ``linear`` or ``conv``.
    axes
        The axes whose probabilities it fuses, in the order of its weights (e.g. ``("z", "y", "x")``).
    weights
        Integer weights acting on uint8 probabilities (0..255): ``linear`` ``(C, A)``, the weight of
        axis ``a``'s probability of class ``c`` in class ``c``'s logit; ``conv`` ``(C, A, C, 3, 3, 3)``,
        output class, axis, input class, then the offsets along z, y and x.
    scale
        Per class, the value of one integer step of its weights.
    bias
        Per class, added to the logit.
    network_sha256
        The network the fusion was fitted for: the sha256 of the model file without fusion it was made
        from (see :class:`~volseg_dask.models.ModelMeta`).
    fit
        How it was fitted (samples, seed, time, the prediction and truth): plain values, for the record.
    """

    kind: str
    axes: tuple[str, ...]
    weights: np.ndarray
    scale: np.ndarray
    bias: np.ndarray
    network_sha256: str
    fit: Mapping[str, Any] = field(default_factory=dict)

    @property
    def classes(self) -> int:
        return int(self.weights.shape[0])

    @property
    def halo(self) -> int:
        """Voxels of context the model needs on each side of a block."""
        return 1 if self.kind == "conv" else 0

    @property
    def kernel(self) -> np.ndarray:
        """The integer weights as a convolution kernel ``(C, A·C, k, k, k)`` (``k`` = 2·halo + 1), float32."""
        c, a = self.classes, len(self.axes)
        if self.kind == "conv":
            return self.weights.reshape(c, a * c, 3, 3, 3).astype(np.float32)
        kernel = np.zeros((c, a, c), np.float32)
        for k in range(c):
            kernel[k, :, k] = self.weights[k]
        return kernel.reshape(c, a * c, 1, 1, 1)

    def float_weights(self) -> np.ndarray:
        """The weights as they act on probabilities in [0, 1] (the fitted values, up to the rounding)."""
        shape = (-1,) + (1,) * (self.weights.ndim - 1)
        return self.weights * self.scale.astype(np.float64).reshape(shape) * 255.0

    @classmethod
    def quantize(cls, kind: str, axes: Sequence[str], weights: np.ndarray, bias: np.ndarray, network_sha256: str,
                 fit: Mapping[str, Any] | None = None) -> Fusion:
        """A fusion from float weights acting on probabilities in [0, 1] (``weights`` shaped as :attr:`weights`).

        Each class's weights are rounded to integers with one scale, as fine as :data:`WEIGHT_BUDGET` allows.
        """
        w = np.asarray(weights, np.float64) / 255.0  # per uint8 step
        per_class = w.reshape(w.shape[0], -1)
        limit = WEIGHT_BUDGET - math.ceil(per_class.shape[1] / 2)  # rounding adds at most 1/2 per weight
        total = np.abs(per_class).sum(axis=1)
        scale = np.where(total > 0, total / limit, 1.0).astype(np.float32)
        ints = np.rint(w / scale.astype(np.float64).reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.int64)
        return cls(kind, tuple(axes), ints, scale, np.asarray(bias, np.float32), network_sha256, dict(fit or {}))

    def to_dict(self) -> dict[str, Any]:
        """Plain values for the model file's metadata."""
        return {"kind": self.kind, "axes": list(self.axes), "weights": self.weights.tolist(),
                "scale": [float(s) for s in self.scale], "bias": [float(b) for b in self.bias],
                "network_sha256": self.network_sha256, "fit": dict(self.fit)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, path: Any = "model", classes: int | None = None) -> Fusion:
        """Read and check the ``fusion`` record of a model file.

        Raises
        ------
        ModelFileError
            A field is missing or does not make sense (the file is damaged).
        """
        def bad(what: str) -> ModelFileError:
            return ModelFileError(f"{path}: the fusion parameters in its metadata are damaged ({what}); fit them "
                                  "again with `volseg fuse fit`")

        if not isinstance(raw, Mapping):
            raise bad("not a mapping")
        missing = [k for k in ("kind", "axes", "weights", "scale", "bias", "network_sha256") if k not in raw]
        if missing:
            raise bad(f"no {', '.join(missing)}")
        kind, axes = raw["kind"], raw["axes"]
        if kind not in KINDS:
            raise bad(f"kind {kind!r}, not one of {', '.join(KINDS)}")
        if (not isinstance(axes, Sequence) or not axes or any(a not in AXES for a in axes)
                or len(set(axes)) != len(axes)):
            raise bad(f"axes {axes!r}")
        try:
            weights = np.asarray(raw["weights"], dtype=np.float64)
            scale = np.asarray(raw["scale"], dtype=np.float32)
            bias = np.asarray(raw["bias"], dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise bad(str(exc)) from None
        c = classes if classes is not None else (weights.shape[0] if weights.ndim else 0)
        n = len(axes)
        want = (c, n) if kind == "linear" else (c, n, c, 3, 3, 3)
        if weights.shape != want or scale.shape != (c,) or bias.shape != (c,):
            raise bad(f"weights {weights.shape}, scale {scale.shape}, bias {bias.shape} for {c} classes and "
                      f"{n} axes (expected weights {want})")
        if not (np.isfinite(scale).all() and np.isfinite(bias).all()) or (scale <= 0).any():
            raise bad("a scale or bias is not finite, or a scale is not positive")
        if (weights != np.rint(weights)).any() or (np.abs(weights).reshape(c, -1).sum(axis=1) > WEIGHT_BUDGET).any():
            raise bad(f"weights must be integers with at most {WEIGHT_BUDGET} in absolute sum per class")
        digest = raw["network_sha256"]
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise bad(f"network_sha256 {digest!r}")
        fit = raw.get("fit") or {}
        return cls(kind, tuple(axes), weights.astype(np.int64), scale, bias, digest,
                   dict(fit) if isinstance(fit, Mapping) else {})


def prediction_network(info: Mapping[str, Any]) -> str | None:
    """The network (sha256, see :class:`~volseg_dask.models.ModelMeta`) whose probabilities a prediction holds.

    ``info`` is the output group's ``volseg_dask`` attribute. Outputs written before fusion existed
    record only the model file's hash, which is the network's for a file without fusion.
    """
    digest = info.get("network_sha256") or (info.get("key_fields") or {}).get("model_sha256")
    return str(digest) if digest else None


def check_fusion(fusion: Fusion | None, model: Any, *, axes: Sequence[str], classes: int) -> Fusion:
    """The fusion of ``model``, refused when it is absent or does not fit a prediction along ``axes``.

    Raises
    ------
    ModelFileError
        The model file has no fusion parameters.
    ConfigError
        The fusion was fitted on other axes than the prediction's.
    """
    if fusion is None:
        raise ModelFileError(f"{model}: has no fusion parameters, which merge '{LEARNED}' needs; fit them with "
                             "`volseg fuse fit PRED.zarr TRUTH.zarr -o MODEL_FUSED.pt --model "
                             f"{model}` (or `volseg train ... --fit-fusion IMAGE LABELS`), or choose the merge "
                             "max, mean or vote")
    if sorted(fusion.axes) != sorted(axes):
        raise ConfigError(f"{model}: its fusion was fitted on the axes {''.join(fusion.axes)}, the prediction has "
                          f"{''.join(axes)}; predict along {''.join(fusion.axes)} (predict.axes), or fit a fusion on "
                          "a prediction along these axes")
    if fusion.classes != classes:
        raise ModelFileError(f"{model}: its fusion has {fusion.classes} classes, the prediction {classes}; the file "
                             "is damaged")
    return fusion


# ---- the context a block needs ------------------------------------------------------------------


def grow(region: Region, shape: Sequence[int], halo: int) -> Region:
    """``region`` grown by ``halo`` voxels on each side, as far as the volume of ``shape`` reaches."""
    return tuple((max(0, a - halo), min(int(n), b + halo)) for (a, b), n in zip(region, shape))


def pad_edge(probs: np.ndarray, region: Region, grown: Region, halo: int) -> np.ndarray:
    """``probs`` ``(C, ...)`` of ``grown`` extended to ``region`` ± ``halo`` by repeating the edge voxel
    (only where ``grown`` stopped at the volume's border)."""
    pads = [(halo - (a - ga), halo - (gb - b)) for (a, b), (ga, gb) in zip(region, grown)]
    if not any(p for pair in pads for p in pair):
        return probs
    return np.pad(probs, [(0, 0), *pads], mode="edge")


def native_probabilities(arrays: Sequence[Any], region: Region, grid: BlockGrid, halo: int = 0) -> list[np.ndarray]:
    """uint8 ``(C, ...)`` per-axis probabilities of the native ``region`` ± ``halo`` (edge repeated at the
    volume's border), read from per-axis arrays (Zarr or numpy) on ``grid``'s network grid.

    With a downsampling model the coarse probabilities are upsampled linearly to the native grid first,
    exactly as for the whole volume (:mod:`~volseg_dask.prediction.upsample`).
    """
    grown = grow(region, grid.native_shape, halo)

    def read(array: Any) -> np.ndarray:
        if grid.factor == 1:
            return np.asarray(array[(slice(None), *(slice(a, b) for a, b in grown))])
        return upsample_region(region_reader(array), grown, grid)

    return [pad_edge(read(a), region, grown, halo) for a in arrays]


# ---- application --------------------------------------------------------------------------------


def fused_logits(probs: Sequence[np.ndarray], fusion: Fusion) -> np.ndarray:
    """float32 logits ``(C, z, y, x)`` of per-axis uint8 probabilities, each ``(C, z + 2h, y + 2h, x + 2h)``.

    With integer weights and uint8 values every sum is an exact float32 integer (see the module's
    docstring), so any summation order gives the same bits: the linear model sums in numpy, the
    conv model is torch's ``conv3d`` on the CPU (a direct or matrix-product convolution: exact too).
    """
    n_classes = fusion.classes
    if fusion.kind == "linear":
        weights = fusion.weights.astype(np.float32)
        sums = np.zeros((n_classes, *probs[0].shape[1:]), np.float32)
        for c in range(n_classes):
            for a, p in enumerate(probs):
                sums[c] += weights[c, a] * p[c].astype(np.float32)
    else:
        import torch  # the conv merge needs torch; the other merges run without it

        spatial = probs[0].shape[1:]
        channels_last = np.empty((*spatial, len(probs) * n_classes), np.float32)  # oneDNN's preferred layout
        for a, p in enumerate(probs):
            channels_last[..., a * n_classes:(a + 1) * n_classes] = np.moveaxis(p, 0, -1)
        x = torch.from_numpy(channels_last).permute(3, 0, 1, 2)[None]
        kernel = torch.from_numpy(fusion.kernel).contiguous(memory_format=torch.channels_last_3d)  # 3x faster
        with torch.inference_mode():
            out = torch.nn.functional.conv3d(x, kernel)[0]
        sums = np.ascontiguousarray(out.numpy())
    sums *= fusion.scale[:, None, None, None]
    sums += fusion.bias[:, None, None, None]
    return sums


def _first_argmax(logits: np.ndarray) -> np.ndarray:
    """``logits.argmax(axis=0)`` (the first class on ties) as uint8, by elementwise comparisons."""
    best = logits[0].copy()
    classes = np.zeros(best.shape, np.uint8)
    for c in range(1, len(logits)):
        classes = np.where(logits[c] > best, np.uint8(c), classes)
        np.maximum(best, logits[c], out=best)
    return classes


def fuse_block(probs: Sequence[np.ndarray], fusion: Fusion, *, label_values: Sequence[int],
               outputs: Sequence[str] = ()) -> np.ndarray:
    """Fuse per-axis uint8 probabilities into ``(1 + len(outputs), z, y, x)``, as :func:`~.votes.merge_block`.

    ``probs`` are in ``fusion.axes`` order, each ``(C, z + 2h, y + 2h, x + 2h)`` with ``h`` =
    ``fusion.halo`` voxels of context (:func:`native_probabilities`). Row 0 holds the labels (the class
    of the highest logit, the first on ties), then ``confidence`` (the fused probability of that class),
    ``entropy`` (of the fused probabilities) and ``disagreement`` (axes whose own label differs).
    The block is fused in slabs along z, so the temporaries stay small whatever the block size.
    """
    for name in outputs:
        if name not in EXTRA_OUTPUTS:
            raise ValueError(f"merge: unknown output {name!r}; choose from {', '.join(EXTRA_OUTPUTS)}")
    arrays = [np.asarray(p) for p in probs]
    if len(arrays) != len(fusion.axes) or any(p.shape != arrays[0].shape for p in arrays):
        raise ValueError(f"fuse: {len(fusion.axes)} per-axis blocks of one shape expected, found "
                         f"{[p.shape for p in arrays]}")
    h = fusion.halo
    shape = tuple(s - 2 * h for s in arrays[0].shape[1:])
    lut = np.asarray(label_values)
    out = np.empty((1 + len(outputs), *shape), dtype=label_dtype(label_values))
    if min(shape, default=0) <= 0:
        return out
    # slabs of ~SLAB_VOXELS (8x for the conv model, whose convolution runs faster on thicker slabs)
    step = max(1, SLAB_VOXELS * (8 if h else 1) // int(np.prod(arrays[0].shape[2:])))
    for start in range(0, shape[0], step):
        stop = min(start + step, shape[0])
        logits = fused_logits([p[:, start:stop + 2 * h] for p in arrays], fusion)
        classes = _first_argmax(logits)
        out[0, start:stop] = lut[classes]
        if not outputs:
            continue
        exp = np.exp(logits - logits.max(axis=0, keepdims=True))
        total = sum(exp[1:], exp[0].copy())
        for i, name in enumerate(outputs, start=1):
            if name == "confidence":  # the chosen class's term is exp(0) = 1
                out[i, start:stop] = np.rint(255.0 / total)
            elif name == "entropy":
                out[i, start:stop] = normalised_entropy(exp / total)
            else:
                centre = (slice(None), slice(start + h, stop + h), *(slice(h, h + s) for s in shape[1:]))
                own = [p[centre].argmax(axis=0) for p in arrays]
                out[i, start:stop] = sum((a != classes for a in own), np.zeros(classes.shape, np.uint16))
    return out
