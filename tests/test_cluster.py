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


@pytest.fixture
def cloud_like_cluster(s3, tmp_path_factory):
    """A `ray start` head with no CPUs (as cluster.yaml's) and two 1-CPU worker nodes, each started in a mount
    namespace of its own with an empty tmpfs over the tests' folders: like a cloud node, a worker sees none of the
    head's files (its images, its storage, its decoded cache), only its own disk, the code, and the S3 server.
    The nodes start one at a time (two starting at once on one machine can pick the same free port)."""
    hidden = tmp_path_factory.getbasetemp()
    temp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # outside `hidden`: every node's Ray uses it
    env = {**os.environ, "RAY_TMPDIR": str(temp), "RAY_AUTH_MODE": "token"}
    workers = []
    try:
        # With its dashboard: the test asks Ray's state API where the tasks ran.
        subprocess.run(["ray", "start", "--head", "--num-cpus=0", "--port=0", "--include-dashboard=true",
                        f"--dashboard-port={_free_port()}", "--disable-usage-stats"], env=env, check=True,
                       capture_output=True, timeout=120)
        address = (temp / "ray" / "ray_current_cluster").read_text().strip()
        for nodes in (2, 3):
            workers.append(subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", "sh", "-c", f"mount -t tmpfs tmpfs {hidden} && exec "
                 f"ray start --address={address} --num-cpus=1 --block --disable-usage-stats"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            deadline = time.monotonic() + 120
            while _alive_nodes(env) < nodes and time.monotonic() < deadline:
                time.sleep(1)
            assert _alive_nodes(env) == nodes
        yield env
    finally:
        ours = [p for p in psutil.process_iter(["cmdline"]) if str(temp) in " ".join(p.info["cmdline"] or [])]
        ours += [psutil.Process(w.pid) for w in workers if w.poll() is None]
        for process in ours + [child for p in ours for child in p.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        shutil.rmtree(temp, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _alive_nodes(env: dict) -> int:
    status = subprocess.run([sys.executable, "-c", "import ray; ray.init(address='auto', log_to_driver=False); "
                             "print(sum(n['Alive'] for n in ray.nodes()))"], env=env, capture_output=True, text=True)
    return int(status.stdout.strip().splitlines()[-1]) if status.returncode == 0 else 0


def _placements(env: dict) -> dict:
    """{task or actor name: the set of node ids it ran on} and the head's node id, from Ray's state API."""
    code = ("import json, ray; from ray.util.state import list_tasks; ray.init(address='auto', log_to_driver=False);"
            "head = [n['NodeID'] for n in ray.nodes() if n['Resources'].get('CPU', 0) == 0 and n['Alive']];"
            "tasks = list_tasks(limit=10000, raise_on_missing_output=False);"
            "print(json.dumps({'head': head, 'tasks': [[t.name, t.node_id] for t in tasks]}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    places = {}
    for name, node in found["tasks"]:
        places.setdefault(name, set()).add(node)
    return {"head": set(found["head"]), "tasks": places}


def test_a_cloud_like_cluster_searches_from_a_bucket_and_resumes_after_losing_its_driver(s3, cloud_like_cluster,
                                                                                        tmp_path):
    env = cloud_like_cluster
    generate_demo(tmp_path / "demo", classes=3, train_per_class=8, test_per_class=3, size=32)
    s3.upload(tmp_path / "demo", "cloud/demo")
    in_bucket = {"demo": None, "train": s3.uri("cloud/demo/train.csv"), "test": s3.uri("cloud/demo/test"),
                 "image_size": 32}
    space = shrunk_space("demo.yaml", tmp_path, data=in_bucket,
                         search={"num_samples": 3, "scheduler": {"type": "asha", "max_epochs": 4, "grace_period": 1,
                                                                 "reduction_factor": 2}},
                         final={"members": 2, "seeds": 1, "tta": ["flip"]})
    cli = [sys.executable, "-m", "tuneprod.cli"]

    # A folder on the head for storage: refused before any trial, in one line that says what would work.
    refused = subprocess.run(cli + ["search", str(space), "--storage", str(tmp_path / "runs"), "--address", "auto"],
                             env=env, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    error = refused.stderr.strip().splitlines()[-1]
    assert f"error: storage: {tmp_path / 'runs'} is a folder on this machine, but Ray node" in error, error
    assert "use a bucket" in error and not (tmp_path / "runs" / "shrunk_demo" / "trials.parquet").exists()

    storage = s3.uri("cloud/runs")
    search = subprocess.run(cli + ["search", str(space), "--storage", storage, "--address", "auto"],
                            env=env, capture_output=True, text=True, timeout=900)
    assert search.returncode == 0, search.stdout + search.stderr
    keys = s3.keys("cloud/runs/shrunk_demo/")
    for name in ("trials.parquet", "study.db", "report.html", "final/ensemble.json", "predictions.csv"):
        assert f"cloud/runs/shrunk_demo/{name}" in keys, name
    body = s3.client.get_object(Bucket=s3.BUCKET, Key="cloud/runs/shrunk_demo/predictions.csv")["Body"]
    assert len(pd.read_csv(body)) == 9
    assert len([k for k in keys if k.endswith("/progress.csv")]) == 3
    placed = _placements(env)
    for name in ("ImplicitFunc.", "_member_task", "_score_shard"):  # trials (actors), members, shards
        nodes = {node for task, where in placed["tasks"].items() if task.startswith(name) for node in where}
        assert nodes and not nodes & placed["head"], (name, placed)

    # The driver lost (killed hard) mid-search; `tuneprod resume` from the bucket, on a machine without its mirror.
    long = shrunk_space("demo.yaml", tmp_path, data=in_bucket,
                        search={"num_samples": 2, "scheduler": {"type": "fifo", "max_epochs": 30}},
                        final={"members": 1, "seeds": 1, "tta": []})
    driver = subprocess.Popen(cli + ["search", str(long), "--storage", storage, "--name", "long",
                                     "--address", "auto", "--no-retrain"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not [k for k in s3.keys("cloud/runs/long/experiment_state")] or \
            not [k for k in s3.keys("cloud/runs/long/trial_") if "/checkpoint_000003/" in k]:
        assert time.monotonic() < deadline and driver.poll() is None
        time.sleep(0.5)
    driver.kill()
    driver.wait()
    from tuneprod.storage import mirror_folder

    shutil.rmtree(mirror_folder(storage) / "long")
    resumed = subprocess.run(cli + ["resume", s3.uri("cloud/runs/long"), "--address", "auto", "--no-retrain"],
                             env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    body = s3.client.get_object(Bucket=s3.BUCKET, Key="cloud/runs/long/trials.parquet")["Body"].read()
    (tmp_path / "long.parquet").write_bytes(body)
    table = pd.read_parquet(tmp_path / "long.parquet")
    assert len(table) == 2 and (table["epochs_run"] == 30).all(), table
