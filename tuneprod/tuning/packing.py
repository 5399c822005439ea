"""How many trials share one GPU under `resources.gpus_per_trial: auto`, decided from a measurement.

A small-batch trial leaves a big GPU idle between kernels; several such trials on one GPU fill it (four batch-32
efficientnet_b2 trials on an H200 gave 2.5x the throughput of one). Whether a model has that headroom is measured,
not guessed: `probe` times synthetic training steps at doubling batch sizes and records their peak memory. Packing
n trials of batch b behaves like one run of batch n*b at best, so `trials_per_gpu` packs while each doubling of the
batch still buys a clear gain, the trials' memory fits and the node has CPUs for them.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from tuneprod.files import atomic_write
from tuneprod.train.loop import amp_dtype, autocast
from tuneprod.train.models import create_model

MIN_GAIN = 1.25  # throughput ratio a doubled batch must reach for packing twice as many trials to pay
MAX_TRIALS_PER_GPU = 8
MEMORY_HEADROOM = 0.9  # share of GPU memory trials may plan to use (fragmentation, cuDNN workspaces)
CONTEXT_BYTES = 600 * 2**20  # each trial process's CUDA context, outside what the allocator reports
PROBE_RECORD = "gpu_probes.json"


@dataclass(frozen=True)
class ProbePoint:
    batch_size: int
    images_per_s: float
    peak_memory: int  # bytes reserved by the allocator during the steps


def trials_per_gpu(points: Sequence[ProbePoint], batch_size: int, gpu_memory: int, cpus_per_trial: float,
                   cpus_per_gpu: float) -> int:
    """The number of trials of `batch_size` to put on one GPU (a power of two, at least 1)."""
    by_batch = {p.batch_size: p for p in points}
    base = by_batch.get(batch_size)
    if base is None:
        return 1
    trials = 1
    while trials * 2 <= MAX_TRIALS_PER_GPU:
        current, doubled = by_batch.get(batch_size * trials), by_batch.get(batch_size * trials * 2)
        if current is None or doubled is None:  # a larger batch ran out of memory, or was not probed
            break
        if doubled.images_per_s < MIN_GAIN * current.images_per_s:  # the GPU is already busy
            break
        if trials * 2 * (base.peak_memory + CONTEXT_BYTES) > MEMORY_HEADROOM * gpu_memory:
            break
        if trials * 2 * cpus_per_trial > cpus_per_gpu:
            break
        trials *= 2
    return trials


def probe_batches(batch_sizes: Sequence[int]) -> list[int]:
    """Doublings from the smallest batch the space can pick to MAX_TRIALS_PER_GPU times the largest."""
    low, high = min(batch_sizes), max(batch_sizes) * MAX_TRIALS_PER_GPU
    return [low * 2**k for k in range(int(math.log2(high / low)) + 1)]


def probe(backbone: str, image_size: int, num_classes: int, batch_sizes: Sequence[int],
          device: torch.device, steps: int = 5) -> list[ProbePoint]:
    """Times `steps` training steps (after warm-up) on synthetic tensors at each batch size, as a trial runs them
    (AMP, channels_last); stops at the first batch size that runs out of memory. Out of memory inside cuDNN or
    cuBLAS is a plain RuntimeError, so any failure after the first batch size counts as not fitting."""
    model = create_model(backbone, num_classes, pretrained=False, dropout=0.0, image_size=image_size).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    points = []
    for batch_size in sorted(batch_sizes):
        try:
            points.append(_time_steps(model, optimizer, batch_size, image_size, num_classes, device, steps))
        except RuntimeError:  # torch.OutOfMemoryError is one
            if not points:
                raise
            break
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return points


def _time_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch_size: int, image_size: int,
                num_classes: int, device: torch.device, steps: int) -> ProbePoint:
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
        torch.cuda.reset_peak_memory_stats(device)
    labels = torch.randint(num_classes, (batch_size,), device=device)
    dtype = amp_dtype(device)

    def step() -> None:
        with autocast(dtype):
            loss = F.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):  # warm-up: cuDNN autotuning, allocator growth
        step()
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronize(device)
    elapsed = time.perf_counter() - started
    peak = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0
    return ProbePoint(batch_size, batch_size * steps / elapsed, peak + _augmentation_bytes(batch_size, image_size))


def _augmentation_bytes(batch_size: int, image_size: int) -> int:
    """What the synthetic steps leave out: batched augmentation's temporaries (sampling grid, warped copy, blur,
    masks), about eight float copies of the batch."""
    return 8 * batch_size * 3 * image_size * image_size * 4


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def points_to_json(points: Sequence[ProbePoint]) -> list[dict]:
    return [asdict(p) for p in points]


def points_from_json(rows: Sequence[dict]) -> list[ProbePoint]:
    return [ProbePoint(**row) for row in rows]


@dataclass(frozen=True)
class PackingTable:
    """Probe results for one GPU model: per backbone, the measured points."""

    gpu_name: str
    gpu_memory: int
    points: dict  # backbone -> list[ProbePoint]

    def trials_for(self, backbone: str, batch_size: int, cpus_per_trial: float, cpus_per_gpu: float) -> int:
        base = self._probed(backbone, batch_size)
        if base is None:
            return 1
        return trials_per_gpu(self.points[backbone], base, self.gpu_memory, cpus_per_trial, cpus_per_gpu)

    def alone_speedup(self, backbone: str, batch_size: int, trials: int) -> float:
        """How much faster than one of `trials` packed trials a run with the GPU to itself goes (a final-stage member,
        a prediction shard), at the least: packed trials of batch b together go no faster than one run of batch
        trials x b (packing's premise), so each at most 1/trials of that, against the batch-b speed alone. On an
        H200, 4 packed batch-32 efficientnet_b2 trials ran at 399 img/s each and one alone at 856 (2.1x)."""
        base = self._probed(backbone, batch_size)
        by_batch = {p.batch_size: p.images_per_s for p in self.points.get(backbone, [])}
        if trials <= 1 or base is None or base * trials not in by_batch:
            return 1.0
        return max(1.0, trials * by_batch[base] / by_batch[base * trials])

    def _probed(self, backbone: str, batch_size: int) -> Optional[int]:
        """A batch size that was not probed is judged by the next larger probed one: fewer trials, never too many."""
        probed = sorted(p.batch_size for p in self.points.get(backbone, []) if p.batch_size >= batch_size)
        return probed[0] if probed else None


def measure_gpu(backbones: Sequence[str], image_size: int, num_classes: int, batch_sizes: Sequence[int],
                record: Path) -> PackingTable:
    """Probes each backbone on this process's GPU, reusing earlier measurements kept in `record` (a JSON file
    keyed by GPU model, torch version, backbone, image size and batch sizes)."""
    record = Path(record).expanduser()  # expanded on the GPU node that runs the probe
    device = torch.device("cuda")
    properties = torch.cuda.get_device_properties(device)
    batches = probe_batches(batch_sizes)
    known = json.loads(record.read_text()) if record.is_file() else {}
    points = {}
    for backbone in backbones:
        key = f"{properties.name}|torch {torch.__version__}|{backbone}|{image_size}px|{batches}"
        if key not in known:
            known[key] = points_to_json(probe(backbone, image_size, num_classes, batches, device))
            record.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(record, lambda path: path.write_text(json.dumps(known, indent=1)))
        points[backbone] = points_from_json(known[key])
    return PackingTable(properties.name, properties.total_memory, points)
