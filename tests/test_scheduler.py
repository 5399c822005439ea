"""The promoting ASHA rule with hand-written results, then once through Ray: paused trials resume from their
checkpoints and no epoch runs twice."""
import json
import math
import pickle
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import ray
from ray import tune

from ray.tune.search import Searcher

from tuneprod.tuning.restore import resumed_at
from tuneprod.tuning.scheduler import (CONTINUE, STOP, WAIT, PromotingASHA, Rungs, RunningTrialsLimiter,
                                       auto_grace_period, milestones)


@pytest.mark.parametrize("grace, factor, max_epochs, expected", [
    (1, 3, 27, (1, 3, 9)), (2, 2, 10, (2, 4, 8)), (5, 3, 15, (5,)), (3, 3, 9, (3,)), (1, 1.5, 5, (1, 2, 3)),
    (4, 2, 4, ()),
])
def test_milestones_are_the_rungs_below_max_epochs(grace, factor, max_epochs, expected):
    assert milestones(grace, factor, max_epochs) == expected


def test_a_bad_first_trial_waits_and_is_stopped_once_peers_report():
    rungs = Rungs((1, 3), reduction_factor=3)
    assert rungs.arrive("first", 1, 0.1) == WAIT  # alone at the rung: nothing to compare with
    assert rungs.arrive("b", 1, 0.5) == WAIT
    assert rungs.arrive("c", 1, 0.9) == CONTINUE  # 3 at the rung: the best third (c) goes straight on
    assert rungs.next_promotion({"first", "b"}) is None
    assert rungs.losers({"first", "b"}) == [("first", 1), ("b", 1)] and rungs.waiting == {}
    assert rungs.arrive("d", 1, 0.3) == STOP  # the rung is decided: below the best third, stopped at once
    assert rungs.arrive("e", 1, 0.95) == CONTINUE  # 5 at the rung, quota 1: e is the best not yet promoted
    assert rungs.arrive("f", 1, 0.7) == STOP  # 6, quota 2: e and c, both promoted already


def test_trials_tied_with_the_cut_go_on_as_they_cannot_be_told_apart():
    rungs = Rungs((2,), reduction_factor=3)
    assert [rungs.arrive(t, 2, 0.1) for t in "abc"] == [WAIT, WAIT, CONTINUE]  # all at chance: quota 1, all tied
    assert rungs.next_promotion({"a", "b"}) == "a" and rungs.next_promotion({"b"}) == "b"
    assert rungs.arrive("d", 2, 0.05) == STOP


def test_a_first_arrival_that_is_best_is_promoted_from_its_pause_and_the_rest_stop():
    rungs = Rungs((1, 3), reduction_factor=3)
    assert [rungs.arrive(t, 1, score) for t, score in (("a", 0.9), ("b", 0.2), ("c", 0.1))] == [WAIT, WAIT, STOP]
    assert rungs.losers({"a", "b"}) == [("b", 1)]  # a is promotable: it stays to be resumed
    assert rungs.next_promotion({"a"}) == "a" and rungs.next_promotion({"a"}) is None  # promoted once only


def test_promotion_mode_keeps_the_losers_waiting_for_later_arrivals_highest_rung_first():
    rungs = Rungs((1, 3), reduction_factor=2, stop_losers=False)
    assert rungs.arrive("a", 1, 0.8) == WAIT
    assert rungs.arrive("b", 1, 0.1) == WAIT  # 2 at the rung, quota 1: a (waiting) is the one to promote, not b
    assert rungs.losers({"a", "b"}) == []
    assert rungs.next_promotion({"a", "b"}) == "a"
    assert rungs.arrive("c", 1, 0.05) == WAIT
    assert rungs.arrive("d", 1, 0.01) == WAIT  # 4 at the rung, quota 2: b's turn, though it arrived second
    assert rungs.next_promotion({"b", "c", "d"}) == "b"

    rungs = Rungs((1, 3), reduction_factor=2, stop_losers=False)
    for trial, score in (("low1", 0.7), ("hi", 0.9)):
        rungs.arrive(trial, 1, score)
    assert rungs.arrive("top", 3, 0.95) == WAIT  # alone at rung 3
    rungs.arrive("low2", 1, 0.8)
    rungs.arrive("low3", 1, 0.1)  # 4 at rung 1, quota 2: hi and low2
    rungs.arrive("peer", 3, 0.2)  # 2 at rung 3, quota 1: top
    assert rungs.next_promotion({"low2", "top"}) == "top"  # the higher rung first
    assert rungs.next_promotion({"low2", "top"}) == "low2"
    assert rungs.next_promotion({"low1", "low3", "peer"}) is None


def test_a_waiting_trial_that_is_not_paused_yet_is_not_chosen():
    rungs = Rungs((1,), reduction_factor=2)
    rungs.arrive("a", 1, 0.9)
    rungs.arrive("b", 1, 0.1)
    assert rungs.next_promotion(set()) is None  # a is still saving its checkpoint: not PAUSED yet
    assert rungs.next_promotion({"a"}) == "a"


def test_closing_promotes_the_best_of_a_rung_that_promoted_nobody():
    rungs = Rungs((1, 3), reduction_factor=3)
    for trial, score in (("a", 0.5), ("b", 0.9), ("c", 0.4)):
        rungs.arrive(trial, 1, score)
    assert rungs.next_promotion({"a", "b"}) == "b" and rungs.promoted[1] == {"b"}
    assert rungs.arrive("b", 3, 0.95) == WAIT  # alone at rung 3, which will get no peer: the search is out of trials
    assert rungs.closing_promotion({"a", "b"}) == "b"
    assert rungs.closing_promotion({"a"}) is None


def test_nan_ranks_last_and_best_waiting_prefers_the_highest_rung():
    rungs = Rungs((1, 2), reduction_factor=2)
    rungs.arrive("nan", 1, math.nan)
    assert rungs.arrive("ok", 1, 0.01) == CONTINUE
    rungs.arrive("ok", 2, 0.3)
    assert rungs.best_waiting({"nan", "ok"}) == "ok"
    rungs.leave("nan")
    assert rungs.waiting == {}


@pytest.mark.parametrize("train, classes, max_epochs, factor, expected", [
    (38_400, 1000, 10, 3, 1),  # the contest: 38 photos a class each epoch
    (1_528, 764, 15, 3, 5),  # 2 a class: would want 10 epochs, capped to leave a rung below 15
    (120, 10, 10, 2, 2),  # the demo: 12 a class
    (10, 10, 2, 3, 1),  # no rung fits: at least 1
])
def test_auto_grace_period_from_the_data_size(train, classes, max_epochs, factor, expected):
    assert auto_grace_period(train, classes, max_epochs, factor) == expected


@pytest.mark.parametrize("warmup, expected", [(0.0, 1), (1.0, 2), (0.5, 2), (2.5, 4), (20.0, 10)])
def test_auto_grace_period_comes_a_whole_epoch_after_the_longest_warm_up(warmup, expected):
    """The contest's size wants 1 epoch; a rung during the warm-up would rank the learning rates' ramps (capped at
    max_epochs // reduction_factor, 10 here)."""
    assert auto_grace_period(38_400, 1000, 30, 3, warmup) == expected


# ------------------------------------------------------------------------------------------ through Ray
def _trainable(config):
    """Reports val_acc = config's quality each epoch; its state (epochs trained) lives in the checkpoint."""
    epoch, log = 0, Path(config["log"])
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            epoch = json.loads((Path(folder) / "state.json").read_text())["epoch"]
    while epoch < 4:
        epoch += 1
        with log.open("a") as out:
            out.write(f"{config['quality']} {epoch}\n")
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "state.json").write_text(json.dumps({"epoch": epoch}))
            tune.report({"epoch": epoch, "val_acc": config["quality"]},
                        checkpoint=tune.Checkpoint.from_directory(folder))


# One at a time, in grid order. 0.1 waits at rung 1. Stopping mode: 0.9 makes two, goes on and waits at rung 2; 0.1,
# then 0.5 and 0.3 stop at rung 1; 0.9, alone at rung 2 when the trials run out, is promoted and resumes. Promotion
# mode: 0.5 waits until 0.3 arrives (4 at the rung, quota 2), is promoted, resumes at epoch 2 and waits below 0.9.
@pytest.mark.slow
@pytest.mark.parametrize("stop_losers, expected", [(True, {0.1: 1, 0.9: 4, 0.5: 1, 0.3: 1}),
                                                   (False, {0.1: 1, 0.9: 4, 0.5: 2, 0.3: 1})])
def test_paused_trials_resume_from_their_checkpoints_and_the_bad_ones_end_at_the_first_rung(tmp_path, stop_losers,
                                                                                            expected):
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        log = tmp_path / "epochs.log"
        tuner = tune.Tuner(
            _trainable,
            param_space={"quality": tune.grid_search([0.1, 0.9, 0.5, 0.3]), "log": str(log)},
            tune_config=tune.TuneConfig(scheduler=PromotingASHA("val_acc", "max", max_epochs=4, grace_period=1,
                                                                reduction_factor=2, stop_losers=stop_losers),
                                        reuse_actors=False),
            run_config=tune.RunConfig(storage_path=str(tmp_path / "runs"), verbose=0,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
        grid = tuner.fit()
    finally:
        ray.shutdown()
    runs = [tuple(line.split()) for line in log.read_text().splitlines()]
    assert len(runs) == len(set(runs)), "an epoch ran twice: a resumed trial did not start from its checkpoint"
    epochs = {float(q): max(int(e) for qq, e in runs if qq == q) for q, _ in runs}
    assert epochs == expected
    assert all(sorted(int(e) for qq, e in runs if float(qq) == q) == list(range(1, n + 1)) for q, n in epochs.items())
    assert not any(result.error for result in grid)


class CountingSearcher(Searcher):
    def __init__(self):
        super().__init__(metric="val_acc", mode="max")
        self.asked = 0

    def suggest(self, trial_id):
        self.asked += 1
        return {"lr": 0.1}

    def on_trial_complete(self, trial_id, result=None, error=False):
        pass


def test_max_concurrent_trials_does_not_count_trials_waiting_at_a_rung():
    rungs = Rungs((1,), reduction_factor=3)
    limiter = RunningTrialsLimiter(CountingSearcher(), max_concurrent=2, rungs=rungs)
    assert limiter.suggest("a") and limiter.suggest("b")
    assert limiter.suggest("c") is None  # two running: the limit
    rungs.arrive("a", 1, 0.5)  # a waits, paused: its slot is free
    assert limiter.suggest("c") == {"lr": 0.1}
    assert limiter.suggest("d") is None
    limiter.on_trial_complete("b")
    assert limiter.suggest("d") == {"lr": 0.1}


class FakeTrial:
    def __init__(self, trial_id, status):
        self.trial_id, self.status = trial_id, status

    def set_status(self, status):
        self.status = status


class FakeController:
    """What PromotingASHA reads of Ray's TuneController: the trials, whether the searcher is done, stop_trial."""

    def __init__(self, trials, finished):
        self.trials, self.stopped = trials, []
        self.search_alg = type("SearchAlg", (), {"is_finished": lambda _: finished})()

    def get_trials(self):
        return self.trials

    def stop_trial(self, trial):
        self.stopped.append(trial.trial_id)
        trial.status = "TERMINATED"


def scheduler_with(arrivals, max_concurrent=None):
    scheduler = PromotingASHA("val_acc", "max", max_epochs=9, grace_period=1, reduction_factor=3,
                              max_concurrent=max_concurrent)
    for trial, rung, score in arrivals:
        scheduler.rungs.arrive(trial, rung, score)
    return scheduler


def test_choosing_promotes_before_starting_new_trials_and_respects_the_concurrency_limit():
    scheduler = scheduler_with([("a", 1, 0.9), ("b", 1, 0.2), ("c", 1, 0.1)])  # 3 at rung 1: a is promotable
    a, new = FakeTrial("a", "PAUSED"), FakeTrial("new", "PENDING")
    assert scheduler.choose_trial_to_run(FakeController([a, new], finished=False)) is a
    assert scheduler.choose_trial_to_run(FakeController([a, new], finished=False)) is new  # a promoted once only
    limited = scheduler_with([("a", 1, 0.9), ("b", 1, 0.2), ("c", 1, 0.1)], max_concurrent=1)
    busy = [FakeTrial("a", "PAUSED"), FakeTrial("x", "RUNNING")]
    assert limited.choose_trial_to_run(FakeController(busy, finished=False)) is None


def test_at_the_end_a_rung_that_promoted_nobody_promotes_its_best_and_the_rest_are_stopped():
    scheduler = scheduler_with([("a", 1, 0.9), ("b", 1, 0.2), ("c", 1, 0.1)])
    scheduler.rungs.next_promotion({"a"})
    scheduler.rungs.arrive("a", 3, 0.95)  # alone at rung 3
    trials = [FakeTrial(t, "PAUSED") for t in "abc"]
    controller = FakeController(trials, finished=True)
    assert scheduler.choose_trial_to_run(controller) is trials[0]  # a: the best of a rung that promoted nobody
    trials[0].status = "TERMINATED"
    assert scheduler.choose_trial_to_run(controller) is None
    assert controller.stopped == ["b", "c"]


def test_while_a_trial_runs_nobody_waiting_is_stopped():
    scheduler = scheduler_with([("b", 1, 0.2)])
    controller = FakeController([FakeTrial("b", "PAUSED"), FakeTrial("r", "RUNNING")], finished=True)
    assert scheduler.choose_trial_to_run(controller) is None and controller.stopped == []


def progress_csv(folder, trial_id, rows):
    """A trial's progress.csv as Ray writes it: (timestamp, epoch, val_acc) per report."""
    (folder / f"trial_{trial_id}").mkdir(parents=True)
    pd.DataFrame([{"epoch": e, "val_acc": v, "timestamp": t, "trial_id": trial_id} for t, e, v in rows]) \
        .to_csv(folder / f"trial_{trial_id}" / "progress.csv", index=False)


def test_a_resumed_search_replays_its_rungs_and_decides_as_if_never_interrupted(tmp_path):
    # rf 2, rungs at epochs 1 and 2. Before the interruption: a waits at rung 1 (alone there), b beats it (goes on;
    # a is stopped), c is worse than b (stopped), b reaches rung 2 and waits; its retried epoch 1 counts once.
    progress_csv(tmp_path, "a", [(100, 1, 0.5)])
    progress_csv(tmp_path, "b", [(101, 1, 0.7), (103, 2, 0.8), (104, 1, 0.1)])
    progress_csv(tmp_path, "c", [(102, 1, 0.6)])
    uninterrupted = PromotingASHA("val_acc", "max", max_epochs=4, grace_period=1, reduction_factor=2)
    for trial, rung, value in (("a", 1, 0.5), ("b", 1, 0.7), ("c", 1, 0.6), ("b", 2, 0.8)):
        uninterrupted.rungs.arrive(trial, rung, value)
    uninterrupted.rungs.leave("a")

    saved = pickle.dumps(PromotingASHA("val_acc", "max", max_epochs=4, grace_period=1, reduction_factor=2))
    fresh = pickle.loads(saved)  # what Ray's restore alone gives: empty rungs
    with resumed_at(tmp_path):
        resumed = pickle.loads(saved)
    assert resumed.rungs.scores == uninterrupted.rungs.scores and resumed.rungs.promoted == {1: {"b"}, 2: set()}
    # After the resume, e reports 0.55 at rung 1: below the best half of five, it stops, as it would have in the
    # uninterrupted run; on empty rungs it would wait, alone, and d (0.9 at rung 2) would wait too.
    for scheduler in (uninterrupted, resumed):
        assert scheduler.rungs.arrive("e", 1, 0.55) == STOP and scheduler.rungs.arrive("d", 2, 0.9) == CONTINUE
    assert fresh.rungs.arrive("e", 1, 0.55) == WAIT and fresh.rungs.arrive("d", 2, 0.9) == WAIT


def test_after_a_resume_a_trial_that_waited_still_waits_though_ray_brings_it_back_pending():
    scheduler = scheduler_with([("w", 1, 0.5)])  # waiting at rung 1 when the search was interrupted
    w, new = FakeTrial("w", "PENDING"), FakeTrial("new", "PENDING")
    controller = FakeController([w, new], finished=False)
    for trial in (w, new):  # as Tuner.restore adds them back
        scheduler.on_trial_add(controller, trial)
    assert (w.status, new.status) == ("PAUSED", "PENDING")
    assert scheduler.choose_trial_to_run(controller) is new  # not w: it has not been promoted
    new.status = "RUNNING"
    assert scheduler.choose_trial_to_run(controller) is None  # w waits while a trial runs
    scheduler.rungs.arrive("x", 1, 0.1)
    scheduler.rungs.arrive("y", 1, 0.2)
    new.status = "TERMINATED"
    assert scheduler.choose_trial_to_run(controller) is w  # promoted: the best third of its rung


def test_after_a_resume_the_searcher_counts_only_the_trials_ray_restored(tmp_path):
    """A driver lost between Ray's two uploads (searcher state, trials' state) leaves a searcher that counts a trial
    the restored state lacks: the first step after the resume counts the trials Ray holds, once."""
    from types import SimpleNamespace

    from tuneprod.tuning.restore import resumed_at
    from tuneprod.tuning.scheduler import ResumableFIFO

    for scheduler in (ResumableFIFO(), PromotingASHA("val_acc", "max", max_epochs=4, grace_period=1,
                                                     reduction_factor=2)):
        assert not pickle.loads(pickle.dumps(scheduler))._recount  # a search that was not resumed
        with resumed_at(tmp_path):
            restored = pickle.loads(pickle.dumps(scheduler))
        held = [SimpleNamespace(status="TERMINATED", trial_id=str(n)) for n in range(9)]
        generator = SimpleNamespace(_counter=10, is_finished=lambda: False)
        controller = SimpleNamespace(search_alg=generator, get_trials=lambda: held, stop_trial=lambda trial: None)
        restored.recount(controller)
        assert generator._counter == 9
        generator._counter = 12  # later suggestions are the searcher's own again
        restored.recount(controller)
        assert generator._counter == 12
