"""The decoded-image cache: what invalidates it, that a build is all-or-nothing, unreadable images, sharing."""
import os
import signal
import threading
import time

import numpy as np
import pytest

from tests.helpers import write_image_folder
from tuneprod.train import cache, watchdog
from tuneprod.train.cache import DecodedCache, decoded, fingerprint
from tuneprod.train.data import DataError, decode_resized, index_images, validation_split


@pytest.fixture
def image_set(image_folder):
    return index_images(image_folder)


def test_fingerprint_changes_with_the_files_and_the_size(image_set):
    paths = list(image_set.paths)
    key = fingerprint(paths, 32)
    assert fingerprint(paths, 32) == key
    assert fingerprint(paths, 48) != key
    assert fingerprint(paths[1:], 32) != key  # a file removed
    assert fingerprint(list(reversed(paths)), 32) != key  # rows follow the file order
    stat = os.stat(paths[0])
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # rewritten in place
    assert fingerprint(paths, 32) != key


def test_a_changed_file_is_decoded_into_a_new_store(image_set):
    first = decoded(image_set, 16)
    path = image_set.paths[0]
    from PIL import Image
    Image.fromarray(np.full((24, 24, 3), 255, dtype=np.uint8)).save(path)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    second = decoded(image_set, 16)
    assert second.cache.folder != first.cache.folder
    assert (second.cache.images()[0] == 255).all() and not (first.cache.images()[0] == 255).all()


def test_store_holds_what_decode_resized_gives(image_set):
    images = decoded(image_set, 20)
    assert images.cache.images().shape == (len(image_set), 20, 20, 3)
    for row in (0, 7, len(image_set) - 1):
        assert np.array_equal(images.cache.images()[row], decode_resized(image_set.paths[row], 20))


def test_an_interrupted_build_is_never_used_and_is_cleaned_up(image_set, monkeypatch, tmp_path):
    real = cache.decode_resized
    main = os.getpid()  # the decoding runs in worker processes or threads; Ctrl-C reaches the main thread

    def dies_half_way(path, size):
        if path == image_set.paths[len(image_set) // 2]:
            os.kill(main, signal.SIGINT)
            time.sleep(5)
        return real(path, size)

    store = DecodedCache.of(image_set.paths, 16, tmp_path / "c")
    monkeypatch.setattr(cache, "decode_resized", dies_half_way)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # whatever an earlier test left
    try:
        with pytest.raises(KeyboardInterrupt):
            store.ensure()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not store.ready() and not store.folder.exists()
    assert len(list((tmp_path / "c").glob(".*partial*"))) == 1  # what it left is hidden and unnamed as a store

    monkeypatch.setattr(cache, "decode_resized", real)
    store.ensure()
    assert store.ready() and not list((tmp_path / "c").glob(".*partial*"))
    assert np.array_equal(store.images()[-1], real(image_set.paths[-1], 16))


def test_concurrent_users_on_a_node_build_once(image_set, monkeypatch, tmp_path):
    builds = []
    real_decode_all = DecodedCache._decode_all

    def counted(self, target, progress, workers):
        builds.append(target)
        time.sleep(0.2)  # hold the lock long enough for the others to queue behind it
        return real_decode_all(self, target, progress, workers)

    monkeypatch.setattr(DecodedCache, "_decode_all", counted)
    stores = [DecodedCache.of(image_set.paths, 16, tmp_path / "c") for _ in range(3)]
    threads = [threading.Thread(target=s.ensure, kwargs={"progress": lambda _: None}) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and all(s.ready() for s in stores)


def test_unreadable_images_are_listed_once_and_skipped(image_folder, capsys):
    broken = image_folder / "red" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    truncated = image_folder / "green" / "truncated.png"
    truncated.write_bytes((image_folder / "green" / "0.png").read_bytes()[:60])
    pipe = image_folder / "blue" / "pipe.png"
    os.mkfifo(pipe)  # opening it for reading would block forever
    loop = image_folder / "blue" / "loop.png"
    loop.symlink_to(loop)
    linked = image_folder / "blue" / "linked.png"
    linked.symlink_to(image_folder / "blue" / "0.png")
    image_set = index_images(image_folder)
    images = decoded(image_set, 16)
    kept = {image_set.paths[r] for r in images.rows}
    assert len(images) == 19 and not {broken, truncated, pipe, loop} & kept and linked in kept
    warning = capsys.readouterr().err
    assert warning.count("warning") == 1 and all(str(p) in warning for p in (broken, truncated, pipe, loop))


def test_unreadable_images_that_empty_a_class_are_an_error(image_folder):
    for f in list((image_folder / "blue").iterdir())[1:]:
        f.write_bytes(b"garbage")
    with pytest.raises(DataError, match="blue"):
        decoded(index_images(image_folder), 16)


def test_split_rows_keep_their_labels(tmp_path):
    image_set = index_images(write_image_folder(tmp_path / "i", per_class=10))
    train, val = validation_split(decoded(image_set, 16), 0.2, seed=1)
    assert len(train) == 24 and len(val) == 6 and not set(train.rows) & set(val.rows)
    for part in (train, val):
        assert [image_set.labels[r] for r in part.rows] == part.labels.tolist()


def test_too_little_disk_is_one_clear_error(image_set, monkeypatch, tmp_path):
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda _: type("Usage", (), {"free": 1000})())
    with pytest.raises(DataError, match="data.cache_dir: the cache needs .* GiB free"):
        DecodedCache.of(image_set.paths, 64, tmp_path / "c").ensure()


def test_an_unwritable_cache_folder_is_one_clear_error(image_set, tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(DataError, match="data.cache_dir: cannot write the decoded-image cache in .*not_a_folder"):
        DecodedCache.of(image_set.paths, 16, blocker / "cache").ensure()


def test_readers_never_build(image_set, tmp_path):
    # A reader may be a DataLoader worker (which may not start processes) or a prefetch thread: only ensure() builds.
    store = DecodedCache.of(image_set.paths, 16, tmp_path / "c")
    with pytest.raises(RuntimeError, match="not built; call ensure"):
        store.images()
    assert not store.ready()


def test_a_large_set_is_decoded_by_processes_into_the_same_store(tmp_path, monkeypatch):
    monkeypatch.setattr(watchdog.threading, "active_count", lambda: 1)  # as if the earlier tests left no threads
    image_set = index_images(write_image_folder(tmp_path / "i", per_class=8))
    images = decoded(image_set, 20, tmp_path / "c")
    assert all(np.array_equal(images.cache.images()[r], decode_resized(image_set.paths[r], 20))
               for r in range(len(image_set)))


@pytest.mark.parametrize("processes", [True, False])
def test_an_image_too_slow_to_decode_counts_as_unreadable(image_set, monkeypatch, tmp_path, capsys, processes):
    monkeypatch.setattr(watchdog.threading, "active_count", lambda: 1 if processes else 2)
    monkeypatch.setattr(cache, "DECODE_TIMEOUT_S", 0.5)
    slow, real = image_set.paths[3], cache.decode_resized

    def stalls_on_one(path, size):
        if path == slow:
            time.sleep(20)  # far past the bound: without it the image would decode, only late
        return real(path, size)

    monkeypatch.setattr(cache, "decode_resized", stalls_on_one)
    images = decoded(image_set, 16, tmp_path / "c")
    assert 3 not in images.rows and len(images) == len(image_set) - 1
    assert f"took longer than 0.5 s to decode and count as unreadable: {slow}" in capsys.readouterr().err


@pytest.mark.parametrize("processes", [True, False])
def test_the_build_opens_its_store_once_for_all_its_workers(image_set, monkeypatch, tmp_path, processes):
    """Not once per image: one descriptor, shared by the workers (threads, or forked processes that inherit it)."""
    monkeypatch.setattr(watchdog.threading, "active_count", lambda: 1 if processes else 2)
    opened, real_open = [], os.open

    def counting_open(path, flags, *args):
        if str(path).endswith(cache.IMAGES) and flags & os.O_WRONLY:
            opened.append(path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(cache.os, "open", counting_open)
    images = decoded(image_set, 16, tmp_path / "c")
    assert len(opened) == 1
    assert all(np.array_equal(images.cache.images()[r], decode_resized(image_set.paths[r], 16))
               for r in range(len(image_set)))


def test_readability_checks_use_the_cpus_this_process_may_run_on(tmp_path, monkeypatch):
    """Inside a Ray worker pinned to one CPU, os.cpu_count() would still say the whole machine."""
    from tuneprod.train import data

    workers = []
    monkeypatch.setattr(watchdog.os, "sched_getaffinity", lambda pid: {3})
    monkeypatch.setattr(data, "run_bounded", lambda check, count, n, timeout: workers.append(n) or
                        np.full(count, watchdog.DONE))
    data.find_unreadable([tmp_path / "a.png", tmp_path / "b.png"])
    assert workers == [1] and watchdog.usable_cpus() == 1
