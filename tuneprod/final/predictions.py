"""The predictions CSV (file,label,confidence and the top 5 of the soft vote) and its scoring against a
test_labels.csv, shared by the torch path (final/inference.py) and the ONNX path (final/portable.py): numpy and
pandas only, so that a deployment without torch writes the same file."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from tuneprod.files import atomic_write
from tuneprod.train.data import IMAGE_EXTENSIONS, DataError, list_images, warn_unreadable

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


def image_paths(images: Path) -> tuple[Path, list[Path]]:
    """(the folder the CSV's names are relative to, the image files): a folder searched recursively, or one image."""
    if images.is_dir():
        paths = list_images(images)
        if not paths:
            raise DataError(f"{images}: holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        return images, paths
    if images.is_file():
        return images.parent, [images]
    raise DataError(f"{images}: no such file or folder; pass a folder of images or one image")


def write_predictions(out: Path, root: Path, paths: Sequence[Path], unreadable: Sequence[int], votes: np.ndarray,
                      classes: Sequence[str], truth: Optional[dict[str, str]],
                      member_labels: Optional[dict[str, list[int]]] = None, images: Optional[Path] = None
                      ) -> PredictionReport:
    """Writes the CSV (atomically): a row for every image asked about, the readable ones in order, then the
    unreadable ones (positions in `paths`) with no label; `votes`: the readable ones' probabilities (images x
    classes). Scored when `truth`."""
    warn_unreadable([paths[i] for i in unreadable])
    skipped = set(unreadable)
    files = [p.relative_to(root).as_posix() for i, p in enumerate(paths) if i not in skipped]
    if not files:
        raise DataError(f"{images or root}: no readable images to predict")
    table = _with_unreadable(_table(files, np.asarray(votes, dtype=np.float32), classes),
                             [paths[i].relative_to(root).as_posix() for i in unreadable])
    atomic_write(Path(out), lambda path: table.to_csv(path, index=False))
    if truth is None:
        return PredictionReport(Path(out), len(files), None)
    member_accuracy = {name: _accuracy(files, [classes[i] for i in labels], truth)
                       for name, labels in (member_labels or {}).items()}
    return PredictionReport(Path(out), len(files), _accuracy(files, table["label"].tolist(), truth),
                            {name: value for name, value in member_accuracy.items() if value is not None})


def _with_unreadable(table: pd.DataFrame, unreadable: list[str]) -> pd.DataFrame:
    """A row for every image asked about: one that could not be read has no label, and `error` says why."""
    table["error"] = ""
    missing = pd.DataFrame({"file": unreadable, "error": "unreadable image (skipped)"})
    return pd.concat([table, missing], ignore_index=True) if unreadable else table


def _table(files: list[str], probabilities: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """Columns keep their names with fewer than TOP_K classes; the lists are just shorter. Equal probabilities go
    to the lower class index, as argmax does."""
    indices = np.argsort(-probabilities, axis=1, kind="stable")[:, :min(TOP_K, len(classes))]
    confidences = np.take_along_axis(probabilities, indices, axis=1)
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
