"""Labelled image sets: indexing a class-per-folder tree or a manifest, the stratified split, and decoding an
image file to the pixels a model sees (`decode_resized`), which the decoded cache and prediction share."""
from __future__ import annotations

import os
import re
import stat
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np
from PIL import Image, ImageOps

from tuneprod.spec import Spec, UserError
from tuneprod.train.watchdog import DONE, run_bounded, usable_cpus

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MANIFEST_EXTENSIONS = (".csv", ".parquet")
TEST_LABELS = "test_labels.csv"  # beside the test images: file,label, to score the predictions
DECODE_TIMEOUT_S = 30.0  # an image slower than this to decode counts as unreadable (a photo takes milliseconds)


class DataError(UserError):
    pass


@dataclass(frozen=True)
class ImageSet:
    """Image paths with integer labels indexing `classes`, and each image's validation group when
    data.val_groups names one."""

    paths: tuple[Path, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]
    groups: Optional[tuple[str, ...]] = None

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: Sequence[int]) -> "ImageSet":
        groups = None if self.groups is None else tuple(self.groups[i] for i in indices)
        return ImageSet(tuple(self.paths[i] for i in indices), tuple(self.labels[i] for i in indices), self.classes,
                        groups)


def list_images(folder: Path) -> list[Path]:
    """Image files under a folder (recursively, hidden entries skipped), in a stable order."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in sorted(files)
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def index_images(source: Path, field: str = "data.train", val_groups: Optional[str] = None) -> ImageSet:
    """Indexes a class-per-folder tree or a `path,label` manifest; raises DataError before any training.
    `val_groups`: a manifest column, or a regular expression whose first group is read from each image's path
    (relative to the folder or manifest), giving each image its validation group."""
    source = Path(source)
    if not source.exists():
        raise DataError(f"{field}: the path {source} does not exist; point it at an image folder "
                        f"(root/<class>/*.jpg) or a CSV/Parquet manifest with columns path,label")
    columns = {}
    if source.is_dir():
        paths, names = _index_folder(source, field)
        root = source
    elif source.suffix.lower() in MANIFEST_EXTENSIONS:
        paths, names, columns = _index_manifest(source, field)
        root = source.parent
    else:
        raise DataError(f"{field}: the value is {str(source)!r}, but must be a folder or a .csv/.parquet manifest")
    image_set = _labelled(paths, names)
    check_class_sizes(image_set, field)
    if val_groups is not None:
        groups = columns.get(val_groups) or _groups_from_paths(val_groups, paths, root, sorted(columns))
        image_set = ImageSet(image_set.paths, image_set.labels, image_set.classes, tuple(groups))
    return image_set


def _groups_from_paths(pattern: str, paths: Sequence[Path], root: Path, columns: list[str]) -> list[str]:
    """The first group of `pattern` searched in each path relative to `root`; every path must match."""
    field = "data.val_groups"
    regex_hint = r"a regular expression with a group, e.g. '_(\d+)deg\.' or '^([^/]+)/'"
    expected = f"a column of the manifest ({', '.join(columns)}) or {regex_hint}" if columns else \
        f"{regex_hint} (only a manifest has columns)"
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise DataError(f"{field}: the value is {pattern!r}, but must be {expected} ({exc})") from None
    if regex.groups < 1:
        raise DataError(f"{field}: the value is {pattern!r}, but must be {expected}: it has no (group)")
    relative = [p.relative_to(root).as_posix() if p.is_relative_to(root) else p.as_posix() for p in paths]
    matches = [regex.search(text) for text in relative]
    missed = [text for text, match in zip(relative, matches) if match is None or match.group(1) is None]
    if missed:
        how_many = "no image path" if len(missed) == len(relative) else f"{len(relative) - len(missed)} of " \
                                                                         f"{len(relative)} image paths"
        raise DataError(f"{field}: the value is {pattern!r}, but matches {how_many} (e.g. not {missed[0]!r}); "
                        f"it must be {expected} that every path matches")
    return [match.group(1) for match in matches]


def _index_folder(root: Path, field: str) -> tuple[list[Path], list[str]]:
    paths, names, empty = [], [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = list_images(class_dir)
        paths += images
        names += [class_dir.name] * len(images)
        if not images:
            empty.append(class_dir.name)
    loose = [p for p in sorted(root.iterdir()) if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS)]
    if empty:
        warn(f"{field}: skipping {len(empty)} class folder(s) with no images: {', '.join(empty)}")
    if loose and paths:
        warn(f"{field}: skipping {len(loose)} image(s) outside any class folder (an image's class is the name of "
             f"the folder it is in): {', '.join(p.name for p in loose[:5])}{' ...' if len(loose) > 5 else ''}")
    if not paths:
        raise DataError(f"{field}: the folder {root} holds no class sub-folders with images; expected "
                        f"{root}/<class>/*.jpg (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return paths, names


def _index_manifest(manifest: Path, field: str) -> tuple[list[Path], list[str], dict[str, list[str]]]:
    """Paths, labels and the manifest's other columns as strings (candidates for data.val_groups)."""
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
    labels = [str(label) for label in table["label"]]
    odd = sorted({label for label in labels if "|" in label or not label.strip()})
    if odd:  # predictions.csv joins the top-5 labels with |
        raise DataError(f"{field}: the manifest {manifest} has label(s) {', '.join(map(repr, odd[:3]))}; a label "
                        f"must be non-empty and must not contain '|'")
    first: dict[Path, int] = {}  # each image's first row
    for i, (path, label) in enumerate(zip(paths, labels)):
        if labels[first.setdefault(path, i)] != label:
            raise DataError(f"{field}: the manifest {manifest} gives {path} two labels, {labels[first[path]]!r} and "
                            f"{label!r}; an image has one")
    keep = sorted(first.values())
    if len(keep) < len(paths):  # the same image twice would sit on both sides of the validation split
        warn(f"{field}: skipping {len(paths) - len(keep)} repeated row(s) of {manifest}")
    others = {str(column): [_cell(table[column].iloc[i]) for i in keep] for column in table.columns
              if column not in ("path", "label")}
    return [paths[i] for i in keep], [labels[i] for i in keep], others


def _cell(value) -> str:
    """A group name; a missing cell is a group of its own rather than NaN, which would never equal itself."""
    return "" if value is None or (isinstance(value, float) and value != value) else str(value)


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


def open_image(path: Path) -> Image.Image:
    """PIL's open, for regular files only: opening a named pipe blocks until something writes into it, and a device
    may never end. Follows links (a link to an image is read; a loop raises OSError)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(f"{path}: not a regular file")
    with warnings.catch_warnings():  # a large photo is no attack here: it is decoded scaled, or it is read and resized
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # (past twice the limit PIL still refuses it)
        return Image.open(path)


def is_readable(path: Path) -> bool:
    """Decodes the image (at reduced scale for JPEG, which is all a check needs)."""
    try:
        with open_image(path) as image:
            image.draft("RGB", (64, 64))
            image.load()
        return True
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return False


def find_unreadable(paths: Sequence[Path]) -> list[Path]:
    """Files that do not decode, or take longer than DECODE_TIMEOUT_S to."""
    outcome = run_bounded(lambda i: is_readable(paths[i]), len(paths), usable_cpus(), DECODE_TIMEOUT_S)
    return [p for p, result in zip(paths, outcome) if result != DONE]


def warn(text: str) -> None:
    print(f"tuneprod: warning: {text}", file=sys.stderr)


def warn_unreadable(unreadable: Sequence[Path]) -> None:
    if unreadable:
        listing = "\n".join(f"  {p}" for p in unreadable)
        print(f"tuneprod: warning: skipping {len(unreadable)} unreadable image(s):\n{listing}", file=sys.stderr)


def validation_split(images, val_fraction: float, seed: int):
    """(train, val) of an ImageSet or DecodedImages: whole groups held out when the images carry groups
    (data.val_groups), else single images."""
    labels = np.asarray(images.labels)
    if images.groups is None:
        train, val = stratified_split(labels, val_fraction, seed)
    else:
        train, val = grouped_split(labels, np.asarray(images.groups), val_fraction, seed, images.classes)
    return images.subset(train), images.subset(val)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Per class, a seeded shuffle puts round(n * val_fraction) images (at least 1, at most n - 1) in validation.
    Returns sorted (train, val) positions."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val = min(max(1, round(len(members) * val_fraction)), len(members) - 1)
        val += members[:n_val].tolist()
        train += members[n_val:].tolist()
    return sorted(train), sorted(val)


def grouped_split(labels: np.ndarray, groups: np.ndarray, val_fraction: float, seed: int,
                  classes: Sequence[str]) -> tuple[list[int], list[int]]:
    """Per class, its groups in a seeded random order go to validation one whole group at a time until at least
    round(n * val_fraction) of its n images (at least 1) are there, while at least one group stays in training.
    So near-duplicates (one session, one viewpoint) never sit on both sides. Returns sorted (train, val)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        names = sorted(set(groups[members].tolist()))
        if len(names) < 2:
            raise DataError(f"data.val_groups: class {classes[label]!r} has all its {len(members)} images in the "
                            f"one group {names[0]!r}, which would leave it no training image; every class needs "
                            f"images in at least two groups (or leave data.val_groups out)")
        target = max(1, round(len(members) * val_fraction))
        held: list[int] = []
        for name in rng.permutation(names)[:-1]:  # the last group in the draw always trains
            if len(held) >= target:
                break
            held += members[groups[members] == name].tolist()
        val += held
        train += sorted(set(members.tolist()) - set(held))
    return sorted(train), sorted(val)


def load_rgb(path: Path, at_least: Optional[int] = None) -> np.ndarray:
    """Any mode (grey, palette, RGBA, CMYK, 16-bit) to an HxWx3 uint8 array, honouring EXIF orientation.
    `at_least`: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's scaled IDCT, much faster) as long as
    both sides stay >= this many pixels."""
    with open_image(path) as image:
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


def check_test_images(spec: Spec, classes: Sequence[str]) -> None:
    """The test folder holds images; its test_labels.csv, if any, is readable, and labels the training set has no
    class for are named (those images can only count as wrong)."""
    test = spec.data.test_path
    if test is None:
        return
    if not test.is_dir() or not list_images(test):
        raise DataError(f"{spec.path}: data.test: the value is {str(test)!r}, but must be a folder holding images "
                        f"to predict")
    truth = read_test_labels(test)
    unknown = sorted(set((truth or {}).values()) - set(classes))
    if unknown:
        warn(f"data.test: {test / TEST_LABELS} names {len(unknown)} label(s) the training set has no class for: "
             f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}; their images count as wrong in the "
             f"test accuracy")


def read_test_labels(folder: Path) -> Optional[dict[str, str]]:
    """{file: label} from the test_labels.csv beside the images, if there is one."""
    import pandas as pd

    labels_file = folder / TEST_LABELS
    if not labels_file.is_file():
        return None
    try:
        truth = pd.read_csv(labels_file, dtype=str)
    except Exception as exc:  # pandas raises many kinds for a malformed file
        raise DataError(f"{labels_file}: cannot read it ({exc}); it must be a CSV with columns file,label") from None
    if not {"file", "label"} <= set(truth.columns):
        raise DataError(f"{labels_file}: must have columns file,label")
    return dict(zip(truth["file"], truth["label"]))
