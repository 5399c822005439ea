"""The results table and the choice of best trial, from hand-picked numbers."""
import math

import pandas as pd
import pytest
import yaml

from tuneprod.tuning.endings import TrialEndings
from tuneprod.tuning.results import (
    BEST_CONFIG,
    TRIALS_CSV,
    TRIALS_PARQUET,
    TrialRecord,
    best_row,
    params_of,
    trials_table,
    write_results,
)

NAMES = ["optimizer", "momentum", "batch_size"]


def history(accs, losses=None, speed=100.0):
    losses = losses or [1.0 - a for a in accs]
    return [{"epoch": i + 1, "val_acc": a, "val_loss": l, "images_per_s": speed, "time_total_s": 2.0 * (i + 1)}
            for i, (a, l) in enumerate(zip(accs, losses))]


RECORDS = [
    TrialRecord("a", {"optimizer": "adamw", "batch_size": 32}, history([0.5, 0.7, 0.6, 0.65])),
    TrialRecord("b", {"optimizer": "sgd", "momentum": 0.9, "batch_size": 16}, history([0.3]), None),
    TrialRecord("c", {"optimizer": "sgd", "momentum": 0.8, "batch_size": 64}, history([0.4, 0.8], [0.9, 0.5])),
    TrialRecord("d", {"optimizer": "adamw", "batch_size": 8}, history([0.2, float("nan")]), "NonFiniteLoss: nan"),
    TrialRecord("e", {"optimizer": "adam", "batch_size": 128}, [], "OutOfMemoryError: CUDA out of memory"),
]


def test_table_rows_best_first_with_peak_epoch_and_early_stops():
    table = trials_table(RECORDS, NAMES, "val_acc", "max", TrialEndings(None, 4))
    assert table["trial_id"].tolist() == ["c", "a", "b", "d", "e"]
    by_id = table.set_index("trial_id")
    assert by_id.loc["a", "best_epoch"] == 2 and by_id.loc["a", "val_acc"] == 0.7
    assert by_id.loc["a", "epochs_run"] == 4 and not by_id.loc["a", "stopped_early"]
    assert by_id.loc["b", "stopped_early"] and by_id.loc["c", "stopped_early"]
    assert by_id.loc["d", "status"] == "ERROR" and not by_id.loc["d", "stopped_early"]
    assert by_id.loc["d", "val_acc"] == 0.2  # the NaN epoch does not count
    assert by_id.loc["e", "epochs_run"] == 0 and math.isnan(by_id.loc["e", "val_acc"])
    assert by_id.loc["a", "wall_time_s"] == 8.0 and by_id.loc["a", "images_per_s"] == 100.0
    assert by_id.loc["e", "error"].startswith("OutOfMemoryError")
    assert pd.isna(by_id.loc["a", "momentum"]) and by_id.loc["c", "momentum"] == 0.8


def test_minimised_metric_picks_lowest_loss():
    table = trials_table(RECORDS, NAMES, "val_loss", "min", TrialEndings(None, 4))
    assert table.iloc[0]["trial_id"] == "a"  # loss 0.3 at epoch 2 beats c's 0.5
    assert table.iloc[0]["best_epoch"] == 2


def test_a_failed_trial_is_never_best_even_with_the_top_metric():
    diverged = TrialRecord("x", {"optimizer": "sgd", "momentum": 0.9, "batch_size": 8}, history([0.95]),
                           "NonFiniteLoss: nan")
    table = trials_table(RECORDS + [diverged], NAMES, "val_acc", "max", TrialEndings(None, 4))
    assert table.iloc[0]["trial_id"] == "x" and best_row(table, "val_acc")["trial_id"] == "c"


def test_best_row_skips_trials_without_results_and_fails_when_none_have_any():
    table = trials_table(RECORDS[4:], NAMES, "val_acc", "max", TrialEndings(None, 4))
    with pytest.raises(ValueError, match="every trial failed"):
        best_row(table, "val_acc")


def test_written_files_round_trip_with_types(tmp_path):
    table = trials_table(RECORDS, NAMES, "val_acc", "max", TrialEndings(None, 4))
    write_results(tmp_path, table, NAMES, "val_acc")
    again = pd.read_parquet(tmp_path / TRIALS_PARQUET)
    assert len(pd.read_csv(tmp_path / TRIALS_CSV)) == 5
    best = params_of(best_row(again, "val_acc"), NAMES)
    assert best == {"optimizer": "sgd", "momentum": 0.8, "batch_size": 64}
    assert type(best["batch_size"]) is int
    assert yaml.safe_load((tmp_path / BEST_CONFIG).read_text()) == best
    assert "epoch 2" in (tmp_path / BEST_CONFIG).read_text().splitlines()[0]
    inactive = params_of(again.set_index("trial_id").loc["a"], NAMES)
    assert "momentum" not in inactive and type(inactive["batch_size"]) is int


def test_a_trials_own_failure_is_its_last_result_and_reads_as_an_error():
    from types import SimpleNamespace

    from tuneprod.tuning.endings import FAILED_IN_EPOCH, FAILED_RESULT
    from tuneprod.tuning.results import records_from_grid

    rows = history([0.3, 0.4]) + [{FAILED_RESULT: "NonFiniteLoss: the loss is nan", FAILED_IN_EPOCH: 3,
                                   "val_acc": math.nan, "val_loss": math.nan, "epoch": math.nan}]
    grid = [SimpleNamespace(metrics_dataframe=pd.DataFrame(rows), metrics={"trial_id": "f"}, path="/x/trial_f",
                            config={"optimizer": "sgd", "lr": 0.1}, error=None)]
    records = records_from_grid(grid, NAMES)
    assert records[0].error == "NonFiniteLoss: the loss is nan" and records[0].params == {"optimizer": "sgd"}
    row = trials_table(records, NAMES, "val_acc", "max", TrialEndings(None, 4)).iloc[0]
    assert row["status"] == "ERROR" and row["epochs_run"] == 2 and row["val_acc"] == pytest.approx(0.4)
    assert row["ended"] == "failed in epoch 3"


def test_the_ended_column_reads_the_record_and_a_trial_that_never_reported_keeps_its_proposed_parameters():
    """The budget cut g after epoch 1 and h before its first report; Ray gives h no config (it never reported),
    so its parameters come from what the searcher proposed."""
    from types import SimpleNamespace

    from tuneprod.tuning.results import records_from_grid

    endings = TrialEndings(None, 4)
    endings.stopped("b", 1)
    endings.cut_by_budget()
    grid = [SimpleNamespace(metrics_dataframe=pd.DataFrame(history([0.3])), metrics={"trial_id": "g"},
                            path="/x/trial_g", config={"optimizer": "adam", "batch_size": 16}, error=None),
            SimpleNamespace(metrics_dataframe=None, metrics={}, path="/x/exp/trial_0a1b2_00007", config=None,
                            error=None)]
    proposed = {"0a1b2_00007": {"optimizer": "sgd", "momentum": 0.5, "batch_size": 8, "lr": 0.1}}
    records = records_from_grid(grid, NAMES, proposed) + RECORDS[:2]
    table = trials_table(records, NAMES, "val_acc", "max", endings).set_index("trial_id")
    assert table.loc["g", "ended"] == "cut by the time budget after epoch 1"
    assert table.loc["0a1b2_00007", "ended"] == "cut by the time budget before its first report"
    assert table.loc["0a1b2_00007", ["optimizer", "momentum", "batch_size"]].tolist() == ["sgd", 0.5, 8]
    assert table.loc["b", "ended"] == "stopped by the scheduler after epoch 1"  # decided before the cut
    assert table.loc["a", "ended"] == "ran all 4 epochs"
    assert table[["stopped_early"]].loc[["g", "0a1b2_00007", "b"]].all().item()
