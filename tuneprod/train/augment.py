"""The named augmentation policies, defined once as numbers (`POLICIES`), and their per-image albumentations form
(the reference for what each policy means; `augment_device: cpu` trains with it). `batch_augment` applies the same
numbers to whole batches on the trial's device. Mixup/cutmix act on batches in both cases."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

# At import, albumentations asks PyPI for a newer version of itself (up to 2 s, and a warning where a node is offline,
# as on the GPU check's machine), in every trial process a search starts.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402

from tuneprod.spec import AUGMENT_POLICIES

Range = tuple[float, float]


@dataclass(frozen=True)
class Policy:
    """Each augmentation with its probability (0: not used) and ranges. Fractions are of the image side;
    angles are in degrees, sampled in +-angle."""

    crop_area: Optional[Range] = None  # random resized crop: the crop's share of the image area
    crop_ratio: Range = (0.75, 1.33)
    flip: float = 0.0  # horizontal
    affine: float = 0.0
    scale_x: Range = (1.0, 1.0)
    scale_y: Range = (1.0, 1.0)
    translate: float = 0.0
    rotate: float = 0.0
    shear: float = 0.0
    perspective: float = 0.0
    perspective_scale: Range = (0.0, 0.0)  # std of the corners' inward jitter
    jitter: float = 0.0
    jitter_strength: float = 0.0  # brightness, contrast and saturation factors in 1 +- strength
    hue: float = 0.0  # hue shift in +-hue of a full turn
    blur: float = 0.0
    blur_sigma: Range = (0.5, 3.0)
    dropout: float = 0.0
    dropout_holes: tuple[int, int] = (1, 1)
    dropout_size: Range = (0.05, 0.2)
    gray: float = 0.0


_MEDIUM_LOOK = dict(jitter=0.8, jitter_strength=0.2, hue=0.02, blur=0.2)

POLICIES: dict[str, Policy] = {
    "none": Policy(),
    "light": Policy(flip=0.5, affine=0.7, scale_x=(0.9, 1.1), scale_y=(0.9, 1.1), translate=0.05, rotate=10),
    "medium": Policy(flip=0.5, affine=0.8, scale_x=(0.8, 1.2), scale_y=(0.8, 1.2), translate=0.1, rotate=20,
                     shear=8, dropout=0.3, dropout_holes=(1, 2), **_MEDIUM_LOOK),
    "heavy": Policy(crop_area=(0.4, 1.0), flip=0.5, affine=0.7, rotate=30, shear=12, jitter=0.8, jitter_strength=0.3,
                    hue=0.04, blur=0.2, dropout=0.5, dropout_holes=(1, 4), gray=0.1),
    # A camera higher above the shelf foreshortens the product's front vertically and tilts it in perspective: a
    # vertical squash plus a perspective warp imitates views the training set lacks.
    "viewpoint": Policy(flip=0.5, affine=0.9, scale_x=(0.9, 1.1), scale_y=(0.6, 1.05), translate=0.08, rotate=12,
                        perspective=0.8, perspective_scale=(0.04, 0.14), **_MEDIUM_LOOK),
}
assert set(POLICIES) == set(AUGMENT_POLICIES)

_REFLECT = cv2.BORDER_REFLECT_101  # product shots: mirrored background hides the warp's border better than black


def policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"augment: the value is {name!r}, but must be one of {', '.join(POLICIES)}")
    return POLICIES[name]


def train_transform(name: str, size: int, mean: Sequence[float], std: Sequence[float],
                    seed: Optional[int] = None) -> A.Compose:
    """The named policy per image with albumentations: HxWx3 uint8 in, normalised CxHxW float tensor out."""
    return A.Compose(_albumentations(policy(name), size) + _to_tensor(mean, std), seed=seed)


def _albumentations(p: Policy, size: int) -> list[A.BasicTransform]:
    transforms = [A.Resize(size, size) if p.crop_area is None else
                  A.RandomResizedCrop(size=(size, size), scale=p.crop_area, ratio=p.crop_ratio)]
    optional = [
        (p.flip, lambda: A.HorizontalFlip(p=p.flip)),
        (p.affine, lambda: A.Affine(scale={"x": p.scale_x, "y": p.scale_y}, keep_ratio=False,
                                    translate_percent=(-p.translate, p.translate), rotate=(-p.rotate, p.rotate),
                                    shear=(-p.shear, p.shear), border_mode=_REFLECT, p=p.affine)),
        (p.perspective, lambda: A.Perspective(scale=p.perspective_scale, border_mode=_REFLECT, p=p.perspective)),
        (p.jitter, lambda: A.ColorJitter(brightness=p.jitter_strength, contrast=p.jitter_strength,
                                         saturation=p.jitter_strength, hue=p.hue, p=p.jitter)),
        (p.blur, lambda: A.GaussianBlur(blur_limit=(3, 5), sigma_limit=p.blur_sigma, p=p.blur)),
        (p.dropout, lambda: A.CoarseDropout(num_holes_range=p.dropout_holes, hole_height_range=p.dropout_size,
                                            hole_width_range=p.dropout_size, p=p.dropout)),
        (p.gray, lambda: A.ToGray(p=p.gray)),
    ]
    return transforms + [make() for probability, make in optional if probability > 0]


def reseed_worker_transform(worker_id: int) -> None:
    """DataLoader worker_init_fn: each worker gets a copy of the transform with the same random state, so without
    this every worker would repeat the others' augmentations. Seeds it from the worker's own (seeded) seed."""
    info = torch.utils.data.get_worker_info()
    info.dataset.transform.set_random_seed(info.seed % 2**32)


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
    perm = torch.from_numpy(rng.permutation(len(images))).to(images.device, non_blocking=True)  # no GPU wait
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
