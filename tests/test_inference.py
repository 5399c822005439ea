"""The self-describing model folder and predictions from it."""
import dataclasses
import json
import re
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch

from tests.helpers import write_image_folder
from tuneprod.final import artifact
from tuneprod.final.ensemble import soft_vote, view_probabilities
from tuneprod.final.inference import predict
from tuneprod.spec import Hyperparams, TrialConfig
from tuneprod.train.batch_augment import normalise
from tuneprod.train.cache import decoded
from tuneprod.train.data import DataError, decode_resized, index_images
from tuneprod.train.loop import TrainingRun


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("p")
    image_set = decoded(index_images(write_image_folder(root / "train", per_class=8)), 32)
    config = TrialConfig(Hyperparams(backbone="test_efficientnet", batch_size=8, lr=5e-3, dropout=0.1),
                         image_size=32, epochs=4)
    run = TrainingRun(config, image_set.classes, image_set)
    for _ in range(config.epochs):
        run.step()
    model_dir = artifact.save(root / "final", run.model, image_set.classes, run.preprocessing, config, {"tta": True})
    # Unlabelled test images in one flat folder, with their answers beside them.
    test_dir = root / "test"
    test_dir.mkdir()
    rows = []
    for i, path in enumerate(sorted(write_image_folder(root / "t", per_class=4, seed=9).rglob("*.png"))):
        shutil.copy(path, test_dir / f"img{i:02d}.png")
        rows.append({"file": f"img{i:02d}.png", "label": path.parent.name})
    pd.DataFrame(rows).to_csv(test_dir / "test_labels.csv", index=False)
    return run, model_dir, test_dir


def test_artifact_describes_itself_and_reloads_identically(trained):
    run, model_dir, _ = trained
    metadata = json.loads((model_dir / "model.json").read_text())
    assert metadata["classes"] == ["blue", "green", "red"]
    assert metadata["preprocessing"]["image_size"] == 32 and len(metadata["preprocessing"]["mean"]) == 3
    assert metadata["hyperparams"]["backbone"] == "test_efficientnet"
    ensemble = artifact.load(model_dir, torch.device("cpu"))  # a single-model folder: a one-member ensemble
    assert ensemble.vote == ("final",) and ensemble.tta == ("flip",) and ensemble.image_size == 32
    model = ensemble.members["final"].model
    x = torch.randn(2, 3, 32, 32)
    run.model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), run.model(x), atol=1e-5)


def test_predictions_csv_and_accuracy(trained, tmp_path):
    _, model_dir, test_dir = trained
    messages = []
    report = predict(model_dir, test_dir, tmp_path / "out" / "p.csv", progress=messages.append)
    table = pd.read_csv(report.out)
    assert list(table.columns) == ["file", "label", "confidence", "top5_labels", "top5_confidences",
                                   "error"]
    assert len(table) == 12 and set(table["label"]) <= {"blue", "green", "red"}
    assert table["confidence"].between(0, 1).all()
    for row in table.itertuples():
        assert row.top5_labels.split("|")[0] == row.label and len(row.top5_labels.split("|")) == 3
        assert float(row.top5_confidences.split("|")[0]) == pytest.approx(row.confidence, abs=1e-4)
    truth = pd.read_csv(test_dir / "test_labels.csv")
    expected = (table.merge(truth, on="file", suffixes=("", "_true")).eval("label == label_true")).mean()
    assert report.accuracy == pytest.approx(expected)
    assert messages and messages[-1] == "predict: 12/12 images"


def test_tta_changes_confidences_but_not_the_file_list(trained, tmp_path):
    _, model_dir, test_dir = trained
    plain = pd.read_csv(predict(model_dir, test_dir, tmp_path / "a.csv", tta=(), progress=lambda _: None).out)
    flipped = pd.read_csv(predict(model_dir, test_dir, tmp_path / "b.csv", tta=("flip",), progress=lambda _: None).out)
    assert plain["file"].tolist() == flipped["file"].tolist()
    assert not plain["confidence"].equals(flipped["confidence"])


def test_unreadable_test_image_is_skipped(trained, tmp_path, capsys):
    _, model_dir, test_dir = trained
    images = tmp_path / "imgs"
    shutil.copytree(test_dir, images)
    (images / "zz_broken.jpg").write_bytes(b"nope")
    os.mkfifo(images / "zz_pipe.png")  # never opened: reading it would block
    report = predict(model_dir, images, tmp_path / "p.csv", progress=lambda _: None)
    warning = capsys.readouterr().err
    assert report.images == 12 and "zz_broken.jpg" in warning and "zz_pipe.png" in warning
    table = pd.read_csv(tmp_path / "p.csv")
    assert len(table) == 14 and table["label"].notna().sum() == 12  # a row for every file asked about
    skipped = table[table["label"].isna()]
    assert skipped["file"].tolist() == ["zz_broken.jpg", "zz_pipe.png"]
    assert (skipped["error"] == "unreadable image (skipped)").all()


def test_bad_model_folder_and_images(trained, tmp_path):
    _, model_dir, _ = trained
    with pytest.raises(artifact.ArtifactError, match="not a tuneprod model folder"):
        predict(tmp_path, tmp_path, tmp_path / "p.csv")
    with pytest.raises(DataError, match="no such file or folder"):
        predict(model_dir, tmp_path / "absent", tmp_path / "p.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        predict(model_dir, tmp_path / "empty", tmp_path / "p.csv")
    assert not (tmp_path / "p.csv").exists()


def test_saving_over_an_old_model_replaces_it_whole(trained, tmp_path):
    run, model_dir, _ = trained
    target = tmp_path / "final"
    shutil.copytree(model_dir, target)
    (target / "stale.txt").write_text("from an older run")
    artifact.save(target, run.model, run.classes, run.preprocessing, run.config, {})
    assert sorted(p.name for p in target.iterdir()) == ["model.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["final"]  # no staging folder left behind


@pytest.fixture(scope="module")
def ensemble_dir(trained, tmp_path_factory):
    """Two members (the trained model and a second, differently seeded one) and their soup, as the final stage
    writes them."""
    run, _, _ = trained
    folder = tmp_path_factory.mktemp("e") / "final"
    other = TrainingRun(dataclasses.replace(run.config, seed=5, epochs=1), run.classes, run.train_batches.images)
    other.step()
    for name, member in (("member_1", run), ("member_2", other)):
        artifact.write_model(folder / name, member.model, run.classes, run.preprocessing, member.config, {})
    soups = {"soup_1": ["member_1", "member_2"]}
    artifact.write_model(folder / "soup_1", run.model, run.classes, run.preprocessing, run.config,
                         {"soup_of": soups["soup_1"]})
    artifact.write_ensemble(folder, run.classes, 32, ["member_1", "member_2"], ["member_1", "member_2"], soups,
                            ("flip", "scale"), {})
    return folder, run, other


def test_ensemble_round_trip_predicts_the_soft_vote(ensemble_dir, trained, tmp_path):
    folder, run, other = ensemble_dir
    _, _, test_dir = trained
    ensemble = artifact.load(folder, torch.device("cpu"))
    assert ensemble.vote == ("member_1", "member_2") and ensemble.tta == ("flip", "scale")
    assert set(ensemble.members) == {"member_1", "member_2", "soup_1"}
    report = predict(folder, test_dir, tmp_path / "p.csv", progress=lambda _: None)
    table = pd.read_csv(report.out)
    # The saved ensemble gives what its members, run here by hand, vote.
    files = sorted(test_dir.glob("*.png"))
    pixels = torch.stack([torch.from_numpy(decode_resized(f, 32)) for f in files])
    prep = run.preprocessing
    images = normalise(pixels, prep["mean"], prep["std"])
    with torch.no_grad():
        by_hand = soft_vote([view_probabilities(m.eval(), images, ("flip", "scale")) for m in (run.model, other.model)])
    expected = by_hand.max(1).values.numpy()
    assert table["file"].tolist() == [f.name for f in files]
    assert table["confidence"].to_numpy() == pytest.approx(expected, abs=1e-4)
    # Each member is scored beside the ensemble when labels exist.
    assert set(report.member_accuracy) == {"member_1", "member_2", "soup_1"}
    assert all(0 <= v <= 1 for v in report.member_accuracy.values()) and "member_2" in report.summary()


def test_ensemble_predicts_from_the_command_line(ensemble_dir, trained, tmp_path):
    folder, _, _ = ensemble_dir
    _, _, test_dir = trained
    result = subprocess.run([sys.executable, "-m", "tuneprod.cli", "predict", str(folder), str(test_dir),
                             "--out", str(tmp_path / "p.csv"), "--tta", "flip,crops"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert re.search(r"accuracy \d\.\d{4} \(member_1 \d\.\d{4}, member_2 \d\.\d{4}, soup_1", result.stdout)
    bad = subprocess.run([sys.executable, "-m", "tuneprod.cli", "predict", str(folder), str(test_dir), "--tta", "spin"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "must be views from flip, scale, crops" in bad.stderr


def test_damaged_ensemble_description_is_one_line(ensemble_dir, tmp_path):
    folder, _, _ = ensemble_dir
    copy = tmp_path / "final"
    shutil.copytree(folder, copy)
    (copy / "ensemble.json").write_text('{"format": "tuneprod-ensemble/9"}')
    with pytest.raises(artifact.ArtifactError, match="format is 'tuneprod-ensemble/9', but must be"):
        artifact.load(copy, torch.device("cpu"))
    (copy / "ensemble.json").write_text("{not json")
    with pytest.raises(artifact.ArtifactError, match="cannot read it"):
        artifact.load(copy, torch.device("cpu"))
