"""The named policies (`augment.POLICIES`) applied to whole batches on the trial's device, GPU or CPU.

All geometry (random resized crop, flip, affine, perspective) composes into one 3x3 matrix per image, so a batch
is resampled once with `grid_sample`; colour jitter, blur, dropout and grey are tensor arithmetic. Images come in
as the decoded cache stores them (uint8 BxHxWx3) and leave normalised (float Bx3xHxW), as the per-image
albumentations pipeline leaves them.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from tuneprod.train.augment import Policy, policy

_LUMA = (0.299, 0.587, 0.114)
_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
_CORNERS = ((-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0))
_MAX_CORNER_SHIFT = 0.32  # of the side, as albumentations' Perspective wraps its corner jitter


@functools.lru_cache(maxsize=64)
def _constant(values: tuple, device: torch.device) -> torch.Tensor:
    """A small constant tensor, copied to the device once: a per-batch copy from pageable memory would make the
    host wait for the GPU and undo the overlap of input work and training."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 BxHxWx3 -> float Bx3xHxW, (x/255 - mean) / std, in the memory format the device trains fastest in."""
    return _standardise(_unit_float(images), mean, std)


def _unit_float(images: torch.Tensor) -> torch.Tensor:
    return images.permute(0, 3, 1, 2).float().div_(255)


def _standardise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = _constant(tuple(mean), images.device).view(1, 3, 1, 1)
    std_t = _constant(tuple(std), images.device).view(1, 3, 1, 1)
    memory_format = torch.channels_last if images.is_cuda else torch.contiguous_format
    return ((images - mean_t) / std_t).contiguous(memory_format=memory_format)


class BatchAugment:
    """Callable: uint8 BxHxWx3 batch (on the device) -> augmented, normalised float Bx3xHxW batch."""

    def __init__(self, name: str, mean: Sequence[float], std: Sequence[float], device: torch.device, seed: int = 0):
        self.policy: Policy = policy(name)
        self.mean, self.std, self.seed = mean, std, seed
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def for_epoch(self, epoch: int) -> "BatchAugment":
        """Reseeded from (seed, epoch): a run resumed at an epoch draws what it would have drawn."""
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)
        return self

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = _unit_float(images)
        x = self._geometry(x)
        x = self._appearance(x)
        return _standardise(x, self.mean, self.std)

    # -- sampling ---------------------------------------------------------------------------------------------
    def _uniform(self, n: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=self.generator, device=self.device)

    def _chance(self, n: int, p: float) -> torch.Tensor:
        return torch.rand(n, generator=self.generator, device=self.device) < p

    # -- geometry: one output->input matrix per image, in grid_sample's [-1, 1] coordinates ------------------
    def _geometry(self, x: torch.Tensor) -> torch.Tensor:
        p, n = self.policy, len(x)
        if p.crop_area is None and not (p.flip or p.affine or p.perspective):
            return x
        # inv_ex: inv would check for singular matrices, a host-device sync per batch; an affine map is invertible.
        sampling = self._crop(n) @ self._flip(n) @ torch.linalg.inv_ex(self._affine(n)).inverse \
            @ self._perspective(n)
        return warp(x, sampling)

    def _identity(self, n: int) -> torch.Tensor:
        return torch.eye(3, device=self.device).repeat(n, 1, 1)

    def _crop(self, n: int) -> torch.Tensor:
        """Random resized crop: an output pixel reads from a box covering `crop_area` of the image."""
        p, m = self.policy, self._identity(n)
        if p.crop_area is None:
            return m
        area = self._uniform(n, *p.crop_area)
        aspect = torch.exp(self._uniform(n, math.log(p.crop_ratio[0]), math.log(p.crop_ratio[1])))
        width, height = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)
        m[:, 0, 0], m[:, 1, 1] = width, height
        m[:, 0, 2] = (1 - width) * self._uniform(n, -1, 1)
        m[:, 1, 2] = (1 - height) * self._uniform(n, -1, 1)
        return m

    def _flip(self, n: int) -> torch.Tensor:
        m = self._identity(n)
        m[:, 0, 0] = torch.where(self._chance(n, self.policy.flip), -1.0, 1.0)
        return m

    def _affine(self, n: int) -> torch.Tensor:
        """Input->output: translate . rotate . shear . scale about the centre (as albumentations' Affine)."""
        p = self.policy
        applied = self._chance(n, p.affine)
        angle = torch.deg2rad(self._uniform(n, -p.rotate, p.rotate))
        shear_x = torch.tan(torch.deg2rad(self._uniform(n, -p.shear, p.shear)))
        shear_y = torch.tan(torch.deg2rad(self._uniform(n, -p.shear, p.shear)))
        scale_x, scale_y = self._uniform(n, *p.scale_x), self._uniform(n, *p.scale_y)
        shift_x, shift_y = (2 * self._uniform(n, -p.translate, p.translate) for _ in range(2))
        cos, sin = torch.cos(angle), torch.sin(angle)
        rotate, shear, scale, translate = (self._identity(n) for _ in range(4))
        rotate[:, 0, 0], rotate[:, 0, 1], rotate[:, 1, 0], rotate[:, 1, 1] = cos, -sin, sin, cos
        shear[:, 0, 1], shear[:, 1, 0] = shear_x, shear_y
        scale[:, 0, 0], scale[:, 1, 1] = scale_x, scale_y
        translate[:, 0, 2], translate[:, 1, 2] = shift_x, shift_y
        forward = translate @ rotate @ shear @ scale
        return torch.where(applied.view(n, 1, 1), forward, self._identity(n))

    def _perspective(self, n: int) -> torch.Tensor:
        """Output corners -> a quadrilateral whose corners moved inwards by |N(0, sigma)| of the side (as
        albumentations' Perspective with keep_size), so the quadrilateral is stretched over the whole output."""
        p = self.policy
        if not p.perspective:
            return self._identity(n)
        sigma = self._uniform(n, *p.perspective_scale) * self._chance(n, p.perspective)
        jitter = torch.randn(n, 4, 2, generator=self.generator, device=self.device).abs() * sigma.view(n, 1, 1)
        inward = torch.remainder(jitter, _MAX_CORNER_SHIFT) * 2  # x2: the side is 2 long in [-1, 1] coordinates
        corners = _constant(_CORNERS, self.device)
        quad = corners - corners.sign() * inward
        return homography(corners.expand(n, 4, 2), quad)

    # -- appearance -------------------------------------------------------------------------------------------
    def _appearance(self, x: torch.Tensor) -> torch.Tensor:
        p, n = self.policy, len(x)
        if p.jitter:
            x = self._jitter(x)
        if p.blur:
            blurred = gaussian_blur(x, self._uniform(n, *p.blur_sigma))
            x = torch.where(self._chance(n, p.blur).view(n, 1, 1, 1), blurred, x)
        if p.dropout:
            x = x.masked_fill(self._holes(x), 0.0)
        if p.gray:
            x = torch.where(self._chance(n, p.gray).view(n, 1, 1, 1), _luma(x).expand_as(x), x)
        return x

    def _jitter(self, x: torch.Tensor) -> torch.Tensor:
        p, n = self.policy, len(x)
        applied = self._chance(n, p.jitter).view(n, 1, 1, 1)

        def factor() -> torch.Tensor:
            sampled = self._uniform(n, 1 - p.jitter_strength, 1 + p.jitter_strength).view(n, 1, 1, 1)
            return torch.where(applied, sampled, 1.0)

        x = (x * factor()).clamp(0, 1)  # brightness
        mean_luma = _luma(x).mean(dim=(2, 3), keepdim=True)
        x = ((x - mean_luma) * factor() + mean_luma).clamp(0, 1)  # contrast
        grey = _luma(x)
        x = ((x - grey) * factor() + grey).clamp(0, 1)  # saturation
        turn = torch.where(applied, self._uniform(n, -p.hue, p.hue).view(n, 1, 1, 1), 0.0)
        return rotate_hue(x, turn).clamp(0, 1)

    def _holes(self, x: torch.Tensor) -> torch.Tensor:
        """Bx1xHxW mask of up to dropout_holes[1] boxes per selected image."""
        p, n, (height, width) = self.policy, len(x), x.shape[-2:]
        low, high = p.dropout_holes
        count = torch.randint(low, high + 1, (n, 1), generator=self.generator, device=self.device)
        count = count * self._chance(n, p.dropout).view(n, 1)
        used = torch.arange(high, device=self.device).view(1, high) < count  # n x holes

        def span(length: int) -> tuple[torch.Tensor, torch.Tensor]:
            size = self._uniform(n * high, *p.dropout_size).view(n, high, 1)
            start = self._uniform(n * high, 0, 1).view(n, high, 1) * (1 - size)
            position = (torch.arange(length, device=self.device) + 0.5) / length
            return (position >= start) & (position < start + size), size

        rows, _ = span(height)
        cols, _ = span(width)
        boxes = rows.unsqueeze(3) & cols.unsqueeze(2) & used.view(n, high, 1, 1)
        return boxes.any(dim=1, keepdim=True)


def warp(x: torch.Tensor, sampling: torch.Tensor) -> torch.Tensor:
    """Resamples each image where its 3x3 output->input matrix points, mirroring at the border."""
    n, _, height, width = x.shape
    ys = (torch.arange(height, device=x.device) + 0.5) / height * 2 - 1
    xs = (torch.arange(width, device=x.device) + 0.5) / width * 2 - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    points = torch.stack([grid_x, grid_y, torch.ones_like(grid_x)], dim=-1).view(1, -1, 3)
    mapped = points @ sampling.transpose(1, 2)
    grid = (mapped[..., :2] / mapped[..., 2:]).view(n, height, width, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def homography(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Bx3x3 matrices taking each image's 4 source points (Bx4x2) to its 4 target points."""
    n = len(source)
    x, y = source[..., 0], source[..., 1]
    u, v = target[..., 0], target[..., 1]
    zeros, ones = torch.zeros_like(x), torch.ones_like(x)
    rows_u = torch.stack([x, y, ones, zeros, zeros, zeros, -u * x, -u * y], dim=-1)
    rows_v = torch.stack([zeros, zeros, zeros, x, y, ones, -v * x, -v * y], dim=-1)
    system = torch.cat([rows_u, rows_v], dim=1)
    solution = torch.linalg.solve_ex(system, torch.cat([u, v], dim=1)).result  # _ex: no host-device sync
    return torch.cat([solution, torch.ones(n, 1, device=source.device)], dim=1).view(n, 3, 3)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """5-tap separable Gaussian with a sigma per image (reflected border)."""
    n, channels, height, width = x.shape
    taps = torch.arange(-2, 3, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(taps.view(1, 5) ** 2) / (2 * sigma.view(n, 1) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(channels, dim=0)  # (n*c) x 5
    flat = F.pad(x.reshape(1, n * channels, height, width), (2, 2, 2, 2), mode="reflect")
    flat = F.conv2d(flat, kernel.view(-1, 1, 1, 5), groups=n * channels)
    flat = F.conv2d(flat, kernel.view(-1, 1, 5, 1), groups=n * channels)
    return flat.view(n, channels, height, width)


def rotate_hue(x: torch.Tensor, turn: torch.Tensor) -> torch.Tensor:
    """Rotates each image's chroma by `turn` of a full circle in YIQ space (a hue shift that keeps luma)."""
    to_yiq = _constant(_TO_YIQ, x.device)
    yiq = torch.einsum("ij,bjhw->bihw", to_yiq, x)
    angle = 2 * math.pi * turn
    cos, sin = torch.cos(angle), torch.sin(angle)
    i, q = yiq[:, 1:2], yiq[:, 2:3]
    yiq = torch.cat([yiq[:, :1], i * cos - q * sin, i * sin + q * cos], dim=1)
    return torch.einsum("ij,bjhw->bihw", _from_yiq(x.device), yiq)


@functools.lru_cache(maxsize=8)
def _from_yiq(device: torch.device) -> torch.Tensor:
    return torch.linalg.inv(_constant(_TO_YIQ, device))


def _luma(x: torch.Tensor) -> torch.Tensor:
    weights = _constant(_LUMA, x.device).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)
