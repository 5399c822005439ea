"""The search's one console view, driven with hand-made trials and a hand-set clock."""
import io
import json
from types import SimpleNamespace

import pytest

from tuneprod.tuning import console
from tuneprod.tuning.console import SearchView
from tuneprod.tuning.results import ENDINGS, ending


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


def test_endings_name_the_cause():
    assert ending(10, 10, failed=False, budget_spent=False) == "ran all 10 epochs"
    assert ending(3, 10, failed=False, budget_spent=False) == "stopped by the scheduler after epoch 3"
    assert ending(3, 10, failed=False, budget_spent=True) == "cut by the time budget after epoch 3"
    assert ending(0, 10, failed=False, budget_spent=True) == "cut by the time budget before its first report"
    assert ending(3, 10, failed=True, budget_spent=False) == "failed in epoch 4"


def test_plain_output_is_a_line_per_change_at_most_every_15_s(tmp_path, clock):
    out = Pipe(tty=False)
    view = SearchView(num_samples=4, metric="val_acc", mode="max", max_epochs=2, out=out)
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
    assert json.loads((tmp_path / ENDINGS).read_text()) == {"t1": "stopped by the scheduler after epoch 1",
                                                          "t2": "failed in epoch 2"}
    clock.now += console.PLAIN_QUIET_S
    view.on_step_end(0, trials)  # a long quiet spell still gets a line
    assert len(out.getvalue().splitlines()) == 3


def test_a_terminal_gets_one_line_rewritten_in_place(clock):
    out = Pipe(tty=True)
    budget = SimpleNamespace(budget_s=600, stopped=False, used_s=lambda: clock.now - 1000)
    view = SearchView(num_samples=2, metric="val_loss", mode="min", max_epochs=2, budget=budget, out=out)
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
    budget = SimpleNamespace(budget_s=60, stopped=True, used_s=lambda: 60)
    view = SearchView(num_samples=1, metric="val_acc", mode="max", max_epochs=4, budget=budget, out=out, show=False)
    trials = [trial("t1", "TERMINATED", 2, tmp_path)]
    view.on_trial_complete(0, trials, trials[0])
    view.on_step_end(0, trials)
    view.on_experiment_end(trials)
    assert out.getvalue() == ""
    assert json.loads((tmp_path / ENDINGS).read_text()) == {"t1": "cut by the time budget after epoch 2"}


def test_a_lost_worker_is_one_line_saying_the_trial_is_retried(clock):
    out = Pipe(tty=False)
    view = SearchView(num_samples=2, metric="val_acc", mode="max", max_epochs=4, out=out)
    lost = trial("t1", "PENDING", 2)
    lost.run_metadata, lost.max_failures = SimpleNamespace(num_failures=1), 3
    view.on_trial_recover(0, [lost], lost)
    assert out.getvalue() == ("search: trial t1 lost its worker (a node or process died); retrying it from its last "
                              "checkpoint (failure 1 of at most 3)\n")
