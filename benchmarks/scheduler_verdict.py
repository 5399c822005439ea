"""Which early stopping to trust: the recorded learning curves (benchmarks/curves/) replayed through the schedulers
on a simulated clock, with many paired seeds.

    pip install -e ".[bench]"
    python benchmarks/scheduler_verdict.py [--seeds 200] [--workers 4] [--budget-trials 12] [--sets ...]

The replay (syne-tune's simulator backend, on curves recorded by benchmarks/curves/record.py):
- N workers on a discrete-event clock; an epoch takes its recorded seconds. A trial is one configuration of the
  set's table with one of its recorded training seeds, and reports that seed's recorded val_acc each epoch.
- Searchers, as the search uses them: random (the table's configurations in a random order: they were drawn at
  random from the space) and TPE (tuneprod's Optuna sampler and define-by-run space; each proposal becomes the
  table configuration nearest to it; every epoch is an intermediate value; a stopped trial is PRUNED).
- Schedulers, through their real decision code with a stub of Ray's controller: tuneprod's `asha` and
  `asha_promotion` (PromotingASHA, i.e. `Rungs`), Ray's ASHAScheduler (`asha_stopping`) and HyperBandScheduler,
  and FIFO; max_epochs is the recorded horizon, grace_period the search's `auto` rule, reduction factor 3.
- The budget: the simulated time in which random+FIFO runs --budget-trials whole trials. Starting a trial and
  resuming one from a pause cost nothing unless --start-s says what they cost (a process started, a checkpoint
  loaded: seconds on a CPU, against epochs of minutes on a real set).
- Paired seeds: for one seed, every method draws the same configuration order, training seeds and sampler seed.

Metrics, per set: the normalised regret of the configuration a method hands over (the best val_acc reported so
far), judged by its mean final val_acc over the recorded seeds: (best - it) / (best - worst) over the table; at the
budget, the paired difference against the default with a bootstrap 95% interval and the default's paired win rate;
the time each method needs for random+FIFO's final regret (mean over seeds), as a fraction of the budget; and the
rank correlation (Spearman) of each epoch's val_acc with the final value. Ends with
`default cost to FIFO's regret: a.aax b.bbx c.ccx` (one fraction of random+FIFO's time per set).
"""
from __future__ import annotations

import argparse
import heapq
import itertools
import logging
import multiprocessing
import sys
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import optuna
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ray.tune.experiment import Trial  # noqa: E402
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler, TrialScheduler  # noqa: E402

from tuneprod.spec import load_spec  # noqa: E402
from tuneprod.tuning.scheduler import PromotingASHA, auto_grace_period  # noqa: E402
from tuneprod.tuning.space import DefineByRun, sampler  # noqa: E402

CURVES = ROOT / "benchmarks" / "curves"
REDUCTION_FACTOR = 3.0
SCHEDULERS = ("fifo", "asha", "asha_promotion", "asha_stopping", "hyperband")
SEARCHERS = ("random", "tpe")
DEFAULT = "tpe+asha"  # the search's default: search.searcher optuna, search.scheduler asha
BASELINE = "random+fifo"
GRID = 100  # points on the regret-over-time curve


# ---------------------------------------------------------------------------------------------------- the tables
@dataclass
class RecordedSet:
    name: str
    space_file: str
    configurations: pd.DataFrame  # one row per configuration, its parameters
    accuracy: np.ndarray  # configuration x seed x epoch (NaN: the run diverged)
    seconds: np.ndarray  # configuration x seed x epoch
    train_images: int
    classes: int
    warmup_epochs: float  # the longest learning-rate warm-up its space allows (the grace period's auto rule)

    @property
    def max_epochs(self) -> int:
        return self.accuracy.shape[2]

    @property
    def value(self) -> np.ndarray:
        """A configuration's worth: its final val_acc, the mean over its recorded seeds (a diverged run counts 0)."""
        return np.nan_to_num(self.accuracy[:, :, -1], nan=0.0).mean(axis=1)

    def regret(self, configuration: Optional[int]) -> float:
        value = self.value
        if configuration is None:
            return 1.0
        return float((value.max() - value[configuration]) / max(value.max() - value.min(), 1e-12))


def load_sets(folder: Path = CURVES, names: Optional[list[str]] = None) -> list[RecordedSet]:
    """The recorded sets, each cut to the configurations recorded with every seed for every epoch."""
    curves = pd.read_parquet(folder / "curves.parquet")
    configurations = pd.read_parquet(folder / "configurations.parquet")
    sets = pd.read_parquet(folder / "sets.parquet").set_index("set")
    found = []
    for name in names or list(sets.index):
        rows = curves[curves["set"] == name]
        epochs, seeds = int(rows["epoch"].max()), int(rows["seed"].nunique())
        complete = rows.groupby("configuration").size().loc[lambda n: n == epochs * seeds].index
        rows = rows[rows["configuration"].isin(complete)].sort_values(["configuration", "seed", "epoch"])
        shape = (len(complete), seeds, epochs)
        params = configurations[(configurations["set"] == name) & configurations["configuration"].isin(complete)]
        space = load_spec(ROOT / "search_spaces" / sets.loc[name, "space"])
        found.append(RecordedSet(name, sets.loc[name, "space"],
                                 params.sort_values("configuration").drop(columns="set").reset_index(drop=True),
                                 rows["val_acc"].to_numpy(float).reshape(shape),
                                 rows["seconds"].to_numpy(float).reshape(shape),
                                 int(sets.loc[name, "train_images"]), int(sets.loc[name, "classes"]),
                                 space.longest_warmup_epochs))
    return found


# ---------------------------------------------------------------------------------------------------- searchers
class RandomTable:
    """The table's configurations in a random order (a fresh order once all were proposed)."""

    def __init__(self, recorded: RecordedSet, rng: np.random.Generator):
        self.order = itertools.chain.from_iterable(rng.permutation(len(recorded.configurations)) for _ in range(100))

    def propose(self, trial: "ReplayedTrial") -> int:
        return int(next(self.order))

    def result(self, trial: "ReplayedTrial", epoch: int, score: float) -> None:
        pass

    def ended(self, trial: "ReplayedTrial", finished: bool, failed: bool = False) -> None:
        pass


class TPETable:
    """tuneprod's TPE sampler on the set's space; a proposal becomes the nearest configuration of the table not
    tried yet (categorical values must match or cost 1; numbers cost their distance over the range, on a log scale
    where the space samples on one), as the random searcher tries each once before any twice: otherwise TPE's
    proposals, which concentrate, would keep landing on the same few of the table's configurations."""

    def __init__(self, recorded: RecordedSet, seed: int):
        spec = load_spec(ROOT / "search_spaces" / recorded.space_file)
        options = spec.search.searcher
        self.study = optuna.create_study(direction="maximize", sampler=sampler(
            "optuna", seed, options.n_startup_trials, options.multivariate))
        self.define = DefineByRun(spec.space)
        self.dimensions = spec.space.dimensions
        self.table = recorded.configurations
        self.asked: dict[str, optuna.Trial] = {}
        self.untried = np.ones(len(self.table), dtype=bool)

    def propose(self, trial: "ReplayedTrial") -> int:
        proposal = self.study.ask()
        self.define(proposal)
        if not self.untried.any():
            self.untried[:] = True
        chosen = self.nearest(proposal.params, self.untried)
        self.untried[chosen] = False
        # The study learns what was trained, the table's configuration, not the proposal it stands in for: the
        # proposal leaves as FAIL (which TPE ignores), and a trial fixed to the configuration takes its place.
        self.study.tell(proposal, state=optuna.trial.TrialState.FAIL)
        row = self.table.iloc[chosen]
        self.study.enqueue_trial({d.name: _plain(row[d.name]) for d in self.dimensions
                                  if d.name in row and pd.notna(row[d.name])})
        self.asked[trial.trial_id] = self.study.ask()
        self.define(self.asked[trial.trial_id])
        return chosen

    def nearest(self, params: dict, among: Optional[np.ndarray] = None) -> int:
        cost = np.zeros(len(self.table)) if among is None else np.where(among, 0.0, np.inf)
        for dimension in self.dimensions:
            column = self.table[dimension.name] if dimension.name in self.table else pd.Series([None] * len(cost))
            wanted, present = params.get(dimension.name), column.notna().to_numpy()
            if wanted is None:
                cost += present
            elif dimension.distribution == "choice":
                cost += ~present | (column.to_numpy() != wanted)
            else:
                low, high = map(float, dimension.values)
                scale = np.log if dimension.log else (lambda v: v)
                values = np.where(present, column.to_numpy(float, na_value=low), low)
                distance = np.abs(scale(values) - scale(float(wanted))) / (scale(high) - scale(low))
                cost += np.where(present, distance, 1.0)
        return int(np.argmin(cost))

    def result(self, trial: "ReplayedTrial", epoch: int, score: float) -> None:
        self.asked[trial.trial_id].report(score, epoch)

    def ended(self, trial: "ReplayedTrial", finished: bool, failed: bool = False) -> None:
        asked = self.asked.pop(trial.trial_id)
        if failed:
            self.study.tell(asked, state=optuna.trial.TrialState.FAIL)
        elif finished:
            self.study.tell(asked, trial.last_result["val_acc"])
        else:  # stopped at a rung: as the search tells Optuna (its last intermediate value)
            self.study.tell(asked, state=optuna.trial.TrialState.PRUNED)


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


# ---------------------------------------------------------------------------------------------------- the replay
class ReplayedTrial:
    """What the schedulers see of a Ray trial."""

    def __init__(self, number: int, configuration: int, seed: int):
        self.trial_id = f"t{number:04d}"
        self.configuration, self.seed = configuration, seed
        self.status = Trial.PENDING
        self.is_saving = False
        self.epoch = 0
        self.generation = 0  # bumped when the trial stops running, so that its queued epoch is dropped
        self.last_result: dict = {}

    def __repr__(self) -> str:
        return self.trial_id


class NeverFinished:
    def is_finished(self) -> bool:
        return False  # the budget ends the search, not the searcher


class Replay:
    """The part of Ray's TuneController the schedulers call, on a simulated clock."""

    def __init__(self, recorded: RecordedSet, scheduler: TrialScheduler, searcher, workers: int,
                 training_seeds: np.ndarray, start_s: float = 0.0):
        """`start_s`: what starting a trial's process costs, at its start and at every resume from a pause."""
        self.recorded, self.scheduler, self.searcher = recorded, scheduler, searcher
        self.start_s = start_s
        self.workers, self.training_seeds = workers, training_seeds
        self.trials: list[ReplayedTrial] = []
        self.search_alg = NeverFinished()
        self.now = 0.0
        self.queue: list = []  # (time the epoch ends, sequence, generation, trial)
        self.sequence = itertools.count()
        self.best: tuple[float, Optional[int]] = (-np.inf, None)  # the incumbent: best val_acc reported, its configuration
        self.handed_over: list[tuple[float, Optional[int]]] = [(0.0, None)]

    # -- the controller's interface
    def get_trials(self) -> list[ReplayedTrial]:
        return self.trials

    def stop_trial(self, trial: ReplayedTrial) -> None:
        if trial.status in (Trial.TERMINATED, Trial.ERROR):
            return
        if trial.status in (Trial.PENDING, Trial.PAUSED):
            self.scheduler.on_trial_remove(self, trial)
        else:
            self.scheduler.on_trial_complete(self, trial, trial.last_result)
        self.searcher.ended(trial, finished=False)
        self._end(trial)

    # -- the clock
    def run(self, budget_s: float) -> list[tuple[float, Optional[int]]]:
        """(time, configuration handed over) at every change, until the budget."""
        while True:
            self._fill()
            if not self.queue:
                break
            end, _, generation, trial = heapq.heappop(self.queue)
            if generation != trial.generation:
                continue
            if end > budget_s:
                break
            self.now = end
            self._epoch_done(trial)
        return self.handed_over

    def _fill(self) -> None:
        """As Ray's controller steps: one trial kept pending (Ray keeps one for a searcher of its own, such as
        tuneprod's Optuna search), then the scheduler's choices started while workers are free."""
        while True:
            if not any(t.status == Trial.PENDING for t in self.trials):
                self._add_trial()
            if sum(t.status == Trial.RUNNING for t in self.trials) >= self.workers:
                return
            trial = self.scheduler.choose_trial_to_run(self)
            if trial is None:
                return
            trial.status = Trial.RUNNING
            self._start_epoch(trial, self.start_s)

    def _add_trial(self) -> None:
        trial = ReplayedTrial(len(self.trials), -1, int(self.training_seeds[len(self.trials)]))
        trial.configuration = self.searcher.propose(trial)
        self.trials.append(trial)
        self.scheduler.on_trial_add(self, trial)

    def _start_epoch(self, trial: ReplayedTrial, extra_s: float = 0.0) -> None:
        seconds = self.recorded.seconds[trial.configuration, trial.seed, trial.epoch] + extra_s
        heapq.heappush(self.queue, (self.now + seconds, next(self.sequence), trial.generation, trial))

    def _epoch_done(self, trial: ReplayedTrial) -> None:
        trial.epoch += 1
        score = float(self.recorded.accuracy[trial.configuration, trial.seed, trial.epoch - 1])
        if np.isnan(score):  # the run diverged: the trial fails, as a NaN loss fails one in the search
            self.scheduler.on_trial_error(self, trial)
            self.searcher.ended(trial, finished=False, failed=True)
            self._end(trial)
            return
        trial.last_result = {"epoch": trial.epoch, "training_iteration": trial.epoch, "val_acc": score}
        if score > self.best[0]:
            self.best = (score, trial.configuration)
            self.handed_over.append((self.now, trial.configuration))
        decision = self.scheduler.on_trial_result(self, trial, trial.last_result)
        if trial.status != Trial.RUNNING:  # a scheduler may stop it through the controller while deciding
            return
        self.searcher.result(trial, trial.epoch, score)  # a stopped trial's rung value too, as the search tells it
        if decision == TrialScheduler.STOP or trial.epoch >= self.recorded.max_epochs:
            self.scheduler.on_trial_complete(self, trial, trial.last_result)
            self.searcher.ended(trial, finished=trial.epoch >= self.recorded.max_epochs)
            self._end(trial)
            return
        if decision == TrialScheduler.PAUSE:
            trial.status = Trial.PAUSED
            trial.generation += 1
        else:
            self._start_epoch(trial)

    def _end(self, trial: ReplayedTrial) -> None:
        trial.status = Trial.TERMINATED
        trial.generation += 1


def make_scheduler(method: str, recorded: RecordedSet) -> TrialScheduler:
    """The scheduler of a method's `searcher+scheduler[:rf=R][:grace=G]`: reduction factor R (default 3), grace
    period G epochs (default: the search's auto rule)."""
    kind, *options = method.split("+")[-1].split(":")
    settings = dict(option.split("=") for option in options)
    reduction_factor = float(settings.get("rf", REDUCTION_FACTOR))
    grace = int(settings.get("grace", 0)) or auto_grace_period(recorded.train_images, recorded.classes,
                                                               recorded.max_epochs, reduction_factor,
                                                               recorded.warmup_epochs)
    rungs = dict(metric="val_acc", mode="max", max_t=recorded.max_epochs, reduction_factor=reduction_factor)
    if kind == "fifo":
        return FIFOScheduler()
    if kind in ("asha", "asha_promotion"):
        return PromotingASHA("val_acc", "max", recorded.max_epochs, grace, reduction_factor,
                             stop_losers=kind == "asha")
    if kind == "asha_stopping":
        return ASHAScheduler(time_attr="epoch", grace_period=grace, **rungs)
    if kind == "hyperband":
        return HyperBandScheduler(time_attr="epoch", **rungs)
    raise ValueError(f"unknown scheduler in {method!r}")


def replay(recorded: RecordedSet, method: str, seed: int, workers: int, budget_s: float,
           start_s: float = 0.0) -> np.ndarray:
    """One paired seed of one method: its regret at each of GRID + 1 points in [0, budget]."""
    searcher_kind = method.split("+")[0]
    streams = np.random.default_rng([seed, zlib.crc32(recorded.name.encode())])
    order_rng, seeds_rng = np.random.default_rng(streams.integers(2 ** 32)), streams.integers(2 ** 32)
    training_seeds = np.random.default_rng(seeds_rng).integers(recorded.accuracy.shape[1], size=100_000)
    searcher = RandomTable(recorded, order_rng) if searcher_kind == "random" else TPETable(recorded, seed)
    handed = Replay(recorded, make_scheduler(method, recorded), searcher, workers, training_seeds,
                    start_s).run(budget_s)
    times = np.array([t for t, _ in handed])
    regrets = np.array([recorded.regret(c) for _, c in handed])
    grid = np.linspace(0, budget_s, GRID + 1)
    return regrets[np.searchsorted(times, grid, side="right") - 1]


def budget_for(recorded: RecordedSet, workers: int, trials: int) -> float:
    """The simulated time in which `workers` run `trials` whole trials of the average recorded length."""
    return float(recorded.seconds.sum(axis=2).mean() * trials / workers)


# ---------------------------------------------------------------------------------------------------- the verdict
def _replay_job(job: tuple) -> tuple:
    warnings.filterwarnings("ignore")
    logging.getLogger("ray.tune.schedulers").setLevel(logging.WARNING)  # HyperBand logs each bracket it skips
    recorded, method, seed, workers, budget, start_s = job
    return recorded.name, method, seed, replay(recorded, method, seed, workers, budget, start_s)


def run_all(sets: list[RecordedSet], methods: list[str], seeds: int, workers: int, budget_trials: int,
            processes: int, start_s: float = 0.0) -> dict:
    """{set: {method: seeds x grid regrets}}."""
    jobs = [(recorded, method, seed, workers, budget_for(recorded, workers, budget_trials), start_s)
            for recorded in sets for method in methods for seed in range(seeds)]
    results: dict = {r.name: {m: np.zeros((seeds, GRID + 1)) for m in methods} for r in sets}
    if processes > 1:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            done = pool.imap_unordered(_replay_job, jobs, chunksize=8)
            for name, method, seed, curve in done:
                results[name][method][seed] = curve
    else:
        for job in jobs:
            name, method, seed, curve = _replay_job(job)
            results[name][method][seed] = curve
    return results


def bootstrap_interval(differences: np.ndarray, rng: np.random.Generator, draws: int = 2000) -> tuple[float, float]:
    means = differences[rng.integers(len(differences), size=(draws, len(differences)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def cost_to_reach(curve: np.ndarray, target: float) -> float:
    """The grid point (as a fraction of the budget) from which a mean regret curve stays at or below target (the
    handed-over configuration can get worse: it is picked on one noisy run); inf if it ends above."""
    above = np.flatnonzero(curve > target + 1e-12)
    if len(above) and above[-1] == len(curve) - 1:
        return float("inf")
    return (above[-1] + 1) / GRID if len(above) else 0.0


def rank_correlation(recorded: RecordedSet) -> np.ndarray:
    """Per epoch: Spearman, over the configurations, of the mean val_acc at that epoch with the final value."""
    final = pd.Series(recorded.value)
    at = np.nan_to_num(recorded.accuracy, nan=0.0).mean(axis=1)
    return np.array([pd.Series(at[:, e]).corr(final, method="spearman") for e in range(recorded.max_epochs)])


def verdict(sets: list[RecordedSet], results: dict, default: str = DEFAULT) -> dict:
    """Per set and method: mean final regret, the paired difference from the default (method - default; > 0: the
    default is better) with its interval, the default's win rate, and the cost to random+FIFO's final regret."""
    rng = np.random.default_rng(0)
    table = {}
    for recorded in sets:
        runs = results[recorded.name]
        target = runs[BASELINE][:, -1].mean()
        rows = {}
        for method, curves in runs.items():
            difference = curves[:, -1] - runs[default][:, -1]
            wins = (difference > 0).mean() + 0.5 * (difference == 0).mean()
            rows[method] = {"regret": curves[:, -1].mean(), "quarter": curves[:, GRID // 4].mean(),
                            "half": curves[:, GRID // 2].mean(), "difference": difference.mean(),
                            "interval": bootstrap_interval(difference, rng), "default_wins": wins,
                            "cost": cost_to_reach(curves.mean(axis=0), target)}
        table[recorded.name] = rows
    return table


def print_verdict(sets: list[RecordedSet], table: dict, seeds: int, workers: int, budget_trials: int,
                  default: str = DEFAULT) -> None:
    for recorded in sets:
        print(f"\n{recorded.name}: {len(recorded.configurations)} configurations x {recorded.accuracy.shape[1]} seeds x "
              f"{recorded.max_epochs} epochs ({recorded.space_file}); {workers} workers, the budget of "
              f"{budget_trials} whole trials; {seeds} paired seeds")
        print(f"  {'method':26s} {'regret at 1/4':>13s} {'1/2':>6s} {'end':>6s} {'- default':>10s} {'95% interval':>17s} "
              f"{'default wins':>13s} {'cost to FIFO':>13s}")
        for method, row in sorted(table[recorded.name].items(), key=lambda kv: kv[1]["regret"]):
            low, high = row["interval"]
            print(f"  {method:26s} {row['quarter']:13.3f} {row['half']:6.3f} {row['regret']:6.3f} "
                  f"{row['difference']:+10.3f} [{low:+.3f}, {high:+.3f}] "
                  f"{row['default_wins']:13.2f} {row['cost']:12.2f}x")
        correlation = rank_correlation(recorded)
        shown = sorted({1, 2, 3, 5, 9, recorded.max_epochs // 2, recorded.max_epochs - 1} & set(range(1, recorded.max_epochs)))
        print("  rank correlation with the final val_acc: " +
              "  ".join(f"epoch {e}: {correlation[e - 1]:.2f}" for e in shown))
    print("\ndefault cost to FIFO's regret: " + " ".join(f"{table[r.name][default]['cost']:.2f}x" for r in sets))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--budget-trials", type=int, default=12)
    parser.add_argument("--sets", default=None, help="comma-separated; default: every recorded set")
    parser.add_argument("--methods", default=",".join(f"{a}+{b}" for a in SEARCHERS for b in SCHEDULERS))
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--start-s", type=float, default=0.0,
                        help="seconds a trial's start and every resume from a pause cost (default: none)")
    parser.add_argument("--curves", type=Path, default=CURVES)
    args = parser.parse_args()
    sets = load_sets(args.curves, args.sets.split(",") if args.sets else None)
    started = time.perf_counter()
    results = run_all(sets, args.methods.split(","), args.seeds, args.workers, args.budget_trials, args.processes,
                      args.start_s)
    print_verdict(sets, verdict(sets, results), args.seeds, args.workers, args.budget_trials)
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
