"""Predictions for a folder of images from a saved model or ensemble: file,label,confidence plus the top 5 of the
soft vote, and each member's accuracy beside the ensemble's when labels exist."""
from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from tuneprod.final import artifact
from tuneprod.final.ensemble import soft_vote, view_probabilities
from tuneprod.final.predictions import PredictionReport, image_paths, write_predictions
from tuneprod.train.batch_augment import normalise
from tuneprod.train.data import decode_resized, find_unreadable, read_test_labels
from tuneprod.train.loop import amp_dtype, autocast, default_device


class ResizedImages(torch.utils.data.Dataset):
    """Image files as decode_resized gives them (size x size x 3 uint8), for prediction."""

    def __init__(self, paths: Sequence[Path], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        # A copy: an image already at the size comes back as PIL's read-only buffer, which torch will not wrap.
        return torch.from_numpy(decode_resized(self.paths[index], self.size).copy())


@dataclass
class Scores:
    """One pass over a list of images: the soft vote of each readable one, in order, and each scored member's
    labels; `unreadable`: the positions (in the list asked about) of those that could not be read."""

    votes: torch.Tensor  # readable images x classes
    member_labels: dict[str, list[int]]
    unreadable: list[int]


# Scores images with a saved ensemble: (model folder, paths, views, the members to score, batch size, loader workers,
# progress). `score_images` does it here; the Ray side scores shards of the images on the cluster's workers.
Scorer = Callable[[Path, Sequence[Path], Sequence[str], Sequence[str], int, int, Callable[[str], None]], Scores]


def score_images(model_dir: Path, paths: Sequence[Path], views: Sequence[str], scored: Sequence[str],
                 batch_size: int = 64, workers: int = 0, progress: Callable[[str], None] = print,
                 use_onnxruntime: bool = True) -> Scores:
    """`use_onnxruntime`: run the members as `runnable` does (False: in eager torch, as a benchmark's baseline)."""
    device = default_device()
    ensemble = artifact.load(model_dir, device)
    unreadable = set(find_unreadable(list(paths)))
    readable = [p for p in paths if p not in unreadable]
    models = {name: runnable(ensemble.members[name].model, ensemble.image_size, device) if use_onnxruntime
              else ensemble.members[name].model for name in scored}
    loader = torch.utils.data.DataLoader(ResizedImages(readable, ensemble.image_size), batch_size=batch_size,
                                         num_workers=workers, pin_memory=device.type == "cuda")
    votes, member_labels = [], {name: [] for name in scored}
    with torch.inference_mode(), autocast(amp_dtype(device)):
        for pixels in loader:
            pixels = pixels.to(device, non_blocking=True)
            probabilities = {name: member_probabilities(ensemble.members[name], pixels, views, models[name])
                             for name in scored}
            votes.append(soft_vote([probabilities[name] for name in ensemble.vote], ensemble.weights).cpu())
            for name in scored:
                member_labels[name] += probabilities[name].argmax(1).tolist()
            done = sum(len(v) for v in votes)
            if len(votes) % 20 == 0 or done == len(readable):
                progress(f"predict: {done}/{len(readable)} images")
    empty = torch.zeros(0, len(ensemble.classes))
    return Scores(torch.cat(votes) if votes else empty, member_labels,
                  [i for i, p in enumerate(paths) if p in unreadable])


def predict(model_dir: Path, images: Path, out: Path, tta: Union[Sequence[str], bool, None] = None,
            batch_size: int = 64, workers: int = 0, progress: Callable[[str], None] = print,
            scorer: Scorer = score_images) -> PredictionReport:
    """Writes the predictions CSV (atomically) and scores it against test_labels.csv when one is present.
    `tta`: the test-time views (default: as the model was saved; the older True/False mean the mirror or none).
    `scorer`: where the images are scored (here by default)."""
    ensemble = artifact.load(model_dir, torch.device("cpu"))  # checked before any image is read
    root, paths = image_paths(Path(images))
    truth = read_test_labels(root)
    # Every member is scored when there are labels to score it against; otherwise only the vote is run.
    scored = list(ensemble.members) if truth is not None else list(ensemble.vote)
    views = ensemble.tta if tta is None else ("flip",) if tta is True else () if tta is False else tuple(tta)
    scores = scorer(Path(model_dir), paths, views, scored, batch_size, workers, progress)
    return write_predictions(Path(out), root, paths, scores.unreadable, scores.votes.numpy(), ensemble.classes,
                             truth, scores.member_labels, Path(images))


def member_probabilities(member: artifact.Member, pixels: torch.Tensor, views: Sequence[str],
                         model: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """One member's probabilities for a batch of uint8 pixels (B x H x W x 3), normalised as it was trained and
    averaged over the test-time views; `model`: how its model is run (default: the torch module)."""
    prep = member.preprocessing
    return view_probabilities(model or member.model, normalise(pixels, prep["mean"], prep["std"]), views)


def runnable(model: nn.Module, image_size: int, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """How predictions run a model: on a CPU with onnxruntime installed (tuneprod[export]), as its ONNX graph in
    onnxruntime (the same probabilities within 1e-5; twice eager torch's images per second for lite0 at 64 px on 2
    cores, and exported in under a second); else, or where the model cannot be exported, the torch module."""
    if not predicts_in_onnxruntime(device):
        return model
    from tuneprod.final.export import OnnxRunner, exportable

    try:
        return OnnxRunner(exportable(model), image_size, torch.get_num_threads())
    except Exception:  # an operation the exporter lacks: torch runs it, as slowly as before
        return model


def predicts_in_onnxruntime(device: torch.device) -> bool:
    """Whether `runnable` runs models in onnxruntime on this device (where they can be exported)."""
    return device.type == "cpu" and importlib.util.find_spec("onnxruntime") is not None


def prediction_speedup(model: nn.Module, image_size: int, device: torch.device, batch: int = 32) -> float:
    """How many times eager torch's images per second `runnable` scores at, on a batch of random pixels (the
    second of two passes each, as the first pays one-time costs): 1.0 where predictions run in torch."""
    model = model.eval()
    runner = runnable(model, image_size, device)
    if runner is model:
        return 1.0
    images = torch.randn(batch, 3, image_size, image_size)
    seconds = []
    for run in (model, runner):
        with torch.inference_mode():
            for _ in range(2):
                started = time.perf_counter()
                run(images)
            seconds.append(time.perf_counter() - started)
    return seconds[0] / seconds[1] if seconds[1] > 0 else 1.0
