"""Batched augmentation on the trial's device against the albumentations reference, policy by policy: the same
output form and, in distribution, the same changes (flip rate, size of change, vertical squash, colour)."""
import numpy as np
import pytest
import torch

from tuneprod.spec import AUGMENT_POLICIES
from tuneprod.train.augment import POLICIES, train_transform
from tuneprod.train.batch_augment import BatchAugment, homography, normalise, warp

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
SIZE, SAMPLES = 32, 400


def both(policy: str, image: np.ndarray, mean=MEAN, std=STD) -> tuple[torch.Tensor, torch.Tensor]:
    """SAMPLES augmentations of one image by each path, as Nx3xHxW."""
    reference = train_transform(policy, SIZE, mean, std, seed=0)
    per_image = torch.stack([reference(image=image)["image"] for _ in range(SAMPLES)])
    batch = torch.from_numpy(np.repeat(image[None], SAMPLES, axis=0))
    batched = BatchAugment(policy, mean, std, torch.device("cpu"), seed=0)(batch)
    return per_image, batched


def half_lit() -> np.ndarray:
    image = np.full((SIZE, SIZE, 3), 30, dtype=np.uint8)
    image[:, : SIZE // 2] = 220  # left half bright
    return image


@pytest.mark.parametrize("policy", AUGMENT_POLICIES)
def test_same_output_form(policy):
    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    per_image, batched = both(policy, image)
    assert batched.shape == per_image.shape and batched.dtype == per_image.dtype == torch.float32
    low, high = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25
    assert batched.min() >= low - 1e-5 and batched.max() <= high + 1e-5


@pytest.mark.parametrize("policy", AUGMENT_POLICIES)
def test_same_flip_rate(policy):
    per_image, batched = both(policy, half_lit())

    def mirrored(x):  # the right half came out brighter than the left
        return (x[..., SIZE // 2:].mean(dim=(1, 2, 3)) > x[..., : SIZE // 2].mean(dim=(1, 2, 3))).float().mean()

    assert abs(mirrored(batched) - mirrored(per_image)) < 0.08
    assert abs(mirrored(batched) - POLICIES[policy].flip) < 0.1


@pytest.mark.parametrize("policy", AUGMENT_POLICIES)
def test_same_amount_of_change(policy):
    image = half_lit()
    original = normalise(torch.from_numpy(image[None]), MEAN, STD)
    per_image, batched = both(policy, image)
    change_reference = (per_image - original).abs().mean().item()
    change_batched = (batched - original).abs().mean().item()
    if policy == "none":
        assert change_batched == 0 and change_reference < 1e-6
    else:
        assert 0.75 < change_batched / change_reference < 1.33


def test_same_vertical_squash_for_viewpoint():
    image = np.zeros((SIZE * 2, SIZE * 2, 3), dtype=np.uint8)
    image[22:42, 22:42] = 255
    global_size = SIZE * 2

    def height_over_width(x):
        masks = x[:, 0] > 0.5
        return masks.any(2).sum(1).float().mean() / masks.any(1).sum(1).float().mean()

    reference = train_transform("viewpoint", global_size, (0, 0, 0), (1, 1, 1), seed=0)
    per_image = torch.stack([reference(image=image)["image"] for _ in range(200)])
    batch = torch.from_numpy(np.repeat(image[None], 200, axis=0))
    batched = BatchAugment("viewpoint", (0, 0, 0), (1, 1, 1), torch.device("cpu"), seed=0)(batch)
    assert height_over_width(batched) < 0.95
    assert abs(height_over_width(batched) - height_over_width(per_image)) < 0.05


@pytest.mark.parametrize("policy", ["medium", "heavy"])
def test_same_colour_spread(policy):
    grey = np.full((SIZE, SIZE, 3), 128, dtype=np.uint8)
    grey[..., 0] = 160
    per_image, batched = both(policy, grey)
    brightness_ref, brightness = per_image.mean(dim=(1, 2, 3)), batched.mean(dim=(1, 2, 3))
    assert abs(brightness.mean() - brightness_ref.mean()) < 0.05
    assert 0.7 < brightness.std() / brightness_ref.std() < 1.4


def test_seeded_and_different_per_image_and_per_epoch():
    batch = torch.from_numpy(np.repeat(half_lit()[None], 8, axis=0))
    a = BatchAugment("heavy", MEAN, STD, torch.device("cpu"), seed=3)
    b = BatchAugment("heavy", MEAN, STD, torch.device("cpu"), seed=3)
    first = a.for_epoch(1)(batch)
    assert torch.equal(first, b.for_epoch(1)(batch))  # a resumed run draws what it would have drawn
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first, a.for_epoch(2)(batch))


def test_identity_geometry_is_exact():
    images = torch.rand(2, 3, 8, 8)
    corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]).expand(2, 4, 2)
    assert torch.allclose(homography(corners, corners), torch.eye(3).expand(2, 3, 3), atol=1e-6)
    assert torch.allclose(warp(images, torch.eye(3).repeat(2, 1, 1)), images, atol=1e-6)


def test_homography_maps_the_corners():
    source = torch.tensor([[[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]])
    target = torch.tensor([[[-0.8, -0.9], [0.9, -0.7], [0.7, 0.95], [-0.85, 0.8]]])
    h = homography(source, target)[0]
    mapped = torch.cat([source[0], torch.ones(4, 1)], 1) @ h.T
    assert torch.allclose(mapped[:, :2] / mapped[:, 2:], target[0], atol=1e-5)
