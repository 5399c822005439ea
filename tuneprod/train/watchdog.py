"""Work over many files with a time bound on each: one hostile file (a progressive JPEG with thousands of scans, a
file on a hung network mount) must cost its own time bound, not stall the search.

Workers are forked processes where forking is safe (a process running one thread): a stuck one is killed and
replaced, and one that crashes (a decoder's segfault) costs only the item it held. Elsewhere they are threads (a
Ray worker runs threads, and a child forked from a threaded process can deadlock on a lock another thread held):
a stuck thread cannot be stopped, so it is abandoned (a daemon whose late answer is ignored) and a fresh one
carries on.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from typing import Callable

import numpy as np

PENDING, DONE, FAILED, TIMED_OUT = 0, 1, 2, 3
TICK_S = 0.1


def usable_cpus() -> int:
    """The CPUs this process may run on: Ray pins a worker to its share (its CPU affinity), not os.cpu_count()."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def can_fork() -> bool:
    return threading.active_count() == 1 and not multiprocessing.current_process().daemon


class _Board:
    """State shared with the workers: the next unclaimed item, each item's outcome, and per worker slot the item
    it holds, since when (0: none), and its generation (bumped when the slot's worker is given up on)."""

    def __init__(self, count: int, slots: int):
        context = multiprocessing.get_context("fork")
        self.next = context.Value("q", 0)
        self.outcome = context.Array("b", count, lock=False)
        self.item = context.Array("q", slots, lock=False)
        self.since = context.Array("d", slots, lock=False)
        self.generation = context.Array("q", slots, lock=False)

    def claim(self) -> int:
        with self.next.get_lock():
            item = self.next.value
            self.next.value += 1
        return item

    def close(self) -> None:
        with self.next.get_lock():
            self.next.value = len(self.outcome)


def _work(check: Callable[[int], bool], board: _Board, slot: int, generation: int, in_process: bool) -> None:
    if in_process:  # Ctrl-C reaches the whole process group; the parent alone decides what happens next
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    while board.generation[slot] == generation:
        item = board.claim()
        if item >= len(board.outcome):
            return
        board.item[slot] = item
        board.since[slot] = time.monotonic()
        try:
            ok = bool(check(item))
        except Exception:
            ok = False
        if board.generation[slot] != generation:  # given up on meanwhile: the item is already recorded
            return
        board.outcome[item] = DONE if ok else FAILED
        board.since[slot] = 0.0


def run_bounded(check: Callable[[int], bool], count: int, workers: int, timeout_s: float,
                on_tick: Callable[[int], None] = lambda done: None) -> np.ndarray:
    """Calls check(i) for every i < count, `workers` at a time. Returns each item's outcome: DONE (check returned
    true), FAILED (it returned false, raised, or its process died) or TIMED_OUT (it ran longer than timeout_s).
    `on_tick(items finished)` is called about ten times a second, in this thread."""
    in_process = can_fork()
    slots = max(1, min(workers, count))
    board = _Board(count, slots)

    def start(slot: int):
        kind = multiprocessing.get_context("fork").Process if in_process else threading.Thread
        worker = kind(target=_work, args=(check, board, slot, board.generation[slot], in_process), daemon=True)
        if not in_process:
            worker.start()
            return worker
        # A Ctrl-C that lands during the fork is raised inside fork's handlers, which swallow it: hold it until the
        # child exists (it then arrives here, where the cleanup below sees it).
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            worker.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        return worker

    running = []
    try:
        for slot in range(slots):
            running.append(start(slot))
        while any(worker.is_alive() for worker in running):
            time.sleep(TICK_S)
            for slot, worker in enumerate(running):
                since = board.since[slot]
                stuck = since and time.monotonic() - since > timeout_s
                if stuck or (since and not worker.is_alive()):
                    board.outcome[board.item[slot]] = TIMED_OUT if stuck else FAILED
                    board.since[slot] = 0.0
                    board.generation[slot] += 1
                    if in_process:
                        worker.kill()
                        worker.join()
                    running[slot] = start(slot)
            on_tick(int(np.count_nonzero(np.frombuffer(board.outcome, dtype=np.int8))))
    finally:
        board.close()
        if in_process:
            for worker in running:
                worker.kill()
                worker.join()
    outcome = np.frombuffer(board.outcome, dtype=np.int8).copy()
    outcome[outcome == PENDING] = FAILED  # claimed by a worker that died before saying so
    return outcome
