"""The final stage's plan: which configurations become members, with which seeds and epochs, and which of them
can be souped; from hand-made experiment folders."""
from pathlib import Path

import pytest

from tuneprod.tuning.endings import TrialEndings
from tuneprod.final.stage import plan_members, soup_groups
from tuneprod.spec import UserError, member_epochs, spec_from_dict
from tuneprod.tuning.results import TrialRecord, trials_table, write_results

NAMES = ["optimizer", "lr", "batch_size"]


def curve(*values):
    return [{"epoch": e, "val_acc": acc} for e, acc in enumerate(values, 1)]


def experiment(tmp_path: Path, final: dict, records=None):
    spec = spec_from_dict({"data": {"train": "x", "image_size": 40}, "final": final, "search": {"seed": 7},
                           "space": {"optimizer": {"choice": ["sgd", "adamw"]}, "lr": {"loguniform": [1e-4, 1]},
                                     "batch_size": 16}}, Path("s.yaml"))
    records = records or [
        TrialRecord("a", {"optimizer": "sgd", "lr": 0.1, "batch_size": 16}, curve(0.2, 0.6, 0.9, 0.8, 0.85)),
        TrialRecord("b", {"optimizer": "adamw", "lr": 0.001, "batch_size": 16}, curve(0.3)),
    ]
    write_results(tmp_path, trials_table(records, NAMES, "val_acc", "max", TrialEndings(None, 5)), NAMES, "val_acc")
    return spec


def test_auto_epochs_are_where_the_best_trial_peaked(tmp_path):
    (plan,) = plan_members(experiment(tmp_path, {"epochs": "auto"}), tmp_path)
    assert plan.name == "member_1" and plan.trial_id == "a" and plan.trial_value == 0.9 and plan.config.epochs == 3
    assert (plan.config.hp.optimizer, plan.config.hp.lr, plan.config.hp.batch_size) == ("sgd", 0.1, 16)
    assert plan.config.image_size == 40 and plan.config.seed == 7


def test_auto_epochs_train_the_horizon_when_the_trial_was_still_improving(tmp_path):
    """Trial b peaked at the last epoch it ran (1), short of max_epochs (10: stopped at a rung, or cut): `auto`
    trains its member for 10 epochs, `best` for 1."""
    records = [TrialRecord("b", {"optimizer": "adamw", "lr": 0.001, "batch_size": 16}, curve(0.3, 0.5))]
    assert plan_members(experiment(tmp_path, {"epochs": "auto"}, records), tmp_path)[0].config.epochs == 10
    assert plan_members(experiment(tmp_path, {"epochs": "best"}, records), tmp_path)[0].config.epochs == 2


@pytest.mark.parametrize("final_epochs, best, run, expected", [
    ("auto", 3, 5, 3), ("auto", 5, 5, 10), ("auto", 10, 10, 10), ("auto", 12, 12, 12),
    ("best", 5, 5, 5), (7, 3, 5, 7), (7, 5, 5, 7)])
def test_member_epochs(final_epochs, best, run, expected):
    assert member_epochs(final_epochs, best, run, max_epochs=10) == expected


def test_fixed_epochs_override_the_peak(tmp_path):
    assert plan_members(experiment(tmp_path, {"epochs": 7}), tmp_path)[0].config.epochs == 7


def test_the_older_retrain_section_still_reads(tmp_path):
    spec = spec_from_dict({"data": {"train": "x"}, "retrain": {"epochs": 4, "tta": False}}, Path("s.yaml"))
    assert spec.final.epochs == 4 and spec.final.tta == () and spec.final.members == 1
    assert "final" in spec.document and "retrain" not in spec.document


def test_top_k_distinct_configurations_with_seeds(tmp_path):
    same = {"optimizer": "sgd", "lr": 0.1, "batch_size": 16}
    records = [
        TrialRecord("a", same, curve(0.5, 0.9)),
        TrialRecord("dup", dict(same), curve(0.8)),  # the same configuration again: not a member of its own
        TrialRecord("tie1", {"optimizer": "adamw", "lr": 0.01, "batch_size": 16}, curve(0.7)),
        TrialRecord("tie2", {"optimizer": "adamw", "lr": 0.02, "batch_size": 16}, curve(0.7)),
        TrialRecord("failed", {"optimizer": "adamw", "lr": 0.5, "batch_size": 16}, curve(0.95), error="NaN"),
        TrialRecord("worst", {"optimizer": "sgd", "lr": 0.3, "batch_size": 16}, curve(0.1)),
    ]
    plans = plan_members(experiment(tmp_path, {"members": 3, "seeds": 2, "epochs": "best"}, records), tmp_path)
    # Failed trials are never chosen, however good; ties keep the search's order.
    assert [p.trial_id for p in plans] == ["a", "a", "tie1", "tie1", "tie2", "tie2"]
    assert [p.config.seed for p in plans] == [7, 8] * 3
    assert {p.config.weights_seed for p in plans} == {7, 8}  # from scratch: each seed its own start
    assert [p.name for p in plans] == [f"member_{n}" for n in range(1, 7)]
    assert [p.config.epochs for p in plans] == [2, 2, 1, 1, 1, 1]


def test_fewer_usable_trials_than_members(tmp_path):
    plans = plan_members(experiment(tmp_path, {"members": 5}), tmp_path)
    assert [p.trial_id for p in plans] == ["a", "b"]


def test_every_trial_failed_is_a_user_error(tmp_path):
    records = [TrialRecord("x", {"optimizer": "sgd", "lr": 0.1, "batch_size": 16}, curve(0.5), error="boom")]
    with pytest.raises(UserError, match="every trial failed"):
        plan_members(experiment(tmp_path, {"members": 2}, records), tmp_path)


def test_no_results_is_a_user_error(tmp_path):
    spec = spec_from_dict({"data": {"train": "x"}}, Path("s.yaml"))
    with pytest.raises(UserError, match="run `tuneprod search` first"):
        plan_members(spec, tmp_path)


def test_soups_group_pretrained_members_of_one_backbone(tmp_path):
    spec = spec_from_dict({"data": {"train": "x"}, "final": {"members": 4, "seeds": 2},
                           "space": {"backbone": {"choice": ["test_resnet", "test_efficientnet"]},
                                     "pretrained": {"choice": [True, False]}, "lr": {"choice": [0.1, 0.2]}}},
                          Path("s.yaml"))
    records = [TrialRecord(str(n), {"backbone": b, "pretrained": p, "lr": lr}, curve(1 - n / 10))
               for n, (b, p, lr) in enumerate([("test_resnet", True, 0.1), ("test_efficientnet", False, 0.1),
                                               ("test_resnet", True, 0.2), ("test_efficientnet", True, 0.1)])]
    names = ["backbone", "pretrained", "lr"]
    write_results(tmp_path, trials_table(records, names, "val_acc", "max", TrialEndings(None, 5)), names, "val_acc")
    plans = plan_members(spec, tmp_path)
    # Pretrained resnets (two configurations x two seeds) share a start, and so do the two seeds of the
    # pretrained efficientnet; the efficientnet trained from scratch is never averaged.
    assert {p.config.weights_seed for p in plans if p.config.hp.pretrained} == {0}  # one start, head included
    assert [[p.name for p in group] for group in soup_groups(plans)] == [
        ["member_1", "member_2", "member_5", "member_6"], ["member_7", "member_8"]]
