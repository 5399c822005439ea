"""Search efficiency: what early stopping saves, and what it costs, at equal num_samples and seeds.

    pip install -e ".[bench]"
    python benchmarks/search_efficiency.py [--seeds 0,1,2] [--methods tpe+asha,tpe+asha_stopping] [--work search_bench]

Data and space: the built-in demo set (generated) and search_spaces/demo.yaml, its max_epochs and num_samples, with
the scheduler's defaults for the rest (grace period auto, reduction factor 3). Methods, each run with every seed:

  random+fifo         random search, every trial runs max_epochs
  tpe+asha_stopping   Optuna TPE with Ray's ASHAScheduler (decides at once: the first trial at a rung goes on)
  tpe+asha_promotion  Optuna TPE with ASHA as its paper states it: trials wait at a rung until promoted
  tpe+asha            Optuna TPE with tuneprod's default: a trial waits at a rung until reduction_factor trials
                      have reached it; the best 1/reduction_factor go on, the others stop

Per method (mean over seeds): the best validation accuracy, the test accuracy of the best configuration retrained on
all labelled data (one member, its best epoch, no test-time views), the trial-epochs run and the search's wall time.
Then, over the FIFO runs' trials, the rank correlation (Spearman) of each epoch's val_acc and val_loss with the
trial's final best val_acc: which early metric ranks trials right, and from which epoch.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import pandas as pd
import ray
import yaml

from tuneprod.final.stage import final_stage, predict_test
from tuneprod.spec import load_spec
from tuneprod.tuning.final_tasks import cluster_scorer, train_members
from tuneprod.tuning.results import read_table
from tuneprod.tuning.tuner import run_search

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"random+fifo": ("random", "fifo"), "tpe+asha_stopping": ("optuna", "asha_stopping"),
           "tpe+asha_promotion": ("optuna", "asha_promotion"), "tpe+asha": ("optuna", "asha")}


def space_for(method: str, seed: int, work: Path) -> Path:
    raw = yaml.safe_load((ROOT / "search_spaces" / "demo.yaml").read_text())
    searcher, scheduler = METHODS[method]
    raw["data"]["demo"] = str(work / "demo")
    raw["name"], raw["storage"] = f"{method}_seed{seed}", str(work / "runs")
    raw["search"]["seed"] = seed
    raw["search"]["searcher"]["type"] = searcher
    raw["search"]["scheduler"] = {"type": scheduler, "max_epochs": raw["search"]["scheduler"]["max_epochs"]}
    raw["final"] = {"members": 1, "seeds": 1, "epochs": "auto", "tta": []}
    path = work / f"{method}_seed{seed}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run(method: str, seed: int, work: Path) -> dict:
    spec = load_spec(space_for(method, seed, work))
    experiment = spec.experiment_dir
    if not (experiment / "done.json").is_file():  # a rerun of the benchmark picks up finished runs
        quiet = lambda line: None  # noqa: E731
        started = time.perf_counter()
        outcome = run_search(spec, progress=quiet, final=False)
        search_s = time.perf_counter() - started
        final_stage(spec, outcome.experiment_dir, quiet, outcome.images, train_members)
        report = predict_test(spec, outcome.experiment_dir, quiet, cluster_scorer(spec))
        table = read_table(outcome.experiment_dir)
        row = {"best_val": float(table["val_acc"].max()), "test": report.accuracy,
               "trial_epochs": int(table["epochs_run"].sum()), "search_s": search_s,
               "trials_to_max": int((table["epochs_run"] >= spec.search.scheduler.max_epochs).sum())}
        (outcome.experiment_dir / "done.json").write_text(json.dumps(row))
        experiment = outcome.experiment_dir
    row = json.loads((experiment / "done.json").read_text())
    print(f"{method:19s} seed {seed}: best val {row['best_val']:.3f}  test {row['test']:.3f}  "
          f"{row['trial_epochs']} trial-epochs  {row['search_s']:.0f} s", flush=True)
    return {**row, "experiment": experiment}


def histories(experiment: Path) -> list[pd.DataFrame]:
    """Each trial's per-epoch reports, from the result.json Ray writes beside its checkpoints."""
    found = []
    for result in sorted(experiment.glob("trial_*/result.json")):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        frame = pd.DataFrame(rows)
        if not frame.empty and "val_acc" in frame:
            found.append(frame.drop_duplicates("epoch", keep="last").set_index("epoch"))
    return found


def early_rank_correlation(experiments: list[Path]) -> pd.DataFrame:
    """Per epoch: Spearman of val_acc and of -val_loss at that epoch with the trial's best val_acc, per run, then
    the mean over runs."""
    per_run = []
    for experiment in experiments:
        trials = histories(experiment)
        final = pd.Series([t["val_acc"].max() for t in trials])
        for epoch in sorted(set.intersection(*(set(t.index) for t in trials))):
            at = lambda key: pd.Series([t.loc[epoch, key] for t in trials])  # noqa: E731
            per_run.append({"epoch": epoch, "val_acc": at("val_acc").corr(final, method="spearman"),
                            "val_loss": (-at("val_loss")).corr(final, method="spearman")})
    return pd.DataFrame(per_run).groupby("epoch").mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(METHODS), help="a subset of: " + ", ".join(METHODS))
    parser.add_argument("--work", type=Path, default=Path("search_bench"))
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    results = {method: [run(method, seed, work) for seed in seeds] for method in args.methods.split(",")}
    ray.shutdown()
    report(results, seeds)


def mean(rows: list[dict], key: str) -> float:
    return statistics.mean(row[key] for row in rows)


def report(results: dict, seeds: list[int]) -> None:
    print(f"\nmeans over seeds {', '.join(map(str, seeds))} (demo set, search_spaces/demo.yaml's space)")
    print(f"{'method':19s} {'best val':>9s} {'test':>7s} {'trial-epochs':>13s} {'to max':>7s} {'search s':>9s}")
    for method, rows in results.items():
        print(f"{method:19s} {mean(rows, 'best_val'):9.3f} {mean(rows, 'test'):7.3f} {mean(rows, 'trial_epochs'):13.1f}"
              f" {mean(rows, 'trials_to_max'):7.1f} {mean(rows, 'search_s'):9.0f}")
    for method, rows in results.items():  # paired by seed: the searcher's seed and the data are shared
        for other, others in results.items():
            if other < method:
                wins = sum(a["best_val"] > b["best_val"] for a, b in zip(rows, others))
                print(f"{method} finds the better best val than {other} in {wins} of {len(rows)} seeds")
    if "random+fifo" not in results:
        return
    correlation = early_rank_correlation([row["experiment"] for row in results["random+fifo"]])
    print("\nrank correlation with the trial's best val_acc (Spearman, FIFO runs):")
    print("epoch  " + "  ".join(f"{epoch:>5d}" for epoch in correlation.index))
    for key in ("val_acc", "val_loss"):
        print(f"{key:8s} " + "  ".join(f"{value:5.2f}" for value in correlation[key]))
    fifo = results["random+fifo"]
    for method in [m for m in ("tpe+asha_stopping", "tpe+asha_promotion", "tpe+asha") if m in results]:
        rows = results[method]  # the default last
        ratio = mean(rows, "trial_epochs") / mean(fifo, "trial_epochs")
        gap = 100 * (mean(rows, "best_val") - mean(fifo, "best_val"))
        print(f"{method.split('+')[1]}-trial-epochs/fifo: {ratio:.2f}x  best-metric gap: {gap:+.1f} pts")


if __name__ == "__main__":
    main()
