"""Augmentation policies and batch mixing."""
import numpy as np
import pytest
import torch

from tuneprod.spec import AUGMENT_POLICIES
from tuneprod.train.augment import mix_batch, reseed_worker_transform, train_transform

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.mark.parametrize("policy", AUGMENT_POLICIES)
def test_every_policy_gives_a_normalised_tensor_of_the_requested_size(policy):
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    out = train_transform(policy, 32, MEAN, STD)(image=image)["image"]
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= (0 - 0.5) / 0.25 - 1e-5 and out.max() <= (1 - 0.5) / 0.25 + 1e-5


def test_policies_differ_in_strength():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    reference = train_transform("none", 32, MEAN, STD)(image=image)["image"]

    def mean_change(policy):
        transform = train_transform(policy, 32, MEAN, STD)
        return np.mean([(transform(image=image)["image"] - reference).abs().mean().item() for _ in range(30)])

    assert mean_change("none") == 0
    assert 0 < mean_change("light") < mean_change("heavy")


def test_viewpoint_squashes_vertically_more_than_horizontally():
    # A higher camera foreshortens a product's front: a centred square comes out shorter than it is wide.
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[22:42, 22:42] = 255
    transform = train_transform("viewpoint", 64, (0, 0, 0), (1, 1, 1))
    masks = [transform(image=image)["image"][0] > 0.5 for _ in range(100)]
    heights = np.mean([m.any(1).sum().item() for m in masks])
    widths = np.mean([m.any(0).sum().item() for m in masks])
    assert heights < 0.95 * widths


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match="augment: the value is 'wild'"):
        train_transform("wild", 32, MEAN, STD)


def test_no_mixing_gives_one_hot_targets():
    images, labels = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 1, 0])
    out, targets = mix_batch(images, labels, 3, 0.0, 0.0, 1.0, np.random.default_rng(0))
    assert torch.equal(out, images) and torch.equal(targets.argmax(1), labels) and (targets.max(1).values == 1).all()


@pytest.mark.parametrize("mixup, cutmix", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixing_gives_soft_targets_that_sum_to_one(mixup, cutmix):
    rng = np.random.default_rng(0)
    images, labels = torch.rand(7, 3, 16, 16), torch.arange(7) % 3  # an odd batch works too
    mixed_any = False
    for _ in range(10):
        out, targets = mix_batch(images, labels, 3, mixup, cutmix, 1.0, rng)
        assert out.shape == images.shape
        assert torch.allclose(targets.sum(1), torch.ones(7))
        mixed_any |= bool((targets.max(1).values < 1).any())
    assert mixed_any


def test_cutmix_target_weight_matches_the_pasted_area():
    images = torch.zeros(2, 1, 20, 20)
    images[1] = 1
    labels = torch.tensor([0, 1])
    rng = np.random.default_rng(3)
    for _ in range(10):
        out, targets = mix_batch(images, labels, 2, 0.0, 1.0, 1.0, rng)
        for i in range(2):
            ones_fraction = out[i].mean().item()
            assert targets[i, 1].item() == pytest.approx(ones_fraction, abs=1e-6)


def test_mix_prob_zero_never_mixes():
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
    out, _ = mix_batch(images, labels, 2, 1.0, 1.0, 0.0, np.random.default_rng(0))
    assert torch.equal(out, images)


class _SameImage(torch.utils.data.Dataset):
    def __init__(self, transform):
        self.transform = transform
        self.image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return self.transform(image=self.image)["image"]


def test_loader_workers_do_not_repeat_each_others_augmentations():
    dataset = _SameImage(train_transform("heavy", 32, MEAN, STD, seed=0))

    def first_two(init_fn):
        loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2, worker_init_fn=init_fn)
        batches = list(loader)
        return batches[0], batches[1]  # samples 0 and 1 come from different workers

    assert torch.equal(*first_two(None))  # the problem: copies of one random state
    assert not torch.equal(*first_two(reseed_worker_transform))


def test_seeded_policy_is_reproducible():
    image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    a = train_transform("heavy", 32, MEAN, STD, seed=5)
    b = train_transform("heavy", 32, MEAN, STD, seed=5)
    assert all(torch.equal(a(image=image)["image"], b(image=image)["image"]) for _ in range(3))


def test_importing_the_policies_asks_no_server_for_updates():
    """albumentations checks PyPI for a newer version when imported, unless told not to: in every trial process,
    up to 2 s and a warning on an offline GPU node (seen on the GPU check's machine)."""
    import os
    import subprocess
    import sys

    probe = ("import urllib.request\n"
             "asked = []\n"
             "def refuse(self, url, *args, **kwargs):\n"
             "    asked.append(getattr(url, 'full_url', url))\n"
             "    raise OSError('offline')\n"
             "urllib.request.OpenerDirector.open = refuse\n"
             "import tuneprod.train.augment\n"
             "print(len(asked))\n")
    env = {key: value for key, value in os.environ.items() if key != "NO_ALBUMENTATIONS_UPDATE"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "0"
