"""One compact view of a running search, in place of Ray's per-trial tables: trials finished / running / waiting /
stopped / failed, the best result so far, time used (of the budget) and an estimate of the time left. On a terminal
it is one line rewritten in place; elsewhere (CI, a log file) a plain line when something changed, at most every
PLAIN_EVERY_S seconds, and at least every PLAIN_QUIET_S. It concludes each trial's ending in the search's record
(tuning/endings.py) as Ray reports the trial's end, and counts from that record."""
from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Optional, TextIO

from ray import tune

from tuneprod.tuning.budget import BudgetStopper
from tuneprod.tuning.endings import CUT, FAILED, FINISHED, STOPPED, TrialEndings

TTY_EVERY_S = 1.0
PLAIN_EVERY_S = 15.0
PLAIN_QUIET_S = 300.0


@dataclass
class Best:
    value: float
    trial_id: str
    epoch: int


def clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class SearchView(tune.Callback):
    def __init__(self, num_samples: int, metric: str, mode: str, endings: TrialEndings,
                 budget: Optional[BudgetStopper] = None, out: Optional[TextIO] = None, show: bool = True):
        """`show`: False records the endings only (with --verbose, Ray's own tables take the console)."""
        self.num_samples, self.metric, self.sign = num_samples, metric, (1.0 if mode == "max" else -1.0)
        self.endings, self.budget, self.show = endings, budget, show
        self._out = out
        self.best: Optional[Best] = None
        self._restart_clock()

    def _restart_clock(self) -> None:
        self.started = time.monotonic()
        self.last_shown = -math.inf
        self.changed = True

    # The Tuner pickles its callbacks into the experiment folder; a resumed search gets a fresh clock and stdout.
    def __getstate__(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "_out"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _out=None)
        self._restart_clock()

    @property
    def out(self) -> TextIO:
        return self._out or sys.stdout

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.endings.observe(trial.trial_id, result)
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and math.isfinite(value) and \
                (self.best is None or self.sign * value > self.sign * self.best.value):
            self.best = Best(float(value), trial.trial_id, int(result.get("epoch", 0)))
            self.changed = True

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.endings.conclude(trial.trial_id, trial.last_result)
        self.changed = True

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.endings.conclude(trial.trial_id, trial.last_result, errored=True)
        self.changed = True

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        """Its worker process or node was lost (Ray retries only that): it goes on from its last checkpoint."""
        if self.show:
            print(f"{self._fresh_line()}search: trial {trial.trial_id} lost its worker (a node or process died); "
                  f"retrying it from its last checkpoint (failure {trial.run_metadata.num_failures} of at most "
                  f"{trial.max_failures})", file=self.out, flush=True)

    def _fresh_line(self) -> str:
        return "\r\x1b[K" if self.out.isatty() else ""

    def on_step_end(self, iteration, trials, **info) -> None:
        now = time.monotonic()
        if not self.show:
            return
        if self.out.isatty():
            if now - self.last_shown >= TTY_EVERY_S:
                # Cut to the terminal's width (a wrapped line cannot be rewritten in place), and leave the cursor
                # at its start, so that a line printed meanwhile (the budget's notice) writes over it.
                width = shutil.get_terminal_size().columns - 1
                self.out.write("\r" + self.line(trials)[:width] + "\x1b[K\r")
                self.out.flush()
                self.last_shown = now
        elif (self.changed and now - self.last_shown >= PLAIN_EVERY_S) or now - self.last_shown >= PLAIN_QUIET_S:
            print(self.line(trials), file=self.out, flush=True)
            self.last_shown, self.changed = now, False

    def on_experiment_end(self, trials, **info) -> None:
        # Ray ends the trials the budget stops without telling anyone: they end here, cut.
        self.endings.conclude_open((trial.trial_id, trial.last_result) for trial in trials)
        if self.show:
            print(self._fresh_line() + self.line(trials), file=self.out, flush=True)

    def line(self, trials) -> str:
        statuses = [trial.status for trial in trials]
        ended = self.endings.counts(trial.trial_id for trial in trials)
        counts = {"finished": ended[FINISHED], "stopped": ended[STOPPED], "cut by the budget": ended[CUT],
                  "failed": ended[FAILED], "running": statuses.count("RUNNING"),
                  "waiting": statuses.count("PAUSED"), "pending": statuses.count("PENDING")}
        shown = ", ".join(f"{n} {what}" for what, n in counts.items() if n)
        best = (f"best {self.metric} {self.best.value:.4f} (trial {self.best.trial_id}, epoch {self.best.epoch})"
                if self.best else f"no {self.metric} yet")
        elapsed = time.monotonic() - self.started
        budget = f" of {clock(self.budget.budget_s)} budget" if self.budget else ""
        left = self.time_left(trials, elapsed)
        left_text = f", ~{clock(left)} left" if left is not None else ""
        return (f"search {clock(elapsed)}{budget}{left_text} | {sum(ended.values())}/{self.num_samples} trials done"
                f"{': ' + shown if shown else ''} | {best}")

    def time_left(self, trials, elapsed: float) -> Optional[float]:
        """Epochs still to run over the epochs per second so far: a trial not yet ended runs as many as the ended
        ones did on average (at least one more), one not yet created as many. Never past the budget. None until a
        trial has ended."""
        ended = self.endings.ended
        epochs = {trial.trial_id: ended[trial.trial_id].epoch if trial.trial_id in ended else
                  self.endings.last_epoch.get(trial.trial_id, 0) for trial in trials}
        done = [trial.trial_id for trial in trials if trial.trial_id in ended]
        if not done or not sum(epochs.values()) or elapsed <= 0:
            return None
        per_trial = sum(epochs[t] for t in done) / len(done)
        live = [t for t in epochs if t not in done]
        todo = sum(max(per_trial - epochs[t], 1.0) for t in live) + \
            max(self.num_samples - len(trials), 0) * per_trial
        left = todo / (sum(epochs.values()) / elapsed)
        if self.budget is not None:
            left = min(left, self.budget.left_s())
        return left
