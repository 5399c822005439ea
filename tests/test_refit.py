"""Which configuration is retrained, for how many epochs, from a hand-made experiment folder."""
from pathlib import Path

import pytest

from tuneprod.refit import plan_retrain
from tuneprod.results import TrialRecord, trials_table, write_results
from tuneprod.spec import UserError, spec_from_dict

NAMES = ["optimizer", "lr", "batch_size"]


def experiment(tmp_path: Path, retrain: dict):
    spec = spec_from_dict({"data": {"train": "x", "image_size": 40}, "retrain": retrain,
                           "space": {"optimizer": {"choice": ["sgd", "adamw"]}, "lr": {"loguniform": [1e-4, 1]},
                                     "batch_size": 16}}, Path("s.yaml"))
    records = [
        TrialRecord("a", {"optimizer": "sgd", "lr": 0.1, "batch_size": 16},
                    [{"epoch": e, "val_acc": acc} for e, acc in enumerate([0.2, 0.6, 0.9, 0.8, 0.85], 1)]),
        TrialRecord("b", {"optimizer": "adamw", "lr": 0.001, "batch_size": 16},
                    [{"epoch": 1, "val_acc": 0.3}]),
    ]
    write_results(tmp_path, trials_table(records, NAMES, "val_acc", "max", 5), NAMES, "val_acc")
    return spec


def test_auto_epochs_are_where_the_best_trial_peaked(tmp_path):
    plan = plan_retrain(experiment(tmp_path, {"epochs": "auto"}), tmp_path)
    assert plan.trial_id == "a" and plan.trial_value == 0.9 and plan.config.epochs == 3
    assert (plan.config.hp.optimizer, plan.config.hp.lr, plan.config.hp.batch_size) == ("sgd", 0.1, 16)
    assert plan.config.image_size == 40


def test_fixed_epochs_override_the_peak(tmp_path):
    assert plan_retrain(experiment(tmp_path, {"epochs": 7}), tmp_path).config.epochs == 7


def test_no_results_is_a_user_error(tmp_path):
    spec = spec_from_dict({"data": {"train": "x"}}, Path("s.yaml"))
    with pytest.raises(UserError, match="run `tuneprod search` first"):
        plan_retrain(spec, tmp_path)
