"""Albumentations pipelines built from :class:`~volseg_dask.config.AugmentSettings`.

The pipeline works on one training slice at a time: the image as float32 ``(H, W, C)`` scaled to
[0, 1] by the intensity window (C = n_slices) and the mask of class indices (uint8, 255 = ignored).
Spatial transforms move image and mask together (the mask with nearest-neighbour interpolation,
borders mirrored for both, so no invented class appears at an edge); intensity transforms touch the
image only. Intensities are standardised after augmentation, so gamma and brightness act on [0, 1]
values as albumentations expects.

Defaults suit CT slices: flips and 90° rotations (slices have no preferred orientation), a small
affine (±10 % scale, ±15°, ±5 % shift), a mild elastic warp (1-2 px), brightness/contrast ±15 %,
gamma 0.8-1.2, Gaussian noise (1-5 % of the window) and a slight blur (sigma 0.3-1 px).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..config import AugmentSettings

__all__ = ["Augmenter", "build_augmentation"]


def build_augmentation(settings: AugmentSettings, *, ignore_index: int = 255) -> Any | None:
    """The albumentations ``Compose`` for ``settings``, or None when augmentation is off.

    Parameters
    ----------
    settings
        Probability of each transform (0 leaves it out).
    ignore_index
        Mask value for areas a transform invents (only used by constant borders; borders here are
        mirrored).
    """
    if not settings.enabled:
        return None
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations as A
    import cv2

    reflect = cv2.BORDER_REFLECT_101
    candidates: list[tuple[float, Any]] = [
        (settings.flip, lambda p: A.HorizontalFlip(p=p)),
        (settings.flip, lambda p: A.VerticalFlip(p=p)),
        (settings.rotate90, lambda p: A.RandomRotate90(p=p)),
        (settings.affine, lambda p: A.Affine(scale=(0.9, 1.1), rotate=(-15, 15), translate_percent=(-0.05, 0.05),
                                             interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                                             border_mode=reflect, fill_mask=ignore_index, p=p)),
        (settings.elastic, lambda p: A.ElasticTransform(alpha=100, sigma=10, interpolation=cv2.INTER_LINEAR,
                                                        mask_interpolation=cv2.INTER_NEAREST, border_mode=reflect,
                                                        fill_mask=ignore_index, p=p)),
        (settings.gamma, lambda p: A.RandomGamma(gamma_limit=(80, 120), p=p)),
        (settings.brightness_contrast, lambda p: A.RandomBrightnessContrast(brightness_limit=0.15,
                                                                            contrast_limit=0.15, p=p)),
        (settings.noise, lambda p: A.GaussNoise(std_range=(0.01, 0.05), p=p)),
        (settings.blur, lambda p: A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.3, 1.0), p=p)),
    ]
    transforms = [make(p) for p, make in candidates if p > 0]
    if not transforms:
        return None
    return A.Compose(transforms, strict=True)


class Augmenter:
    """``(image01 (H, W, C), mask (H, W), seed) -> (image01, mask)``: the pipeline, seeded per sample.

    Seeding every call makes a sample's augmentation a function of its index, whichever
    DataLoader worker draws it, so runs repeat exactly with the same seed.
    """

    def __init__(self, settings: AugmentSettings, *, ignore_index: int = 255) -> None:
        self.settings = settings
        self.ignore_index = ignore_index
        self.pipeline = build_augmentation(settings, ignore_index=ignore_index)

    def __bool__(self) -> bool:
        return self.pipeline is not None

    def __call__(self, image: np.ndarray, mask: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        if self.pipeline is None:
            return image, mask
        self.pipeline.set_random_seed(seed)
        out = self.pipeline(image=image, mask=mask)
        img = np.asarray(out["image"], dtype=np.float32)
        if img.ndim == 2:
            img = img[..., None]
        return img, np.asarray(out["mask"], dtype=np.uint8)

    def __getstate__(self) -> dict[str, Any]:  # rebuilt in spawned workers; albumentations state is not needed
        return {"settings": self.settings, "ignore_index": self.ignore_index}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["settings"], ignore_index=state["ignore_index"])  # type: ignore[misc]
