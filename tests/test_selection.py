"""Ensemble selection with hand-made probability tables: the order trials are picked in, picking again, the votes,
ties, a failed trial, a single usable trial; how members are shared out; the weighted vote."""
import numpy as np
import pytest
import torch

from tests.test_refit import curve, experiment
from tuneprod.final.ensemble import soft_vote
from tuneprod.final.selection import KEPT_PREDICTIONS, ensemble_score, greedy_selection, share_out
from tuneprod.final.stage import choose, plan_members
from tuneprod.tuning.results import TrialRecord

LABELS = np.array([0, 1, 2, 0])


def table(*rows):
    return np.array(rows, dtype=np.float32)


# Four images of three classes. A is right on images 0 and 1; B on 2 and 3; C on 0, 1 and 2 (best alone), but
# barely: averaged with B, all four are right; with A, only two.
A = table([.9, .05, .05], [.05, .9, .05], [.5, .4, .1], [.1, .8, .1])
B = table([.3, .4, .3], [.45, .3, .25], [.1, .1, .8], [.9, .05, .05])
C = table([.5, .3, .2], [.3, .5, .2], [.3, .3, .4], [.2, .6, .2])


def test_each_round_adds_the_trial_that_helps_most_and_may_add_one_again():
    selection = greedy_selection({"c": C, "a": A, "b": B}, LABELS, "val_acc", rounds=4)
    assert ensemble_score(C, LABELS, "val_acc") == 0.75 and ensemble_score(A, LABELS, "val_acc") == 0.5
    # Round 1: C alone is the best single trial. Round 2: B fixes image 3 (C + B: all four right).
    assert [trial for trial, _ in selection.path][:2] == ["c", "b"]
    assert selection.path[1][1] == 1.0
    # Later rounds keep the vote at 1.0 and may pick a trial already in (with replacement); the rounds up to the
    # best (accuracy, then the lower loss) are kept, and their picks are the weights.
    assert [score for _, score in selection.path][2:] == [1.0, 1.0] and len(selection.path) == 4
    assert 2 <= selection.kept <= 4 and sum(selection.weights.values()) == selection.kept
    assert list(selection.weights)[:2] == ["c", "b"]  # in the order first picked


def test_rounds_after_the_best_score_are_dropped():
    # Every round adds a again (b would lower the vote), and a averaged with itself is a: every round scores the
    # same, so the fewest rounds are kept.
    perfect = np.eye(3, dtype=np.float32)[LABELS] * 0.8 + 0.2 / 3
    selection = greedy_selection({"a": perfect, "b": B}, LABELS, "val_acc", rounds=5)
    assert [trial for trial, _ in selection.path] == ["a"] * 5 and selection.kept == 1
    assert selection.weights == {"a": 1}


def test_at_most_as_many_distinct_trials_as_members():
    selection = greedy_selection({"c": C, "a": A, "b": B}, LABELS, "val_acc", rounds=6, most=1)
    assert set(trial for trial, _ in selection.path) == {"c"}  # the best single one, weighted alone
    selection = greedy_selection({"c": C, "a": A, "b": B}, LABELS, "val_acc", rounds=6, most=2)
    assert set(trial for trial, _ in selection.path) == {"c", "b"}


def test_picking_again_weights_a_trial():
    selection = greedy_selection({"a": A}, LABELS, "val_acc", rounds=3)
    assert [trial for trial, _ in selection.path] == ["a"] * 3  # a single usable trial: picked every round
    assert [score for _, score in selection.path] == [0.5, 0.5, 0.5] and selection.weights == {"a": 1}
    surer_of_c = greedy_selection({"c": C, "b": B}, LABELS, "val_acc", rounds=10)
    assert max(surer_of_c.weights.values()) > 1 or surer_of_c.kept == 2  # picked again where it helps


def test_ties_go_to_the_earlier_trial_and_accuracy_ties_to_the_lower_loss():
    assert greedy_selection({"first": A, "second": A.copy()}, LABELS, "val_acc", rounds=1).weights == {"first": 1}
    surer = A.copy()
    surer[0] = [.98, .01, .01]  # as accurate as A, lower loss
    assert greedy_selection({"a": A, "surer": surer}, LABELS, "val_acc", rounds=1).weights == {"surer": 1}


def test_val_loss_selects_by_the_lower_negative_log_likelihood():
    assert ensemble_score(table([.5, .5, 0]), np.array([0]), "val_loss") == pytest.approx(np.log(2))
    selection = greedy_selection({"a": A, "c": C}, LABELS, "val_loss", rounds=1)
    losses = {name: ensemble_score(t, LABELS, "val_loss") for name, t in {"a": A, "c": C}.items()}
    assert selection.weights == {min(losses, key=losses.get): 1}


def test_no_table_is_an_error():
    with pytest.raises(ValueError, match="no trial kept"):
        greedy_selection({}, LABELS, "val_acc")


def test_members_are_shared_out_by_votes():
    assert share_out([7, 3], 2) == [1, 1]  # 1.4 and 0.6: the larger remainder gets the second
    assert share_out([10], 3) == [3]  # one configuration picked every round: three seeds of it
    assert share_out([5, 5], 3) == [2, 1]  # a tie: the earlier
    assert share_out([8, 1, 1], 2) == [2, 0, 0]


def test_the_weighted_vote():
    first, second = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert torch.allclose(soft_vote([first, second]), torch.tensor([[0.5, 0.5]]))
    assert torch.allclose(soft_vote([first, second], [3, 1]), torch.tensor([[0.75, 0.25]]))


def keep(tmp_path, trial, probabilities, rows=(10, 11, 12, 13)):
    folder = tmp_path / f"trial_{trial}"
    folder.mkdir(exist_ok=True)
    np.savez(folder / KEPT_PREDICTIONS, probabilities=probabilities.astype(np.float16), rows=np.array(rows),
             labels=LABELS, epoch=1)


def test_greedy_final_stage_plans_from_the_kept_predictions(tmp_path):
    records = [
        TrialRecord("c", {"optimizer": "sgd", "lr": 0.1, "batch_size": 16}, curve(0.75)),
        TrialRecord("failed", {"optimizer": "adamw", "lr": 0.5, "batch_size": 16}, curve(0.9), error="NaN"),
        TrialRecord("a", {"optimizer": "adamw", "lr": 0.01, "batch_size": 16}, curve(0.5)),
        TrialRecord("b", {"optimizer": "adamw", "lr": 0.001, "batch_size": 16}, curve(0.5)),
        TrialRecord("other_order", {"optimizer": "sgd", "lr": 0.2, "batch_size": 16}, curve(0.4)),
    ]
    spec = experiment(tmp_path, {"select": "greedy", "members": "auto"}, records)
    perfect = np.eye(3, dtype=np.float32)[LABELS]
    keep(tmp_path, "failed", perfect)  # never a member, however good its predictions
    keep(tmp_path, "c", C)
    keep(tmp_path, "a", A)
    keep(tmp_path, "b", B)
    keep(tmp_path, "other_order", perfect, rows=(13, 12, 11, 10))  # another image order: not comparable
    chosen = choose(spec, tmp_path, print, slots=4)
    assert [trial for trial, _ in chosen.selection.path][:2] == ["c", "b"]
    assert set(chosen.selection.weights) <= {"a", "b", "c"}  # not the failed one, nor the one in another order
    votes = dict(zip([str(row["trial_id"]) for row in chosen.rows], chosen.votes))
    assert votes == chosen.selection.weights and list(votes.values()) == sorted(votes.values(), reverse=True)
    plans = plan_members(spec, tmp_path, slots=4, chosen=chosen)
    seeds = share_out(chosen.votes, 4)
    assert [p.trial_id for p in plans] == [trial for trial, n in zip(votes, seeds) for _ in range(n)]
    assert sum(p.weight for p in plans) == pytest.approx(sum(chosen.votes))  # each configuration's votes shared
    assert [p.config.seed for p in plans if p.trial_id == plans[0].trial_id][:2] == [7, 8][:seeds[0]]


def test_greedy_without_kept_predictions_falls_back_to_the_best(tmp_path):
    lines = []
    spec = experiment(tmp_path, {"select": "greedy", "members": 2})
    chosen = choose(spec, tmp_path, lines.append)
    assert chosen.selection is None and [str(r["trial_id"]) for r in chosen.rows] == ["a", "b"]
    assert "no trial kept its validation predictions" in lines[0]


def test_a_configuration_tried_twice_is_one_member_with_both_votes(tmp_path):
    same = {"optimizer": "sgd", "lr": 0.1, "batch_size": 16}
    records = [TrialRecord("c", same, curve(0.75)), TrialRecord("c2", dict(same), curve(0.5)),
               TrialRecord("a", {"optimizer": "adamw", "lr": 0.001, "batch_size": 16}, curve(0.5))]
    spec = experiment(tmp_path, {"select": "greedy", "members": 2}, records)
    for trial, probabilities in (("c", C), ("c2", B), ("a", A)):  # its two trials complement each other
        keep(tmp_path, trial, probabilities)
    chosen = choose(spec, tmp_path, print)
    assert list(chosen.selection.weights)[:2] == ["c", "c2"]
    assert [str(r["trial_id"]) for r in chosen.rows] == ["c"]  # one member, at its better trial
    assert chosen.votes == [chosen.selection.kept] and chosen.selection.kept >= 2


def test_only_the_trials_that_trained_furthest_are_candidates(tmp_path):
    """A trial stopped at an early rung is a snapshot of a schedule it never finished: however well its
    predictions complement the best one's, it is no candidate while enough trials trained further."""
    records = [TrialRecord("c", {"optimizer": "sgd", "lr": 0.1, "batch_size": 16}, curve(0.5, 0.75)),
               TrialRecord("b", {"optimizer": "adamw", "lr": 0.001, "batch_size": 16}, curve(0.5)),  # rung 1
               TrialRecord("a", {"optimizer": "adamw", "lr": 0.01, "batch_size": 16}, curve(0.4, 0.5))]
    spec = experiment(tmp_path, {"select": "greedy", "members": 2}, records)
    for trial, probabilities in (("c", C), ("b", B), ("a", A)):
        keep(tmp_path, trial, probabilities)
    assert set(choose(spec, tmp_path, print).selection.weights) <= {"c", "a"}
    spec = experiment(tmp_path, {"select": "greedy", "members": 3}, records)  # three members: all three compare
    assert "b" in choose(spec, tmp_path, print).selection.weights


def test_members_the_time_buys_beyond_the_slots_are_more_seeds_of_the_chosen_configurations(tmp_path):
    """final.members auto with time for 5 members on 2 slots: at most 2 configurations, 5 members shared out by
    their votes (top: equal votes, 3 + 2), each configuration's votes split among its seeds."""
    records = [TrialRecord("c", {"optimizer": "sgd", "lr": 0.1, "batch_size": 16}, curve(0.75)),
               TrialRecord("a", {"optimizer": "adamw", "lr": 0.01, "batch_size": 16}, curve(0.6)),
               TrialRecord("b", {"optimizer": "adamw", "lr": 0.001, "batch_size": 16}, curve(0.5))]
    spec = experiment(tmp_path, {"select": "top", "members": "auto"}, records)
    plans = plan_members(spec, tmp_path, slots=2, auto_members=5)
    assert [p.trial_id for p in plans] == ["c", "c", "c", "a", "a"]
    assert [p.config.seed for p in plans] == [7, 8, 9, 7, 8]
    assert [p.weight for p in plans] == pytest.approx([1 / 3] * 3 + [1 / 2] * 2)
    assert [p.trial_id for p in plan_members(spec, tmp_path, slots=2)] == ["c", "a"]  # no time said: one round
    assert len(plan_members(spec, tmp_path, slots=3, auto_members=2)) == 3  # never fewer than the slots
