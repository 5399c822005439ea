"""Chaos: a 10-trial search on a local 3-node Ray cluster (a head with no CPUs, two 1-CPU worker nodes, made with
ray.cluster_utils.Cluster) while something is killed every few seconds, at random: a worker node (removed, and a
fresh one added in its place), one trial's worker process (SIGKILL), or the search's driver (SIGKILL, then
`tuneprod resume`). The run must end with every trial accounted for, no finished trial run again, a final model
and predictions.

    python benchmarks/chaos.py [--kills 10] [--seed 0] [--work chaos_bench] [--s3]

--s3: storage in an S3 bucket on a local server (moto's, from ".[test]") instead of a folder: Ray's checkpoints and
state and the driver's files go there, and each `tuneprod resume` starts from the bucket alone.

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


class Folder:
    """Where the experiment lives: a local folder."""

    def __init__(self, work: Path):
        self.storage, self.local = str(work / "runs"), work / "runs" / "chaos"
        self.experiment = str(self.local)

    def checkpointed(self) -> bool:
        return bool(list(self.local.glob("trial_*/checkpoint_*")))

    def resumable(self) -> bool:
        return (self.local / "tuner.pkl").is_file() and not (self.local / "final").is_dir()

    def progress(self) -> dict[str, pd.DataFrame]:
        return {p.parent.name.removeprefix("trial_"): pd.read_csv(p) for p in self.local.glob("trial_*/progress.csv")}


class Bucket:
    """Where the experiment lives: a bucket on a local S3 server (the driver's files mirrored on this machine)."""

    def __init__(self, work: Path):
        sys.path.insert(0, str(ROOT))
        from tests.helpers import LocalS3
        from tuneprod.storage import mirror_folder

        self.s3 = LocalS3()
        self.storage, self.experiment = self.s3.uri("runs"), self.s3.uri("runs/chaos")
        self.local = mirror_folder(self.storage) / "chaos"
        shutil.rmtree(self.local, ignore_errors=True)

    def checkpointed(self) -> bool:
        return any("/checkpoint_" in key for key in self.s3.keys("runs/chaos/trial_"))

    def resumable(self) -> bool:
        keys = self.s3.keys("runs/chaos/")
        return "runs/chaos/tuner.pkl" in keys and not any(k.startswith("runs/chaos/final/") for k in keys)

    def progress(self) -> dict[str, pd.DataFrame]:
        return {key.split("/")[2].removeprefix("trial_"):
                pd.read_csv(self.s3.client.get_object(Bucket=self.s3.BUCKET, Key=key)["Body"])
                for key in self.s3.keys("runs/chaos/trial_") if key.endswith("/progress.csv")}


def space(work: Path, storage: str) -> Path:
    raw = yaml.safe_load((ROOT / "search_spaces" / "demo.yaml").read_text())
    raw["data"].update(demo=str(work / "demo"), image_size=32)
    raw["name"], raw["storage"] = "chaos", storage
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
    parser.add_argument("--s3", action="store_true", help="storage in a bucket on a local S3 server")
    options = parser.parse_args()
    work = options.work.absolute()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    generate_demo(work / "demo", classes=4, train_per_class=8, test_per_class=3, size=32)
    rng = random.Random(options.seed)
    where = Bucket(work) if options.s3 else Folder(work)  # first: the nodes take the bucket's credentials
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    log = open(work / "driver.log", "w")
    address = ["--address", cluster.address]
    search = driver(["search", str(space(work, where.storage)), *address], log)
    kills, restarts, started = [], 0, time.monotonic()
    try:
        while len(kills) < options.kills and search.poll() is None:
            time.sleep(rng.uniform(3, 8))
            if search.poll() is not None or not where.checkpointed():
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
                if options.s3:  # each resume starts from the bucket alone, as on another machine
                    shutil.rmtree(where.local, ignore_errors=True)
                search = driver(["resume", where.experiment, *address], log)
                restarts += 1
            kills.append(kind)
            print(f"chaos: {time.monotonic() - started:5.0f} s  kill {len(kills)}: {kind}", flush=True)
        code = search.wait(timeout=1800)
        while code != 0 and restarts < 20 and where.resumable():  # a kill during the last moments: resume again
            search = driver(["resume", where.experiment, *address], log)
            restarts += 1
            code = search.wait(timeout=1800)
    finally:
        log.close()
        ray.shutdown()
        cluster.shutdown()
    report(where, kills, restarts, code, time.monotonic() - started)


def report(where, kills: list[str], restarts: int, code: int, seconds: float) -> None:
    experiment = where.local
    table = pd.read_parquet(experiment / "trials.parquet") if (experiment / "trials.parquet").is_file() else None
    print(f"\nkills: {len(kills)} ({', '.join(f'{kills.count(k)} {k}' for k in ('node', 'trial', 'driver'))}); "
          f"driver restarts: {restarts}; last exit status: {code}; {seconds:.0f} s")
    if table is None:
        print("no trials.parquet: the search did not finish")
        return
    rerun = {}
    for trial, progress in where.progress().items():
        epochs = progress["epoch"].dropna().astype(int).tolist()
        rerun[trial] = len(epochs) - len(set(epochs))
    record = read_endings(experiment)
    kinds = [record[t].kind for t in table["trial_id"] if t in record]
    endings = {kind: kinds.count(kind) for kind in sorted(set(kinds))}
    finished_rerun = sum(rerun.get(t, 0) > 1 for t, ending in record.items() if ending.kind == FINISHED)
    print(f"trials in the table: {len(table)} of {TRIALS}; endings: {endings}")
    print(f"epochs run twice: {sum(rerun.values())} in {sum(n > 0 for n in rerun.values())} trial(s); "
          f"finished trials with more than one epoch run again: {finished_rerun}")
    for trial, progress in where.progress().items():  # where a trial went back, and how far
        if rerun.get(trial):
            print(f"  trial {trial} reported epochs {progress['epoch'].dropna().astype(int).tolist()}")
    print(f"final model: {(experiment / 'final' / 'ensemble.json').is_file()}; predictions: "
          f"{len(pd.read_csv(experiment / 'predictions.csv')) if (experiment / 'predictions.csv').is_file() else 0}")


if __name__ == "__main__":
    main()
