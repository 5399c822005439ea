"""Successive halving that compares before it decides, for Ray Tune.

Ray's ASHAScheduler decides at once, against whatever results a rung holds: the first trial to reach a rung has
nothing to be compared with and goes on, however bad (ray-project/ray #32634). Here a trial that reaches a rung
holding fewer than reduction_factor results waits there, paused with its checkpoint; once the rung holds enough,
the best 1/reduction_factor of it go on (a waiting trial resumes where it stopped) and the others are decided:
- `stop_losers=True` (type asha, the default): stopped then, as Ray's ASHA stops them; the searcher learns their
  result at once (TPE only learns from finished trials);
- `stop_losers=False` (type asha_promotion, the paper's Algorithm 2: Li et al. 2020; syne-tune's "promotion"
  type): they wait on, and are promoted if later arrivals rank below them.
When no new trial can come, a rung that promoted nobody promotes its best, and the trials still waiting end there.

`Rungs` is the rule alone, in plain Python (tested with hand-written results); `PromotingASHA` feeds it Ray's trials.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher

from tuneprod.tuning.endings import TrialEndings
from tuneprod.tuning.restore import reported_epochs, resuming

CONTINUE, WAIT, STOP = "continue", "wait", "stop"


def milestones(grace_period: int, reduction_factor: float, max_epochs: int) -> tuple[int, ...]:
    """The rungs below max_epochs: grace, grace*rf, grace*rf^2, ... (epochs)."""
    rungs, k = [], 0
    while (rung := round(grace_period * reduction_factor ** k)) < max_epochs:
        if rung not in rungs:
            rungs.append(rung)
        k += 1
    return tuple(rungs)


class Rungs:
    """Scores (higher is better) of the trials that reached each rung, which of them were promoted, and where each
    paused trial waits."""

    def __init__(self, milestones: tuple[int, ...], reduction_factor: float, stop_losers: bool = True):
        self.milestones = milestones
        self.reduction_factor = reduction_factor
        self.stop_losers = stop_losers
        self.peers = math.ceil(reduction_factor)  # results a rung needs before anyone there is decided
        self.scores: dict[int, dict[str, float]] = {m: {} for m in milestones}  # in arrival order
        self.promoted: dict[int, set[str]] = {m: set() for m in milestones}
        self.waiting: dict[str, int] = {}  # trial -> the rung it waits at

    def arrive(self, trial: str, rung: int, score: float) -> str:
        """Records a trial's score at a rung: CONTINUE (it is among the best), WAIT (too few to compare with, or
        it may yet be promoted) or STOP."""
        if math.isnan(score):
            score = -math.inf  # a NaN metric ranks last, and does not poison the comparison
        self.scores[rung][trial] = score
        if trial in self.promotable(rung):
            self.promoted[rung].add(trial)
            return CONTINUE
        if self.stop_losers and self.decided(rung):
            return STOP
        self.waiting[trial] = rung
        return WAIT

    def decided(self, rung: int) -> bool:
        return len(self.scores[rung]) >= self.peers

    def promotable(self, rung: int) -> list[str]:
        """The best floor(n / reduction_factor) of the n trials at a rung, and those tied with the last of them (equal
        scores cannot be told apart: early on, many trials sit at chance), less those promoted already; best first."""
        scores = self.scores[rung]
        quota = int(len(scores) // self.reduction_factor)
        if quota == 0:
            return []
        ranked = sorted(scores, key=lambda t: -scores[t])
        cutoff = scores[ranked[quota - 1]]
        return [t for t in ranked if scores[t] >= cutoff and t not in self.promoted[rung]]

    def next_promotion(self, paused: set[str]) -> Optional[str]:
        """A waiting trial that has earned its promotion: from the highest rung first, the best first."""
        for rung in reversed(self.milestones):
            for trial in self.promotable(rung):
                if self.waiting.get(trial) == rung and trial in paused:
                    return self._promote(trial)
        return None

    def losers(self, paused: set[str]) -> list[tuple[str, int]]:
        """With stop_losers: (trial, rung) of the waiting trials whose rung now holds enough results and that are not
        among its best; they leave the rung (to be stopped)."""
        if not self.stop_losers:
            return []
        lost = [(t, rung) for t, rung in self.waiting.items()
                if t in paused and self.decided(rung) and t not in self.promotable(rung)]
        for trial, _ in lost:
            self.leave(trial)
        return lost

    def closing_promotion(self, paused: set[str]) -> Optional[str]:
        """When no new trial can arrive: the best waiting trial of the highest rung that has promoted nobody yet
        (so that a search too small to fill a rung still takes its best trial on)."""
        for rung in reversed(self.milestones):
            candidates = [t for t, at in self.waiting.items() if at == rung and t in paused]
            if candidates and not self.promoted[rung]:
                return self._promote(max(candidates, key=lambda t: self.scores[rung][t]))
        return None

    def best_waiting(self, paused: set[str]) -> Optional[str]:
        """The waiting trial that stands highest (highest rung, then best score): for when nothing else can run."""
        candidates = [t for t in self.waiting if t in paused]
        if not candidates:
            return None
        return self._promote(max(candidates, key=lambda t: (self.waiting[t], self.scores[self.waiting[t]][t])))

    def leave(self, trial: str) -> None:
        """The trial ended (finished, failed or stopped): it waits nowhere any more; its scores stay for comparison."""
        self.waiting.pop(trial, None)

    def _promote(self, trial: str) -> str:
        self.promoted[self.waiting.pop(trial)].add(trial)
        return trial


class RecountsAfterResume:
    """Mixed into the search's schedulers, for a search resumed after losing its driver. Ray restores its searcher's
    state and its trials' state from two files that it uploads separately (to a bucket, every few seconds): a
    driver lost between the two uploads leaves a searcher whose count includes trials the restored state lacks, and
    the search would end that many trials short of num_samples. On its first step after a resume, the searcher
    counts the trials Ray holds. (Ray's SearchGenerator keeps that count in `_counter` and offers no other way to
    set it; the schedulers are the only part of a search that sees both it and the trials.)"""

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        self._recount = False  # also keeps the instance's state non-empty, so that unpickling calls __setstate__

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._recount = resuming() is not None

    def recount(self, tune_controller) -> None:
        if self._recount:
            self._recount = False
            generator, held = tune_controller.search_alg, len(tune_controller.get_trials())
            if getattr(generator, "_counter", 0) > held:
                generator._counter = held

    def choose_trial_to_run(self, tune_controller) -> Optional[Trial]:
        self.recount(tune_controller)
        return super().choose_trial_to_run(tune_controller)


class ResumableFIFO(RecountsAfterResume, FIFOScheduler):
    """`fifo`: every trial to max_epochs."""


class PromotingASHA(RecountsAfterResume, FIFOScheduler):
    """Ray's side of `Rungs`: PAUSE at a rung, promoted trials chosen to run before new ones, the end of the search
    closing the rungs. Rungs count epochs (`epoch` in each report); `metric` and `mode` rank trials at the rungs."""

    def __init__(self, metric: str, mode: str, max_epochs: int, grace_period: int, reduction_factor: float,
                 max_concurrent: Optional[int] = None, stop_losers: bool = True,
                 endings: Optional[TrialEndings] = None):
        """`endings`: the search's record, where each stop is written as it is decided."""
        super().__init__()
        self.endings = endings or TrialEndings(None, max_epochs)
        self.max_concurrent = max_concurrent  # trials running at once (search.max_concurrent_trials), if limited
        self._metric = metric
        self._sign = 1.0 if mode == "max" else -1.0  # Rungs ranks higher scores first
        self.rungs = Rungs(milestones(grace_period, reduction_factor, max_epochs), reduction_factor, stop_losers)

    def __setstate__(self, state: dict) -> None:
        """Ray saves no scheduler state (ray-project/ray #30838): Tuner.restore brings this back as the search began.
        A resumed search replays the results its trials reported, so that its rungs decide as an uninterrupted
        run's would. (The rungs are shared with RunningTrialsLimiter, so they are refilled, not replaced.)"""
        super().__setstate__(state)
        folder = resuming()
        if folder is not None:
            self.replay((trial, epoch, self._sign * value)
                        for trial, epoch, value in reported_epochs(folder, self._metric))

    def replay(self, arrivals: Iterable[tuple[str, int, float]]) -> None:
        """(trial, epoch, score) in the order they came: each rung result recorded again. A trial seen at a higher
        rung than the one it waited at was promoted from it."""
        for trial, epoch, score in arrivals:
            if epoch not in self.rungs.milestones or trial in self.rungs.scores[epoch]:
                continue
            if trial in self.rungs.waiting:
                self.rungs._promote(trial)
            self.rungs.arrive(trial, epoch, score)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        epoch = result.get("epoch")
        if epoch not in self.rungs.milestones or self._metric not in result:
            return TrialScheduler.CONTINUE
        decision = self.rungs.arrive(trial.trial_id, epoch, self._sign * float(result[self._metric]))
        if decision == STOP:
            self.endings.stopped(trial.trial_id, epoch)
        return {CONTINUE: TrialScheduler.CONTINUE, WAIT: TrialScheduler.PAUSE, STOP: TrialScheduler.STOP}[decision]

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        # A resumed search brings back a trial that waited at a rung as PENDING (which would also hold back the
        # searcher: Ray keeps one trial pending at a time): it waits on, PAUSED, until its rung promotes it.
        if trial.status == Trial.PENDING and trial.trial_id in self.rungs.waiting:
            trial.set_status(Trial.PAUSED)

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self.rungs.leave(trial.trial_id)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self.rungs.leave(trial.trial_id)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self.rungs.leave(trial.trial_id)

    def choose_trial_to_run(self, tune_controller) -> Optional[Trial]:
        self.recount(tune_controller)
        trials = tune_controller.get_trials()
        paused = {t.trial_id: t for t in trials if t.status == Trial.PAUSED}
        for loser, rung in self.rungs.losers(set(paused)):  # their rung filled up with better trials
            self.endings.stopped(loser, rung)
            tune_controller.stop_trial(paused.pop(loser))
        active = sum(t.status in (Trial.RUNNING, Trial.PENDING) for t in trials)
        if self.max_concurrent is not None and active >= self.max_concurrent:
            return None
        promoted = self.rungs.next_promotion(set(paused))
        if promoted:
            return paused[promoted]
        pending = [t for t in trials if t.status == Trial.PENDING]
        if pending:
            return pending[0]
        if any(t.status == Trial.RUNNING for t in trials) or not paused:
            return None
        # Nothing runs and nothing new is queued: close the rungs when the searcher has no trials left; otherwise
        # (it has nothing to propose yet) let the best waiting trial on, so that the search moves.
        waiting = set(paused)
        finished = tune_controller.search_alg.is_finished()
        chosen = self.rungs.closing_promotion(waiting) or (None if finished else self.rungs.best_waiting(waiting))
        if chosen:
            return paused[chosen]
        for trial in paused.values():  # they end at the rung they wait at: stopped early, as ASHA intends
            self.endings.stopped(trial.trial_id, self.rungs.waiting.get(trial.trial_id, 0))
            tune_controller.stop_trial(trial)
        return None

    def debug_string(self) -> str:
        return f"promoting ASHA: rungs at epochs {', '.join(map(str, self.rungs.milestones))}"


class RecordingASHA(RecountsAfterResume, ASHAScheduler):
    """Ray's ASHA (`asha_stopping`), writing each stop it decides into the search's record."""

    def __init__(self, endings: TrialEndings, **options):
        super().__init__(**options)
        self.endings = endings

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP and result.get("epoch", 0) < self.endings.max_epochs:
            self.endings.stopped(trial.trial_id, int(result.get("epoch", 0)))
        return decision


class RunningTrialsLimiter(ConcurrencyLimiter):
    """search.max_concurrent_trials with the promoting ASHA: a trial waiting paused at a rung holds no resources, so
    it does not count. Ray's ConcurrencyLimiter counts it until it ends, and with every slot taken by waiting trials
    the searcher would propose nothing while the machine idles."""

    def __init__(self, searcher: Searcher, max_concurrent: int, rungs: Rungs):
        super().__init__(searcher, max_concurrent)
        self.rungs = rungs

    def suggest(self, trial_id: str) -> Optional[dict]:
        if len(self.live_trials - set(self.rungs.waiting)) >= self.max_concurrent:
            return None
        suggestion = self.searcher.suggest(trial_id)
        if suggestion not in (None, Searcher.FINISHED):
            self.live_trials.add(trial_id)
            self.num_unfinished_live_trials += 1
        return suggestion


# Before the first comparison each class should have been seen this many times (in all, over the epochs): on the
# few-shot sets of issue 8, 6 sightings a class left every trial under 1% (a coin toss for ASHA), 30 separated them.
GRACE_SIGHTINGS_PER_CLASS = 20


def auto_grace_period(train_images: int, classes: int, max_epochs: int, reduction_factor: float,
                      warmup_epochs: float = 0.0) -> int:
    """The first rung in epochs, from the data size: a 48k-image epoch of 1000 classes holds 48 sightings a class (1
    epoch is enough); a 1.5k-image epoch of 764 classes holds 2 (10 epochs would be needed). And after the longest
    learning-rate warm-up the space allows, plus one whole epoch: during the warm-up every trial's learning rate is
    still rising, and its score says more about the ramp than about the configuration. Capped so that at least one
    rung is left below max_epochs."""
    per_epoch = train_images / max(classes, 1)
    wanted = max(math.ceil(GRACE_SIGHTINGS_PER_CLASS / max(per_epoch, 1e-9)), math.ceil(warmup_epochs) + 1)
    return max(1, min(wanted, int(max_epochs // reduction_factor)))
