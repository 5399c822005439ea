"""benchmarks/scheduler_verdict.py: the replay's clock and bookkeeping on hand-made curves, and a 3-seed verdict on
the recorded tables."""
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import scheduler_verdict as verdict  # noqa: E402


def hand_made(curves: list[list[float]], seconds: float = 1.0, train_images: int = 400, classes: int = 10,
              params: list[dict] | None = None) -> verdict.RecordedSet:
    """One recorded seed per configuration; 40 images a class and no warm-up make the auto grace period 1 epoch."""
    accuracy = np.array(curves, dtype=float)[:, None, :]
    params = params or [{"configuration": n} for n in range(len(curves))]
    return verdict.RecordedSet("hand", "demo.yaml", pd.DataFrame(params), accuracy,
                               np.full_like(accuracy, seconds), train_images, classes, warmup_epochs=0.0)


def replayed(recorded, scheduler: str, workers: int, budget_s: float, order: list[int]) -> verdict.Replay:
    class InOrder(verdict.RandomTable):
        def __init__(self):
            self.order = iter(order * 100)

    run = verdict.Replay(recorded, verdict.make_scheduler(f"random+{scheduler}", recorded), InOrder(), workers,
                         np.zeros(1000, dtype=int))
    run.run(budget_s)
    return run


def epochs_run(run: verdict.Replay) -> dict[int, int]:
    """Epochs each configuration's first trial ran."""
    return {t.configuration: t.epoch for t in reversed(run.trials) if t.epoch}


FOUR = [[0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9],   # 0: the best, and best from the start
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.6, 0.6, 0.6],
        [0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.3, 0.3, 0.3],
        [0.0, 0.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]]   # 3: the worst


def test_regret_is_normalised_by_the_tables_best_and_worst_final_value():
    recorded = hand_made(FOUR)
    assert recorded.regret(0) == 0.0 and recorded.regret(3) == 1.0
    assert recorded.regret(1) == pytest.approx((0.9 - 0.6) / 0.8)
    assert recorded.regret(None) == 1.0  # nothing handed over yet


def test_a_diverged_run_is_worth_nothing():
    recorded = hand_made([[0.5, 0.6], [0.5, np.nan]])
    assert list(recorded.value) == [0.6, 0.0]


def test_fifo_runs_every_trial_to_the_end_and_hands_over_the_best_reported():
    run = replayed(hand_made(FOUR), "fifo", workers=4, budget_s=9.0, order=[3, 2, 1, 0])
    assert epochs_run(run) == {0: 9, 1: 9, 2: 9, 3: 9}
    assert run.handed_over[-1] == (9.0, 0)


def test_the_clock_gives_each_worker_one_epoch_at_a_time():
    run = replayed(hand_made(FOUR), "fifo", workers=2, budget_s=9.5, order=[3, 2, 1, 0])
    assert epochs_run(run) == {3: 9, 2: 9}  # two workers, 9 one-second epochs each; the next two never started


def test_tuneprods_asha_stops_the_losers_at_the_first_rung():
    # Grace 1, reduction factor 3: rungs at epochs 1 and 3. Three trials at once reach epoch 1; the best goes on (and
    # waits at epoch 3 for two more trials to compare with).
    run = replayed(hand_made(FOUR), "asha", workers=3, budget_s=30.0, order=[2, 0, 3, 1])
    ran = epochs_run(run)
    assert ran[0] == 9 and ran[2] == 1 and ran[3] == 1


def test_rays_hyperband_is_driven_through_the_stub_controller():
    # max_t 9, eta 3: bracket 0 runs 3 trials to the end; bracket 1 takes the next 5 to epoch 3 and keeps 2. Ray
    # keeps one trial pending for a searcher of its own: the 4th, in bracket 1 while the first 3 run.
    run = replayed(hand_made(FOUR), "hyperband", workers=3, budget_s=60.0, order=[0, 1, 2, 3])
    assert [t.epoch for t in run.trials[:3]] == [9, 9, 9]
    halved = [t for t in run.trials[3:8] if t.status == "TERMINATED"]
    assert sorted(t.epoch for t in halved)[:3] == [3, 3, 3]
    assert run.handed_over[-1][1] == 0


def test_rays_hyperband_with_fewer_workers_than_its_first_bracket_never_stops_a_trial():
    # Its bracket 0 counts live trials: with 2 workers and one trial pending it never holds 3, so every trial
    # joins it and runs to the end, as FIFO would (what Ray does with a searcher that keeps one trial pending).
    run = replayed(hand_made(FOUR), "hyperband", workers=2, budget_s=40.0, order=[0, 1, 2, 3])
    ended = [t.epoch for t in run.trials if t.status == "TERMINATED"]
    assert len(ended) >= 4 and set(ended) == {9}


def test_methods_with_one_seed_draw_the_same_configurations_and_training_seeds_in_the_same_order():
    recorded = hand_made([[0.1 * n] * 3 for n in range(8)])
    recorded.accuracy = np.repeat(recorded.accuracy, 2, axis=1)  # two recorded training seeds
    recorded.seconds = np.repeat(recorded.seconds, 2, axis=1)
    drawn = {}
    for method in ("random+fifo", "random+asha"):
        original = verdict.Replay.run

        def run_and_keep(self, budget_s, method=method):
            handed = original(self, budget_s)
            drawn[method] = [(t.configuration, t.seed) for t in self.trials[:8]]
            return handed
        verdict.Replay.run = run_and_keep
        try:
            verdict.replay(recorded, method, seed=5, workers=2, budget_s=60.0)
        finally:
            verdict.Replay.run = original
    assert drawn["random+fifo"] == drawn["random+asha"]
    assert sorted(c for c, _ in drawn["random+fifo"]) == list(range(8))


def test_tpes_proposal_becomes_the_nearest_configuration_of_the_table():
    table = [{"backbone": "resnet10t", "lr": 1e-3, "optimizer": "adamw"},
             {"backbone": "resnet10t", "lr": 1e-2, "optimizer": "adamw"},
             {"backbone": "mobilenetv3_small_100", "lr": 1e-3, "optimizer": "sgd", "momentum": 0.9}]
    searcher = verdict.TPETable(hand_made([[0.1], [0.2], [0.3]], params=table), seed=0)
    assert searcher.nearest({"backbone": "resnet10t", "lr": 8e-3, "optimizer": "adamw"}) == 1
    assert searcher.nearest({"backbone": "resnet10t", "lr": 1.2e-3, "optimizer": "adamw"}) == 0
    assert searcher.nearest({"backbone": "mobilenetv3_small_100", "lr": 3e-3, "optimizer": "sgd",
                             "momentum": 0.85}) == 2


def test_cost_to_reach_is_the_first_time_a_curve_gets_there():
    curve = np.linspace(1, 0, verdict.GRID + 1)
    assert verdict.cost_to_reach(curve, 0.5) == pytest.approx(0.5)
    assert verdict.cost_to_reach(curve, -0.1) == float("inf")
    dips = np.concatenate([np.full(10, 1.0), np.full(10, 0.2), np.full(verdict.GRID + 1 - 20, 0.8)])
    dips[-30:] = 0.1  # below 0.5 for a while, above again, below from 71 on
    assert verdict.cost_to_reach(dips, 0.5) == pytest.approx(0.71)


def test_the_bootstrap_interval_holds_the_mean_and_excludes_zero_for_a_clear_difference():
    rng = np.random.default_rng(0)
    differences = rng.normal(0.2, 0.05, size=200)
    low, high = verdict.bootstrap_interval(differences, rng)
    assert low < differences.mean() < high and low > 0


def test_a_three_seed_verdict_on_the_recorded_curves(capsys):
    sets = verdict.load_sets()
    assert len(sets) >= 3 and all(len(s.configurations) >= 3 for s in sets)
    methods = [f"{a}+{b}" for a in verdict.SEARCHERS for b in verdict.SCHEDULERS]
    results = verdict.run_all(sets, methods, seeds=3, workers=4, budget_trials=16, processes=1)
    table = verdict.verdict(sets, results)
    for recorded in sets:
        assert set(table[recorded.name]) == set(methods)
        for row in table[recorded.name].values():
            assert 0.0 <= row["regret"] <= 1.0
        assert table[recorded.name][verdict.DEFAULT]["difference"] == 0.0
    verdict.print_verdict(sets, table, 3, 4, 16)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("default cost to FIFO's regret: ")


def test_a_method_names_its_reduction_factor_and_grace_period():
    recorded = hand_made([[0.1] * 20], train_images=60, classes=10)  # 6 images a class: auto grace 4 epochs
    assert verdict.make_scheduler("tpe+asha", recorded).rungs.milestones == (4, 12)
    assert verdict.make_scheduler("tpe+asha:rf=2:grace=1", recorded).rungs.milestones == (1, 2, 4, 8, 16)
    with pytest.raises(ValueError, match="unknown scheduler"):
        verdict.make_scheduler("tpe+median", recorded)


def test_tpe_tries_every_configuration_once_before_any_twice():
    table = [{"backbone": "resnet10t", "lr": 10 ** (-3.5 + n / 4), "optimizer": "adamw"} for n in range(6)]
    searcher = verdict.TPETable(hand_made([[0.1]] * 6, params=table), seed=0)
    proposed = [searcher.propose(verdict.ReplayedTrial(n, -1, 0)) for n in range(8)]
    assert sorted(proposed[:6]) == list(range(6)) and all(0 <= c < 6 for c in proposed[6:])


def test_tpe_learns_the_configuration_that_was_trained_and_a_stopped_trials_rung_value():
    table = [{"backbone": "resnet10t", "lr": 10 ** (-3.5 + n / 4), "optimizer": "adamw"} for n in range(6)]
    recorded = hand_made([[0.1 * n, 0.1 * n + 0.05, 0.1 * n + 0.1] for n in range(6)], params=table)
    searcher = verdict.TPETable(recorded, seed=0)
    run = verdict.Replay(recorded, verdict.make_scheduler("tpe+asha", recorded), searcher, 3,
                         np.zeros(1000, dtype=int))
    run.run(6.0)
    told = [t for t in searcher.study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert told
    for trial in told:
        assert trial.params["lr"] in {row["lr"] for row in table}  # a table configuration's, not a proposal's
        assert trial.intermediate_values  # a pruned trial keeps its rung value, which TPE ranks it by


@pytest.mark.parametrize("start_s, epochs", [(2.0, 9), (2.5, 8)])  # 1 s epochs in 11 s, less the start
def test_a_start_cost_is_paid_at_every_start_and_resume(start_s, epochs):
    recorded = hand_made(FOUR)
    run = verdict.Replay(recorded, verdict.make_scheduler("random+fifo", recorded), verdict.RandomTable(
        recorded, np.random.default_rng(0)), 1, np.zeros(1000, dtype=int), start_s=start_s)
    run.run(11.0)
    assert run.trials[0].epoch == epochs
    assert (run.trials[0].status == "TERMINATED") == (epochs == 9)  # the 9th epoch is the recorded horizon
