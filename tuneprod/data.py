"""Labelled image sets: indexing a class-per-folder tree or a manifest, the stratified split, and decoding an
image file to the pixels a model sees (`decode_resized`), which the decoded cache and prediction share."""
from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps

from tuneprod.spec import Spec, UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MANIFEST_EXTENSIONS = (".csv", ".parquet")


class DataError(UserError):
    pass


@dataclass(frozen=True)
class ImageSet:
    """Image paths with integer labels indexing `classes`."""

    paths: tuple[Path, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: Sequence[int]) -> "ImageSet":
        return ImageSet(tuple(self.paths[i] for i in indices), tuple(self.labels[i] for i in indices), self.classes)


def list_images(folder: Path) -> list[Path]:
    """Image files under a folder (recursively, hidden entries skipped), in a stable order."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in sorted(files)
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def index_images(source: Path, field: str = "data.train") -> ImageSet:
    """Indexes a class-per-folder tree or a `path,label` manifest; raises DataError before any training."""
    source = Path(source)
    if not source.exists():
        raise DataError(f"{field}: the path {source} does not exist; point it at an image folder "
                        f"(root/<class>/*.jpg) or a CSV/Parquet manifest with columns path,label")
    if source.is_dir():
        paths, names = _index_folder(source, field)
    elif source.suffix.lower() in MANIFEST_EXTENSIONS:
        paths, names = _index_manifest(source, field)
    else:
        raise DataError(f"{field}: the value is {str(source)!r}, but must be a folder or a .csv/.parquet manifest")
    image_set = _labelled(paths, names)
    check_class_sizes(image_set, field)
    return image_set


def _index_folder(root: Path, field: str) -> tuple[list[Path], list[str]]:
    paths, names = [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = list_images(class_dir)
        paths += images
        names += [class_dir.name] * len(images)
    if not paths:
        raise DataError(f"{field}: the folder {root} holds no class sub-folders with images; expected "
                        f"{root}/<class>/*.jpg (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return paths, names


def _index_manifest(manifest: Path, field: str) -> tuple[list[Path], list[str]]:
    import pandas as pd

    try:
        table = pd.read_parquet(manifest) if manifest.suffix.lower() == ".parquet" else pd.read_csv(manifest)
    except Exception as exc:  # pandas raises many kinds for a malformed file
        raise DataError(f"{field}: cannot read the manifest {manifest}: {exc}") from None
    missing_columns = {"path", "label"} - set(table.columns)
    if missing_columns:
        raise DataError(f"{field}: the manifest {manifest} lacks the column(s) {', '.join(sorted(missing_columns))}; "
                        f"it must have columns path,label")
    if table.empty:
        raise DataError(f"{field}: the manifest {manifest} has no rows")
    paths = [(manifest.parent / str(p)).absolute() for p in table["path"]]
    absent = [p for p in paths if not p.is_file()]
    if absent:
        shown = ", ".join(str(p) for p in absent[:3])
        raise DataError(f"{field}: {len(absent)} file(s) listed in {manifest} do not exist (paths are relative "
                        f"to the manifest): {shown}{' ...' if len(absent) > 3 else ''}")
    return paths, [str(label) for label in table["label"]]


def _labelled(paths: list[Path], names: list[str]) -> ImageSet:
    classes = tuple(sorted(set(names)))
    lookup = {name: i for i, name in enumerate(classes)}
    return ImageSet(tuple(paths), tuple(lookup[n] for n in names), classes)


def check_class_sizes(image_set: ImageSet, field: str) -> None:
    counts = np.bincount(image_set.labels, minlength=len(image_set.classes))
    small = [f"{image_set.classes[i]} ({n})" for i, n in enumerate(counts) if n < 2]
    if small:
        raise DataError(f"{field}: every class needs at least 2 readable images (one to train, one to validate), "
                        f"but {', '.join(small[:5])}{' ...' if len(small) > 5 else ''} have fewer; add images or "
                        f"remove the class")
    if len(image_set.classes) < 2:
        raise DataError(f"{field}: found only the class {image_set.classes[0]!r}; a classifier needs at least 2")


def is_readable(path: Path) -> bool:
    """Decodes the image (at reduced scale for JPEG, which is all a check needs)."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (64, 64))
            image.load()
        return True
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return False


def find_unreadable(paths: Sequence[Path]) -> list[Path]:
    # Threads suffice: PIL releases the GIL while decoding.
    with ThreadPoolExecutor(min(32, (os.cpu_count() or 1) * 2)) as pool:
        readable = list(pool.map(is_readable, paths))
    return [p for p, ok in zip(paths, readable) if not ok]


def warn_unreadable(unreadable: Sequence[Path]) -> None:
    if unreadable:
        listing = "\n".join(f"  {p}" for p in unreadable)
        print(f"tuneprod: warning: skipping {len(unreadable)} unreadable image(s):\n{listing}", file=sys.stderr)


def stratified_split(image_set: ImageSet, val_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Per class, a seeded shuffle puts round(n * val_fraction) images (at least 1, at most n - 1) in validation."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(image_set.labels)
    train, val = [], []
    for label in range(len(image_set.classes)):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val = min(max(1, round(len(members) * val_fraction)), len(members) - 1)
        val += members[:n_val].tolist()
        train += members[n_val:].tolist()
    return image_set.subset(sorted(train)), image_set.subset(sorted(val))


def load_rgb(path: Path, at_least: Optional[int] = None) -> np.ndarray:
    """Any mode (grey, palette, RGBA, CMYK, 16-bit) to an HxWx3 uint8 array, honouring EXIF orientation.
    `at_least`: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's scaled IDCT, much faster) as long as
    both sides stay >= this many pixels."""
    with Image.open(path) as image:
        if at_least:
            image.draft("RGB", (at_least, at_least))
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            # Composite on white: a transparent background otherwise becomes arbitrary colours.
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        elif image.mode == "I;16" or image.mode == "I":
            image = Image.fromarray((np.asarray(image, dtype=np.float32) / 256).clip(0, 255).astype(np.uint8))
        return np.asarray(image.convert("RGB"))


def decode_resized(path: Path, size: int) -> np.ndarray:
    """The image as a model sees it: size x size x 3 uint8, squashed to a square (a product photo's whole frame
    matters more than its aspect ratio). Training (through the decoded cache) and prediction both read images
    through this one function, so they see the same pixels."""
    pixels = load_rgb(path, at_least=size)
    if pixels.shape[:2] == (size, size):
        return pixels
    shrinking = pixels.shape[0] >= size and pixels.shape[1] >= size
    return cv2.resize(pixels, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def check_test_images(spec: Spec) -> None:
    test = spec.data.test_path
    if test is not None and (not test.is_dir() or not list_images(test)):
        raise DataError(f"{spec.path}: data.test: the value is {str(test)!r}, but must be a folder holding images "
                        f"to predict")


class ResizedImages(torch.utils.data.Dataset):
    """Image files as decode_resized gives them (size x size x 3 uint8), for prediction."""

    def __init__(self, paths: Sequence[Path], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        # A copy: an image already at the size comes back as PIL's read-only buffer, which torch will not wrap.
        return torch.from_numpy(decode_resized(self.paths[index], self.size).copy())
