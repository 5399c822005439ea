"""Images and files in an object store, against a local S3 server: a listing fetched once per node (never a partial
fetch, a changed listing fetched anew), each node's decoded cache built from its own copy, and one-line errors."""
import dataclasses
import pickle

import numpy as np
import pytest

from tests.helpers import write_image_folder
from tuneprod.spec import spec_from_dict
from tuneprod.storage import COMPLETE, ObjectListing, RemoteFolder, StorageError, fetch_location
from tuneprod.train.cache import labelled_images, localised
from tuneprod.train.data import decode_resized


@pytest.fixture(scope="module")
def images_in_bucket(s3, tmp_path_factory):
    folder = write_image_folder(tmp_path_factory.mktemp("upload") / "train", per_class=4)
    s3.upload(folder, "shop/train")
    return folder


def test_a_listing_is_fetched_once_into_a_folder_named_by_it(s3, images_in_bucket, tmp_path):
    lines = []
    listing = ObjectListing.of(s3.uri("shop/train"))
    assert sorted(listing.keys) == sorted(p.relative_to(images_in_bucket).as_posix()
                                          for p in images_in_bucket.rglob("*.png"))
    folder = listing.fetch(tmp_path, lines.append, workers=4)
    assert all((folder / key).read_bytes() == (images_in_bucket / key).read_bytes() for key in listing.keys)
    assert (folder / COMPLETE).is_file() and any("fetched 12 objects" in line for line in lines)
    lines.clear()
    assert listing.fetch(tmp_path, lines.append) == folder and lines == []  # this node has it: no request


def test_a_changed_listing_is_a_new_fetch_and_a_partial_one_is_never_used(s3, tmp_path):
    folder = write_image_folder(tmp_path / "up", per_class=2)
    s3.upload(folder, "changing")
    first = ObjectListing.of(s3.uri("changing"))
    s3.client.put_object(Bucket=s3.BUCKET, Key="changing/red/0.png", Body=(folder / "green" / "0.png").read_bytes())
    second = ObjectListing.of(s3.uri("changing"))
    assert second.key != first.key and second.folder(tmp_path) != first.folder(tmp_path)

    removed = (folder / "red" / "1.png").read_bytes()
    s3.client.delete_object(Bucket=s3.BUCKET, Key="changing/red/1.png")  # gone between the listing and the fetch
    with pytest.raises(StorageError, match="changing"):
        second.fetch(tmp_path, lambda _: None, workers=1)
    assert not second.folder(tmp_path).exists()  # only a hidden partial folder, never read
    s3.client.put_object(Bucket=s3.BUCKET, Key="changing/red/1.png", Body=removed)
    fetched = second.fetch(tmp_path, lambda _: None)
    assert (fetched / "red" / "0.png").read_bytes() == (folder / "green" / "0.png").read_bytes()
    assert not list(fetched.parent.glob(".*partial*"))  # the interrupted fetch was cleaned up


def test_each_node_fetches_and_decodes_its_own_copy(s3, images_in_bucket, tmp_path):
    spec = spec_from_dict({"data": {"train": s3.uri("shop/train"), "image_size": 16, "cache_dir": str(tmp_path / "a")}},
                          tmp_path / "s.yaml")
    local = localised(spec, lambda _: None)
    assert local.data.train.is_dir() and spec.document["data"]["train"] == s3.uri("shop/train")
    images = labelled_images(local, lambda _: None)
    # Another node: the cache travels pickled (paths relative to the fetched copy), its disk has nothing yet.
    other = dataclasses.replace(pickle.loads(pickle.dumps(images.cache)), root=tmp_path / "b")
    other.ensure(lambda _: None)
    assert (tmp_path / "b" / "objects").is_dir() and other.folder != images.cache.folder
    assert np.array_equal(other.images(), images.cache.images())
    first = images.cache.files()[0]
    assert np.array_equal(images.cache.images()[0], decode_resized(first, 16))


def test_a_manifest_in_a_bucket_brings_its_images_with_it(s3, tmp_path):
    folder = write_image_folder(tmp_path / "up", per_class=3)
    rows = ["path,label"] + [f"{p.relative_to(folder).as_posix()},{p.parent.name}" for p in folder.rglob("*.png")]
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    s3.upload(folder, "manifest")
    path, listing = fetch_location(s3.uri("manifest/labels.csv"), tmp_path / "cache", lambda _: None)
    assert path.name == "labels.csv" and path.is_file() and len(listing.keys) == 10


@pytest.mark.parametrize("where, message", [
    (lambda s3: s3.uri("x", bucket="no-such-bucket"), "the bucket 'no-such-bucket' does not exist"),
    (lambda s3: s3.uri("nothing/here"), "no objects under this prefix"),
    (lambda s3: s3.uri("x").replace("region=", "regio="), "not a storage URI pyarrow can open"),
])
def test_a_bucket_that_cannot_be_used_is_one_line_naming_it(s3, where, message):
    with pytest.raises(StorageError, match=message) as caught:
        ObjectListing.of(where(s3))
    assert "\n" not in str(caught.value) and str(caught.value).startswith("s3://")


def test_a_remote_folder_round_trips_files(s3, tmp_path):
    folder = RemoteFolder(s3.uri("runs/exp"))
    (tmp_path / "up" / "final").mkdir(parents=True)
    (tmp_path / "up" / "final" / "m.json").write_text("{}")
    (tmp_path / "up" / "trials.csv").write_text("a,b\n")
    for relative in ("final/m.json", "trials.csv"):
        folder.upload(tmp_path / "up" / relative, relative)
    assert s3.keys("runs/exp") == ["runs/exp/final/m.json", "runs/exp/trials.csv"]
    assert folder.download("final", tmp_path / "down" / "final") and folder.download("trials.csv",
                                                                                       tmp_path / "down" / "t.csv")
    assert (tmp_path / "down" / "final" / "m.json").read_text() == "{}"
    assert not folder.download("report.html", tmp_path / "down" / "r.html")
    assert RemoteFolder(s3.uri("runs")).entries() == {"exp": True} and RemoteFolder(s3.uri("none")).entries() == {}


@pytest.mark.slow
def test_a_search_reads_its_images_from_a_bucket(s3, tmp_path):
    """The demo set in the bucket (its manifest and test images given as URIs): the search, the final stage and the
    predictions run from this node's fetched copy; the saved spec keeps the URIs."""
    import pandas as pd
    import ray
    import yaml

    import tuneprod
    from tests.helpers import shrunk_space
    from tuneprod.demo import generate_demo

    generate_demo(tmp_path / "demo", classes=3, train_per_class=8, test_per_class=3, size=32)
    s3.upload(tmp_path / "demo", "demo")
    space = shrunk_space("demo.yaml", tmp_path,
                         data={"demo": None, "train": s3.uri("demo/train.csv"), "test": s3.uri("demo/test"),
                               "image_size": 32},
                         search={"num_samples": 3, "scheduler": {"type": "asha", "max_epochs": 2, "grace_period": 1,
                                                                 "reduction_factor": 2}},
                         final={"members": 1, "seeds": 1, "tta": ["flip"]})
    raw = yaml.safe_load(space.read_text())
    del raw["data"]["demo"]
    space.write_text(yaml.safe_dump(raw))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        lines = []
        tuneprod.search(space, storage=tmp_path / "runs", progress=lines.append)
    finally:
        ray.shutdown()
    experiment = tmp_path / "runs" / "shrunk_demo"
    assert len(pd.read_parquet(experiment / "trials.parquet")) == 3
    assert len(pd.read_csv(experiment / "predictions.csv")) == 9
    assert any(line.startswith("tuneprod: fetching ") and "s3://tuneprod-test/demo" in line for line in lines)
    saved = yaml.safe_load((experiment / "search_space.yaml").read_text())
    assert saved["data"]["train"] == s3.uri("demo/train.csv") and saved["data"]["test"] == s3.uri("demo/test")


@pytest.mark.slow
def test_a_search_stored_in_a_bucket_is_interrupted_then_resumed_and_reported_from_it(s3, tmp_path):
    """--storage s3://...: Ray's checkpoints and state and the driver's own files (the study as a snapshot) go to
    the bucket. Ctrl-C, the driver's machine forgotten (its local mirror deleted), `tuneprod resume s3://...`
    completes the search from the bucket, `tuneprod report s3://...` writes the report there again, and `tuneprod
    predict s3://.../final` predicts with the model in the bucket."""
    import shutil
    import signal
    import subprocess
    import sys
    import time

    import pandas as pd
    from optuna.trial import TrialState

    from tests.helpers import shrunk_space
    from tuneprod.demo import generate_demo
    from tuneprod.storage import mirror_folder
    from tuneprod.tuning.results import load_study

    generate_demo(tmp_path / "demo", classes=3, train_per_class=6, test_per_class=2, size=32)
    space = shrunk_space("demo.yaml", tmp_path, data={"demo": str(tmp_path / "demo"), "image_size": 32},
                         search={"num_samples": 3, "max_concurrent_trials": 1,
                                 "scheduler": {"type": "fifo", "max_epochs": 20},
                                 "start_from": [{"backbone": "test_resnet", "batch_size": 16}]},
                         final={"members": 1, "seeds": 1, "tta": ["flip"]})
    storage = s3.uri("runs")
    remote = s3.uri("runs/shrunk_demo")
    search = subprocess.Popen([sys.executable, "-m", "tuneprod.cli", "search", str(space), "--storage", storage],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not [k for k in s3.keys("runs/shrunk_demo/trial_") if "/checkpoint_000002/" in k] \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    search.send_signal(signal.SIGINT)
    _, stderr = search.communicate(timeout=180)
    assert search.returncode == 130, stderr
    assert f"tuneprod resume {remote}" in stderr
    mirror = mirror_folder(storage) / "shrunk_demo"
    assert (mirror / "study.db").is_file() and not list(mirror.glob("trial_*"))  # Ray's files are in the bucket
    keys = s3.keys("runs/shrunk_demo/")
    assert "runs/shrunk_demo/study.db" in keys and "runs/shrunk_demo/search_space.yaml" in keys

    shutil.rmtree(mirror)  # another machine: only the bucket knows the search
    resume = subprocess.run([sys.executable, "-m", "tuneprod.cli", "resume", remote], capture_output=True, text=True,
                            timeout=600)
    assert resume.returncode == 0, resume.stdout + resume.stderr
    assert f"results in {remote}" in resume.stdout
    keys = s3.keys("runs/shrunk_demo/")
    for name in ("trials.parquet", "trials.csv", "best_config.yaml", "trial_endings.json", "report.html",
                 "final/ensemble.json", "final/member_1/model.safetensors", "predictions.csv"):
        assert f"runs/shrunk_demo/{name}" in keys, name

    shutil.rmtree(mirror)
    report = subprocess.run([sys.executable, "-m", "tuneprod.cli", "report", remote], capture_output=True, text=True,
                            timeout=300)
    assert report.returncode == 0, report.stderr
    table = pd.read_parquet(mirror / "trials.parquet")
    assert len(table) == 3 and (table["epochs_run"] == 20).all()
    study = load_study(mirror)
    assert len(study.trials) == 3 and {t.state for t in study.trials} == {TrialState.COMPLETE}
    predicted = subprocess.run([sys.executable, "-m", "tuneprod.cli", "predict", s3.uri("runs/shrunk_demo/final"),
                                str(tmp_path / "demo" / "test"), "--out", str(tmp_path / "p.csv")],
                               capture_output=True, text=True, timeout=300)
    assert predicted.returncode == 0, predicted.stderr
    assert len(pd.read_csv(tmp_path / "p.csv")) == 6
    for progress in [k for k in keys if k.endswith("/progress.csv")]:  # continued from its checkpoint
        body = s3.client.get_object(Bucket=s3.BUCKET, Key=progress)["Body"]
        epochs = pd.read_csv(body)["epoch"].tolist()
        assert epochs.count(1) == 1 and sorted(set(epochs)) == list(range(1, 21)), (progress, epochs)


def test_the_drivers_files_go_up_changed_ones_only_the_study_as_a_snapshot_and_not_rays(s3, tmp_path):
    import sqlite3

    from tuneprod.storage import ExperimentUploads

    local = tmp_path / "exp"
    (local / "trial_abc_00000").mkdir(parents=True)
    (local / "trial_abc_00000" / "progress.csv").write_text("epoch\n1\n")  # Ray's: brought back for a resume only
    (local / "trial_endings.json").write_text("{}")
    live = sqlite3.connect(local / "study.db")  # open, as the search holds it
    live.execute("create table t (x)")
    live.execute("insert into t values (42)")
    live.commit()
    uploads = ExperimentUploads(local, s3.uri("up/exp"), every_s=3600)
    uploads()
    assert s3.keys("up/exp") == ["up/exp/study.db", "up/exp/trial_endings.json"]
    body = s3.client.get_object(Bucket=s3.BUCKET, Key="up/exp/study.db")["Body"].read()
    (tmp_path / "copy.db").write_bytes(body)
    assert sqlite3.connect(tmp_path / "copy.db").execute("select x from t").fetchall() == [(42,)]
    (local / "report.html").write_text("<html>")
    uploads()  # within the throttle: nothing
    assert "up/exp/report.html" not in s3.keys("up/exp")
    uploads(force=True)
    assert "up/exp/report.html" in s3.keys("up/exp")
    live.close()


def test_a_trial_in_a_bucket_goes_on_from_its_furthest_state_whose_epochs_the_driver_recorded(s3):
    """Ray's state (uploaded every few seconds) may name an older checkpoint than the trial saved, or none; after a
    resume, Ray numbers new checkpoints again from the one it named, over folders written before."""
    import time

    from tuneprod.storage import filesystem
    from tuneprod.tuning.trainable import bucket_resume_state, state_file

    trial = "resume/trial_a"

    def put(number: int, epoch: int) -> str:
        key = f"{trial}/checkpoint_00000{number}/{state_file(epoch)}"
        s3.client.put_object(Bucket=s3.BUCKET, Key=key, Body=b"x")
        return f"{s3.BUCKET}/{key}"

    def recorded(*epochs: int) -> None:
        body = "trial_id,epoch\n" + "".join(f"a,{epoch}\n" for epoch in epochs)
        s3.client.put_object(Bucket=s3.BUCKET, Key=f"{trial}/progress.csv", Body=body)

    fs, _ = filesystem(s3.uri("resume"))
    path = f"{s3.BUCKET}/{trial}"
    assert bucket_resume_state(fs, path, None) is None  # nothing saved: from scratch
    put(0, 1)
    second = put(1, 2)
    put(2, 3)  # the driver was lost before it recorded epoch 3
    assert bucket_resume_state(fs, path, None) is None  # Ray's state names none, and nothing is recorded
    recorded(1, 2)
    assert bucket_resume_state(fs, path, None) == second  # not 3: its result must be recorded, for the rungs
    assert bucket_resume_state(fs, path, f"{s3.BUCKET}/{trial}/checkpoint_000002") == f"{s3.BUCKET}/{trial}/" \
        "checkpoint_000002/" + state_file(3)  # Ray recorded it, though the progress in the bucket lags
    time.sleep(1.1)  # an object store keeps times to the second
    again = put(0, 3)  # the epoch run again after the resume, Ray numbering from the start again: the newer one
    put(3, 5)
    recorded(1, 2, 3, 4)
    assert bucket_resume_state(fs, path, None) == again
    recorded(1, 2, 3, 4, 5)
    assert bucket_resume_state(fs, path, None) == f"{s3.BUCKET}/{trial}/checkpoint_000003/{state_file(5)}"


def test_a_trial_in_a_bucket_deletes_its_old_states_but_not_the_folders_ray_may_name(s3):
    """Ray would fail to resume from a checkpoint folder that is gone; the trial goes on from a state still there."""
    import time

    import pyarrow.fs

    from tuneprod.storage import filesystem
    from tuneprod.tuning.trainable import bucket_resume_state, held_file, state_file, states_to_delete

    trial = "pruned/trial_a"
    fs, _ = filesystem(s3.uri("pruned"))
    path = f"{s3.BUCKET}/{trial}"

    def save(number: int, epoch: int) -> str:
        folder = f"{trial}/checkpoint_00000{number}"
        for name in (state_file(epoch), held_file(epoch)):
            s3.client.put_object(Bucket=s3.BUCKET, Key=f"{folder}/{name}", Body=b"x")
        return f"{s3.BUCKET}/{folder}"

    assert states_to_delete(fs, path, kept_s=0.5) == []  # nothing saved
    first, second = save(0, 1), save(1, 2)
    s3.client.put_object(Bucket=s3.BUCKET, Key=f"{trial}/progress.csv", Body=b"x" * 10_000)  # not a state
    assert states_to_delete(fs, path, kept_s=0.5) == []  # saved within the same moment: both kept
    time.sleep(1.1)  # an object store keeps times to the second
    third = save(2, 3)
    old = states_to_delete(fs, path, kept_s=0.5)
    assert sorted(old) == [f"{first}/{state_file(1)}", f"{second}/{state_file(2)}"]
    assert states_to_delete(fs, path, kept_s=60) == []  # within the window: kept
    fs.delete_file(f"{second}/{state_file(2)}")
    assert fs.get_file_info(second).type != pyarrow.fs.FileType.NotFound  # Ray's check before a resume
    # Ray's lagging state names the second checkpoint, whose state is gone: the epochs it held are still recorded.
    assert bucket_resume_state(fs, path, second) == f"{first}/{state_file(1)}"
    assert bucket_resume_state(fs, path, third) == f"{third}/{state_file(3)}"


def test_a_checkpoint_an_older_tuneprod_saved_is_resumed_from(tmp_path):
    import pyarrow.fs

    from tuneprod.tuning.trainable import UNNAMED_STATE, named_state, state_file

    fs, checkpoint = pyarrow.fs.LocalFileSystem(), tmp_path / "checkpoint_000003"
    checkpoint.mkdir()
    assert named_state(fs, str(checkpoint)) is None  # nothing saved: from scratch
    (checkpoint / UNNAMED_STATE).write_bytes(b"old")
    assert named_state(fs, str(checkpoint)) == f"{checkpoint}/{UNNAMED_STATE}"
    (checkpoint / state_file(3)).write_bytes(b"new")
    assert named_state(fs, str(checkpoint)) == f"{checkpoint}/{state_file(3)}"
