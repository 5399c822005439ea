"""The one record of how each trial ended, kept in the experiment folder (`trial_endings.json`).

Each ending is written where it is decided: the scheduler records its stop (tuneprod's rungs and Ray's ASHA), the
time budget records its cut, and a trial that finishes its epochs or fails is concluded from its last result when
Ray reports its end. The table, the console, the report and the study's states all read this record, so they
cannot disagree. Ray ends the trials it stops for the budget without telling the searcher or the callbacks, so a
trial still open when the search ends is concluded then, by the same rule.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional

from tuneprod.files import atomic_write
from tuneprod.tuning.restore import resuming

ENDINGS = "trial_endings.json"
FINISHED, STOPPED, CUT, FAILED = "finished", "stopped", "cut", "failed"
KINDS = (FINISHED, STOPPED, CUT, FAILED)
# A trial's own failure (NaN loss, out of memory, a model that cannot take the image size) is its last result, not a
# crash: Ray retries crashes (a lost worker or node) from the last checkpoint, and would retry these for nothing.
FAILED_RESULT = "trial_failed"  # that result's message
FAILED_IN_EPOCH = "failed_in_epoch"


@dataclass(frozen=True)
class Ending:
    kind: str  # one of KINDS
    epoch: int  # the last epoch it completed; for a failure, the epoch it failed in

    def words(self, max_epochs: int) -> str:
        """The table's `ended` column."""
        if self.kind == FAILED:
            return f"failed in epoch {self.epoch}"
        if self.kind == FINISHED:
            return f"ran all {max_epochs} epochs"
        if self.kind == CUT:
            return f"cut by the time budget after epoch {self.epoch}" if self.epoch else \
                "cut by the time budget before its first report"
        return f"stopped by the scheduler after epoch {self.epoch}"


def conclude(last: Optional[dict], errored: bool, max_epochs: int, budget_cut: bool) -> Ending:
    """How a trial ended that no scheduler stopped: from its last result, whether Ray saw it fail, and whether the
    budget had run out by then."""
    last = last or {}
    if isinstance(last.get(FAILED_RESULT), str):
        return Ending(FAILED, int(last[FAILED_IN_EPOCH]))
    epoch = reported_epoch(last) or 0
    if errored:
        return Ending(FAILED, epoch + 1)
    if epoch >= max_epochs:
        return Ending(FINISHED, epoch)
    return Ending(CUT if budget_cut else STOPPED, epoch)


def reported_epoch(result: dict) -> Optional[int]:
    """The epoch a result reports, if any (a failure's report has none; a table row may hold NaN)."""
    epoch = result.get("epoch")
    return int(epoch) if isinstance(epoch, (int, float)) and math.isfinite(epoch) else None


class TrialEndings:
    """trial id -> Ending. One instance per search, shared by the scheduler, the budget, the searcher and the
    console. Copied or unpickled (Tuner.restore brings each of them back separately), every copy is the one instance
    for its folder (the folder being resumed, within a resume)."""

    def __init__(self, experiment_dir: Optional[Path], max_epochs: int):
        """`experiment_dir` None: a record kept in memory only (a scheduler driven by hand)."""
        self.experiment_dir = None if experiment_dir is None else Path(experiment_dir)
        self.max_epochs = max_epochs
        self.ended: dict[str, Ending] = read_endings(self.experiment_dir) if self.experiment_dir else {}
        self.last_epoch: dict[str, int] = {}  # the epoch each running trial last reported
        self.budget_cut = False

    @classmethod
    def open(cls, experiment_dir: Path, max_epochs: int) -> "TrialEndings":
        """A search's (or a resumed search's) record, read from its folder: the instance its copies become."""
        instance = cls(experiment_dir, max_epochs)
        _instances[instance.experiment_dir] = instance
        return instance

    def __reduce__(self):
        if self.experiment_dir is None:
            return TrialEndings, (None, self.max_epochs)
        return _shared, (str(self.experiment_dir), self.max_epochs)

    def observe(self, trial_id: str, result: dict) -> None:
        if reported_epoch(result) is not None:
            self.last_epoch[trial_id] = reported_epoch(result)

    def stopped(self, trial_id: str, epoch: int) -> None:
        """The scheduler stopped the trial after this epoch (at a rung)."""
        self._record(trial_id, Ending(STOPPED, epoch))

    def cut_by_budget(self) -> None:
        """The time budget ended the search: every trial still open ends cut."""
        self.budget_cut = True

    def conclude(self, trial_id: str, last: Optional[dict] = None, errored: bool = False) -> Ending:
        """The trial's ending: the one decided already, else worked out from its last result (or the last epoch
        it reported) and recorded."""
        if trial_id not in self.ended:
            last = last or {}
            if reported_epoch(last) is None and not isinstance(last.get(FAILED_RESULT), str):
                last = {**last, "epoch": self.last_epoch.get(trial_id, 0)}
            self._record(trial_id, conclude(last, errored, self.max_epochs, self.budget_cut))
        return self.ended[trial_id]

    def conclude_open(self, trials: Iterable[tuple[str, Optional[dict]]]) -> None:
        """At the end of a search the budget cut: (trial id, last result) of every trial, those not yet ended too."""
        if self.budget_cut:
            for trial_id, last in trials:
                self.conclude(trial_id, last)

    def words(self, trial_id: str) -> Optional[str]:
        ending = self.ended.get(trial_id)
        return ending.words(self.max_epochs) if ending else None

    def counts(self, trial_ids: Iterable[str]) -> dict[str, int]:
        kinds = [self.ended[t].kind for t in trial_ids if t in self.ended]
        return {kind: kinds.count(kind) for kind in KINDS}

    def _record(self, trial_id: str, ending: Ending) -> None:
        if trial_id in self.ended:  # decided once, where it was decided
            return
        self.ended[trial_id] = ending
        self.last_epoch.pop(trial_id, None)
        if self.experiment_dir is not None and self.experiment_dir.is_dir():
            text = json.dumps({t: asdict(e) for t, e in self.ended.items()}, indent=1)
            atomic_write(self.experiment_dir / ENDINGS, lambda path: path.write_text(text))


_instances: dict[Path, TrialEndings] = {}


def _shared(experiment_dir: str, max_epochs: int) -> TrialEndings:
    folder = resuming() or Path(experiment_dir)
    return _instances.get(folder) or TrialEndings.open(folder, max_epochs)


def read_endings(experiment_dir: Path) -> dict[str, Ending]:
    path = Path(experiment_dir) / ENDINGS
    if not path.is_file():
        return {}
    # An experiment from before this record kept words alone: those trials' table rows still say how they ended.
    return {trial_id: Ending(**fields) for trial_id, fields in json.loads(path.read_text()).items()
            if isinstance(fields, dict)}
