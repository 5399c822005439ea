"""The decoded-image cache: every image of a data set decoded once at the training size into one uint8 array on
node-local disk, which every trial on the node (and the retrain, and later searches) memory-maps read-only.

Trials then never decode a JPEG: a batch is a gather of rows from pages the OS shares between processes, so the
memory cost is one copy of the data set per node however many trials run. The store is keyed by a fingerprint of
the file list, the files' sizes and modification times and the image size: a changed data set gets a new store.
A store is built in a hidden folder and renamed into place when complete, under a per-node lock, so an interrupted
build is never read and concurrent trials build it once. Images from an object store (data.train: s3://...) are
fetched once per node first, into its own disk (tuneprod/storage.py), and keyed by the listing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from tuneprod.demo import generate_demo
from tuneprod.spec import Spec, is_uri
from tuneprod.storage import ObjectListing, fetch_location, node_lock
from tuneprod.train.data import (DECODE_TIMEOUT_S, DataError, ImageSet, check_class_sizes, decode_resized, index_images,
                                 warn, warn_unreadable)
from tuneprod.train.watchdog import DONE, TIMED_OUT, run_bounded, usable_cpus

FORMAT_VERSION = 1  # bump when decode_resized or the layout changes: old stores then stop matching
DEFAULT_ROOT = "~/.cache/tuneprod"
IMAGES, READABLE, META = "images.npy", "readable.npy", "meta.json"
LARGE = 1000  # images: a build this size shows its progress

_open_arrays: dict[Path, np.ndarray] = {}  # per process: every dataset over a store shares one mapping


def default_root() -> Path:
    return Path(os.environ.get("TUNEPROD_CACHE", DEFAULT_ROOT))


def fingerprint(paths: Sequence[Path], size: int, stat: bool = True) -> str:
    """Changes when a file is added, removed, renamed, rewritten (size or mtime) or the image size changes. Without
    `stat`, the names alone (fetched objects: the listing's key, first of them, stands for their contents)."""
    digest = hashlib.sha256(f"tuneprod-cache {FORMAT_VERSION} {size}\n".encode())
    for path in paths:
        if not stat:
            digest.update(f"{path}\n".encode())
            continue
        try:
            stat = os.stat(path)
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:  # a symlink loop or a dangling link: unreadable, and skipped later with a warning
            digest.update(f"{path}\0unreadable\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True, eq=False)
class DecodedCache:
    """The store for `paths` at `size` px. Picklable (paths only): a trial on another node rebuilds it there. With a
    `source` (a listing of objects), the paths are relative to the node's fetched copy, fetched before a build."""

    root: Path  # may start with ~, expanded on the node that uses it
    paths: tuple[Path, ...]
    size: int
    key: str
    source: Optional[ObjectListing] = None

    @classmethod
    def of(cls, paths: Sequence[Path], size: int, root: Optional[Path] = None,
           source: Optional[ObjectListing] = None) -> "DecodedCache":
        root = Path(root or default_root())
        if source is None:
            return cls(root, tuple(paths), size, fingerprint(paths, size))
        fetched = source.folder(root)
        relative = tuple(Path(p).relative_to(fetched) for p in paths)
        return cls(root, relative, size, fingerprint([Path(source.key), *relative], size, stat=False), source)

    def files(self) -> list[Path]:
        """The images on this node's disk."""
        if self.source is None:
            return list(self.paths)
        fetched = self.source.folder(self.root)
        return [fetched / path for path in self.paths]

    @property
    def folder(self) -> Path:
        return self.root.expanduser() / f"{self.size}px-{self.key[:24]}"

    def ready(self) -> bool:
        return (self.folder / META).is_file()  # written last, inside the folder before it is renamed into place

    def ensure(self, progress: Callable[[str], None] = print, workers: Optional[int] = None) -> "DecodedCache":
        """Builds the store unless it exists; `workers` decode in parallel (default: this process's CPUs)."""
        if not self.ready():
            if self.source is not None:  # on a node that has not fetched the images yet
                self.source.fetch(self.root, progress)
            self._build(progress, workers or usable_cpus())
        return self

    def images(self) -> np.ndarray:
        """N x size x size x 3 uint8, memory-mapped read-only. Never builds: a reader may be a DataLoader worker
        or a prefetch thread, where a build does not belong; `ensure` first."""
        folder = self.folder
        if folder not in _open_arrays:
            if not self.ready():
                raise RuntimeError(f"the decoded-image cache {folder} is not built; call ensure() first")
            _open_arrays[folder] = np.load(folder / IMAGES, mmap_mode="r")
        return _open_arrays[folder]

    def readable(self) -> np.ndarray:
        return np.load(self.ensure().folder / READABLE)

    def _build(self, progress: Callable[[str], None], workers: int) -> None:
        root = self.root.expanduser()
        lock = root / f".{self.folder.name}.lock"
        try:
            root.mkdir(parents=True, exist_ok=True)
            lock.touch()
        except OSError as exc:
            raise DataError(f"data.cache_dir: cannot write the decoded-image cache in {root} ({exc.strerror}); "
                            f"point data.cache_dir (or $TUNEPROD_CACHE) at a writable folder on local disk") from None
        with node_lock(lock):
            if self.ready():  # another trial on this node built it while we waited
                return
            for stale in root.glob(f".{self.folder.name}.partial-*"):  # an interrupted build; we hold the lock
                shutil.rmtree(stale, ignore_errors=True)
            _check_free_space(root, len(self.paths) * self.size * self.size * 3)
            partial = root / f".{self.folder.name}.partial-{os.getpid()}"
            partial.mkdir()
            started = time.perf_counter()
            readable = self._decode_all(partial / IMAGES, progress, workers)
            np.save(partial / READABLE, readable)
            elapsed = time.perf_counter() - started
            meta = {"format": FORMAT_VERSION, "size": self.size, "images": len(self.paths), "key": self.key,
                    "build_s": round(elapsed, 2), "workers": workers}
            (partial / META).write_text(json.dumps(meta, indent=1))
            for written in (IMAGES, READABLE, META, "."):  # on disk before the name says the store is complete
                _fsync(partial / written)
            os.rename(partial, self.folder)
            _fsync(root)
        progress(f"tuneprod: decoded {len(self.paths)} images in {elapsed:.1f} s "
                 f"({len(self.paths) / max(elapsed, 1e-9):.0f} img/s, {workers} in parallel) into {self.folder}")

    def _decode_all(self, target: Path, progress: Callable[[str], None], workers: int) -> np.ndarray:
        files = self.files()
        count = len(files)
        store = np.lib.format.open_memmap(target, mode="w+", dtype=np.uint8, shape=(count, self.size, self.size, 3))
        data_offset = store.offset  # where the rows start, after the .npy header
        del store
        progress(f"tuneprod: decoding {count} images once at {self.size} px into the cache in "
                 f"{self.root.expanduser()}")
        row_bytes = self.size * self.size * 3
        tenth = max(1, count // 10)
        shown = [0]

        # One descriptor for the whole build, shared by every worker (a forked one inherits it): pwrite takes its
        # offset with each call, so the workers never move a shared file position. pwrite, not a writable mapping:
        # writing through a map faults in every fresh page, which serialises the workers in the kernel.
        descriptor = os.open(target, os.O_WRONLY)

        def decode_row(row: int) -> bool:
            pixels = decode_resized(files[row], self.size)
            _write_at(descriptor, np.ascontiguousarray(pixels).data.cast("B"), data_offset + row * row_bytes)
            return True

        def show(done: int) -> None:
            if count >= LARGE and done // tenth > shown[0]:
                shown[0] = done // tenth
                progress(f"tuneprod: decoded {done}/{count}")

        try:
            outcome = run_bounded(decode_row, count, workers, DECODE_TIMEOUT_S, show)
        finally:
            os.close(descriptor)
        slow = [str(files[i]) for i in np.flatnonzero(outcome == TIMED_OUT)]
        if slow:
            warn(f"{len(slow)} image(s) took longer than {DECODE_TIMEOUT_S:g} s to decode and count as unreadable: "
                 f"{', '.join(slow[:5])}{' ...' if len(slow) > 5 else ''}")
        return outcome == DONE


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_at(descriptor: int, data: memoryview, offset: int) -> None:
    while data:  # pwrite may write less than asked
        written = os.pwrite(descriptor, data, offset)
        data, offset = data[written:], offset + written


def _check_free_space(root: Path, needed: int) -> None:
    free = shutil.disk_usage(root).free
    if free < needed * 1.05:
        raise DataError(f"data.cache_dir: the cache needs {needed / 2**30:.1f} GiB but {root} has "
                        f"{free / 2**30:.1f} GiB free; point data.cache_dir (or $TUNEPROD_CACHE) at a larger disk")


@dataclass(frozen=True, eq=False)
class DecodedImages:
    """Labelled rows of a decoded cache: what a training run reads."""

    cache: DecodedCache
    rows: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    groups: Optional[np.ndarray] = None  # each image's validation group (data.val_groups)

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, indices: Sequence[int]) -> "DecodedImages":
        indices = np.asarray(indices, dtype=np.int64)
        groups = None if self.groups is None else self.groups[indices]
        return DecodedImages(self.cache, self.rows[indices], self.labels[indices], self.classes, groups)

    def pixels(self, indices: np.ndarray) -> np.ndarray:
        """The uint8 images at these positions (sorted rows read the file in order)."""
        return self.cache.images()[self.rows[indices]]


def decoded(image_set: ImageSet, size: int, root: Optional[Path] = None, field_name: str = "data.train",
            progress: Callable[[str], None] = print, source: Optional[ObjectListing] = None) -> DecodedImages:
    """The image set's readable images in the cache (built on first use); unreadable ones dropped with a warning.
    `source`: the listing the images were fetched from (every node fetches it before building its cache)."""
    cache = DecodedCache.of(image_set.paths, size, root, source).ensure(progress)
    readable = cache.readable()
    warn_unreadable([p for p, ok in zip(image_set.paths, readable) if not ok])
    kept = np.flatnonzero(readable)
    check_class_sizes(image_set.subset(kept), field_name)
    groups = None if image_set.groups is None else np.asarray(image_set.groups)[kept]
    return DecodedImages(cache, kept, np.asarray(image_set.labels, dtype=np.int64)[kept], image_set.classes, groups)


def labelled_images(spec: Spec, progress: Callable[[str], None] = print) -> DecodedImages:
    """The training images, decoded into the cache; the demo set is generated on first use."""
    if spec.data.demo is not None and spec.data.train is None and not spec.data.train_path.exists():
        progress(f"tuneprod: generating the demo product set in {spec.data.demo}")
        try:
            generate_demo(spec.data.demo, size=spec.data.image_size)
        except FileExistsError:
            raise DataError(f"{spec.path}: data.demo: the folder {spec.data.demo} holds other files but no "
                            f"train.csv; point data.demo at a new folder") from None
    try:
        image_set = index_images(spec.data.train_path, "data.train", spec.data.val_groups)
        return decoded(image_set, spec.data.image_size, spec.data.cache_dir, "data.train", progress,
                       spec.sources.get("train"))
    except DataError as exc:
        raise DataError(f"{spec.path}: {exc}") from None


def localised(spec: Spec, progress: Callable[[str], None] = print) -> Spec:
    """The spec with its images on this node's disk: data.train and data.test given as URIs are fetched (once per
    node and listing) and replaced by the local copies; `spec.sources` keeps the listings, so that the trials'
    caches fetch them on their own nodes. The saved spec keeps the URIs."""
    fetched, sources = {}, {}
    for name in ("train", "test"):
        location = getattr(spec.data, name)
        if is_uri(location):
            fetched[name], sources[name] = fetch_location(location, Path(spec.data.cache_dir or default_root()),
                                                          progress)
    if not fetched:
        return spec
    return dataclasses.replace(spec, data=spec.data.model_copy(update=fetched), sources={**spec.sources, **sources})
