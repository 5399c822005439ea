"""Searches where Ray runs on more than one node, or more than one search runs. A cluster of several nodes is made
on this machine with ray.cluster_utils.Cluster: a head with no CPUs (it runs the driver only, as cluster.yaml's
does) and two 1-CPU worker nodes. One worker node is removed in the middle of the search: its trial resumes on the
other from its checkpoint, and the search, the final stage and the predictions complete. Slow (a few minutes)."""
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import ray
from ray.cluster_utils import Cluster

import tuneprod
from tests.helpers import shrunk_space
from tuneprod.demo import generate_demo

pytestmark = pytest.mark.slow
EPOCHS = 30


@pytest.fixture
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def checkpointed(experiment, epochs: int) -> set[str]:
    """The trials with a checkpoint of at least this many epochs (checkpoint_000000 holds the first)."""
    return {c.parent.name for c in experiment.glob("trial_*/checkpoint_*") if int(c.name.split("_")[-1]) >= epochs - 1}


def test_a_search_survives_losing_a_worker_node(tmp_path, cluster):
    head, (kept, lost) = cluster
    generate_demo(tmp_path / "demo", classes=3, train_per_class=6, test_per_class=2, size=32)
    space = shrunk_space("demo.yaml", tmp_path, data={"demo": str(tmp_path / "demo"), "image_size": 32},
                         search={"num_samples": 2, "scheduler": {"type": "fifo", "max_epochs": EPOCHS}},
                         final={"members": 1, "seeds": 1})
    experiment = tmp_path / "runs" / "shrunk_demo"
    outcome = {}
    search = threading.Thread(target=lambda: outcome.update(result=tuneprod.search(
        space, storage=tmp_path / "runs", address=head.address, progress=lambda _: None)))
    search.start()
    deadline = time.monotonic() + 180
    # Both trials under way (one per worker node), each with a few epochs checkpointed.
    while len(checkpointed(experiment, epochs=3)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(checkpointed(experiment, epochs=3)) == 2
    head.remove_node(lost)
    search.join(timeout=600)
    assert not search.is_alive() and "result" in outcome

    table = pd.read_parquet(experiment / "trials.parquet")
    assert table["status"].tolist() == ["TERMINATED"] * 2 and table["epochs_run"].tolist() == [EPOCHS] * 2
    for progress in experiment.glob("trial_*/progress.csv"):
        epochs = pd.read_csv(progress)["epoch"].tolist()
        # The trial on the lost node went on from its checkpoint, not from the start.
        assert epochs.count(1) == 1 and sorted(set(epochs)) == list(range(1, EPOCHS + 1)), epochs
    ensemble = json.loads((experiment / "final" / "ensemble.json").read_text())
    assert ensemble["members"] == ["member_1"] and (experiment / "final" / "member_1" / "model.safetensors").is_file()
    assert len(pd.read_csv(experiment / "predictions.csv")) == 6
    assert (experiment / "report.html").is_file()


def test_two_searches_started_at_once_with_one_name_each_finish_in_their_own_folder(tmp_path):
    generate_demo(tmp_path / "demo", classes=3, train_per_class=6, test_per_class=2, size=32)
    space = shrunk_space("demo.yaml", tmp_path, data={"demo": str(tmp_path / "demo"), "image_size": 32},
                         search={"num_samples": 2, "scheduler": {"type": "fifo", "max_epochs": 2}},
                         final={"members": 1, "seeds": 1})
    command = [sys.executable, "-m", "tuneprod.cli", "search", str(space), "--storage", str(tmp_path / "runs")]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
            for _ in range(2)]  # each starts a Ray of its own on this machine
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    for name in ("shrunk_demo", "shrunk_demo_2"):
        experiment = tmp_path / "runs" / name
        assert len(pd.read_parquet(experiment / "trials.parquet")) == 2
        assert len(pd.read_csv(experiment / "predictions.csv")) == 6 and (experiment / "report.html").is_file()


@pytest.fixture
def ray_start_cluster():
    """A `ray start --head` cluster of 2 CPUs, found the way Ray finds one (its temp folder, here a private one
    given by RAY_TMPDIR, so that it holds no other test's Ray); its processes are ended by their tree, not with
    `ray stop`, which would end every Ray on the machine."""
    temp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "RAY_TMPDIR": str(temp)}
    subprocess.run(["ray", "start", "--head", "--num-cpus=2", "--port=0", "--include-dashboard=false",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120)
    session = (temp / "ray" / "session_latest").resolve()
    yield env, session
    ours = [p for p in psutil.process_iter(["cmdline"]) if str(temp) in " ".join(p.info["cmdline"] or [])]
    for process in ours + [child for p in ours for child in p.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    shutil.rmtree(temp, ignore_errors=True)


def test_a_search_joins_a_running_ray_start_cluster_and_local_starts_its_own(tmp_path, ray_start_cluster):
    env, session = ray_start_cluster
    generate_demo(tmp_path / "demo", classes=3, train_per_class=6, test_per_class=2, size=32)
    space = shrunk_space("demo.yaml", tmp_path, data={"demo": str(tmp_path / "demo"), "image_size": 32},
                         search={"num_samples": 2, "scheduler": {"type": "fifo", "max_epochs": 2}},
                         final={"members": 1, "seeds": 1})
    command = [sys.executable, "-m", "tuneprod.cli", "search", str(space), "--storage", str(tmp_path / "runs")]
    joins = subprocess.Popen(command + ["--name", "joins"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    alone = subprocess.Popen(command + ["--name", "alone", "--address", "local"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    outputs = [run.communicate(timeout=600)[0] for run in (joins, alone)]
    assert [joins.returncode, alone.returncode] == [0, 0], outputs
    for name in ("joins", "alone"):
        experiment = tmp_path / "runs" / name
        assert len(pd.read_parquet(experiment / "trials.parquet")) == 2
        assert len(pd.read_csv(experiment / "predictions.csv")) == 6
    # A driver that joins a cluster logs into that cluster's session folder, under its process id.
    drivers = " ".join(p.name for p in (session / "logs").glob("python-core-driver-*"))
    assert f"_{joins.pid}." in drivers and f"_{alone.pid}." not in drivers, drivers
