"""Work with a time bound per item: stuck and crashing workers cost their item only, in processes and threads."""
import multiprocessing
import os
import signal
import time

import numpy as np
import pytest

from tuneprod.train import watchdog
from tuneprod.train.watchdog import DONE, FAILED, TIMED_OUT, run_bounded


@pytest.fixture(params=["processes", "threads"])
def mode(request, monkeypatch):
    # One thread: forked processes; more (as in a Ray worker): threads.
    monkeypatch.setattr(watchdog.threading, "active_count", lambda: 1 if request.param == "processes" else 2)
    return request.param


def test_every_item_is_done_once(mode, tmp_path):
    def check(i):
        (tmp_path / str(i)).touch(exist_ok=False)  # a second call for an item would raise
        return i % 5 != 0

    outcome = run_bounded(check, 23, workers=3, timeout_s=30)
    assert outcome.tolist() == [FAILED if i % 5 == 0 else DONE for i in range(23)]
    assert len(list(tmp_path.iterdir())) == 23


def test_a_stuck_item_times_out_and_the_rest_go_on(mode):
    def check(i):
        if i == 2:
            time.sleep(20)  # would be DONE, far later, without the bound
        return True

    outcome = run_bounded(check, 12, workers=2, timeout_s=0.5)
    assert outcome.tolist() == [TIMED_OUT if i == 2 else DONE for i in range(12)]


def test_an_item_that_raises_or_kills_its_process_fails_alone(mode):
    def check(i):
        if i == 4:
            raise ValueError("a decoder's error")
        if i == 7 and mode == "processes":
            os._exit(1)  # as a segfault in a decoder would end the process
        return True

    outcome = run_bounded(check, 10, workers=2, timeout_s=30)
    assert [i for i in range(10) if outcome[i] != DONE] == ([4, 7] if mode == "processes" else [4])
    assert set(outcome.tolist()) <= {DONE, FAILED}


def test_ctrl_c_stops_the_workers(monkeypatch):
    monkeypatch.setattr(watchdog.threading, "active_count", lambda: 1)
    started = []

    def check(i):
        time.sleep(0.05)
        return True

    def interrupt(done):
        started.append(done)
        if len(started) == 3:
            os.kill(os.getpid(), signal.SIGINT)

    before = set(multiprocessing.active_children())  # earlier tests' children, if any, are not ours
    # Python's own Ctrl-C handler: a Ray Tuner run earlier in this process may have left its own in place.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_bounded(check, 10_000, workers=2, timeout_s=30, on_tick=interrupt)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert set(multiprocessing.active_children()) <= before  # the workers were killed, not left decoding
    assert np.all(np.asarray(started) < 10_000)
