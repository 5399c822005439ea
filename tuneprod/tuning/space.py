"""The validated space as an Optuna define-by-run function, which handles conditional parameters."""
from __future__ import annotations

import warnings

import optuna

# The search prints its own progress; Optuna's per-trial info lines and its "experimental" notes on the TPE
# options used here would drown it.
optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
from tuneprod.spec import Dimension, Space


class DefineByRun:
    """Samples one configuration on an Optuna trial, in the order the YAML lists parameters.

    A parameter with `when` is sampled only if the earlier parameters it names took one of the listed values,
    so TPE never models momentum for an Adam trial. Returns the fixed values; Ray adds the sampled ones.
    A class rather than a closure: Ray pickles the searcher, and this with it, to checkpoint the experiment.
    """

    def __init__(self, space: Space):
        self.space = space

    def __call__(self, trial: optuna.Trial) -> dict:
        chosen = dict(self.space.fixed)
        for dimension in self.space.dimensions:
            if is_active(dimension, chosen):
                chosen[dimension.name] = suggest(trial, dimension)
        return dict(self.space.fixed)


def is_active(dimension: Dimension, chosen: dict) -> bool:
    return all(chosen.get(name) in allowed for name, allowed in dimension.when)


def suggest(trial: optuna.Trial, dimension: Dimension):
    name, values = dimension.name, dimension.values
    if dimension.distribution == "choice":
        return trial.suggest_categorical(name, list(values))
    if dimension.distribution == "int":
        return trial.suggest_int(name, int(values[0]), int(values[1]), log=dimension.log)
    return trial.suggest_float(name, float(values[0]), float(values[1]), log=dimension.log)


def sampler(kind: str, seed: int, n_startup_trials: int, multivariate: bool) -> optuna.samplers.BaseSampler:
    """TPE (grouped multivariate, so conditional parameters are modelled jointly) or a random baseline."""
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials, multivariate=multivariate,
                                      group=multivariate, constant_liar=True)
