"""One budget for the whole run: the trials, then the final stage, then the test predictions.

Before any trial, a short measurement of training and evaluation speed (with a trial's resources) checks that the
budget holds one trial to its first rung, the final stage and the predictions; a smaller budget is a one-line error.
While the trials run, `BudgetStopper` re-plans the final stage from their measured speeds and best epochs, and ends
the trials when the time left is what the final stage and the predictions need.
"""
from __future__ import annotations

import heapq
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from ray import tune

from tuneprod.spec import Hyperparams, member_epochs
from tuneprod.tuning.endings import TrialEndings

AUTO_MEMBERS_MOST = 8  # final.members auto: past a handful of members, another adds little (and costs predictions)
FIXED_OVERHEAD_S = 30.0  # member tasks started, models built, the artifact written and loaded again to predict
DECODE_S_PER_IMAGE = 0.004  # a test photo read and resized for prediction (a 256 px JPEG, one core)
SHARD_IMAGES = 1000  # test images per prediction task: the shards are scored side by side, one per slot


@dataclass(frozen=True)
class Speed:
    train_images_per_s: float  # one trial's (or member's) training throughput, augmentation included
    eval_images_per_s: float  # forward passes only
    predict_speedup: float = 1.0  # how much faster the test predictions run a model (final/inference.runnable)


@dataclass(frozen=True)
class Workload:
    """What the run must get through besides the trials' epochs."""

    train_images: int  # a trial's epoch
    val_images: int
    labelled_images: int  # a member's epoch: train + validation
    test_images: int
    views: int  # forward passes per test image and member (test-time augmentation)
    members: int  # distinct configurations (final.members)
    seeds: int  # each trained with this many seeds (final.seeds)
    member_epochs: Union[str, int]  # final.epochs: a number, or 'auto' or 'best' (from each member's trial)
    max_epochs: int  # search.scheduler.max_epochs
    slots: int  # members trained at once
    final: bool  # whether the final stage and predictions follow the trials
    time_share: float = 0.0  # final.time_share: the least share of the budget the trials leave

    def epochs_for(self, best_epoch: int, epochs_run: int) -> int:
        """A member's epochs, from its trial's best epoch and the epochs it ran (spec.member_epochs)."""
        return member_epochs(self.member_epochs, best_epoch, epochs_run, self.max_epochs)


@dataclass(frozen=True)
class FinalEstimate:
    members_s: float
    predict_s: float
    overhead_s: float

    @property
    def total_s(self) -> float:
        return self.members_s + self.predict_s + self.overhead_s


def makespan(durations: Sequence[float], slots: int) -> float:
    """Wall time of jobs run `slots` at a time, longest first, each on the slot that frees first."""
    ends = [0.0] * max(1, slots)
    for duration in sorted(durations, reverse=True):
        heapq.heapreplace(ends, ends[0] + duration)
    return max(ends)


@dataclass(frozen=True)
class MemberPlan:
    epochs: int
    gallery: bool = False  # predicts by a gallery: one more pass over every labelled image, to embed them


def final_estimate(work: Workload, speed: Speed, members: Sequence[MemberPlan]) -> FinalEstimate:
    if not work.final:
        return FinalEstimate(0.0, 0.0, 0.0)
    epoch_s = work.labelled_images / speed.train_images_per_s
    gallery_s = work.labelled_images / speed.eval_images_per_s
    members_s = makespan([m.epochs * epoch_s + (gallery_s if m.gallery else 0.0) for m in members], work.slots)
    per_image_s = work.views * len(members) / (speed.eval_images_per_s * speed.predict_speedup) + DECODE_S_PER_IMAGE
    shards = shard_sizes(work.test_images, work.slots)
    return FinalEstimate(members_s, makespan([size * per_image_s for size in shards], work.slots), FIXED_OVERHEAD_S)


def shard_sizes(images: int, slots: int) -> list[int]:
    """The test images' shards, one prediction task each: at most SHARD_IMAGES, as many as a multiple of the slots
    and as even as can be, so that no slot idles while another scores a last shard (1,597 images on 2 slots: 799
    and 798, not 1,000 and 597)."""
    if images <= 0:
        return []
    count = max(1, slots) * math.ceil(images / (max(1, slots) * SHARD_IMAGES))
    count = min(count, images)
    return [images // count + (1 if n < images % count else 0) for n in range(count)]


def members_that_fit(work: Workload, speed: Speed, best: Sequence[MemberPlan], seconds: float) -> int:
    """final.members auto: how many members the final stage can train, and predict with, in `seconds`. The best
    trials' plans are taken in turn (in the final stage a configuration picked again is another seed of it); at
    least one round of slots, at most AUTO_MEMBERS_MOST (or the slots, if more)."""
    count, most = work.slots, most_auto_members(work)
    while count < most and final_estimate(work, speed, taken_in_turn(best, count + 1)).total_s <= seconds:
        count += 1
    return count


def most_auto_members(work: Workload) -> int:
    return max(work.slots, AUTO_MEMBERS_MOST)


def taken_in_turn(best: Sequence[MemberPlan], count: int) -> list[MemberPlan]:
    return [best[n % len(best)] for n in range(count)]


def trial_seconds(work: Workload, speed: Speed, epochs: int) -> float:
    return epochs * (work.train_images / speed.train_images_per_s + work.val_images / speed.eval_images_per_s)


def minimum_seconds(work: Workload, speed: Speed, grace_period: int) -> tuple[float, float, FinalEstimate]:
    """The least a run can do: one trial to its first rung, then members as final.epochs trains them after such a
    trial, then predictions. Returns (total, the trial's part, the final part)."""
    epochs = work.epochs_for(grace_period, grace_period)
    final = final_estimate(work, speed, [MemberPlan(epochs)] * (work.members * work.seeds))
    trial = trial_seconds(work, speed, grace_period)
    return trial + final.total_s, trial, final


@dataclass
class _TrialBest:
    score: float  # higher is better
    epoch: int
    gallery: bool  # its model predicts by a gallery
    latest_epoch: int  # the last it reported


class BudgetStopper(tune.Stopper):
    """Ends all trials once the time used plus the final stage's estimate reaches the budget. The estimate follows
    the search: the members are the current best trials (each for the epochs final.epochs gives it, from its best and
    latest epochs so far), at the median speed the trials report after their first epoch (until then, the speed
    measured before the search), scaled to what a run with a GPU to itself gets where trials share one. On an H200 a
    trial's first epoch ran 7x slower than the probe measured, and its first evaluation put predictions at 80 s where
    they took 3: trusting it ended a search 30 s into its 170."""

    alone_speedup: Optional[Callable[[dict], float]] = None  # (a class default for stoppers saved without one)

    def __init__(self, budget_s: float, work: Workload, first_speed: Speed, metric: str, mode: str,
                 progress: Callable[[str], None] = print, alone_speedup: Optional[Callable[[dict], float]] = None):
        """`alone_speedup`: from a trial's configuration, how much faster than it a member runs (trials packed
        several to a GPU; a member has one to itself)."""
        self.budget_s, self.work, self.first_speed = budget_s, work, first_speed
        self.alone_speedup = alone_speedup
        self.metric, self.sign = metric, (1.0 if mode == "max" else -1.0)
        self.progress = progress
        self.best: dict[str, _TrialBest] = {}
        self.train_speeds: list[float] = []
        self.eval_speeds: list[float] = []
        self.started = time.monotonic()
        self.stopped = False
        self.reserved_s: Optional[float] = None  # what the trials left the final stage when they were cut
        self.endings: Optional[TrialEndings] = None  # the search's record, where the cut is written

    def __call__(self, trial_id: str, result: dict) -> bool:
        value, epoch = result.get(self.metric), int(result.get("epoch", 1))
        if isinstance(value, (int, float)) and math.isfinite(value):
            score = self.sign * value
            best = self.best.get(trial_id)
            if best is None or score > best.score:
                gallery = Hyperparams.from_params(result.get("config") or {}).predicts_by_gallery
                best = self.best[trial_id] = _TrialBest(score, epoch, gallery, epoch)
            best.latest_epoch = max(best.latest_epoch, epoch)
        alone = self.alone_speedup(result.get("config") or {}) if self.alone_speedup else 1.0
        for key, speeds, measured in (("images_per_s", self.train_speeds, self.first_speed.train_images_per_s),
                                      ("eval_images_per_s", self.eval_speeds, self.first_speed.eval_images_per_s)):
            # A first epoch pays one-time costs (on a GPU: kernels loaded lazily, cuDNN's set-up): it counts only
            # where the speed could not be measured before the search (inf), as better than nothing.
            if result.get(key) and (epoch > 1 or not math.isfinite(measured)):
                speeds.append(float(result[key]) * alone)
        return False

    def speed(self) -> Speed:
        return Speed(statistics.median(self.train_speeds) if self.train_speeds else self.first_speed.train_images_per_s,
                     statistics.median(self.eval_speeds) if self.eval_speeds else self.first_speed.eval_images_per_s,
                     self.first_speed.predict_speedup)

    def members(self) -> list[MemberPlan]:
        """The planned members: the best trials so far, each with the seeds it will be trained with."""
        return [plan for plan in self._best_plans(self.work.members) for _ in range(self.work.seeds)]

    def _best_plans(self, count: int) -> list[MemberPlan]:
        top = sorted(self.best.values(), key=lambda b: -b.score)[:count]
        return [MemberPlan(self.work.epochs_for(b.epoch, b.latest_epoch), b.gallery) for b in top] or \
            [MemberPlan(self.work.epochs_for(1, 1))]

    def estimate(self) -> FinalEstimate:
        return final_estimate(self.work, self.speed(), self.members())

    def reserve_s(self, estimate: FinalEstimate) -> float:
        """What the trials leave: the planned final stage, or more with final.time_share: that share of the budget,
        but no more than the most members final.members auto trains need (the rest would go unused)."""
        if not self.work.time_share:
            return estimate.total_s
        plans = taken_in_turn(self._best_plans(self.work.members), most_auto_members(self.work))
        most_s = final_estimate(self.work, self.speed(), plans).total_s
        return max(estimate.total_s, min(self.work.time_share * self.budget_s, most_s))

    def final_members(self) -> int:
        """final.members auto, once the trials have ended: as many members as fit in the time they left (when cut,
        what they were cut for: the seconds the trials take to stop are within the setup's estimate)."""
        seconds = self.left_s() if self.reserved_s is None else self.reserved_s
        return members_that_fit(self.work, self.speed(), self._best_plans(self.work.members), seconds)

    def used_s(self) -> float:
        return time.monotonic() - self.started

    def left_s(self) -> float:
        return max(self.budget_s - self.used_s(), 0.0)

    def stop_all(self) -> bool:
        if self.stopped:
            return True
        estimate = self.estimate()
        reserve = self.reserve_s(estimate)
        if self.used_s() + reserve >= self.budget_s:
            self.stopped, self.reserved_s = True, reserve
            if self.endings is not None:
                self.endings.cut_by_budget()
            what = (f"~{estimate.members_s:.0f} s for the final stage ({len(self.members())} member(s)), "
                    f"~{estimate.predict_s:.0f} s for predictions and ~{estimate.overhead_s:.0f} s of setup"
                    if self.work.final else "nothing after the trials")
            if reserve > estimate.total_s:
                what += f"; final.time_share keeps {reserve:.0f} s for it, so final.members auto can train more"
            self.progress(f"tuneprod: {self.used_s():.0f} s of the {self.budget_s:.0f} s budget used: ending the "
                          f"trials, leaving {self.left_s():.0f} s ({what})")
        return self.stopped

    # The Tuner saves the stopper in the experiment folder, and Tuner.restore brings it back: without the progress
    # callable (the console may not pickle), and with the budget starting afresh for the resumed search (the clock of
    # the process that saved it means nothing here).
    def __getstate__(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "progress"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, progress=print, started=time.monotonic(), stopped=False, reserved_s=None)
        if self.endings is not None and self.endings.experiment_dir is not None:
            _restored[self.endings.experiment_dir] = self


# experiment folder -> the stopper Tuner.restore brought back for it: Ray keeps it inside the restored tuner, and a
# resumed search asks it, as a new one asks its own, how many members fit in the time its trials left.
_restored: dict[Path, BudgetStopper] = {}


def restored_stopper(experiment_dir: Path) -> Optional[BudgetStopper]:
    return _restored.get(Path(experiment_dir))
