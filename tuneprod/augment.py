"""Named augmentation policies (albumentations, per image) and mixup/cutmix (torch, per batch)."""
from __future__ import annotations

from typing import Optional, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

from tuneprod.spec import AUGMENT_POLICIES

_REFLECT = cv2.BORDER_REFLECT_101  # product shots: mirrored background hides the warp's border better than black


def _geometry(policy: str, size: int) -> list[A.BasicTransform]:
    resize = A.Resize(size, size)
    flip = A.HorizontalFlip(p=0.5)
    if policy == "none":
        return [resize]
    if policy == "light":
        return [resize, flip, A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-10, 10),
                                       border_mode=_REFLECT, p=0.7)]
    if policy == "medium":
        return [resize, flip, A.Affine(scale=(0.8, 1.2), translate_percent=(-0.1, 0.1), rotate=(-20, 20),
                                       shear=(-8, 8), border_mode=_REFLECT, p=0.8)]
    if policy == "heavy":
        return [A.RandomResizedCrop(size=(size, size), scale=(0.4, 1.0), ratio=(0.75, 1.33)), flip,
                A.Affine(rotate=(-30, 30), shear=(-12, 12), border_mode=_REFLECT, p=0.7)]
    # viewpoint: a camera higher above the shelf foreshortens the product's front vertically and tilts it in
    # perspective; a vertical squash plus a perspective warp imitates views the training set lacks.
    return [resize, flip,
            A.Affine(scale={"x": (0.9, 1.1), "y": (0.6, 1.05)}, translate_percent=(-0.08, 0.08), rotate=(-12, 12),
                     border_mode=_REFLECT, p=0.9),
            A.Perspective(scale=(0.04, 0.14), border_mode=_REFLECT, p=0.8)]


def _appearance(policy: str) -> list[A.BasicTransform]:
    if policy in ("none", "light"):
        return []
    strong = policy == "heavy"
    transforms = [
        A.ColorJitter(brightness=0.3 if strong else 0.2, contrast=0.3 if strong else 0.2,
                      saturation=0.3 if strong else 0.2, hue=0.04 if strong else 0.02, p=0.8),
        A.GaussianBlur(blur_limit=(3, 5), p=0.2),
    ]
    if policy != "viewpoint":
        transforms.append(A.CoarseDropout(num_holes_range=(1, 4 if strong else 2), hole_height_range=(0.05, 0.2),
                                          hole_width_range=(0.05, 0.2), p=0.5 if strong else 0.3))
    if strong:
        transforms.append(A.ToGray(p=0.1))
    return transforms


def train_transform(policy: str, size: int, mean: Sequence[float], std: Sequence[float],
                    seed: Optional[int] = None) -> A.Compose:
    """The named policy at `size` px, then normalisation to a CxHxW float tensor."""
    if policy not in AUGMENT_POLICIES:
        raise ValueError(f"augment: the value is {policy!r}, but must be one of {', '.join(AUGMENT_POLICIES)}")
    return A.Compose(_geometry(policy, size) + _appearance(policy) + _to_tensor(mean, std), seed=seed)


def reseed_worker_transform(worker_id: int) -> None:
    """DataLoader worker_init_fn: each worker gets a copy of the transform with the same random state, so without
    this every worker would repeat the others' augmentations. Seeds it from the worker's own (seeded) seed."""
    info = torch.utils.data.get_worker_info()
    info.dataset.transform.set_random_seed(info.seed % 2**32)


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> A.Compose:
    return A.Compose([A.Resize(size, size)] + _to_tensor(mean, std))


def _to_tensor(mean: Sequence[float], std: Sequence[float]) -> list[A.BasicTransform]:
    return [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]


def mix_batch(images: torch.Tensor, labels: torch.Tensor, num_classes: int, mixup_alpha: float,
              cutmix_alpha: float, mix_prob: float, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix (one of the enabled ones, chosen per batch with probability mix_prob).

    Returns the images and soft targets (rows sum to 1). Works for any batch size, odd ones included.
    """
    targets = torch.nn.functional.one_hot(labels, num_classes).to(images.dtype)
    enabled = [kind for kind, alpha in (("mixup", mixup_alpha), ("cutmix", cutmix_alpha)) if alpha > 0]
    if not enabled or len(images) < 2 or rng.random() >= mix_prob:
        return images, targets
    kind = enabled[rng.integers(len(enabled))]
    lam = float(rng.beta(*(2 * [mixup_alpha if kind == "mixup" else cutmix_alpha])))
    perm = torch.from_numpy(rng.permutation(len(images))).to(images.device)
    if kind == "mixup":
        images = lam * images + (1 - lam) * images[perm]
    else:
        images, lam = _paste_box(images, images[perm], lam, rng)
    return images, lam * targets + (1 - lam) * targets[perm]


def _paste_box(images: torch.Tensor, donors: torch.Tensor, lam: float,
               rng: np.random.Generator) -> tuple[torch.Tensor, float]:
    """Pastes a box covering about 1 - lam of the area from the donors; returns lam corrected to the real area."""
    height, width = images.shape[-2:]
    cut = np.sqrt(1 - lam)
    box_h, box_w = int(height * cut), int(width * cut)
    cy, cx = rng.integers(height), rng.integers(width)
    top, bottom = np.clip([cy - box_h // 2, cy + box_h // 2], 0, height)
    left, right = np.clip([cx - box_w // 2, cx + box_w // 2], 0, width)
    images = images.clone()
    images[..., top:bottom, left:right] = donors[..., top:bottom, left:right]
    return images, 1 - (bottom - top) * (right - left) / (height * width)
