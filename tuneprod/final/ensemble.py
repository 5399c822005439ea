"""How the final stage's members become one prediction: test-time views, the soft vote, and the weight-averaged
"soup". Plain torch, tested with hand-picked tensors."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

ZOOM = 0.875  # the side kept by the `scale` and `crops` views, as in the usual 224-of-256 evaluation crop


def tta_views(images: torch.Tensor, views: Sequence[str]) -> list[torch.Tensor]:
    """The batch (Bx3xHxW) as each view sees it, all at HxW: the image itself; `scale`: its centre zoomed in;
    `crops`: its four corners zoomed in; `flip`: every one of those mirrored too."""
    seen = [images]
    if "scale" in views:
        seen.append(_zoom(images, 0.5, 0.5))
    if "crops" in views:
        seen += [_zoom(images, x, y) for x in (0.0, 1.0) for y in (0.0, 1.0)]
    if "flip" in views:
        seen += [torch.flip(view, dims=[3]) for view in seen]
    return seen


def view_count(views: Sequence[str]) -> int:
    """How many forward passes `tta_views` makes of each image (counted on a tiny batch, so that it cannot drift)."""
    return len(tta_views(torch.zeros(1, 3, 8, 8), views))


def _zoom(images: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """A crop of ZOOM x the side, placed at relative position (x, y) (0: left/top, 1: right/bottom), resized back."""
    height, width = (int(side) for side in images.shape[-2:])  # fixed sides: constants in an exported graph
    crop_h, crop_w = round(height * ZOOM), round(width * ZOOM)
    top, left = round((height - crop_h) * y), round((width - crop_w) * x)
    crop = images[..., top:top + crop_h, left:left + crop_w]
    return F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)


def view_probabilities(model: torch.nn.Module, images: torch.Tensor, views: Sequence[str]) -> torch.Tensor:
    """The softmax probabilities of a model, averaged over the test-time views (B x classes, float32)."""
    probabilities = [model(view).float().softmax(1) for view in tta_views(images, views)]
    return torch.stack(probabilities).mean(0)


def soft_vote(probabilities: Sequence[torch.Tensor], weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """The members' probabilities averaged, each by its weight (equal when none are given), however confident it
    is: a weighted average of probabilities stays a probability."""
    stacked = torch.stack(list(probabilities)).float()
    if weights is None:
        return stacked.mean(0)
    shares = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    # A product and a sum, not einsum: autocast would run einsum in half precision.
    return (stacked * (shares / shares.sum()).view(-1, *[1] * (stacked.ndim - 1))).sum(0)


def soup(states: Sequence[dict]) -> dict:
    """The uniform average of state dicts of one architecture (floating tensors averaged; integer ones, such as
    BatchNorm's batch counters, taken from the first). Averaging helps only for members fine-tuned from one
    pretrained start, which stay in one basin of the loss (Wortsman et al. 2022)."""
    first = states[0]
    if any(state.keys() != first.keys() or any(state[k].shape != first[k].shape for k in first)
           for state in states[1:]):
        raise ValueError("a soup needs members of one architecture")
    return {key: torch.stack([state[key].float() for state in states]).mean(0).to(value.dtype)
            if value.is_floating_point() else value.clone() for key, value in first.items()}
