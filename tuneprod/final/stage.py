"""The final stage: the search's chosen configurations (members) trained on all labelled data (train +
validation), combined by a weighted soft vote (optionally souped), saved as `final/`, then the test predictions.

Members: the configurations final.select chooses (the best distinct ones, or ensemble selection over the trials'
validation predictions; failed trials never), each with `final.seeds` seeds (data order, augmentation, mixing;
members fine-tuned from pretrained weights share the head's initial weights too, so that they can be souped).
Epochs: spec.member_epochs, from the member's trial (where its metric peaked, and whether it was still improving
when it stopped); the learning-rate schedule spans exactly those epochs.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from tuneprod.final import artifact
from tuneprod.final.ensemble import soup
from tuneprod.final.inference import Scorer, predict, score_images
from tuneprod.final.predictions import PredictionReport
from tuneprod.final.selection import KEPT_PREDICTIONS, Selection, greedy_selection, share_out
from tuneprod.spec import (EXPERIMENT_SPEC, Hyperparams, Spec, TrialConfig, UserError, is_uri, load_spec,
                           member_epochs)
from tuneprod.storage import RemoteFolder
from tuneprod.train.cache import DecodedImages, labelled_images
from tuneprod.train.data import TEST_LABELS, check_test_images
from tuneprod.train.heads import build_model
from tuneprod.train.loop import NonFiniteLoss, TrainingRun
from tuneprod.tuning import results

FINAL = "final"
PREDICTIONS = "predictions.csv"


class MemberFailed(UserError):
    """A member's configuration failed on all the data (NaN loss, out of memory); the others go on."""


# Trains the planned members into folder/<name> (each where it can: the Ray side runs them as tasks on the cluster);
# returns {name: why} for those that failed.
MemberTrainer = Callable[["Spec", "list[MemberPlan]", DecodedImages, Path, Callable[[str], None]], dict]


@dataclass(frozen=True)
class MemberPlan:
    name: str  # its folder in final/
    config: TrialConfig
    trial_id: str
    trial_value: float
    metric: str
    weight: float = 1.0  # its share of the vote (before the vote's normalisation)


@dataclass(frozen=True)
class Chosen:
    """The configurations the final stage trains (their trials' rows, best first) and each one's votes."""

    rows: list[pd.Series]
    votes: list[float]
    selection: Optional[Selection] = None  # how greedy selection got there


def choose(spec: Spec, experiment_dir: Path, progress: Callable[[str], None] = print, slots: int = 1) -> Chosen:
    """final.select: `top`, the best distinct configurations with a vote each; `greedy`, ensemble selection over
    the kept validation predictions of the usable trials that trained furthest (at least as far as the members'
    count-th), of as many trials as there will be members. With final.members 'auto', at most `slots`
    configurations (the members the time buys beyond them are more seeds). A configuration tried twice counts as
    one."""
    if not (experiment_dir / results.TRIALS_PARQUET).is_file():
        raise UserError(f"{experiment_dir}: holds no {results.TRIALS_PARQUET}; run `tuneprod search` first")
    names, metric = spec.space.names(), spec.search.metric
    table = results.read_table(experiment_dir)
    try:
        usable = results.usable_trials(table, metric)
    except ValueError as exc:
        raise UserError(f"{experiment_dir}: {exc}") from None
    if spec.final.select == "greedy":
        most = slots if spec.final.members == "auto" else spec.final.members
        candidates = results.furthest_trained(usable, most)
        tables, labels = _kept_predictions(spec, experiment_dir, [str(t) for t in candidates["trial_id"]])
        if tables:
            selection = greedy_selection(tables, labels, metric, most=most)
            rows = {str(row["trial_id"]): row for _, row in usable.iterrows()}
            votes: dict[tuple, float] = {}
            firsts: dict[tuple, pd.Series] = {}
            for trial, picks in selection.weights.items():  # a configuration tried twice: one member, its votes summed
                key = results.configuration_key(rows[trial], names)
                votes[key] = votes.get(key, 0) + picks
                firsts.setdefault(key, rows[trial])
            ranked = sorted(votes, key=lambda key: -votes[key])  # stable: ties in the order first picked
            return Chosen([firsts[key] for key in ranked], [votes[key] for key in ranked], selection)
        progress("final: no trial kept its validation predictions (a search from an older tuneprod): members are "
                 "the best configurations, as final.select: top")
    count = spec.final.members if spec.final.members != "auto" else slots
    rows = results.top_distinct(table, metric, names, count)
    return Chosen(rows, [1.0] * len(rows))


def _kept_predictions(spec: Spec, experiment_dir: Path, trials: list[str]) -> tuple[dict, Optional[np.ndarray]]:
    """{trial: validation probabilities} of the trials that kept them, in one image order (the first's), and the
    labels; from the bucket when the experiment's storage is one."""
    tables, order = {}, None
    remote = RemoteFolder(spec.remote) if spec.remote is not None else None
    for trial in trials:
        relative = f"trial_{trial}/{KEPT_PREDICTIONS}"
        if remote is not None:
            remote.download(relative, experiment_dir / relative)
        path = experiment_dir / relative
        if not path.is_file():
            continue
        with np.load(path, allow_pickle=False) as kept:
            rows, labels, probabilities = kept["rows"], kept["labels"], kept["probabilities"]
        if order is None:
            order = (rows, labels)
        if np.array_equal(rows, order[0]) and np.array_equal(labels, order[1]):
            tables[trial] = probabilities
    return tables, None if order is None else order[1]


def plan_members(spec: Spec, experiment_dir: Path, slots: int = 1, chosen: Optional[Chosen] = None,
                 progress: Callable[[str], None] = print, auto_members: Optional[int] = None) -> list[MemberPlan]:
    """The members to train: each chosen configuration with final.seeds seeds, its votes shared among them. With
    final.members 'auto', `auto_members` members (as many as fit in the time the search left; else `slots`, as
    many as train at once), shared out by the votes: members beyond the chosen configurations are more seeds."""
    chosen = chosen or choose(spec, experiment_dir, progress, slots)
    names, metric = spec.space.names(), spec.search.metric
    if spec.final.members == "auto":
        seeds = share_out(chosen.votes, max(slots, auto_members or slots))
    else:
        seeds = [spec.final.seeds] * min(spec.final.members, len(chosen.rows))
    plans = []
    for row, votes, count in zip(chosen.rows, chosen.votes, seeds):
        hp = Hyperparams.from_params(results.params_of(row, names))
        epochs = member_epochs(spec.final.epochs, int(row["best_epoch"]), int(row["epochs_run"]),
                               spec.search.scheduler.max_epochs)
        for offset in range(count):
            # Members fine-tuned from pretrained weights share their whole start, the new head included, so that
            # they stay averageable (a soup); from scratch, each seed starts from its own weights.
            config = TrialConfig(hp, image_size=spec.data.image_size, epochs=epochs, seed=spec.search.seed + offset,
                                 workers=spec.dataloader_workers,
                                 init_seed=spec.search.seed if hp.pretrained else None)
            plans.append(MemberPlan(f"member_{len(plans) + 1}", config, str(row["trial_id"]), float(row[metric]),
                                    metric, votes / count))
    return plans


def train_member(plan: MemberPlan, images: DecodedImages, folder: Path, device: Optional[torch.device] = None,
                 progress: Callable[[str], None] = print) -> Path:
    """Trains one member on `images` and writes its model folder. Ray-free: the final stage runs it as a Ray task,
    and it runs as well in a plain process."""
    run = TrainingRun(plan.config, images.classes, images, device=device)
    while run.epoch < plan.config.epochs:
        try:
            metrics = run.step()
        except (NonFiniteLoss, torch.OutOfMemoryError) as exc:
            raise MemberFailed(f"{plan.name} (trial {plan.trial_id}'s configuration, seed {plan.config.seed}) failed "
                               f"at epoch {run.epoch + 1}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
        progress(f"final: {plan.name} epoch {metrics['epoch']}/{plan.config.epochs}  "
                 f"train_loss {metrics['train_loss']:.4f}  {metrics['images_per_s']:.0f} img/s")
    return artifact.write_model(folder, run.final_model(), images.classes, run.preprocessing, plan.config,
                                {"trained_on_images": len(images), "source_trial": plan.trial_id,
                                 f"trial_{plan.metric}": plan.trial_value})


def final_stage(spec: Spec, experiment_dir: Path, progress: Callable[[str], None],
                images: Optional[DecodedImages], train_members: MemberTrainer, slots: int = 1,
                auto_members: Optional[int] = None) -> Path:
    """Runs the final stage into final/. `images`: the labelled images the search already indexed and decoded (else
    they are indexed again, and the decoded cache found again). `slots`: members trained at once (with
    final.members 'auto', the most distinct configurations). `auto_members`: what final.members 'auto' trains (as
    many as fit in the time the search left; else `slots`)."""
    chosen = choose(spec, experiment_dir, progress, slots)
    if chosen.selection is not None:
        path = ", ".join(f"{trial} {score:.4f}" for trial, score in chosen.selection.path)
        progress(f"final: ensemble selection over the trials' validation predictions ({spec.search.metric} after "
                 f"each round): {path}; the first {chosen.selection.kept} round(s) kept")
    plans = plan_members(spec, experiment_dir, slots, chosen, auto_members=auto_members)
    labelled = images if images is not None else labelled_images(spec, progress)
    listing = ", ".join(f"{p.name}: trial {p.trial_id} ({p.metric} {p.trial_value:.4f}, seed {p.config.seed}, "
                        f"{p.config.epochs} epochs, vote {p.weight / sum(q.weight for q in plans):.2f})"
                        for p in plans)
    progress(f"final: training {len(plans)} member(s) on all {len(labelled)} labelled images: {listing}")
    staging = artifact.staging_folder(experiment_dir / FINAL)
    staging.mkdir(parents=True)
    try:
        failures = train_members(spec, plans, labelled, staging, progress)
        trained = [plan for plan in plans if plan.name not in failures]
        if not trained:
            raise UserError(f"final: every member failed ({'; '.join(failures.values())}); no model was saved. "
                            f"Set final.epochs, or search again")
        soups = make_soups(trained, staging, labelled.classes) if spec.final.soup else {}
        souped = {name for members in soups.values() for name in members}
        vote = list(soups) + [plan.name for plan in trained if plan.name not in souped]
        weight = {plan.name: plan.weight for plan in trained}
        weights = [sum(weight[name] for name in soups.get(entry, [entry])) for entry in vote]
        info = {"trained_on_images": len(labelled), "weights": [w / sum(weights) for w in weights]}
        if chosen.selection is not None:
            info["selection"] = {"metric": spec.search.metric, "picks": chosen.selection.weights,
                                 "kept_rounds": chosen.selection.kept,
                                 "path": [{"trial": trial, "score": score} for trial, score in chosen.selection.path]}
        artifact.write_ensemble(staging, labelled.classes, spec.data.image_size, [p.name for p in trained], vote,
                                soups, spec.final.tta, info)
        folder = artifact.publish(staging, experiment_dir / FINAL)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when published
    how = f"soft vote of {len(vote)}" if len(vote) > 1 else "one model"
    soup_note = "".join(f"; {name} averages {', '.join(members)}" for name, members in soups.items())
    progress(f"final: saved {folder} ({how}{soup_note}; test-time views: {', '.join(spec.final.tta) or 'none'})")
    return folder


def soup_groups(plans: list[MemberPlan]) -> list[list[MemberPlan]]:
    """Members that share a backbone and its pretrained start, two or more to a group. Members trained from
    scratch start from different random weights and end in different basins, where an average is meaningless."""
    groups: dict[str, list[MemberPlan]] = {}
    for plan in plans:
        if plan.config.hp.pretrained and not plan.config.hp.predicts_by_gallery:  # a gallery is no average
            groups.setdefault(plan.config.hp.backbone, []).append(plan)
    return [group for group in groups.values() if len(group) > 1]


def make_soups(plans: list[MemberPlan], folder: Path, classes: tuple[str, ...]) -> dict[str, list[str]]:
    """Writes soup_<n>/ for each group of members that can be averaged; returns {soup: its members}."""
    soups = {}
    for number, group in enumerate(soup_groups(plans), start=1):
        states = [load_file(str(folder / plan.name / artifact.WEIGHTS)) for plan in group]
        first = group[0]
        model = build_model(first.config.hp, len(classes), first.config.image_size, pretrained=False)
        model.load_state_dict(soup(states))
        preprocessing = json.loads((folder / first.name / artifact.METADATA).read_text())["preprocessing"]
        name = f"soup_{number}"
        artifact.write_model(folder / name, model, classes, preprocessing, first.config,
                             {"soup_of": [plan.name for plan in group]})
        soups[name] = [plan.name for plan in group]
    return soups


def predict_test(spec: Spec, experiment_dir: Path, progress: Callable[[str], None],
                 scorer: Scorer = score_images) -> Optional[PredictionReport]:
    """Predicts data.test with the final model, when the spec names test images. `scorer`: where the images are
    scored (the Ray side scores shards of them on the cluster)."""
    if spec.data.test_path is None:
        return None
    check_test_images(spec, json.loads((experiment_dir / FINAL / artifact.ENSEMBLE).read_text())["classes"])
    report = predict(experiment_dir / FINAL, spec.data.test_path, experiment_dir / PREDICTIONS,
                     workers=spec.dataloader_workers, progress=progress, scorer=scorer)
    progress(f"predict: {report.images} predictions written to {report.out}")
    if report.accuracy is not None:
        progress(f"predict: test accuracy {report.summary()} (against {spec.data.test_path / TEST_LABELS})")
    return report


def load_experiment(experiment_dir: Path) -> Spec:
    """The spec a search ran with, placed at the folder it is read from (which may have been moved)."""
    saved = experiment_dir / EXPERIMENT_SPEC
    if not saved.is_file():
        raise UserError(f"{experiment_dir}: not a tuneprod experiment folder (no {EXPERIMENT_SPEC}); pass the "
                        f"folder `tuneprod search` printed, e.g. tuneprod_runs/demo")
    spec = load_spec(saved)
    # Its storage a bucket: this folder is the driver's mirror of it, and the spec still names the bucket.
    return spec if is_uri(spec.storage) else spec.placed(experiment_dir.absolute())
