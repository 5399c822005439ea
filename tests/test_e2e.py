"""The whole path through Ray on the real demo space, shrunk: search (Optuna TPE + ASHA) -> table -> retrain ->
predict. Slow (about a minute on 2 cores): select with -m slow, skip with -m 'not slow'."""
import json
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import ray
import yaml
from optuna.trial import TrialState

import tuneprod
from tests.helpers import shrunk_space, write_image_folder
from tuneprod.demo import generate_demo
from tuneprod.final.stage import MemberPlan
from tuneprod.spec import Hyperparams, TrialConfig, UserError, spec_from_dict
from tuneprod.train.cache import decoded
from tuneprod.train.data import index_images
from tuneprod.tuning.final_tasks import cluster_scorer, train_members
from tuneprod.tuning.results import RAY_TRIAL_ID, load_study

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_two_cpus():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_search_retrain_predict(tmp_path, ray_two_cpus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    generate_demo(tmp_path / "demo", classes=4, train_per_class=8, test_per_class=3, size=32)
    space = shrunk_space(
        "demo.yaml", tmp_path,
        data={"demo": str(tmp_path / "demo"), "image_size": 32},
        search={"num_samples": 5, "searcher": {"type": "optuna", "n_startup_trials": 2}, "time_budget_s": 900,
                "scheduler": {"type": "asha", "max_epochs": 2, "grace_period": 1, "reduction_factor": 2},
                # inception_v3 cannot run on 32 px images: the first trial fails, and the search must go on.
                "start_from": [{"backbone": "inception_v3", "batch_size": 16}]},
        final={"members": 2, "seeds": 1, "tta": ["flip", "scale"]},
    )
    raw = yaml.safe_load(space.read_text())
    raw["space"]["backbone"] = {"choice": ["test_resnet", "test_efficientnet", "inception_v3"]}
    space.write_text(yaml.safe_dump(raw, sort_keys=False))

    said = []
    outcome = tuneprod.search(space, storage=tmp_path / "runs", progress=lambda line: said.append(print(line) or line))
    experiment = tmp_path / "runs" / "shrunk_demo"
    assert outcome.experiment_dir == experiment
    # The speed probe runs the first start point, which cannot run at 32 px: the budget is then planned from the
    # trials' own reports, and the search goes on.
    assert any("could not measure the training speed" in line for line in said)
    assert any(line.startswith("tuneprod: budget 900 s for the whole run") for line in said)
    assert any("compared at epochs 1 " in line for line in said)

    table = pd.read_parquet(experiment / "trials.parquet")
    assert len(table) == 5 and set(table["status"]) <= {"TERMINATED", "ERROR"}
    for column in ("trial_id", "backbone", "lr", "augment", "val_acc", "best_epoch", "epochs_run", "stopped_early",
                   "wall_time_s", "images_per_s"):
        assert column in table.columns
    failed = table[table["status"] == "ERROR"]
    assert "inception_v3" in failed["backbone"].tolist() and "Kernel size" in failed["error"].iloc[0]
    # Its own failure, recorded once: not a crash that Ray would retry (search.max_failures is 3 by default).
    assert failed["ended"].iloc[0] == "failed in epoch 1"
    assert not (experiment / f"trial_{failed['trial_id'].iloc[0]}" / "error.txt").exists()
    healthy = table[table["status"] == "TERMINATED"]
    assert set(healthy["epochs_run"]) <= {1, 2} and 2 in set(healthy["epochs_run"])  # ASHA lets the best go on
    assert healthy["val_acc"].between(0, 1).all() and (healthy["images_per_s"] > 0).all()
    assert (table.loc[table["momentum"].notna(), "optimizer"] == "sgd").all()  # conditional parameter

    best = yaml.safe_load((experiment / "best_config.yaml").read_text())
    assert best["backbone"] == table.iloc[0]["backbone"] and best["lr"] == pytest.approx(table.iloc[0]["lr"])
    # The final stage: the two best distinct healthy configurations, trained as Ray tasks, soft-voted.
    ensemble = json.loads((experiment / "final" / "ensemble.json").read_text())
    assert ensemble["vote"] == ensemble["members"] == ["member_1", "member_2"] and ensemble["tta"] == ["flip", "scale"]
    sources = [json.loads((experiment / "final" / m / "model.json").read_text())["source_trial"]
               for m in ensemble["members"]]
    assert sources == healthy["trial_id"].head(2).tolist()
    predictions = pd.read_csv(experiment / "predictions.csv")
    classes = {p.name for p in (tmp_path / "demo" / "train").iterdir()}
    assert len(predictions) == 12 and set(predictions["label"]) <= classes
    assert list(experiment.glob("trial_*/events.out.tfevents.*"))  # TensorBoard can read the trials

    # The saved model predicts from the command line with no other flags.
    result = subprocess.run([sys.executable, "-m", "tuneprod.cli", "predict", str(experiment / "final"),
                             str(tmp_path / "demo" / "test"), "--out", str(tmp_path / "p.csv")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert re.search(r"accuracy \S+ \(member_1 \S+, member_2 \S+\)", result.stdout), result.stdout
    assert len(pd.read_csv(tmp_path / "p.csv")) == 12

    # A second search with the same name goes to a new folder; its only trial (the failing start point) fails,
    # which ends the search with a user error rather than a retrain of nothing.
    with pytest.raises(UserError, match="every trial failed"):
        tuneprod.search(space, storage=tmp_path / "runs", num_samples=1)
    assert (tmp_path / "runs" / "shrunk_demo_2" / "trials.csv").is_file() and (experiment / "final").is_dir()


def test_interrupted_search_resumes_from_checkpoints(tmp_path, ray_two_cpus):
    generate_demo(tmp_path / "demo", classes=3, train_per_class=6, test_per_class=2, size=32)
    space = shrunk_space("demo.yaml", tmp_path, data={"demo": str(tmp_path / "demo"), "image_size": 32},
                         # One trial at a time: when Ctrl-C comes, the running trial has checkpoints to resume
                         # from, and the others have not started.
                         search={"num_samples": 3, "max_concurrent_trials": 1,
                                 "scheduler": {"type": "fifo", "max_epochs": 30}, "time_budget_s": 900,
                                 "start_from": [{"backbone": "test_resnet", "batch_size": 16}]},
                         final={"members": "auto", "epochs": 1})  # sized by the budget Ray restores
    experiment = tmp_path / "runs" / "shrunk_demo"
    search = subprocess.Popen([sys.executable, "-m", "tuneprod.cli", "search", str(space), "--storage",
                               str(tmp_path / "runs")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    # Ray keeps only the latest checkpoint: wait until it is a later one than the first.
    while not [c for c in experiment.glob("trial_*/checkpoint_*") if not c.name.endswith("_000000")] \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    search.send_signal(signal.SIGINT)  # Ctrl-C after the first trial's second epoch
    _, stderr = search.communicate(timeout=120)
    assert search.returncode == 130, stderr
    assert f"tuneprod resume {experiment}" in stderr
    assert not (experiment / "trials.parquet").exists()  # no table of half-run trials
    cut = [p for p in experiment.glob("trial_*/progress.csv") if 0 < len(pd.read_csv(p)) < 30]
    assert len(cut) == 1  # one trial was stopped mid-run

    lines = []
    outcome = tuneprod.resume(experiment, progress=lines.append)
    table = pd.read_parquet(experiment / "trials.parquet")
    assert outcome.trials == 3 and (table["epochs_run"] == 30).all()
    # The study holds the same three trials, each finished, and the start point once (a naive restore asks it
    # again and leaves the interrupted trial RUNNING).
    study = load_study(experiment)
    assert sorted(t.user_attrs[RAY_TRIAL_ID] for t in study.trials) == sorted(table["trial_id"])
    assert {t.state for t in study.trials} == {TrialState.COMPLETE}
    assert sum(t.params["backbone"] == "test_resnet" and t.params["batch_size"] == 16 for t in study.trials) >= 1
    assert len(study.trials) == 3 and all(len(t.intermediate_values) == 30 for t in study.trials)
    for progress in experiment.glob("trial_*/progress.csv"):
        epochs = pd.read_csv(progress)["epoch"].tolist()
        # Continued from its checkpoint, not restarted: epoch 1 ran once. (The epoch after the last checkpoint
        # Ray recorded may run twice.)
        assert epochs.count(1) == 1 and sorted(set(epochs)) == list(range(1, 31)), (progress, epochs)
    # The restored budget sizes final.members auto (a resume once trained one round of slots, whatever the time).
    sized = [line for line in lines if line.startswith("tuneprod: final.members auto: ")]
    assert len(sized) == 1, lines
    members = int(sized[0].split(": ")[2].split()[0])
    assert members > 2 and len(list((experiment / "final").glob("member_*/model.safetensors"))) == members


def test_member_tasks_run_on_ray_and_a_failing_member_is_reported(tmp_path, ray_two_cpus):
    images = decoded(index_images(write_image_folder(tmp_path / "images", per_class=4)), 32)
    spec = spec_from_dict({"data": {"train": "x", "image_size": 32}, "resources": {"gpus_per_trial": 0}},
                          tmp_path / "s.yaml")
    plans = [MemberPlan(name, TrialConfig(Hyperparams(backbone=backbone, batch_size=4), 32, epochs=1), "t", 0.5,
                        "val_acc")
             for name, backbone in (("member_1", "test_resnet"), ("member_2", "inception_v3"))]
    lines = []
    failures = train_members(spec, plans, images, tmp_path / "final", lines.append)
    assert list(failures) == ["member_2"] and "Kernel size" in failures["member_2"]
    assert (tmp_path / "final" / "member_1" / "model.safetensors").is_file()
    assert any(line.startswith("final: member_1 trained in") for line in lines)
    warnings = [line for line in lines if "warning" in line]
    assert len(warnings) == 1 and "Kernel size" in warnings[0] and "goes on without it" in warnings[0]


def test_a_member_whose_worker_is_killed_is_trained_again_from_scratch(tmp_path, ray_two_cpus):
    import threading

    import psutil

    images = decoded(index_images(write_image_folder(tmp_path / "images", per_class=8)), 32)
    spec = spec_from_dict({"data": {"train": "x", "image_size": 32}, "resources": {"gpus_per_trial": 0},
                           "search": {"max_failures": 1}}, tmp_path / "s.yaml")
    plan = MemberPlan("member_1", TrialConfig(Hyperparams(backbone="test_resnet", batch_size=4), 32, epochs=30), "t",
                      0.5, "val_acc")
    outcome = {}
    members = threading.Thread(target=lambda: outcome.update(
        failures=train_members(spec, [plan], images, tmp_path / "final", lambda _: None)))
    members.start()
    deadline, workers = time.monotonic() + 120, []
    while not workers and time.monotonic() < deadline:
        time.sleep(0.5)
        workers = [p for p in psutil.process_iter(["cmdline"])
                   if "ray::_member_task" in " ".join(p.info["cmdline"] or [])]
    assert len(workers) == 1, workers
    time.sleep(2)  # some epochs in
    workers[0].kill()  # SIGKILL: its node lost, as far as the task can tell
    members.join(timeout=300)
    assert outcome["failures"] == {}
    assert (tmp_path / "final" / "member_1" / "model.safetensors").is_file()


def test_predictions_scored_in_shards_on_ray_write_the_same_csv_as_here(tmp_path, ray_two_cpus, monkeypatch):
    """Shards of at most 3 images, each task carrying its images' bytes: the CSV is the one a local predict writes, the
    unreadable files (a corrupt one, a named pipe the driver must not read) keep their rows, the progress is said."""
    import os

    from tuneprod.final import artifact
    from tuneprod.final.inference import predict
    from tuneprod.tuning import budget

    images = decoded(index_images(write_image_folder(tmp_path / "images", per_class=4)), 24)
    spec = spec_from_dict({"data": {"train": "x", "image_size": 24}, "resources": {"gpus_per_trial": 0}},
                          tmp_path / "s.yaml")
    plan = MemberPlan("member_1", TrialConfig(Hyperparams(backbone="test_resnet", batch_size=4), 24, epochs=1), "t",
                      0.5, "val_acc")
    staging = tmp_path / "final"
    assert train_members(spec, [plan], images, staging, lambda _: None) == {}
    artifact.write_ensemble(staging, images.classes, 24, ["member_1"], ["member_1"], {}, ["flip"], {})
    test = write_image_folder(tmp_path / "test_tree", per_class=3, seed=1)
    flat = tmp_path / "test"
    flat.mkdir()
    for number, path in enumerate(sorted(test.rglob("*.png"))):
        path.rename(flat / f"{number:02d}.png")
    (flat / "05.png").write_bytes(b"not an image")
    os.mkfifo(flat / "pipe.png")
    (flat / "test_labels.csv").write_text("file,label\n00.png,red\n01.png,red\n")
    here = predict(staging, flat, tmp_path / "here.csv")
    monkeypatch.setattr(budget, "SHARD_IMAGES", 3)  # 10 images on 2 slots: 3, 3, 2 and 2
    lines = []
    there = predict(staging, flat, tmp_path / "there.csv", progress=lines.append, scorer=cluster_scorer(spec))
    assert (tmp_path / "here.csv").read_text() == (tmp_path / "there.csv").read_text()
    assert here.accuracy == there.accuracy and here.images == there.images == 8
    table = pd.read_csv(tmp_path / "there.csv")
    assert set(table.loc[table["label"].isna(), "file"]) == {"05.png", "pipe.png"}
    assert any(line.startswith("predict: 4/4 shard(s), 10/10 images") for line in lines), lines


def test_a_trial_whose_worker_is_killed_resumes_from_its_checkpoint(tmp_path, ray_two_cpus):
    import threading

    import psutil

    generate_demo(tmp_path / "demo", classes=3, train_per_class=6, test_per_class=2, size=32)
    space = shrunk_space("demo.yaml", tmp_path, data={"demo": str(tmp_path / "demo"), "image_size": 32},
                         search={"num_samples": 1, "scheduler": {"type": "fifo", "max_epochs": 40}})
    experiment = tmp_path / "runs" / "shrunk_demo"
    search = threading.Thread(target=tuneprod.search, args=(space,),
                              kwargs={"storage": tmp_path / "runs", "retrain": False, "progress": lambda _: None})
    search.start()
    deadline = time.monotonic() + 120
    while not [c for c in experiment.glob("trial_*/checkpoint_*") if int(c.name.split("_")[-1]) >= 2] \
            and time.monotonic() < deadline:  # a few epochs in
        time.sleep(0.05)
    workers = [p for p in psutil.process_iter(["cmdline"]) if "ImplicitFunc" in " ".join(p.info["cmdline"] or [])]
    assert len(workers) == 1, workers
    workers[0].kill()  # SIGKILL, as the kernel's OOM killer would
    search.join(timeout=300)
    table = pd.read_parquet(experiment / "trials.parquet")
    assert table["status"].tolist() == ["TERMINATED"] and table["epochs_run"].tolist() == [40]
    epochs = pd.read_csv(next(experiment.glob("trial_*/progress.csv")))["epoch"].tolist()
    # Retried from its checkpoint: epoch 1 ran once; only epochs after the last checkpoint may run twice.
    assert epochs.count(1) == 1 and sorted(set(epochs)) == list(range(1, 41)), epochs
    assert len(epochs) < 40 + 5


def test_every_ending_is_told_one_way_when_the_budget_cuts_and_the_scheduler_stops(tmp_path, ray_two_cpus,
                                                                                     monkeypatch, capsys):
    """A real search whose budget runs out after its eighth report (the clock is the stopper's, made to run out):
    the scheduler has stopped some trials by then, the budget cuts the running ones after a report and the queued
    one before its first. Table, record, console line and study agree, and every row has its parameters."""
    from tuneprod.tuning import budget
    from tuneprod.tuning.endings import read_endings

    reports = []
    real_call = budget.BudgetStopper.__call__
    monkeypatch.setattr(budget.BudgetStopper, "__call__",
                        lambda self, trial_id, result: reports.append(trial_id) or real_call(self, trial_id, result))
    monkeypatch.setattr(budget.BudgetStopper, "used_s",
                        lambda self: self.budget_s if len(reports) >= 8 else 0.0)
    generate_demo(tmp_path / "demo", classes=4, train_per_class=8, test_per_class=3, size=32)
    space = shrunk_space("demo.yaml", tmp_path, data={"demo": str(tmp_path / "demo"), "image_size": 32},
                         search={"num_samples": 12, "time_budget_s": 3600, "max_concurrent_trials": 2,
                                 "scheduler": {"type": "asha", "max_epochs": 6, "grace_period": 1,
                                               "reduction_factor": 2}})
    said = []
    tuneprod.search(space, storage=tmp_path / "runs", retrain=False, progress=said.append)
    experiment = tmp_path / "runs" / "shrunk_demo"
    table = pd.read_parquet(experiment / "trials.parquet").set_index("trial_id")
    record = read_endings(experiment)
    assert set(record) == set(table.index)
    assert table["ended"].to_dict() == {t: e.words(6) for t, e in record.items()}
    ended = table["ended"]
    assert ended.str.startswith("stopped by the scheduler after epoch").any()
    assert ended.str.match(r"cut by the time budget after epoch [1-5]$").any()
    assert (ended == "cut by the time budget before its first report").any()
    assert table["backbone"].notna().all() and table["lr"].notna().all()

    study = {t.user_attrs[RAY_TRIAL_ID]: t.state for t in load_study(experiment).trials}
    assert {t: study[t] for t in table.index} == {
        t: TrialState.COMPLETE if e.kind == "finished" else TrialState.PRUNED for t, e in record.items()}
    kinds = [e.kind for e in record.values()]
    summary = [line for line in said if line.startswith(f"tuneprod: {len(table)} trials:")]
    assert summary == [f"tuneprod: {len(table)} trials: {kinds.count('finished')} ran to the end, "
                       f"{kinds.count('stopped')} stopped early by the scheduler, {kinds.count('cut')} cut by the "
                       f"time budget, 0 failed"]
    view = [line for line in capsys.readouterr().out.splitlines() if line.startswith("search ")][-1]
    counts = ", ".join(f"{kinds.count(kind)} {words}" for kind, words in
                       (("finished", "finished"), ("stopped", "stopped"), ("cut", "cut by the budget"))
                       if kinds.count(kind))
    assert f"| {len(table)}/12 trials done: {counts} |" in view, view


def test_a_search_keeps_validation_predictions_and_the_final_stage_selects_from_them(tmp_path, ray_two_cpus):
    """search -> each trial's validation probabilities at its best -> greedy ensemble selection -> as many members
    as fit in the time the search left (final.members auto), at most two configurations (the two slots), shared out
    by the votes -> weighted vote -> predict from the command line; the report shows the path."""
    import numpy as np

    from tuneprod.final.selection import KEPT_PREDICTIONS, ROUNDS
    from tuneprod.tuning.budget import AUTO_MEMBERS_MOST

    generate_demo(tmp_path / "demo", classes=4, train_per_class=8, test_per_class=3, size=32)
    space = shrunk_space("demo.yaml", tmp_path, data={"demo": str(tmp_path / "demo"), "image_size": 32},
                         search={"num_samples": 4, "scheduler": {"type": "fifo", "max_epochs": 2},
                                 "time_budget_s": 900},
                         final={"select": "greedy", "members": "auto", "tta": [], "time_share": 0.5})
    said = []
    tuneprod.search(space, storage=tmp_path / "runs", progress=said.append)
    experiment = tmp_path / "runs" / "shrunk_demo"
    table = pd.read_parquet(experiment / "trials.parquet")
    for row in table.itertuples():
        with np.load(experiment / f"trial_{row.trial_id}" / KEPT_PREDICTIONS) as kept:
            probabilities, labels, epoch = kept["probabilities"], kept["labels"], int(kept["epoch"])
        assert probabilities.dtype == np.float16 and probabilities.shape == (len(labels), 4)
        assert np.allclose(probabilities.astype(np.float32).sum(1), 1, atol=1e-2)
        assert epoch == row.best_epoch  # kept at the trial's best, not its last
        assert (probabilities.argmax(1) == labels).mean() == pytest.approx(row.val_acc)
    ensemble = json.loads((experiment / "final" / "ensemble.json").read_text())
    picks = ensemble["selection"]["picks"]
    assert sum(picks.values()) == ensemble["selection"]["kept_rounds"] <= len(ensemble["selection"]["path"]) == ROUNDS
    assert set(picks) <= set(table["trial_id"])
    # The trials end long before the budget: the time left buys AUTO_MEMBERS_MOST members.
    assert f"tuneprod: final.members auto: {AUTO_MEMBERS_MOST} member(s) fit in the" in "\n".join(said)
    assert len(ensemble["members"]) == AUTO_MEMBERS_MOST and sum(ensemble["weights"]) == pytest.approx(1)
    sources = [json.loads((experiment / "final" / m / "model.json").read_text())["source_trial"]
               for m in ensemble["members"]]
    assert set(sources) <= set(picks) and len(set(sources)) <= 2  # more seeds, not more configurations
    assert any(line.startswith("final: ensemble selection over the trials' validation predictions") for line in said)
    assert "ensemble selection over the trials" in (experiment / "report.html").read_text()
    result = subprocess.run([sys.executable, "-m", "tuneprod.cli", "predict", str(experiment / "final"),
                             str(tmp_path / "demo" / "test"), "--out", str(tmp_path / "p.csv")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(pd.read_csv(tmp_path / "p.csv")) == 12
