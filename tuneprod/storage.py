"""Where files live: a local folder, or a folder in an object store named by a URI (`s3://bucket/prefix`,
`gs://bucket/prefix`, with pyarrow's query parameters such as `?region=...&endpoint_override=...`), through pyarrow's
filesystems, as Ray Tune's `storage_path` takes them.

Two uses: images listed under a prefix are fetched once per node into its local disk (`ObjectListing.fetch`), and
an experiment's own files (written on the driver's machine) are uploaded to the experiment's folder in the bucket and
brought back from it (`RemoteFolder`). Never SQLite on a network file system: the study is uploaded as a snapshot.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

from tuneprod.spec import UserError
FETCH_WORKERS = 32  # parallel requests: object stores answer each in tens of milliseconds, from many servers
PROGRESS_EVERY_S = 10.0
COMPLETE = ".complete"  # written last into a fetched folder, before it is renamed into place

def join(uri: str, *parts: str) -> str:
    """`uri`/parts, with its query (pyarrow's options) kept at the end."""
    split = urlsplit(uri)
    path = "/".join([split.path.rstrip("/"), *[p.strip("/") for p in parts if p]])
    return urlunsplit((split.scheme, split.netloc, path, split.query, ""))


def parent(uri: str) -> tuple[str, str]:
    """(the URI of the folder holding what `uri` names, its name)."""
    split = urlsplit(uri)
    folder, _, name = split.path.rstrip("/").rpartition("/")
    return urlunsplit((split.scheme, split.netloc, folder, split.query, "")), name


def without_query(uri: str) -> str:
    split = urlsplit(uri)
    return urlunsplit((split.scheme, split.netloc, split.path.rstrip("/"), "", ""))


class StorageError(UserError):
    """A URI that cannot be used: one line naming it and the fix."""


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # an unknown scheme or query parameter; a missing optional filesystem
        raise StorageError(f"{uri}: not a storage URI pyarrow can open ({_first_line(exc)}); use "
                           f"s3://bucket/prefix or gs://bucket/prefix, with pyarrow's query parameters "
                           f"(region, endpoint_override, scheme)") from None


def explain(uri: str, exc: BaseException) -> StorageError:
    """The object store's error as one line that names the URI and says what would fix it."""
    text = _first_line(exc)
    bucket = urlsplit(uri).netloc
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
        return StorageError(f"{without_query(uri)}: the bucket {bucket!r} does not exist; create it or correct the "
                            f"URI")
    if any(word in text for word in ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "credentials",
                                     "SignatureDoesNotMatch", "INVALID_ACCESS_KEY", "Forbidden", "403")):
        return StorageError(f"{without_query(uri)}: access denied or no credentials ({text}); give this machine "
                            f"credentials that may read and write the bucket (AWS_ACCESS_KEY_ID and "
                            f"AWS_SECRET_ACCESS_KEY, ~/.aws, or the node's instance profile)")
    if isinstance(exc, FileNotFoundError):
        return StorageError(f"{without_query(uri)}: no objects under this prefix; check the URI")
    return StorageError(f"{without_query(uri)}: the object store failed: {text}")


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


@contextlib.contextmanager
def node_lock(path: Path) -> Iterator[None]:
    """Exclusive among the processes of one node (trials, members, the driver) that share its disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass(frozen=True)
class ObjectListing:
    """The objects under a prefix, as listed once (on the driver): what every node fetches. Named by the listing
    (keys, sizes, modification times), so a changed prefix is a new fetch, never a mix of old and new objects."""

    uri: str
    keys: tuple[str, ...]  # relative to the prefix
    sizes: tuple[int, ...]
    stamps: tuple[int, ...]  # modification times (ns)

    @classmethod
    def of(cls, uri: str) -> "ObjectListing":
        fs, root = filesystem(uri)
        try:
            infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        except Exception as exc:
            raise explain(uri, exc) from None
        files = sorted((info for info in infos if info.type == pafs.FileType.File), key=lambda info: info.path)
        if not files:
            raise StorageError(f"{without_query(uri)}: no objects under this prefix; check the URI")
        prefix = root.rstrip("/") + "/"
        return cls(uri, tuple(info.path[len(prefix):] for info in files), tuple(info.size for info in files),
                   tuple(info.mtime_ns or 0 for info in files))

    @property
    def key(self) -> str:
        digest = hashlib.sha256(f"tuneprod-objects 1 {without_query(self.uri)}\n".encode())
        for key, size, stamp in zip(self.keys, self.sizes, self.stamps):
            digest.update(f"{key}\0{size}\0{stamp}\n".encode())
        return digest.hexdigest()

    def folder(self, root: Path) -> Path:
        return Path(root).expanduser() / "objects" / self.key[:24]

    def fetch(self, root: Path, progress: Callable[[str], None] = print, workers: int = FETCH_WORKERS) -> Path:
        """This node's copy of every listed object, fetched once (under a node lock, `workers` requests at a time)
        into a hidden folder and renamed into place when complete: a partial fetch is never used."""
        folder = self.folder(root)
        if (folder / COMPLETE).is_file():
            return folder
        with node_lock(folder.parent / f".{folder.name}.lock"):
            if (folder / COMPLETE).is_file():  # another process on this node fetched it while we waited
                return folder
            for stale in folder.parent.glob(f".{folder.name}.partial-*"):  # an interrupted fetch; we hold the lock
                shutil.rmtree(stale, ignore_errors=True)
            partial = folder.parent / f".{folder.name}.partial-{os.getpid()}"
            partial.mkdir(parents=True)
            self._download(partial, progress, workers)
            (partial / COMPLETE).write_text(f"{len(self.keys)} objects from {without_query(self.uri)}\n")
            os.rename(partial, folder)
        return folder

    def _download(self, target: Path, progress: Callable[[str], None], workers: int) -> None:
        fs, root = filesystem(self.uri)
        total = sum(self.sizes)
        progress(f"tuneprod: fetching {len(self.keys)} objects ({total / 2**20:.1f} MiB) from "
                 f"{without_query(self.uri)} to {target.parent}, {workers} at a time")
        started = last_shown = time.monotonic()
        done = 0

        def one(key: str) -> None:
            local = target / key
            local.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(f"{root.rstrip('/')}/{key}") as source, open(local, "wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)

        with ThreadPoolExecutor(max(1, workers)) as pool:
            try:
                for _ in pool.map(one, self.keys):
                    done += 1
                    if time.monotonic() - last_shown >= PROGRESS_EVERY_S:
                        last_shown = time.monotonic()
                        progress(f"tuneprod: fetched {done}/{len(self.keys)} objects")
            except Exception as exc:
                raise explain(self.uri, exc) from None
        elapsed = max(time.monotonic() - started, 1e-9)
        progress(f"tuneprod: fetched {len(self.keys)} objects in {elapsed:.1f} s ({len(self.keys) / elapsed:.0f} "
                 f"objects/s, {total / 2**20 / elapsed:.1f} MiB/s)")


def fetch_location(uri: str, root: Path, progress: Callable[[str], None] = print) -> tuple[Path, ObjectListing]:
    """This node's copy of what `uri` names, and the listing fetched: a prefix (a folder of images), or one object
    (a manifest, whose images sit under its own prefix, which is fetched with it)."""
    fs, path = filesystem(uri)
    try:
        info = fs.get_file_info(path)
    except Exception as exc:
        raise explain(uri, exc) from None
    if info.type == pafs.FileType.File:
        folder_uri, name = parent(uri)
        listing = ObjectListing.of(folder_uri)
        return listing.fetch(root, progress) / name, listing
    listing = ObjectListing.of(uri)
    return listing.fetch(root, progress), listing


class RemoteFolder:
    """A folder in an object store that mirrors a local one: files uploaded from it and brought back into it."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/") if "?" not in uri else uri
        self.fs, self.root = filesystem(uri)
        self.root = self.root.rstrip("/")

    def exists(self, relative: str = "") -> bool:
        try:
            info = self.fs.get_file_info(f"{self.root}/{relative}".rstrip("/"))
        except Exception as exc:
            raise explain(self.uri, exc) from None
        return info.type != pafs.FileType.NotFound

    def upload(self, local: Path, relative: str) -> None:
        """One file. An object appears whole when its upload completes; an object store needs no folders made."""
        try:
            with open(local, "rb") as source, self.fs.open_output_stream(f"{self.root}/{relative}") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)
        except OSError as exc:
            raise explain(self.uri, exc) from None

    def download(self, relative: str, local: Path) -> bool:
        """The object (or every object under the prefix) `relative` into `local`; False when there is none."""
        try:
            info = self.fs.get_file_info(f"{self.root}/{relative}")
            if info.type == pafs.FileType.NotFound:
                return False
            if info.type == pafs.FileType.File:
                self._download_file(info.path, local)
                return True
            for entry in self.fs.get_file_info(pafs.FileSelector(info.path, recursive=True)):
                if entry.type == pafs.FileType.File:
                    self._download_file(entry.path, Path(local) / entry.path[len(info.path) + 1:])
            return True
        except OSError as exc:
            raise explain(self.uri, exc) from None

    def _download_file(self, path: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        staging = local.parent / f".{local.name}.download"
        with self.fs.open_input_stream(path) as source, open(staging, "wb") as sink:
            shutil.copyfileobj(source, sink, 1 << 20)
        os.replace(staging, local)

    def entries(self) -> dict[str, bool]:
        """The files and folders directly inside, name -> whether it is a folder (none when there is no such
        folder)."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        except OSError as exc:
            raise explain(self.uri, exc) from None
        return {info.base_name: info.type == pafs.FileType.Directory for info in sorted(infos, key=lambda i: i.path)}


def mirror_folder(uri: str) -> Path:
    """The driver's local folder for a storage URI: its own files are written there, then uploaded (under
    $TUNEPROD_CACHE, else ~/.cache/tuneprod)."""
    split = urlsplit(uri)
    base = Path(os.environ.get("TUNEPROD_CACHE", "~/.cache/tuneprod")).expanduser()
    return base / "storage" / split.scheme / split.netloc / split.path.strip("/")



RAY_FOLDERS = "trial_"  # Ray's own per-trial folders (trial_<id>/): written to the bucket by Ray, not the driver
SQLITE_SUFFIX = ".db"


def snapshot_sqlite(source: Path, target: Path) -> None:
    """A consistent copy of a live SQLite database (its backup API), never the file as it is being written."""
    import sqlite3

    target.unlink(missing_ok=True)
    with contextlib.closing(sqlite3.connect(source)) as live, contextlib.closing(sqlite3.connect(target)) as copy:
        live.backup(copy)


class ExperimentUploads:
    """Uploads the driver's own files of an experiment (study, table, endings, report, final/, predictions) from
    its local folder to its folder in the bucket: the changed ones, at most every `every_s` unless forced. The
    study goes up as a snapshot. Ray's trial folders are Ray's to write."""

    def __init__(self, local: Path, remote: Optional[str], every_s: float = 30.0):
        self.local, self.remote, self.every_s = Path(local), remote, every_s
        self.sent: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime) uploaded
        self.last = -float("inf")

    def __call__(self, force: bool = False) -> None:
        if self.remote is None or (not force and time.monotonic() - self.last < self.every_s):
            return
        self.last = time.monotonic()
        folder = RemoteFolder(self.remote)
        for path in sorted(self.local.rglob("*")):
            relative = path.relative_to(self.local).as_posix()
            if not path.is_file() or _in_trial_folder(relative) or "/." in f"/{relative}":
                continue
            stat = path.stat()
            if self.sent.get(relative) == (stat.st_size, stat.st_mtime_ns):
                continue
            if path.suffix == SQLITE_SUFFIX:
                snapshot = path.parent / f".{path.name}.snapshot"
                snapshot_sqlite(path, snapshot)
                folder.upload(snapshot, relative)
                snapshot.unlink()
            else:
                folder.upload(path, relative)
            self.sent[relative] = (stat.st_size, stat.st_mtime_ns)

    def __getstate__(self) -> dict:  # travels with the Tuner's callbacks; a resumed search uploads afresh
        return {"local": self.local, "remote": self.remote, "every_s": self.every_s}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


def _in_trial_folder(relative: str) -> bool:
    return relative.startswith(RAY_FOLDERS) and "/" in relative


def bring_back(remote: str, local: Path, trial_files: Sequence[str] = ()) -> Path:
    """The experiment's own files from its bucket folder into `local` (its local mirror), and of each of Ray's
    trial folders only `trial_files` (their progress.csv, for a resumed search's rungs)."""
    folder = RemoteFolder(remote)
    entries = folder.entries()
    if not entries:
        raise StorageError(f"{without_query(remote)}: no experiment there; pass the folder `tuneprod search` "
                           f"printed, e.g. s3://bucket/tuneprod_runs/demo")
    for name, is_folder in entries.items():
        for wanted in (trial_files if is_folder and name.startswith(RAY_FOLDERS) else [""]):
            relative = f"{name}/{wanted}" if wanted else name
            folder.download(relative, Path(local) / relative)
    return Path(local)
