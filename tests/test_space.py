"""The define-by-run space, exercised with Optuna directly (no Ray, no training)."""
from pathlib import Path

import optuna

from tuneprod.spec import spec_from_dict
from tuneprod.tuning.space import DefineByRun, sampler


def space_of(text_space: dict):
    return spec_from_dict({"data": {"train": "x"}, "space": text_space}, Path("t.yaml")).space


CONDITIONAL = {
    "optimizer": {"choice": ["sgd", "adamw"]},
    "momentum": {"uniform": [0.8, 0.95], "when": {"optimizer": "sgd"}},
    "lr": {"loguniform": [1e-4, 1e-1]},
    "batch_size": {"int": [8, 64], "log": True},
    "dropout": 0.2,
}


def sample_many(space, n=40, kind="optuna", seed=0):
    study = optuna.create_study(direction="maximize", sampler=sampler(kind, seed, 5, True))
    configs = []
    for _ in range(n):
        trial = study.ask()
        fixed = DefineByRun(space)(trial)
        config = {**trial.params, **fixed}
        configs.append(config)
        study.tell(trial, config["lr"])  # a made-up objective: larger lr is better
    return configs


def test_conditional_parameter_only_when_its_condition_holds():
    configs = sample_many(space_of(CONDITIONAL))
    assert {c["optimizer"] for c in configs} == {"sgd", "adamw"}
    for config in configs:
        assert ("momentum" in config) == (config["optimizer"] == "sgd")
        if "momentum" in config:
            assert 0.8 <= config["momentum"] <= 0.95


def test_ranges_types_and_fixed_values():
    for config in sample_many(space_of(CONDITIONAL), kind="random"):
        assert 1e-4 <= config["lr"] <= 1e-1
        assert isinstance(config["batch_size"], int) and 8 <= config["batch_size"] <= 64
        assert config["dropout"] == 0.2


def test_tpe_moves_towards_the_better_region():
    configs = sample_many(space_of({"lr": {"loguniform": [1e-4, 1e-1]}}), n=40)
    early = sum(c["lr"] for c in configs[:5]) / 5
    late = sum(c["lr"] for c in configs[-10:]) / 10
    assert late > early


def test_same_seed_same_samples():
    space = space_of(CONDITIONAL)
    assert sample_many(space, n=8, seed=3) == sample_many(space, n=8, seed=3)
    assert sample_many(space, n=8, seed=3) != sample_many(space, n=8, seed=4)


def test_start_point_is_evaluated_first():
    space = space_of(CONDITIONAL)
    study = optuna.create_study(direction="maximize", sampler=sampler("optuna", 0, 5, True))
    study.enqueue_trial({"optimizer": "sgd", "momentum": 0.9, "lr": 1e-3, "batch_size": 32})
    trial = study.ask()
    DefineByRun(space)(trial)
    assert trial.params == {"optimizer": "sgd", "momentum": 0.9, "lr": 1e-3, "batch_size": 32}
