"""Records learning curves of tuneprod's own trials, run to the end (no early stopping), for
benchmarks/scheduler_verdict.py to replay. Offline, not in CI; resumable: it appends to its tables, so a later run
continues where one stopped (or was stopped).

    pip install -e ".[bench,lite]"  +  apt-get install dataset-fashion-mnist
    python benchmarks/curves/record.py [--configs 48] [--seeds 2] [--epochs 20] [--minutes 75]

Sets (written under --work on first use), at 32 px so that ~6,000 epochs fit about 90 minutes of 2 cores:
  viewpoint  the demo products, 40 classes x 12 photos, validated on a camera elevation the class was not trained
             on (few-shot with a viewpoint shift); search_spaces/demo.yaml's space, trained from scratch
  digits     scikit-learn's handwritten digit scans, 60 a class (more images a class); demo.yaml's space
  fashion    Fashion-MNIST (Debian dataset-fashion-mnist), 30 a class; search_spaces/cpu.yaml's space: the
             pretrained tf_efficientnet_lite0 fine-tuned
Each set's configurations are drawn at random from its space (Optuna's RandomSampler, the search's define-by-run
code), and each is trained once per training seed on 80% of the labelled images (seeded data order, augmentation,
dropout and head weights), for --epochs epochs with that horizon's learning-rate schedule, as a trial of a search
would be. Every epoch's val_acc, val_loss and seconds (training + evaluation, one core) go into curves.parquet;
configurations.parquet holds the parameters, sets.parquet each set's
space file, training images and classes. Two trials run at a time, one per core.
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE.parent))

from accuracy import FASHION, few_shot, read_idx, write_split  # noqa: E402
from tuneprod.demo import generate_demo  # noqa: E402
from tuneprod.spec import Hyperparams, TrialConfig, load_spec  # noqa: E402

SIZE = 32
SETS = {  # name: the search-space file whose space is sampled, and the validation split
    "viewpoint": "demo.yaml",
    "digits": "demo.yaml",
    "fashion": "cpu.yaml",
}
CURVES, CONFIGURATIONS, SETS_TABLE = "curves.parquet", "configurations.parquet", "sets.parquet"


def make_set(name: str, work: Path) -> Path:
    """The set's train/ (or train.csv) path, written on first use."""
    folder = work / name
    if not folder.is_dir():
        work.mkdir(parents=True, exist_ok=True)
        if name == "viewpoint":
            generate_demo(folder, classes=40, train_per_class=12, test_per_class=1, size=SIZE)
        elif name == "digits":
            from sklearn.datasets import load_digits
            digits = load_digits()
            pixels = (digits.images * (255 / 16)).round().astype(np.uint8)
            write_split(folder, *few_shot(pixels, digits.target, [f"d{n}" for n in range(10)], 60, 1))
        else:
            names = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
            write_split(folder, *few_shot(read_idx(FASHION / "train-images-idx3-ubyte.gz"),
                                          read_idx(FASHION / "train-labels-idx1-ubyte.gz"), names, 30, 1))
    return folder / "train.csv" if name == "viewpoint" else folder / "train"


def draw_configurations(name: str, count: int) -> pd.DataFrame:
    """`count` configurations of the set's space, drawn at random: one row each, the fixed values included."""
    from tuneprod.tuning.space import DefineByRun

    spec = load_spec(ROOT / "search_spaces" / SETS[name])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=list(SETS).index(name)))
    define = DefineByRun(spec.space)
    rows = []
    for number in range(count):
        trial = study.ask()
        fixed = define(trial)
        rows.append({"set": name, "configuration": number, **fixed, **trial.params})
        study.tell(trial, 0.0)
    return pd.DataFrame(rows)


_loaded: dict = {}


def split(name: str, work: Path):
    """(train, val) decoded images of a set, once per process; the demo's validation is an unseen elevation."""
    if name not in _loaded:
        from tuneprod.train.cache import decoded
        from tuneprod.train.data import index_images, validation_split
        images = decoded(index_images(make_set(name, work), "data.train",
                                      "elevation" if name == "viewpoint" else None),
                         SIZE, root=work / "cache", progress=lambda _: None)
        _loaded[name] = validation_split(images, 0.25 if name == "viewpoint" else 0.2, seed=0)
    return _loaded[name]


def train_one(job: tuple) -> list[dict]:
    """Every epoch of one configuration trained with one seed."""
    import torch
    from tuneprod.train.loop import TrainingRun

    torch.set_num_threads(1)
    name, configuration, params, seed, epochs, work = job
    train, val = split(name, work)
    run = TrainingRun(TrialConfig(Hyperparams.from_params(params), SIZE, epochs, seed=seed), train.classes, train, val)
    rows = []
    for _ in range(epochs):
        started = time.perf_counter()
        try:
            metrics = run.step()
        except Exception as exc:  # a diverging configuration: its curve ends in NaN, as a failed trial would
            print(f"record: {name} configuration {configuration} seed {seed}: {exc}", flush=True)
            metrics = {"epoch": run.epoch + 1, "val_acc": float("nan"), "val_loss": float("nan")}
            run.epoch += 1
        rows.append({"set": name, "configuration": configuration, "seed": seed, "epoch": metrics["epoch"],
                     "val_acc": metrics["val_acc"], "val_loss": metrics["val_loss"],
                     "seconds": time.perf_counter() - started})
    return rows


def read(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.is_file() else pd.DataFrame()


def append(path: Path, rows: pd.DataFrame) -> None:
    """Rewritten beside, then moved over: a run stopped while writing leaves the last complete table."""
    table = pd.concat([read(path), rows], ignore_index=True)
    staging = path.with_suffix(".tmp")
    table.to_parquet(staging, index=False)
    staging.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=48)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--minutes", type=float, default=75, help="no new trial starts after this")
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--work", type=Path, default=Path("curves_work"))
    args = parser.parse_args()
    sets, work = args.sets.split(","), args.work.absolute()
    args.out.mkdir(parents=True, exist_ok=True)
    configurations = read(args.out / CONFIGURATIONS)
    for name in sets:
        known = configurations[configurations["set"] == name] if len(configurations) else configurations
        if len(known) < args.configs:
            drawn = draw_configurations(name, args.configs)
            append(args.out / CONFIGURATIONS, drawn[drawn["configuration"] >= len(known)])
    configurations = read(args.out / CONFIGURATIONS)
    described = []
    for name in sets:
        train, _ = split(name, work)  # builds the decoded cache once, before the workers read it
        described.append({"set": name, "space": SETS[name], "train_images": len(train), "classes": len(train.classes)})
    pd.DataFrame(described).to_parquet(args.out / SETS_TABLE, index=False)  # what auto_grace_period needs
    done = read(args.out / CURVES)
    finished = set() if done.empty else set(
        done.groupby(["set", "configuration", "seed"]).size().loc[lambda n: n >= args.epochs].index)
    # Configuration by configuration, every set and seed of one before the next: a recording cut short still has
    # whole configurations on every set.
    jobs = []
    for number in range(args.configs):
        for name in sets:
            row = configurations[(configurations["set"] == name) & (configurations["configuration"] == number)]
            params = {k: v for k, v in row.iloc[0].items() if k not in ("set", "configuration") and pd.notna(v)}
            params = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in params.items()}
            jobs += [(name, number, params, seed, args.epochs, work) for seed in range(args.seeds)
                     if (name, number, seed) not in finished]
    print(f"record: {len(jobs)} trials to run ({len(finished)} recorded already)", flush=True)
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(2, maxtasksperchild=8) as pool:
        pending = iter(jobs)
        running = []
        for job in pending:  # two at a time, so that none starts after --minutes
            running.append(pool.apply_async(train_one, (job,)))
            if len(running) < 2:
                continue
            while all(not r.ready() for r in running):
                time.sleep(0.5)
            for result in [r for r in running if r.ready()]:
                running.remove(result)
                rows = pd.DataFrame(result.get())
                append(args.out / CURVES, rows)
                print(f"record: {rows['set'][0]} configuration {rows['configuration'][0]} seed {rows['seed'][0]}: "
                      f"final val_acc {rows['val_acc'].iloc[-1]:.3f}, {rows['seconds'].sum():.0f} s "
                      f"({(time.perf_counter() - started) / 60:.1f} min)", flush=True)
            if time.perf_counter() - started > 60 * args.minutes:
                break
        for result in running:
            append(args.out / CURVES, pd.DataFrame(result.get()))
    print(f"record: {len(read(args.out / CURVES))} epochs in {args.out / CURVES}", flush=True)


if __name__ == "__main__":
    main()
