"""Predictions for a folder of images from a saved model or ensemble: file,label,confidence plus the top 5 of the
soft vote, and each member's accuracy beside the ensemble's when labels exist."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import pandas as pd
import torch

from tuneprod.files import atomic_write
from tuneprod.final import artifact
from tuneprod.final.ensemble import soft_vote, view_probabilities
from tuneprod.train.batch_augment import normalise
from tuneprod.train.data import (
    IMAGE_EXTENSIONS,
    DataError,
    ResizedImages,
    find_unreadable,
    list_images,
    read_test_labels,
    warn_unreadable,
)
from tuneprod.train.loop import amp_dtype, autocast, default_device

TOP_K = 5


@dataclass(frozen=True)
class PredictionReport:
    out: Path
    images: int
    accuracy: Optional[float]  # when a test_labels.csv sits beside the images
    member_accuracy: dict[str, float] = field(default_factory=dict)  # each member's (and soup's) own, likewise

    def summary(self) -> str:
        """The accuracy, with each member's beside it when there are several."""
        text = f"{self.accuracy:.4f}"
        if len(self.member_accuracy) > 1:
            text += " (" + ", ".join(f"{name} {value:.4f}" for name, value in self.member_accuracy.items()) + ")"
        return text


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
                 batch_size: int = 64, workers: int = 0, progress: Callable[[str], None] = print) -> Scores:
    device = default_device()
    ensemble = artifact.load(model_dir, device)
    unreadable = set(find_unreadable(list(paths)))
    readable = [p for p in paths if p not in unreadable]
    loader = torch.utils.data.DataLoader(ResizedImages(readable, ensemble.image_size), batch_size=batch_size,
                                         num_workers=workers, pin_memory=device.type == "cuda")
    votes, member_labels = [], {name: [] for name in scored}
    with torch.inference_mode(), autocast(amp_dtype(device)):
        for pixels in loader:
            pixels = pixels.to(device, non_blocking=True)
            probabilities = {name: _member_probabilities(ensemble.members[name], pixels, views) for name in scored}
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
    root, paths = _image_paths(Path(images))
    truth = read_test_labels(root)
    # Every member is scored when there are labels to score it against; otherwise only the vote is run.
    scored = list(ensemble.members) if truth is not None else list(ensemble.vote)
    views = ensemble.tta if tta is None else ("flip",) if tta is True else () if tta is False else tuple(tta)
    scores = scorer(Path(model_dir), paths, views, scored, batch_size, workers, progress)
    unreadable = [paths[i] for i in scores.unreadable]
    warn_unreadable(unreadable)
    skipped = set(scores.unreadable)
    files = [p.relative_to(root).as_posix() for i, p in enumerate(paths) if i not in skipped]
    if not files:
        raise DataError(f"{images}: no readable images to predict")
    classes = ensemble.classes
    table = _with_unreadable(_table(files, scores.votes, classes),
                             [p.relative_to(root).as_posix() for p in unreadable])
    atomic_write(Path(out), lambda path: table.to_csv(path, index=False))
    if truth is None:
        return PredictionReport(Path(out), len(files), None)
    member_accuracy = {name: _accuracy(files, [classes[i] for i in labels], truth)
                       for name, labels in scores.member_labels.items()}
    return PredictionReport(Path(out), len(files), _accuracy(files, table["label"].tolist(), truth),
                            {name: value for name, value in member_accuracy.items() if value is not None})


def _member_probabilities(member: artifact.Member, pixels: torch.Tensor, views: Sequence[str]) -> torch.Tensor:
    prep = member.preprocessing
    return view_probabilities(member.model, normalise(pixels, prep["mean"], prep["std"]), views)


def _image_paths(images: Path) -> tuple[Path, list[Path]]:
    if images.is_dir():
        paths = list_images(images)
        if not paths:
            raise DataError(f"{images}: holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        return images, paths
    if images.is_file():
        return images.parent, [images]
    raise DataError(f"{images}: no such file or folder; pass a folder of images or one image")


def _with_unreadable(table: pd.DataFrame, unreadable: list[str]) -> pd.DataFrame:
    """A row for every image asked about: one that could not be read has no label, and `error` says why."""
    table["error"] = ""
    missing = pd.DataFrame({"file": unreadable, "error": "unreadable image (skipped)"})
    return pd.concat([table, missing], ignore_index=True) if unreadable else table


def _table(files: list[str], probabilities: torch.Tensor, classes: tuple[str, ...]) -> pd.DataFrame:
    """Columns keep their names with fewer than TOP_K classes; the lists are just shorter."""
    confidences, indices = probabilities.topk(min(TOP_K, len(classes)), dim=1)
    return pd.DataFrame({
        "file": files,
        "label": [classes[i] for i in indices[:, 0].tolist()],
        "confidence": confidences[:, 0].tolist(),
        f"top{TOP_K}_labels": ["|".join(classes[i] for i in row) for row in indices.tolist()],
        f"top{TOP_K}_confidences": ["|".join(f"{c:.4f}" for c in row) for row in confidences.tolist()],
    })


def _accuracy(files: Sequence[str], predicted: Sequence[str], truth: dict[str, str]) -> Optional[float]:
    """Over the predicted files that have a true label."""
    hits = [label == truth[file] for file, label in zip(files, predicted) if file in truth]
    return sum(hits) / len(hits) if hits else None
