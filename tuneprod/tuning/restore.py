"""What a resumed search rebuilds from its experiment folder. Tuner.restore unpickles the searcher and the
scheduler as they were when the search started; within `resumed_at`, they learn the folder the experiment is in
now and read back what happened since (the study; the results the trials reported)."""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Iterator, Optional

import pandas as pd

_resumed_at: Optional[Path] = None


@contextlib.contextmanager
def resumed_at(experiment_dir: Path) -> Iterator[None]:
    """Around Tuner.restore: the folder the experiment is in now, which may not be where it was searched (and Ray
    restores the searcher's saved state from a staging copy, which does not say)."""
    global _resumed_at
    _resumed_at = Path(experiment_dir)
    try:
        yield
    finally:
        _resumed_at = None


def resuming() -> Optional[Path]:
    return _resumed_at


def reported_epochs(experiment_dir: Path, metric: str) -> list[tuple[str, int, float]]:
    """(trial id, epoch, metric) of every epoch each trial reported, in the order they came (each trial's Ray
    progress.csv, by timestamp); an epoch run again after a restore counts once, as first reported."""
    rows = []
    for progress in Path(experiment_dir).glob("trial_*/progress.csv"):
        table = pd.read_csv(progress)
        if not {"trial_id", "epoch", "timestamp", metric} <= set(table.columns):
            continue
        table = table[table["epoch"].notna()].drop_duplicates("epoch", keep="first")
        rows += [(float(r.timestamp), str(r.trial_id), int(r.epoch), float(getattr(r, metric)))
                 for r in table.itertuples()]
    return [(trial, epoch, value) for _, trial, epoch, value in sorted(rows, key=lambda r: (r[0], r[2]))
            if not math.isinf(value)]
