"""The study a search keeps in its folder, driven by hand the way Ray's controller drives a searcher: states as the
dashboard shows them, the rung value a stopped trial ended on, and a resume that neither asks a start point twice
nor leaves a trial RUNNING."""
import pickle
import shutil

import pytest
from optuna.trial import TrialState

from tuneprod.tuning.endings import TrialEndings
from tuneprod.tuning.results import LOST, RAY_TRIAL_ID, load_study
from tuneprod.tuning.restore import resumed_at
from tuneprod.tuning.study import StudySearch, close_open_trials

START = {"lr": 0.01, "batch_size": 16}


def space(trial):
    trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    trial.suggest_categorical("batch_size", [16, 32])


def searcher(folder, start=(START,)) -> StudySearch:
    folder.mkdir(exist_ok=True)
    return StudySearch(folder, "exp", TrialEndings.open(folder, 4), {"rungs": [1, 2]}, space=space, metric="val_acc",
                       mode="max",
                       points_to_evaluate=[dict(p) for p in start] or None)


def report(search, trial_id, epoch, value):
    result = {"val_acc": value, "epoch": epoch, "training_iteration": epoch}
    search.on_trial_result(trial_id, result)
    search._endings.observe(trial_id, result)  # as the console view does with every result
    return result


def test_each_ending_has_its_state_and_every_epoch_its_value(tmp_path):
    search = searcher(tmp_path)
    assert search.suggest("a") == START  # the start point first
    for trial_id in "bcd":
        search.suggest(trial_id)
    for epoch in range(1, 5):
        last = report(search, "a", epoch, 0.1 * epoch)
    search.on_trial_complete("a", last)
    report(search, "b", 1, 0.05)
    # The scheduler stops b on its second report: Ray hands that result to on_trial_complete only.
    search.on_trial_complete("b", {"val_acc": 0.07, "epoch": 2, "training_iteration": 2})
    report(search, "c", 1, 0.3)
    search.on_trial_complete("c", None, error=True)
    search._endings.cut_by_budget()
    search.on_trial_complete("d", None)  # cut by the time budget before its first report

    study = load_study(tmp_path)
    assert study.user_attrs == {"rungs": [1, 2]}
    trials = {t.user_attrs[RAY_TRIAL_ID]: t for t in study.trials}
    assert {k: t.state for k, t in trials.items()} == {"a": TrialState.COMPLETE, "b": TrialState.PRUNED,
                                                       "c": TrialState.FAIL, "d": TrialState.PRUNED}
    assert trials["a"].value == pytest.approx(0.4) and len(trials["a"].intermediate_values) == 4
    assert trials["b"].intermediate_values == {1: 0.05, 2: 0.07} and trials["b"].value == pytest.approx(0.07)
    assert trials["d"].value is None
    assert [search._endings.words(t) for t in "abcd"] == [
        "ran all 4 epochs", "stopped by the scheduler after epoch 2", "failed in epoch 2",
        "cut by the time budget before its first report"]


def test_trials_ray_ends_without_telling_the_searcher_take_their_state_from_the_record(tmp_path):
    """The budget's cut reaches neither the searcher nor the callbacks: at the end, the study follows the record."""
    search = searcher(tmp_path)
    for trial_id in "abc":
        search.suggest(trial_id)
    for epoch in range(1, 5):
        report(search, "a", epoch, 0.1 * epoch)
    report(search, "b", 1, 0.3)
    endings = search._endings
    endings.conclude("a", {"epoch": 4})
    endings.cut_by_budget()
    endings.conclude("b", {"epoch": 1})
    close_open_trials(load_study(tmp_path), endings)
    states = {t.user_attrs[RAY_TRIAL_ID]: (t.state, t.value) for t in load_study(tmp_path).trials}
    assert states == {"a": (TrialState.COMPLETE, pytest.approx(0.4)), "b": (TrialState.PRUNED, pytest.approx(0.3)),
                      "c": (TrialState.RUNNING, None)}  # c: no ending recorded, left as it is


def test_a_resumed_search_reopens_the_moved_folder_and_ends_lost_trials(tmp_path):
    search = searcher(tmp_path / "old")
    search.suggest("a")
    report(search, "a", 1, 0.2)
    (tmp_path / "old_staging_copy").mkdir()  # Ray restores the searcher from a staging copy of the folder
    search.save_to_dir(str(tmp_path / "old_staging_copy"), "s1")
    search.suggest("lost")  # asked for after the last save: the driver died before Ray recorded it
    shutil.move(tmp_path / "old", tmp_path / "new")

    with resumed_at(tmp_path / "new"):  # as Tuner.restore unpickles it; then Ray restores its saved state
        restored = pickle.loads(pickle.dumps(search))
    restored.restore_from_dir(str(tmp_path / "old_staging_copy"))
    report(restored, "a", 2, 0.4)
    restored.suggest("b")
    restored.on_trial_complete("a", {"val_acc": 0.4, "epoch": 4, "training_iteration": 4})

    study = load_study(tmp_path / "new")
    trials = {t.user_attrs[RAY_TRIAL_ID]: t for t in study.trials}
    assert set(trials) == {"a", "lost", "b"}
    assert trials["a"].state == TrialState.COMPLETE and trials["a"].intermediate_values == {1: 0.2, 2: 0.4}
    assert trials["lost"].state == TrialState.FAIL and trials["lost"].user_attrs[LOST]
    assert trials["b"].state == TrialState.RUNNING
    assert [t.params for t in study.trials].count(START) == 1  # the start point was asked once


def test_a_trial_the_study_has_ended_already_ends_again_quietly(tmp_path):
    """A bucket's study newer than Ray's state: a trial the study has ended comes back from Ray's state paused,
    and is stopped again. Optuna raises when told twice (and Ray, seeing the error, would retry the trial)."""
    search = searcher(tmp_path)
    search.suggest("a")
    report(search, "a", 1, 0.2)
    search.on_trial_complete("a", {"val_acc": 0.2, "epoch": 1, "training_iteration": 1})
    older = pickle.loads(pickle.dumps(search))  # the searcher as Ray's older state holds it: a not yet ended
    older._completed_trials.discard("a")
    with resumed_at(tmp_path):
        restored = pickle.loads(pickle.dumps(older))
    restored.on_trial_complete("a")  # stopped again, as Ray's controller stops a paused trial
    (trial,) = load_study(tmp_path).trials
    assert trial.state == TrialState.PRUNED and trial.intermediate_values == {1: 0.2}
