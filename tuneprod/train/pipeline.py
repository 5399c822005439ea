"""Batches for a training run: rows of the decoded cache in, normalised float tensors on the run's device out.

`augment_device: gpu` (DeviceBatches): a background thread gathers each batch's uint8 rows from the memory-mapped
cache, the batch moves to the device as uint8 (4x fewer bytes than float), and `BatchAugment` transforms it there.
`augment_device: cpu` (WorkerBatches): DataLoader workers read rows and apply the albumentations policy per image.
Both shuffle with a permutation drawn from (seed, epoch), so a resumed run sees the epochs it would have seen; the
batched augmentation is reseeded from (seed, epoch) too, while albumentations in persistent workers is seeded once
per run (a resumed run draws other augmentations than an uninterrupted one would have).
"""
from __future__ import annotations

import math
import queue
import threading
from functools import partial
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from tuneprod.spec import TrialConfig
from tuneprod.train.augment import reseed_worker_transform, train_transform
from tuneprod.train.batch_augment import BatchAugment, normalise
from tuneprod.train.cache import DecodedImages

Batch = tuple[torch.Tensor, torch.Tensor]


def epoch_order(count: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(count)


def training_batches(images: DecodedImages, config: TrialConfig, batch_size: int, mean: Sequence[float],
                     std: Sequence[float], device: torch.device):
    images.cache.ensure()  # here, in the caller's thread: on a node that lacks the cache, this builds it
    if config.hp.augment_device == "gpu":
        augment = BatchAugment(config.hp.augment, mean, std, device, seed=config.seed)
        return DeviceBatches(images, batch_size, device, augment.for_epoch, shuffle=True, seed=config.seed)
    transform = train_transform(config.hp.augment, config.image_size, mean, std, seed=config.seed)
    return WorkerBatches(images, batch_size, device, transform, config.workers, config.seed)


def evaluation_batches(images: DecodedImages, batch_size: int, mean: Sequence[float], std: Sequence[float],
                       device: torch.device) -> "DeviceBatches":
    images.cache.ensure()
    model_input = partial(normalise, mean=mean, std=std)
    return DeviceBatches(images, batch_size, device, lambda epoch: model_input, shuffle=False)


class DeviceBatches:
    """Batches transformed on the device; with `shuffle`, the ragged last batch is dropped (it would give
    BatchNorm a batch of one)."""

    def __init__(self, images: DecodedImages, batch_size: int, device: torch.device,
                 transform_for_epoch: Callable[[int], Callable[[torch.Tensor], torch.Tensor]], shuffle: bool,
                 seed: int = 0):
        self.images, self.batch_size, self.device = images, batch_size, device
        self.transform_for_epoch, self.shuffle, self.seed = transform_for_epoch, shuffle, seed
        self.pin = device.type == "cuda"

    def __len__(self) -> int:
        whole = len(self.images) / self.batch_size
        return int(whole) if self.shuffle else math.ceil(whole)

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        count = len(self.images)
        order = epoch_order(count, self.seed, epoch) if self.shuffle else np.arange(count)
        batches = (order[start:start + self.batch_size] for start in range(0, len(self) * self.batch_size,
                                                                              self.batch_size))
        transform = self.transform_for_epoch(epoch)
        for pixels, labels in prefetched(self._gather(positions) for positions in batches):
            pixels = pixels.to(self.device, non_blocking=True)
            yield transform(pixels), labels.to(self.device, non_blocking=True)

    def _gather(self, positions: np.ndarray) -> Batch:
        positions = np.sort(positions)  # rows in file order: sequential reads; order within a batch is irrelevant
        pixels = torch.from_numpy(self.images.pixels(positions))
        labels = torch.from_numpy(self.images.labels[positions])
        return (pixels.pin_memory(), labels.pin_memory()) if self.pin else (pixels, labels)


def prefetched(items: Iterable, depth: int = 3) -> Iterator:
    """Iterates `items` in a background thread, `depth` ahead, so gathering overlaps the training step. The
    thread ends when the consumer stops early; an exception it meets is raised in the consumer."""
    slots: queue.Queue = queue.Queue(depth)
    stop, end = threading.Event(), object()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def fill() -> None:
        try:
            for item in items:
                if not offer(item):
                    return
            offer(end)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            offer(exc)

    thread = threading.Thread(target=fill, daemon=True, name="tuneprod-prefetch")
    thread.start()
    try:
        while (item := slots.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


class _CachedRows(torch.utils.data.Dataset):
    def __init__(self, images: DecodedImages, transform: Callable[..., dict]):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Batch:
        pixels = self.images.pixels(np.asarray([index]))[0]
        return self.transform(image=pixels)["image"], int(self.images.labels[index])


class _EpochOrder(torch.utils.data.Sampler):
    def __init__(self, count: int, seed: int):
        self.count, self.seed, self.epoch = count, seed, 0

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[int]:
        return iter(epoch_order(self.count, self.seed, self.epoch).tolist())


class WorkerBatches:
    """Per-image albumentations in `workers` DataLoader processes, each mapping the cache itself."""

    def __init__(self, images: DecodedImages, batch_size: int, device: torch.device, transform, workers: int,
                 seed: int):
        self.device = device
        self.order = _EpochOrder(len(images), seed)
        self.loader = torch.utils.data.DataLoader(
            _CachedRows(images, transform), batch_size=batch_size, sampler=self.order, drop_last=True,
            num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda",
            worker_init_fn=reseed_worker_transform if workers > 0 else None)

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        self.order.epoch = epoch
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=True)
            if self.device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, labels.to(self.device, non_blocking=True)
