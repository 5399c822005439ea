"""The results table (one row per trial) and the best configuration, from what the trials reported."""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import optuna
import pandas as pd
import yaml

from tuneprod.files import atomic_write
from tuneprod.spec import PARAMS
from tuneprod.tuning.endings import FAILED_RESULT, STOPPED, CUT, TrialEndings

TRIALS_PARQUET = "trials.parquet"
TRIALS_CSV = "trials.csv"
BEST_CONFIG = "best_config.yaml"
STUDY_DB = "study.db"  # the search's Optuna study (tuning/study.py writes it; the dashboard and report read it)
RAY_TRIAL_ID = "ray_trial_id"  # the user attribute that ties an Optuna trial to its row of trials.parquet
LOST = "lost"  # user attribute of a trial the driver asked for but Ray never recorded (a driver killed hard)


@dataclass
class TrialRecord:
    """One trial as the table needs it: its sampled parameters, per-epoch reports and error, if any."""

    trial_id: str
    params: dict
    history: list[dict] = field(default_factory=list)
    error: Optional[str] = None


def records_from_grid(grid, param_names: list[str], proposed: Optional[dict[str, dict]] = None) -> list[TrialRecord]:
    """Reads a Ray ResultGrid; trials that never reported (errored, or cut before their first report) still get a
    row, with the parameters the searcher proposed for them (`proposed`: trial id -> parameters)."""
    records = []
    for result in grid:
        history = [] if result.metrics_dataframe is None else result.metrics_dataframe.to_dict("records")
        trial_id = (result.metrics or {}).get("trial_id") or _trial_id_from_path(result.path)
        config = result.config or (proposed or {}).get(trial_id) or {}
        params = {k: v for k, v in config.items() if k in param_names}
        error = None if result.error is None else _first_line(result.error)
        failure = history[-1].get(FAILED_RESULT) if history else None
        records.append(TrialRecord(trial_id, params, history, failure if isinstance(failure, str) else error))
    return records


def proposed_params(study: Optional[optuna.Study], fixed: dict) -> dict[str, dict]:
    """Ray trial id -> the parameters the searcher proposed (the study's sampled values and the space's fixed
    ones): what a trial that never reported ran with."""
    if study is None:
        return {}
    return {trial.user_attrs[RAY_TRIAL_ID]: {**fixed, **trial.params} for trial in study.get_trials(deepcopy=False)
            if RAY_TRIAL_ID in trial.user_attrs}


def _trial_id_from_path(path: str) -> str:
    match = re.search(r"_([0-9a-f]{5}_\d{5})", os.path.basename(str(path)))
    return match.group(1) if match else os.path.basename(str(path))


def _first_line(error: BaseException) -> str:
    """The root cause's message: Ray wraps the trial's exception in its own."""
    return describe(getattr(error, "cause", None) or error)


def describe(error: BaseException) -> str:
    """One line: the exception's type and the last line of its message (where tracebacks put the point)."""
    text = f"{type(error).__name__}: {error}".strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def trials_table(records: list[TrialRecord], param_names: list[str], metric: str, mode: str,
                 endings: TrialEndings) -> pd.DataFrame:
    """One row per trial, best first: parameters, best metrics and the epoch they peaked, and how it ended (as
    the search recorded it; a trial the record lacks is concluded by its rule from its last report)."""
    rows = [_row(record, param_names, metric, mode, endings) for record in records]
    columns = (["trial_id", "status"] + param_names +
               ["val_acc", "val_loss", "best_epoch", "epochs_run", "stopped_early", "ended", "wall_time_s",
                "images_per_s", "error"])
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values(metric, ascending=mode == "min", na_position="last", kind="stable").reset_index(drop=True)


def _row(record: TrialRecord, param_names: list[str], metric: str, mode: str, endings: TrialEndings) -> dict:
    reported = [h for h in record.history if _finite(h.get(metric))]
    best = (max if mode == "max" else min)(reported, key=lambda h: h[metric]) if reported else {}
    last = record.history[-1] if record.history else {}
    completed = [h for h in record.history if _finite(h.get("epoch"))]  # not a failure's last report
    speeds = [h["images_per_s"] for h in record.history if _finite(h.get("images_per_s"))]
    epochs_run = int(completed[-1]["epoch"]) if completed else 0
    ending = endings.conclude(record.trial_id, last if last else None, errored=record.error is not None)
    return {
        "trial_id": record.trial_id,
        "status": "ERROR" if record.error else "TERMINATED",
        **{name: record.params.get(name) for name in param_names},
        "val_acc": max((h["val_acc"] for h in record.history if _finite(h.get("val_acc"))), default=None),
        "val_loss": min((h["val_loss"] for h in record.history if _finite(h.get("val_loss"))), default=None),
        "best_epoch": int(best["epoch"]) if best else None,
        "epochs_run": epochs_run,
        "stopped_early": ending.kind in (STOPPED, CUT),
        "ended": ending.words(endings.max_epochs),
        "wall_time_s": last.get("time_total_s"),
        "images_per_s": sum(speeds) / len(speeds) if speeds else None,
        "error": record.error,
    }


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def usable_trials(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The trials that may be retrained, best first (the table's order). A failed trial is never one, even one that
    peaked before its loss diverged: retraining its configuration would most likely fail the same way."""
    usable = table[table[metric].notna() & (table["status"] == "TERMINATED")]
    if usable.empty:
        raise ValueError("no trial reported a result: every trial failed; see the error column of trials.csv")
    return usable


def furthest_trained(usable: pd.DataFrame, count: int) -> pd.DataFrame:
    """The trials that ran at least as many epochs as the `count`-th furthest, in the table's order: those whose
    validation predictions compare. One stopped at an early rung is a snapshot of a schedule it never finished, and
    the member retrained from it is another model."""
    least = usable["epochs_run"].nlargest(max(count, 1)).min()
    return usable[usable["epochs_run"] >= least]


def best_row(table: pd.DataFrame, metric: str) -> pd.Series:
    return usable_trials(table, metric).iloc[0]


def top_distinct(table: pd.DataFrame, metric: str, param_names: list[str], k: int) -> list[pd.Series]:
    """The k best usable trials whose configurations differ: a configuration tried twice (a start_from point that
    TPE proposes again) is one member, at its better trial. Ties keep the table's order."""
    usable = usable_trials(table, metric)
    chosen, seen = [], set()
    for _, row in usable.iterrows():
        key = configuration_key(row, param_names)
        if key not in seen:
            seen.add(key)
            chosen.append(row)
        if len(chosen) == k:
            break
    return chosen


def configuration_key(row: pd.Series, param_names: list[str]) -> tuple:
    """What makes two trials one configuration: their active parameters."""
    return tuple(sorted(params_of(row, param_names).items()))


def params_of(row: pd.Series, param_names: list[str]) -> dict:
    """The trial's active parameters with their declared types (parquet stores an int column with gaps as float)."""
    params = {}
    for name in param_names:
        value = row.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue  # a conditional parameter that was not active in this trial
        value = value.item() if hasattr(value, "item") else value  # numpy scalar -> Python
        kind = PARAMS[name].kind
        params[name] = kind(value) if kind in (int, float) else value
    return params


def write_results(experiment_dir: Path, table: pd.DataFrame, param_names: list[str], metric: str) -> None:
    atomic_write(experiment_dir / TRIALS_PARQUET, lambda path: table.to_parquet(path, index=False))
    atomic_write(experiment_dir / TRIALS_CSV, lambda path: table.to_csv(path, index=False))
    try:
        best = best_row(table, metric)
    except ValueError:
        return
    header = (f"# Best trial {best['trial_id']}: {metric} {best[metric]:.4f} at epoch {best['best_epoch']} "
              f"of {best['epochs_run']}.\n# Usable as an entry of search.start_from.\n")
    text = header + yaml.safe_dump(params_of(best, param_names), sort_keys=False)
    atomic_write(experiment_dir / BEST_CONFIG, lambda path: path.write_text(text))


def read_table(experiment_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(experiment_dir / TRIALS_PARQUET)


def study_storage(experiment_dir: Path, pooled: bool = True) -> optuna.storages.RDBStorage:
    """`pooled`: False opens the file anew for every request (a dashboard whose file is replaced by a newer
    snapshot)."""
    # A dashboard may read while the search writes: wait for SQLite's lock rather than fail.
    options = {"connect_args": {"timeout": 60}}
    if not pooled:
        from sqlalchemy.pool import NullPool

        options["poolclass"] = NullPool
    return optuna.storages.RDBStorage(f"sqlite:///{Path(experiment_dir).absolute() / STUDY_DB}",
                                      engine_kwargs=options)


def load_study(experiment_dir: Path) -> Optional[optuna.Study]:
    """The experiment's study, or None for an experiment from before studies were kept."""
    if not (Path(experiment_dir) / STUDY_DB).is_file():
        return None
    storage = study_storage(experiment_dir)
    names = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=names[0], storage=storage) if names else None
