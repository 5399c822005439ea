"""Chaos: a 10-trial search on a local 3-node Ray cluster (a head with no CPUs, two 1-CPU worker nodes, made with
ray.cluster_utils.Cluster) while something is killed every few seconds, at random: a worker node (removed, and a
fresh one added in its place), one trial's worker process (SIGKILL), or the search's driver (SIGKILL, then
`tuneprod resume`). The run must end with every trial accounted for, no finished trial run again, a final model
and predictions.

    python benchmarks/chaos.py [--kills 10] [--seed 0] [--work chaos_bench]

Prints each kill, then: trials in the table (of num_samples), their endings, epochs run again (an epoch after a
trial's last checkpoint may run twice; a finished trial must not run at all), driver restarts, and whether the
final model and predictions exist.
"""
from __future__ import annotations

import argparse
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import ray
import yaml
from ray.cluster_utils import Cluster

from tuneprod.demo import generate_demo
from tuneprod.tuning.endings import FINISHED, read_endings

ROOT = Path(__file__).resolve().parents[1]
TRIALS = 10


def space(work: Path) -> Path:
    raw = yaml.safe_load((ROOT / "search_spaces" / "demo.yaml").read_text())
    raw["data"].update(demo=str(work / "demo"), image_size=32)
    raw["name"], raw["storage"] = "chaos", str(work / "runs")
    raw["search"].update(num_samples=TRIALS, max_failures=10)
    raw["search"]["scheduler"] = {"type": "asha", "max_epochs": 8, "grace_period": 2, "reduction_factor": 2}
    raw["space"]["backbone"] = {"choice": ["test_resnet", "test_efficientnet"]}
    raw["final"] = {"members": 2, "seeds": 1, "tta": ["flip"]}
    path = work / "chaos.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def driver(args: list[str], log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tuneprod.cli", *args], stdout=log, stderr=subprocess.STDOUT)


def trial_processes() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if "ImplicitFunc" in " ".join(p.info["cmdline"] or [])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("chaos_bench"))
    options = parser.parse_args()
    work = options.work.absolute()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    generate_demo(work / "demo", classes=4, train_per_class=8, test_per_class=3, size=32)
    rng = random.Random(options.seed)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    experiment = work / "runs" / "chaos"
    log = open(work / "driver.log", "w")
    address = ["--address", cluster.address]
    search = driver(["search", str(space(work)), *address], log)
    kills, restarts, started = [], 0, time.monotonic()
    try:
        while len(kills) < options.kills and search.poll() is None:
            time.sleep(rng.uniform(3, 8))
            if search.poll() is not None or not list(experiment.glob("trial_*/checkpoint_*")):
                continue
            kind = rng.choice(["node", "trial", "driver"])
            if kind == "node":
                lost = workers.pop(rng.randrange(len(workers)))
                cluster.remove_node(lost)
                workers.append(cluster.add_node(num_cpus=1))
            elif kind == "trial":
                running = trial_processes()
                for _ in range(100):  # between epochs, or just after a kill, no trial may be running: wait for one
                    if running or search.poll() is not None:
                        break
                    time.sleep(0.1)
                    running = trial_processes()
                if not running:
                    continue
                rng.choice(running).kill()
            else:
                search.send_signal(signal.SIGKILL)
                search.wait()
                time.sleep(2)  # Ray notices the driver is gone and ends its trials
                search = driver(["resume", str(experiment), *address], log)
                restarts += 1
            kills.append(kind)
            print(f"chaos: {time.monotonic() - started:5.0f} s  kill {len(kills)}: {kind}", flush=True)
        code = search.wait(timeout=1800)
        while code != 0 and restarts < 20 and (experiment / "tuner.pkl").is_file() \
                and not (experiment / "final").is_dir():  # a kill during the last moments: resume once more
            search = driver(["resume", str(experiment), *address], log)
            restarts += 1
            code = search.wait(timeout=1800)
    finally:
        log.close()
        ray.shutdown()
        cluster.shutdown()
    report(experiment, kills, restarts, code, time.monotonic() - started)


def report(experiment: Path, kills: list[str], restarts: int, code: int, seconds: float) -> None:
    table = pd.read_parquet(experiment / "trials.parquet") if (experiment / "trials.parquet").is_file() else None
    print(f"\nkills: {len(kills)} ({', '.join(f'{kills.count(k)} {k}' for k in ('node', 'trial', 'driver'))}); "
          f"driver restarts: {restarts}; last exit status: {code}; {seconds:.0f} s")
    if table is None:
        print("no trials.parquet: the search did not finish")
        return
    rerun = {}
    for progress in experiment.glob("trial_*/progress.csv"):
        epochs = pd.read_csv(progress)["epoch"].dropna().astype(int).tolist()
        rerun[progress.parent.name.removeprefix("trial_")] = len(epochs) - len(set(epochs))
    record = read_endings(experiment)
    kinds = [record[t].kind for t in table["trial_id"] if t in record]
    endings = {kind: kinds.count(kind) for kind in sorted(set(kinds))}
    finished_rerun = sum(rerun.get(t, 0) > 1 for t, ending in record.items() if ending.kind == FINISHED)
    print(f"trials in the table: {len(table)} of {TRIALS}; endings: {endings}")
    print(f"epochs run twice: {sum(rerun.values())} in {sum(n > 0 for n in rerun.values())} trial(s); "
          f"finished trials with more than one epoch run again: {finished_rerun}")
    print(f"final model: {(experiment / 'final' / 'ensemble.json').is_file()}; predictions: "
          f"{len(pd.read_csv(experiment / 'predictions.csv')) if (experiment / 'predictions.csv').is_file() else 0}")


if __name__ == "__main__":
    main()
