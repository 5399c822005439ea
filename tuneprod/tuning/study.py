"""The search's Optuna study, kept in an SQLite file inside the experiment folder: optuna-dashboard reads it live,
the report after. Every epoch's metric is an intermediate value; a trial's state follows the search's record of how
it ended (tuning/endings.py): one the scheduler stopped or the time budget cut is PRUNED, as Optuna's own pruners
record it; a failed one is FAIL; one that ran all its epochs is COMPLETE."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Optional

import optuna
from optuna.trial import TrialState
from ray.tune.result import TRAINING_ITERATION
from ray.tune.search.optuna import OptunaSearch

from tuneprod.tuning.endings import FAILED, FAILED_RESULT, FINISHED, Ending, TrialEndings
from tuneprod.tuning.restore import resuming
from tuneprod.tuning.results import LOST, RAY_TRIAL_ID, STUDY_DB, study_storage


class StudySearch(OptunaSearch):
    """Ray's OptunaSearch on a study stored in the experiment folder. Its saved state holds trial numbers, not the
    study: a resumed search reopens the file where the folder now is, and asks no start point twice."""

    def __init__(self, experiment_dir: Path, study_name: str, endings: TrialEndings, notes: dict, **options):
        self._experiment_dir = Path(experiment_dir)
        self._endings = endings
        super().__init__(storage=study_storage(experiment_dir), study_name=study_name, **options)
        self._ot_study.set_metric_names([self._metric])  # the dashboard's axis says val_acc, not "Objective 0"
        for key, value in notes.items():  # what the report needs to draw the search: rungs, metric, budget
            self._ot_study.set_user_attr(key, value)

    def suggest(self, trial_id: str) -> Optional[dict]:
        new = trial_id not in self._ot_trials
        config = super().suggest(trial_id)
        if new:
            self._ot_trials[trial_id].set_user_attr(RAY_TRIAL_ID, trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # A failure's report is no point of the learning curve. A trial the study does not know: one Ray saved in a
        # bucket after the study's last upload there, before the driver was lost (see _reopen).
        if FAILED_RESULT not in result and trial_id in self._ot_trials:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        trial = self._ot_trials[trial_id]
        if self._storage.get_trial(trial._trial_id).state.is_finished():
            # Told already by a driver lost after the study's last upload to a bucket and before Ray's state's: the
            # restored trial ends again here. Telling Optuna twice raises, and Ray would retry the trial, forever.
            self._completed_trials.add(trial_id)
            return
        state = study_state(self._endings.conclude(trial_id, result, errored=error))
        if state == TrialState.FAIL:
            self._ot_study.tell(trial, state=TrialState.FAIL)
        elif state == TrialState.COMPLETE and result and result.get(self._metric) is not None:
            self._ot_study.tell(trial, result[self._metric])
        else:  # stopped at a rung, or cut by the time budget: Optuna takes its last intermediate value
            # Ray passes the result that a scheduler stopped the trial on to this call alone, not to
            # on_trial_result: it is the rung's value, and belongs on the learning curve.
            reported = self._storage.get_trial(trial._trial_id).intermediate_values
            if result and result.get(self._metric) is not None and result.get(TRAINING_ITERATION) not in reported \
                    and TRAINING_ITERATION in result:
                trial.report(result[self._metric], result[TRAINING_ITERATION])
            self._ot_study.tell(trial, state=TrialState.PRUNED)
        self._completed_trials.add(trial_id)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_ot_study=None, _storage=None,
                     _ot_trials={ray_id: trial._trial_id for ray_id, trial in self._ot_trials.items()})
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._experiment_dir = resuming() or self._experiment_dir
        if (self._experiment_dir / STUDY_DB).is_file():  # opening a missing one would make an empty one
            self._reopen(self._experiment_dir)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__getstate__(), file)

    def restore(self, checkpoint_path: str) -> None:
        """The state saved with the experiment's last snapshot, on the study in the folder this searcher was
        unpickled for. Trials asked for after that snapshot were lost with the driver that asked: Ray will not run
        them, so they end as FAIL rather than stay RUNNING."""
        here = self._experiment_dir
        with open(checkpoint_path, "rb") as file:
            self.__dict__.update(pickle.load(file))
        self._reopen(here)
        known = {trial._trial_id for trial in self._ot_trials.values()}
        for trial in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial._trial_id not in known:
                self._storage.set_trial_user_attr(trial._trial_id, LOST, True)
                self._ot_study.tell(trial.number, state=TrialState.FAIL)

    def _reopen(self, experiment_dir: Path) -> None:
        self._experiment_dir = experiment_dir
        self._storage = study_storage(experiment_dir)
        self._ot_study = optuna.load_study(study_name=self._study_name, storage=self._storage, sampler=self._sampler,
                                           pruner=optuna.pruners.NopPruner())
        # The saved state holds each trial's storage id (see __getstate__); one the study file lacks (its copy in a
        # bucket older than Ray's saved state) goes on without a place in the study.
        stored = {trial._trial_id for trial in self._ot_study.get_trials(deepcopy=False)}
        self._ot_trials = {ray_id: optuna.Trial(self._ot_study, storage_id)
                           for ray_id, storage_id in self._ot_trials.items() if storage_id in stored}


def study_state(ending: Ending) -> TrialState:
    return {FAILED: TrialState.FAIL, FINISHED: TrialState.COMPLETE}.get(ending.kind, TrialState.PRUNED)


def close_open_trials(study: Optional[optuna.Study], endings: TrialEndings) -> None:
    """Trials Ray ended without telling the searcher (the budget's cut) take their state from the record; a
    finished one its last value."""
    if study is None:
        return
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        ending = endings.ended.get(trial.user_attrs.get(RAY_TRIAL_ID))
        if ending is None:
            continue
        state = study_state(ending)
        values = trial.intermediate_values
        if state == TrialState.COMPLETE and values:
            study.tell(trial.number, values[max(values)])
        else:
            study.tell(trial.number, state=TrialState.PRUNED if state == TrialState.COMPLETE else state)
