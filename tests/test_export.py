"""One ONNX file for a whole ensemble (final/export.py), run by onnxruntime (final/portable.py): the same
probabilities and labels as torch for the demo's kind of ensemble, a gallery member and a soup."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import write_image_folder
from tuneprod import api
from tuneprod.final import artifact, portable
from tuneprod.final.ensemble import soup
from tuneprod.final.export import OnnxRunner, export, to_onnx
from tuneprod.final.inference import prediction_speedup, predict, runnable, score_images
from tuneprod.spec import Hyperparams, TrialConfig
from tuneprod.train.cache import decoded
from tuneprod.train.data import decode_resized, index_images, list_images
from tuneprod.train.loop import TrainingRun

SIZE = 48  # demo.yaml's image size


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """(decoded training images, a test folder with test_labels.csv)."""
    root = tmp_path_factory.mktemp("export")
    train = decoded(index_images(write_image_folder(root / "train", per_class=8, size=SIZE)), SIZE)
    test = root / "test"
    test.mkdir()
    rows = []
    for number, path in enumerate(sorted(write_image_folder(root / "t", per_class=6, size=SIZE, seed=5).rglob("*.png"))):
        shutil.copy(path, test / f"img{number:02d}.png")
        rows.append({"file": f"img{number:02d}.png", "label": path.parent.name})
    pd.DataFrame(rows).to_csv(test / "test_labels.csv", index=False)
    return train, test


def trained_member(folder, train, **hyperparams):
    """One epoch on the tiny set (real batch-norm statistics and a gallery when the head predicts by one)."""
    config = TrialConfig(Hyperparams(**{"pretrained": False, "batch_size": 8, "lr": 3e-3, **hyperparams}), SIZE, epochs=1)
    run = TrainingRun(config, train.classes, train)
    run.step()
    artifact.write_model(folder, run.final_model(), train.classes, run.preprocessing, config, {})
    return run


def ensemble_folder(folder, train, members: dict, tta, weights=None, vote=None, soups=None):
    for name, hyperparams in members.items():
        trained_member(folder / name, train, **hyperparams)
    info = {"weights": weights} if weights else {}
    artifact.write_ensemble(folder, train.classes, SIZE, list(members), vote or list(members), soups or {},
                            tuple(tta), info)
    return folder


def eager(*args, **kwargs):
    """score_images with every member in torch (on a CPU it would run them in onnxruntime)."""
    return score_images(*args, **kwargs, use_onnxruntime=False)


def assert_parity(model_dir, test_dir, tmp_path):
    """ONNX probabilities within 1e-4 of torch's on every test image, identical labels, and the same CSV labels."""
    onnx_file = export(model_dir, tmp_path / "model.onnx")
    ensemble = artifact.load(model_dir, torch.device("cpu"))
    paths = list_images(test_dir)
    with torch.inference_mode():
        expected = score_images(model_dir, paths, ensemble.tta, ensemble.vote, progress=lambda _: None,
                                use_onnxruntime=False).votes.numpy()
    model = portable.load(onnx_file)
    got = model.probabilities(np.stack([decode_resized(p, SIZE) for p in paths]))
    assert np.abs(got - expected).max() <= 1e-4
    assert (got.argmax(1) == expected.argmax(1)).all()
    from_torch = predict(model_dir, test_dir, tmp_path / "torch.csv", progress=lambda _: None, scorer=eager)
    from_onnx = api.predict(onnx_file, test_dir, tmp_path / "onnx.csv", progress=lambda _: None)
    torch_table, onnx_table = pd.read_csv(from_torch.out), pd.read_csv(from_onnx.out)
    assert list(onnx_table.columns) == list(torch_table.columns)
    assert onnx_table["label"].tolist() == torch_table["label"].tolist()
    assert from_onnx.accuracy == from_torch.accuracy
    return onnx_file


def test_the_demos_kind_of_ensemble_exports_with_its_views_and_weighted_vote(images, tmp_path):
    train, test = images
    folder = ensemble_folder(tmp_path / "final", train, {
        "member_1": {"backbone": "resnet10t"}, "member_2": {"backbone": "mobilenetv3_small_100"},
        "member_3": {"backbone": "resnet10t", "dropout": 0.2}}, tta=("flip", "crops"), weights=[2, 1, 1])
    onnx_file = assert_parity(folder, test, tmp_path)
    described = json.loads(onnx_file.with_name("labels.json").read_text())
    assert described["classes"] == list(train.classes) and described["image_size"] == SIZE
    assert described["tta"] == ["flip", "crops"] and described["vote"] == ["member_1", "member_2", "member_3"]
    metadata = portable.load(onnx_file)
    assert metadata.classes == train.classes and metadata.tta == ("flip", "crops")


@pytest.mark.parametrize("rule", ["knn", "centroid"])
def test_a_member_that_predicts_by_its_gallery_exports_its_scoring(images, tmp_path, rule):
    train, test = images
    folder = ensemble_folder(tmp_path / "final", train, {
        "member_1": {"backbone": "test_efficientnet", "head": "arcface", "predict_by": rule, "knn_k": 3,
                     "embedding_size": 32},
        "member_2": {"backbone": "test_resnet"}}, tta=("flip",))
    assert_parity(folder, test, tmp_path)


def test_a_soup_exports_as_the_one_model_it_is(images, tmp_path):
    train, test = images
    folder = tmp_path / "final"
    members = {"member_1": {"backbone": "test_efficientnet"}, "member_2": {"backbone": "test_efficientnet",
                                                                          "lr": 1e-3}}
    runs = [trained_member(folder / name, train, **hp) for name, hp in members.items()]
    averaged = runs[0].final_model()
    averaged.load_state_dict(soup([run.final_model().state_dict() for run in runs]))
    artifact.write_model(folder / "soup_1", averaged, train.classes, runs[0].preprocessing, runs[0].config,
                         {"soup_of": list(members)})
    artifact.write_ensemble(folder, train.classes, SIZE, list(members), ["soup_1"], {"soup_1": list(members)},
                            ("flip", "scale"), {})
    assert_parity(folder, test, tmp_path)


def test_the_exported_graph_takes_any_batch_and_refuses_another_size_or_dtype(images, tmp_path):
    import onnxruntime

    train, _ = images
    folder = ensemble_folder(tmp_path / "final", train, {"member_1": {"backbone": "test_efficientnet"}}, tta=())
    model = portable.load(export(folder))
    assert (tmp_path / "model.onnx").is_file()  # beside the final/ folder by default
    for batch in (1, 5):
        probabilities = model.probabilities(np.zeros((batch, SIZE, SIZE, 3), np.uint8))
        assert probabilities.shape == (batch, 3) and np.allclose(probabilities.sum(1), 1, atol=1e-5)
    with pytest.raises(portable.PortableModelError, match=r"uint8 \(N, 48, 48, 3\)"):
        model.probabilities(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(portable.PortableModelError, match="float32"):
        model.probabilities(np.zeros((2, SIZE, SIZE, 3), np.float32))
    # onnxruntime itself, for a user who feeds the file directly
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="(?i)invalid dimensions"):
        session.run(None, {"images": np.zeros((2, 32, 32, 3), np.uint8)})
    with pytest.raises(Exception, match="(?i)type"):
        session.run(None, {"images": np.zeros((2, SIZE, SIZE, 3), np.float32)})


class SpectralModel(torch.nn.Module):
    """A model with an operation ONNX has no export for."""

    def forward(self, images):
        return torch.fft.fft2(images).real.mean((2, 3))


def test_a_member_that_cannot_be_exported_is_named_with_its_operation(images, tmp_path):
    train, _ = images
    folder = ensemble_folder(tmp_path / "final", train, {"member_1": {"backbone": "test_efficientnet"}}, tta=())
    ensemble = artifact.load(folder, torch.device("cpu"))
    member = artifact.Member("member_2", SpectralModel(), ensemble.members["member_1"].metadata)
    broken = artifact.Ensemble(ensemble.classes, SIZE, {**ensemble.members, "member_2": member},
                               ("member_1", "member_2"), ())
    with pytest.raises(artifact.ArtifactError) as caught:
        to_onnx(broken)
    message = str(caught.value)
    assert message.startswith("member_2: cannot be exported to ONNX: ") and "fft_fft2" in message
    assert "\n" not in message


@pytest.mark.parametrize("members", [
    {"member_1": {"backbone": "resnet10t"}, "member_2": {"backbone": "mobilenetv3_small_100"}},
    {"member_1": {"backbone": "test_efficientnet", "head": "arcface", "predict_by": "knn", "knn_k": 3,
                  "embedding_size": 32}}], ids=["demo", "gallery"])
def test_predictions_on_a_cpu_run_each_member_in_onnxruntime_with_torchs_probabilities(images, tmp_path, members):
    train, test = images
    folder = ensemble_folder(tmp_path / "final", train, members, tta=("flip", "crops"))
    ensemble = artifact.load(folder, torch.device("cpu"))
    assert all(isinstance(runnable(m.model, SIZE, torch.device("cpu")), OnnxRunner) for m in ensemble.members.values())
    paths = list_images(test)
    scored = list(ensemble.members)
    fast = score_images(folder, paths, ensemble.tta, scored, progress=lambda _: None)
    slow = eager(folder, paths, ensemble.tta, scored, progress=lambda _: None)
    assert (fast.votes - slow.votes).abs().max() <= 1e-4
    assert fast.member_labels == slow.member_labels and (fast.votes.argmax(1) == slow.votes.argmax(1)).all()


def test_a_model_that_cannot_be_exported_is_run_by_torch_at_torchs_speed():
    model = SpectralModel()
    assert runnable(model, SIZE, torch.device("cpu")) is model
    assert prediction_speedup(model, SIZE, torch.device("cpu")) == 1.0
    speedup = prediction_speedup(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()), SIZE,
                                 torch.device("cpu"))
    assert speedup > 0 and speedup != 1.0


def test_export_and_onnx_predict_on_the_command_line_and_without_torch(images, tmp_path):
    train, test = images
    folder = ensemble_folder(tmp_path / "final", train, {"member_1": {"backbone": "test_efficientnet"}}, tta=("flip",))
    done = subprocess.run([sys.executable, "-m", "tuneprod.cli", "export", str(folder), "--out",
                           str(tmp_path / "m.onnx"), "--tta", "flip,crops"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert portable.load(tmp_path / "m.onnx").tta == ("flip", "crops")
    # A deployment without torch: importing it fails, and the ONNX path never needs it.
    script = ("import sys; sys.modules['torch'] = None\n"
              "from tuneprod.final.portable import predict\n"
              f"report = predict({str(tmp_path / 'm.onnx')!r}, {str(test)!r}, {str(tmp_path / 'p.csv')!r})\n"
              "print(report.images, report.accuracy)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2] == "18" and len(pd.read_csv(tmp_path / "p.csv")) == 18


@pytest.mark.parametrize("args, message", [
    (["export", "{final}", "--out", "{tmp}/m.txt"], "--out: the value is '{tmp}/m.txt', but must end in .onnx"),
    (["predict", "{tmp}/missing.onnx", "{tmp}"], "{tmp}/missing.onnx: no such file"),
    (["predict", "{tmp}/foreign.onnx", "{tmp}"], "{tmp}/foreign.onnx: format is None, but must be 'tuneprod-onnx/1'"),
    (["predict", "{tmp}/m.onnx", "{tmp}", "--tta", "scale"], "--tta: the value is scale, but {tmp}/m.onnx was exported "
                                                              "with flip"),
])
def test_bad_export_and_onnx_predict_inputs_are_one_line_errors(images, tmp_path, args, message):
    train, _ = images
    folder = ensemble_folder(tmp_path / "final", train, {"member_1": {"backbone": "test_efficientnet"}}, tta=("flip",))
    export(folder, tmp_path / "m.onnx")
    foreign = torch.nn.Linear(3, 2)
    torch.onnx.export(foreign, (torch.zeros(1, 3),), str(tmp_path / "foreign.onnx"), dynamo=False)
    filled = [a.format(final=folder, tmp=tmp_path) for a in args]
    done = subprocess.run([sys.executable, "-m", "tuneprod.cli", *filled], capture_output=True, text=True)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"tuneprod {args[0]}: error: {message.format(tmp=tmp_path)}")


def test_a_model_in_a_bucket_is_fetched_alone_and_exported_into_the_current_folder(images, tmp_path, s3, monkeypatch):
    """An exported model beside a whole experiment in a bucket: predicting from it fetches that one object, not
    the experiment; exporting a bucket's final/ folder writes model.onnx here, not into the cache."""
    from tuneprod.spec import UserError

    train, test = images
    experiment = tmp_path / "experiment"
    ensemble_folder(experiment / "final", train, {"member_1": {"backbone": "test_efficientnet"}}, tta=("flip",))
    (experiment / "trial_a").mkdir()
    (experiment / "trial_a" / "checkpoint.bin").write_bytes(b"0" * 1000)
    s3.upload(experiment, "deploy/experiment")
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    cache = tmp_path / "cache"
    monkeypatch.setenv("TUNEPROD_CACHE", str(cache))
    written = api.export(s3.uri("deploy/experiment/final"))
    assert written == Path("model.onnx") and (here / "model.onnx").is_file()
    s3.client.upload_file(str(here / "model.onnx"), s3.BUCKET, "deploy/experiment/model.onnx")
    report = api.predict(s3.uri("deploy/experiment/model.onnx"), test, tmp_path / "p.csv", progress=lambda _: None)
    assert report.images == 18 and len(pd.read_csv(tmp_path / "p.csv")) == 18
    fetched = [p.name for p in cache.rglob("*") if p.is_file()]
    assert "model.onnx" in fetched and "checkpoint.bin" not in fetched
    with pytest.raises(UserError, match="deploy/experiment/other.onnx.*: no such object"):
        api.predict(s3.uri("deploy/experiment/other.onnx"), test, tmp_path / "p.csv")
