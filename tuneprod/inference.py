"""Predictions for a folder of images from a saved model: file,label,confidence plus the top 5."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
import torch

from tuneprod import artifact
from tuneprod.batch_augment import normalise
from tuneprod.data import IMAGE_EXTENSIONS, DataError, ResizedImages, find_unreadable, list_images, warn_unreadable
from tuneprod.files import atomic_write
from tuneprod.loop import default_device, predict_logits

TEST_LABELS = "test_labels.csv"
TOP_K = 5


@dataclass(frozen=True)
class PredictionReport:
    out: Path
    images: int
    accuracy: Optional[float]  # when a test_labels.csv sits beside the images


def predict(model_dir: Path, images: Path, out: Path, tta: Optional[bool] = None, batch_size: int = 64,
            workers: int = 0, progress: Callable[[str], None] = print) -> PredictionReport:
    """Writes the predictions CSV (atomically) and scores it against test_labels.csv when one is present."""
    device = default_device()
    model, metadata = artifact.load(model_dir, device)
    root, paths = _image_paths(Path(images))
    unreadable = set(find_unreadable(paths))
    warn_unreadable(sorted(unreadable))
    paths = [p for p in paths if p not in unreadable]
    if not paths:
        raise DataError(f"{images}: no readable images to predict")
    prep = metadata["preprocessing"]
    classes = tuple(metadata["classes"])
    loader = torch.utils.data.DataLoader(ResizedImages(paths, prep["image_size"]), batch_size=batch_size,
                                         num_workers=workers, pin_memory=device.type == "cuda")
    batches = ((normalise(pixels.to(device, non_blocking=True), prep["mean"], prep["std"]), None)
               for pixels in loader)
    use_tta = metadata.get("tta", False) if tta is None else tta
    probabilities = []
    for logits, _ in predict_logits(model, batches, device, tta=use_tta):
        probabilities.append(logits.softmax(1).cpu())
        done = sum(len(p) for p in probabilities)
        if len(probabilities) % 20 == 0 or done == len(paths):
            progress(f"predict: {done}/{len(paths)} images")
    table = _table([p.relative_to(root).as_posix() for p in paths], torch.cat(probabilities), classes)
    atomic_write(Path(out), lambda path: table.to_csv(path, index=False))
    return PredictionReport(Path(out), len(table), _accuracy(table, root))


def _image_paths(images: Path) -> tuple[Path, list[Path]]:
    if images.is_dir():
        paths = list_images(images)
        if not paths:
            raise DataError(f"{images}: holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        return images, paths
    if images.is_file():
        return images.parent, [images]
    raise DataError(f"{images}: no such file or folder; pass a folder of images or one image")


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


def _accuracy(table: pd.DataFrame, root: Path) -> Optional[float]:
    labels_file = root / TEST_LABELS
    if not labels_file.is_file():
        return None
    truth = pd.read_csv(labels_file, dtype=str)
    if not {"file", "label"} <= set(truth.columns):
        raise DataError(f"{labels_file}: must have columns file,label")
    scored = table.merge(truth, on="file", suffixes=("", "_true"))
    return float((scored["label"] == scored["label_true"]).mean()) if len(scored) else None
