"""The search's one console view, driven with hand-made trials and a hand-set clock."""
import io
import json
from types import SimpleNamespace

import pytest

from tuneprod.tuning import console
from tuneprod.tuning.console import SearchView
from tuneprod.tuning.endings import ENDINGS, TrialEndings


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Pipe(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(console.time, "monotonic", clock)
    return clock


def trial(trial_id, status, epoch=None, folder="."):
    return SimpleNamespace(trial_id=trial_id, status=status, last_result={"epoch": epoch} if epoch else {},
                           storage=SimpleNamespace(experiment_fs_path=str(folder)))


def test_plain_output_is_a_line_per_change_at_most_every_15_s(tmp_path, clock):
    out = Pipe(tty=False)
    view = SearchView(num_samples=4, metric="val_acc", mode="max", endings=TrialEndings(tmp_path, 2), out=out)
    trials = [trial("t1", "RUNNING", 1, tmp_path), trial("t2", "RUNNING", 1, tmp_path), trial("t3", "PENDING")]
    view.on_trial_result(0, trials, trials[0], {"val_acc": 0.4, "epoch": 1})
    view.on_trial_result(0, trials, trials[1], {"val_acc": 0.6, "epoch": 1})
    view.on_step_end(0, trials)
    for _ in range(4):  # a busy second of steps prints nothing more
        clock.now += 0.25
        view.on_step_end(0, trials)
    assert out.getvalue().count("\n") == 1
    clock.now += 20
    trials[0].status, trials[0].last_result = "TERMINATED", {"epoch": 1}
    view.on_trial_complete(0, trials, trials[0])
    trials[1].status = "ERROR"
    view.on_trial_error(0, trials, trials[1])
    view.on_step_end(0, trials)
    clock.now += 20
    view.on_step_end(0, trials)  # nothing changed: no line
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    # 2 epochs in 21 s; 2 trials to go at 1 epoch each (as the ended ones): 21 s.
    assert lines[1] == ("search 0:21, ~0:21 left | 2/4 trials done: 1 stopped, 1 failed, 1 pending | "
                        "best val_acc 0.6000 (trial t2, epoch 1)")
    assert json.loads((tmp_path / ENDINGS).read_text()) == {"t1": {"kind": "stopped", "epoch": 1},
                                                          "t2": {"kind": "failed", "epoch": 2}}
    clock.now += console.PLAIN_QUIET_S
    view.on_step_end(0, trials)  # a long quiet spell still gets a line
    assert len(out.getvalue().splitlines()) == 3


def test_a_terminal_gets_one_line_rewritten_in_place(clock):
    out = Pipe(tty=True)
    budget = SimpleNamespace(budget_s=600, stopped=False, used_s=lambda: clock.now - 1000)
    view = SearchView(num_samples=2, metric="val_loss", mode="min", endings=TrialEndings(None, 2), budget=budget,
                      out=out)
    trials = [trial("t1", "RUNNING", 1)]
    for value in (0.9, 0.5, 0.7):
        view.on_trial_result(0, trials, trials[0], {"val_loss": value, "epoch": 1})
        clock.now += 1.5
        view.on_step_end(0, trials)
    view.on_experiment_end(trials)
    text = out.getvalue()
    assert "\n" not in text.rstrip("\n") and text.count("\r") == 7  # to the start before and after each line
    assert "search 0:04 of 10:00 budget | 0/2 trials done: 1 running | best val_loss 0.5000 (trial t1" in text


def test_with_verbose_it_only_records_the_endings(tmp_path, clock):
    out = Pipe(tty=False)
    endings = TrialEndings(tmp_path, 4)
    budget = SimpleNamespace(budget_s=60, used_s=lambda: 60)
    view = SearchView(num_samples=1, metric="val_acc", mode="max", endings=endings, budget=budget, out=out, show=False)
    trials = [trial("t1", "TERMINATED", 2, tmp_path)]
    endings.cut_by_budget()
    view.on_trial_complete(0, trials, trials[0])
    view.on_step_end(0, trials)
    view.on_experiment_end(trials)
    assert out.getvalue() == ""
    assert json.loads((tmp_path / ENDINGS).read_text()) == {"t1": {"kind": "cut", "epoch": 2}}


def test_the_counts_and_the_time_left_read_the_record(tmp_path, clock):
    """Trials the budget ends are never reported ended by Ray: the last line counts them from the record, by kind
    (not one word for stops and cuts), and a failed trial's epochs count towards the time left."""
    out = Pipe(tty=False)
    endings = TrialEndings(tmp_path, 4)
    view = SearchView(num_samples=5, metric="val_acc", mode="max", endings=endings, out=out)
    trials = [trial(f"t{i}", "RUNNING", None, tmp_path) for i in range(5)]
    for t, epoch in zip(trials, (4, 1, 2, 3)):
        for e in range(1, epoch + 1):
            view.on_trial_result(0, trials, t, {"val_acc": 0.1 * e, "epoch": e})
        t.last_result = {"epoch": epoch}
    trials[0].status = "TERMINATED"
    view.on_trial_complete(0, trials, trials[0])  # ran all 4
    endings.stopped("t1", 1)  # the scheduler's decision, before Ray ends it
    trials[1].status = "TERMINATED"
    view.on_trial_complete(0, trials, trials[1])
    trials[2].status, trials[2].last_result = "TERMINATED", {"trial_failed": "NonFiniteLoss", "failed_in_epoch": 3}
    view.on_trial_complete(0, trials, trials[2])
    clock.now += 100
    endings.cut_by_budget()  # t3 (after epoch 3) and t4 (before its first report) are cut; Ray says nothing
    for t in trials[3:]:
        t.status = "TERMINATED"
    view.on_experiment_end(trials)
    assert out.getvalue().splitlines()[-1].startswith(
        "search 1:40, ~0:00 left | 5/5 trials done: 1 finished, 1 stopped, 2 cut by the budget, 1 failed |")
    assert {t: e.kind for t, e in endings.ended.items()} == {"t0": "finished", "t1": "stopped", "t2": "failed",
                                                           "t3": "cut", "t4": "cut"}
    assert [endings.words(t) for t in ("t3", "t4")] == ["cut by the time budget after epoch 3",
                                                        "cut by the time budget before its first report"]


def test_time_left_counts_a_failed_trials_epochs(tmp_path, clock):
    view = SearchView(num_samples=2, metric="val_acc", mode="max", endings=TrialEndings(None, 10), out=Pipe(False))
    trials = [trial("a", "RUNNING", None), trial("b", "RUNNING", None)]
    for epoch in (1, 2, 3, 4):
        view.on_trial_result(0, trials, trials[0], {"val_acc": 0.5, "epoch": epoch})
    view.on_trial_result(0, trials, trials[1], {"val_acc": 0.5, "epoch": 1})
    trials[0].status, trials[0].last_result = "ERROR", {"trial_failed": "x", "failed_in_epoch": 5}
    view.on_trial_error(0, trials, trials[0])
    # 6 epochs (a: 4 and the one it failed in; b: 1) in 50 s; b has 4 more to go, as a ran 5: 4 / (6 / 50) s.
    assert view.time_left(trials, 50.0) == pytest.approx(4 / (6 / 50))


def test_a_lost_worker_is_one_line_saying_the_trial_is_retried(clock):
    out = Pipe(tty=False)
    view = SearchView(num_samples=2, metric="val_acc", mode="max", endings=TrialEndings(None, 4), out=out)
    lost = trial("t1", "PENDING", 2)
    lost.run_metadata, lost.max_failures = SimpleNamespace(num_failures=1), 3
    view.on_trial_recover(0, [lost], lost)
    assert out.getvalue() == ("search: trial t1 lost its worker (a node or process died); retrying it from its last "
                              "checkpoint (failure 1 of at most 3)\n")
