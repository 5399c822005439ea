"""Training throughput of tuneprod's trial pipeline against its limit and against a plain PyTorch baseline.

On the same JPEGs, model, batch size, optimizer and training loop, measured side by side in one run:
  (a) limit     one batch of synthetic tensors already on the device, fed again and again: no input pipeline
  (b) tuneprod  the trial pipeline: decoded cache + batched augmentation on the trial's device
  (c) baseline  torchvision ImageFolder (PIL) + albumentations per image + DataLoader, same worker count
plus tuneprod with `augment_device: cpu` (albumentations over the cache), the cache build rate per core, and, on a
GPU, the aggregate throughput of 1, 2 and 4 batch-32 trials sharing it and what `gpus_per_trial: auto` picks.

    python benchmarks/throughput.py              # this machine's defaults: CPU small, GPU 256 px efficientnet_b2
    python benchmarks/throughput.py --data DIR   # your own class-per-folder images instead of generated ones
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch
import torchvision
from PIL import Image

from tuneprod.spec import Hyperparams, TrialConfig
from tuneprod.train.augment import train_transform
from tuneprod.train.cache import DecodedCache, decoded
from tuneprod.train.data import index_images
from tuneprod.train.loop import TrainingRun
from tuneprod.tuning.packing import PackingTable, probe, probe_batches

GPU = torch.cuda.is_available()


def main() -> None:
    args = _arguments()
    device = torch.device("cuda" if GPU else "cpu")
    cores = len(os.sched_getaffinity(0))
    workers = args.workers if args.workers is not None else max(1, cores - 1)
    print(f"device {torch.cuda.get_device_name() if GPU else 'CPU'}, {cores} cores; {args.model} at {args.size} px, "
          f"batch {args.batch}, policy {args.policy}, {workers} loader workers, {args.images} images")
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.data or _generate_jpegs(Path(scratch) / "images", args.images, args.classes)
        image_set = index_images(folder)
        _cache_scaling(image_set, args.cache_size, Path(scratch), cores)
        images = decoded(image_set, args.size, Path(scratch) / "cache", progress=lambda _: None)
        config = _config(args, workers)

        limit = TrainingRun(config, image_set.classes, images, device=device)
        limit.train_batches = SyntheticBatches(len(images), args.batch, args.size, len(image_set.classes), device)
        baseline = TrainingRun(config, image_set.classes, images, device=device)
        baseline.train_batches = FolderBatches(folder, config, baseline.preprocessing, args.batch, workers, device)
        cpu_augment = replace(config, hp=replace(config.hp, augment_device="cpu"))
        rates = _interleaved({"limit": limit,
                              "tuneprod": TrainingRun(config, image_set.classes, images, device=device),
                              "tuneprod, augment on CPU": TrainingRun(cpu_augment, image_set.classes, images,
                                                                      device=device),
                              "baseline": baseline}, args.epochs)

        for name, rate in rates.items():
            print(f"  {name:<26} {rate:8.0f} img/s   {rate / rates['limit']:5.2f}x limit   "
                  f"{rate / rates['baseline']:5.2f}x baseline")
        if GPU:
            _packing(args, images, image_set.classes)
    print(f"tuneprod/limit: {rates['tuneprod'] / rates['limit']:.2f}x  "
          f"tuneprod/baseline: {rates['tuneprod'] / rates['baseline']:.2f}x")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, help="a class-per-folder image tree (default: generated JPEGs)")
    parser.add_argument("--images", type=int, default=10000 if GPU else 1200, help="generated images")
    parser.add_argument("--classes", type=int, default=50 if GPU else 20)
    parser.add_argument("--size", type=int, default=256 if GPU else 48, help="training image size")
    parser.add_argument("--model", default="efficientnet_b2" if GPU else "mobilenetv3_small_050")
    parser.add_argument("--batch", type=int, default=128 if GPU else 64)
    parser.add_argument("--policy", default="light")
    parser.add_argument("--cache-size", type=int, default=256, help="image size for the cache-build measurement")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: cores - 1)")
    parser.add_argument("--epochs", type=int, default=3, help="measured epochs per pipeline, after one warm-up")
    parser.add_argument("--pack-seconds", type=float, default=30, help="GPU: how long each packing run lasts")
    return parser.parse_args()


def _config(args: argparse.Namespace, workers: int) -> TrialConfig:
    hp = Hyperparams(backbone=args.model, batch_size=args.batch, augment=args.policy, lr=1e-3, optimizer="adamw")
    return TrialConfig(hp, image_size=args.size, epochs=args.epochs + 1, workers=workers)


def _interleaved(runs: dict[str, TrainingRun], rounds: int) -> dict[str, float]:
    """Images per second of each run over `rounds` epochs, after a warm-up epoch each (worker start-up, allocator,
    cuDNN). Epochs take turns, so a change in the machine's load (a shared VM's speed drifts) falls on all alike."""
    for run in runs.values():
        run.train_epoch()
    seen, spent = dict.fromkeys(runs, 0), dict.fromkeys(runs, 0.0)
    for _ in range(rounds):
        for name, run in runs.items():
            _sync()
            started = time.perf_counter()
            run.train_epoch()
            _sync()
            spent[name] += time.perf_counter() - started
            seen[name] += len(run.train_batches) * run.batch_size
    return {name: seen[name] / spent[name] for name in runs}


def _sync() -> None:
    if GPU:
        torch.cuda.synchronize()


class SyntheticBatches:
    """The limit: one batch of random tensors, made once on the device and fed again and again, as many batches
    per epoch as the real pipelines give."""

    def __init__(self, count: int, batch: int, size: int, num_classes: int, device: torch.device):
        self.batches = count // batch
        memory_format = torch.channels_last if GPU else torch.contiguous_format
        self.images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
        self.labels = torch.randint(num_classes, (batch,), device=device)

    def __len__(self) -> int:
        return self.batches

    def epoch(self, epoch: int = 0):
        return ((self.images, self.labels) for _ in range(self.batches))


class _AlbumentationsOnPil:
    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image=np.asarray(image))["image"]


class FolderBatches:
    """The plain baseline: every epoch decodes every JPEG with PIL and augments it with albumentations in
    DataLoader workers, as a hand-written PyTorch script does."""

    def __init__(self, folder: Path, config: TrialConfig, preprocessing: dict, batch: int, workers: int,
                 device: torch.device):
        transform = train_transform(config.hp.augment, config.image_size, preprocessing["mean"],
                                    preprocessing["std"], seed=0)
        dataset = torchvision.datasets.ImageFolder(str(folder), transform=_AlbumentationsOnPil(transform))
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                                                  num_workers=workers, persistent_workers=workers > 0,
                                                  pin_memory=GPU)
        self.device = device

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int = 0):
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=True)
            if GPU:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, labels.to(self.device, non_blocking=True)


def _generate_jpegs(root: Path, count: int, classes: int) -> Path:
    """256x256 JPEGs (the contest's format): a coloured product shape per class on a varied background, made in
    one process per core (on a GPU machine the minute this takes alone is device time)."""
    cores = len(os.sched_getaffinity(0))
    chunks = [(root, range(start, min(start + 500, count)), classes) for start in range(0, count, 500)]
    with multiprocessing.get_context("spawn").Pool(min(cores, len(chunks))) as pool:
        pool.starmap(_generate_chunk, chunks)
    return root


def _generate_chunk(root: Path, numbers: range, classes: int) -> None:
    rng = np.random.default_rng(numbers.start)
    for n in numbers:
        label = n % classes
        (root / f"c{label:03d}").mkdir(parents=True, exist_ok=True)
        background = cv2.resize(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (256, 256),
                                interpolation=cv2.INTER_CUBIC)
        colour = np.random.default_rng(label).integers(0, 256, 3).tolist()
        centre = tuple(int(c) for c in rng.integers(90, 166, 2))
        axes = (int(30 + label % 7 * 8), int(50 + label % 5 * 10))
        cv2.ellipse(background, centre, axes, float(rng.uniform(-20, 20)), 0, 360, colour, -1)
        cv2.putText(background, str(label), (centre[0] - 20, centre[1]), cv2.FONT_HERSHEY_SIMPLEX, 1.2,
                    (255 - colour[0], 255 - colour[1], 255 - colour[2]), 3)
        # Sensor noise and texture give the files a photo's detail: flat shapes alone would compress to a third
        # of a real 256 px product photo's size and decode faster than one.
        photo = np.clip(background + rng.normal(0, 5, background.shape), 0, 255).astype(np.uint8)
        Image.fromarray(photo).save(root / f"c{label:03d}" / f"{n:06d}.jpg", quality=90)


def _cache_scaling(image_set, size: int, scratch: Path, cores: int) -> None:
    rates = {}
    for workers in sorted({1, cores}):
        store = DecodedCache.of(image_set.paths, size, scratch / f"scaling_{workers}")
        started = time.perf_counter()
        store.ensure(progress=lambda _: None, workers=workers)
        rates[workers] = len(image_set) / (time.perf_counter() - started)
    summary = ", ".join(f"{w} worker(s) {r:.0f} img/s ({r / w:.0f} per core)" for w, r in rates.items())
    print(f"cache build ({len(image_set)} JPEGs -> {size} px): {summary}; "
          f"{rates[cores] / rates[1]:.2f}x on {cores} cores")


def _packing(args: argparse.Namespace, images, classes) -> None:
    """Aggregate img/s of 1, 2 and 4 batch-32 trials as separate processes on one GPU, as Ray would run them."""
    small = argparse.Namespace(**{**vars(args), "batch": 32})
    config = _config(small, workers=0)
    device = torch.device("cuda")
    aggregate = {k: _packed_run(k, config, images, classes, args.pack_seconds, device) for k in (1, 2, 4)}
    for k, rate in aggregate.items():
        print(f"  {k} packed batch-32 trial(s)   {rate:8.0f} img/s   {rate / aggregate[1]:5.2f}x one trial")
    points = probe(args.model, args.size, len(classes), probe_batches([32]), torch.device("cuda"))
    table = PackingTable(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory,
                         {args.model: points})
    chosen = table.trials_for(args.model, 32, cpus_per_trial=2, cpus_per_gpu=len(os.sched_getaffinity(0)))
    measured = aggregate.get(chosen) or _packed_run(chosen, config, images, classes, args.pack_seconds, device)
    print(f"  auto packing picks {chosen} trial(s) per GPU: {measured / aggregate[1]:.2f}x one batch-32 trial")


def _packed_run(trials: int, config: TrialConfig, images, classes, seconds: float, device: torch.device) -> float:
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(trials + 1), context.Queue()
    processes = [context.Process(target=_trial_process,
                                 args=(config, images, classes, seconds, device, start, results))
                 for _ in range(trials)]
    for p in processes:
        p.start()
    start.wait()
    began = time.perf_counter()
    seen = sum(results.get() for _ in processes)
    elapsed = time.perf_counter() - began
    for p in processes:
        p.join()
    return seen / elapsed


def _trial_process(config, images, classes, seconds, device, start, results) -> None:
    run = TrainingRun(config, classes, images, device=device)
    run.train_epoch()  # warm-up before the common start
    _sync()
    start.wait()
    began, seen = time.perf_counter(), 0
    while time.perf_counter() - began < seconds:
        run.train_epoch()
        seen += len(run.train_batches) * run.batch_size
    _sync()
    results.put(seen)


if __name__ == "__main__":
    sys.exit(main())
