"""Prediction speed: `tuneprod predict` on a final/ folder with its members in eager torch (as without
onnxruntime installed; with it, on a CPU, predict runs each member in onnxruntime) against the exported model.onnx under
onnxruntime, on the same images with the same batch size, in one run. A benchmark, not a test.

    pip install -e ".[export,lite]"
    python benchmarks/inference.py [--images 512] [--batch-size 64] [--repeats 3] [--work inference_bench]

Ensembles (members trained for one epoch on generated images, so that their labels mean something):
  demo   search_spaces/demo.yaml's final stage: 3 members (resnet10t, mobilenetv3_small_100, resnet10t) at 48 px
  cpu    search_spaces/cpu.yaml's: 2 members of the pretrained tf_efficientnet_lite0 at 96 px
Each with the test-time views [flip] and [flip, crops]. Per row: images per second of the whole prediction (decoding
the files, the ensemble, writing the CSV; the best of --repeats), the same for the model alone on decoded images,
whether the two label every image alike, the largest probability difference, and the file's size. Ends with
`onnx/torch: R.RRx` (the demo ensemble, [flip, crops], whole predictions).
"""
from __future__ import annotations

import argparse
import functools
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuneprod.demo import generate_demo  # noqa: E402
from tuneprod.final import artifact, portable  # noqa: E402
from tuneprod.final.export import export  # noqa: E402
from tuneprod.final.ensemble import soft_vote  # noqa: E402
from tuneprod.final.inference import member_probabilities, predict, score_images  # noqa: E402
from tuneprod.spec import Hyperparams, TrialConfig  # noqa: E402
from tuneprod.train.cache import decoded  # noqa: E402
from tuneprod.train.data import decode_resized, index_images, list_images  # noqa: E402
from tuneprod.train.loop import TrainingRun  # noqa: E402

ENSEMBLES = {  # name: image size, members' hyperparameters
    "demo": (48, [{"backbone": "resnet10t"}, {"backbone": "mobilenetv3_small_100"},
                  {"backbone": "resnet10t", "dropout": 0.2}]),
    "cpu": (96, [{"backbone": "tf_efficientnet_lite0", "pretrained": True},
                 {"backbone": "tf_efficientnet_lite0", "pretrained": True, "lr": 3e-4}]),
}
VIEWS = (("flip",), ("flip", "crops"))


def build(name: str, work: Path) -> tuple[Path, Path]:
    """(the ensemble's final/ folder, a folder of test images), made on first use."""
    size, members = ENSEMBLES[name]
    data = work / f"data_{size}"
    if not data.is_dir():
        generate_demo(data, classes=20, train_per_class=6, test_per_class=30, size=size)
    folder = work / name / "final"
    if not (folder / artifact.ENSEMBLE).is_file():
        shutil.rmtree(folder, ignore_errors=True)
        train = decoded(index_images(data / "train.csv"), size, progress=lambda _: None)
        names = []
        for number, hyperparams in enumerate(members, start=1):
            config = TrialConfig(Hyperparams(**{"pretrained": False, "batch_size": 16, "lr": 1e-3, **hyperparams}),
                                 size, epochs=1, seed=number)
            run = TrainingRun(config, train.classes, train)
            run.step()
            names.append(f"member_{number}")
            artifact.write_model(folder / names[-1], run.final_model(), train.classes, run.preprocessing, config, {})
        artifact.write_ensemble(folder, train.classes, size, names, names, {}, VIEWS[-1], {})
    return folder, data / "test"


def best_rate(images: int, run, repeats: int) -> float:
    """Images per second, the best of `repeats` runs (the VM's speed drifts; the best is the least disturbed)."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    return images / min(seconds)


def measure(name: str, views: tuple[str, ...], work: Path, count: int, batch_size: int, repeats: int) -> dict:
    folder, test = build(name, work)
    paths = list_images(test)
    test = work / f"test_{name}_{count}"  # the first `count` images, with no labels file (no member scoring)
    if not test.is_dir():
        test.mkdir()
        for path in paths[:count]:
            shutil.copy(path, test / path.name)
    paths = list_images(test)
    onnx_file = export(folder, work / name / f"model_{'_'.join(views)}.onnx", tta=views)
    model = portable.load(onnx_file)
    quiet = lambda _: None  # noqa: E731
    torch_csv, onnx_csv = work / "torch.csv", work / "onnx.csv"
    eager = functools.partial(score_images, use_onnxruntime=False)  # else predict runs the members in onnxruntime
    whole_torch = best_rate(len(paths), lambda: predict(folder, test, torch_csv, tta=views, batch_size=batch_size,
                                                        progress=quiet, scorer=eager), repeats)
    whole_onnx = best_rate(len(paths), lambda: portable.predict(onnx_file, test, onnx_csv, batch_size=batch_size,
                                                                progress=quiet), repeats)
    pixels = np.stack([decode_resized(p, model.image_size) for p in paths])
    ensemble = artifact.load(folder, torch.device("cpu"))

    tensors = torch.from_numpy(pixels)

    def torch_model():  # what score_images does for each batch, on decoded images
        with torch.inference_mode():
            return torch.cat([soft_vote([member_probabilities(ensemble.members[m], tensors[i:i + batch_size], views)
                                         for m in ensemble.vote], ensemble.weights)
                              for i in range(0, len(paths), batch_size)]).numpy()

    def onnx_model():
        return np.concatenate([model.probabilities(pixels[i:i + batch_size]) for i in range(0, len(paths), batch_size)])

    torch_rate = best_rate(len(paths), torch_model, repeats)
    onnx_rate = best_rate(len(paths), onnx_model, repeats)
    same = (pd.read_csv(torch_csv)["label"] == pd.read_csv(onnx_csv)["label"]).all()
    difference = float(np.abs(torch_model() - onnx_model()).max())
    return {"ensemble": name, "views": "+".join(views), "images": len(paths), "torch_predict": whole_torch,
            "onnx_predict": whole_onnx, "torch_model": torch_rate, "onnx_model": onnx_rate, "same_labels": bool(same),
            "max_difference": difference, "onnx_mb": onnx_file.stat().st_size / 2 ** 20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ensembles", default=",".join(ENSEMBLES))
    parser.add_argument("--work", type=Path, default=Path("inference_bench"))
    args = parser.parse_args()
    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    print(f"{torch.get_num_threads()} torch threads; onnxruntime with its default threads; batch {args.batch_size}")
    print(f"{'ensemble':8s} {'views':10s} {'images':>6s} {'predict img/s: torch':>21s} {'onnx':>7s} {'ratio':>6s} "
          f"{'model img/s: torch':>19s} {'onnx':>7s} {'ratio':>6s} {'same labels':>11s} {'max diff':>9s} {'MB':>5s}")
    rows = []
    for name in args.ensembles.split(","):
        for views in VIEWS:
            row = measure(name, views, work, args.images, args.batch_size, args.repeats)
            rows.append(row)
            print(f"{name:8s} {row['views']:10s} {row['images']:6d} {row['torch_predict']:21.0f} "
                  f"{row['onnx_predict']:7.0f} {row['onnx_predict'] / row['torch_predict']:5.2f}x "
                  f"{row['torch_model']:19.0f} {row['onnx_model']:7.0f} {row['onnx_model'] / row['torch_model']:5.2f}x "
                  f"{str(row['same_labels']):>11s} {row['max_difference']:9.1e} {row['onnx_mb']:5.1f}", flush=True)
    demo = [r for r in rows if r["ensemble"] == "demo" and r["views"] == "flip+crops"]
    if demo:
        print(f"onnx/torch: {demo[0]['onnx_predict'] / demo[0]['torch_predict']:.2f}x")


if __name__ == "__main__":
    main()
