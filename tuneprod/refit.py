"""The best configuration retrained on all labelled data (train + validation), saved as `final/`, and the test
predictions written when the spec names test images.

Epochs: with retrain.epochs 'auto', as many as the best trial had run when its metric peaked (its best_epoch);
the learning-rate schedule spans exactly those epochs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from tuneprod import artifact, results
from tuneprod.cache import DecodedImages, labelled_images
from tuneprod.data import check_test_images
from tuneprod.inference import PredictionReport, predict
from tuneprod.loop import NonFiniteLoss, TrainingRun
from tuneprod.spec import EXPERIMENT_SPEC, Hyperparams, Spec, TrialConfig, UserError, load_spec

FINAL = "final"
PREDICTIONS = "predictions.csv"


@dataclass(frozen=True)
class RetrainPlan:
    config: TrialConfig
    trial_id: str
    trial_value: float


def plan_retrain(spec: Spec, experiment_dir: Path) -> RetrainPlan:
    if not (experiment_dir / results.TRIALS_PARQUET).is_file():
        raise UserError(f"{experiment_dir}: holds no {results.TRIALS_PARQUET}; run `tuneprod search` first")
    try:
        best = results.best_row(results.read_table(experiment_dir), spec.search.metric)
    except ValueError as exc:
        raise UserError(f"{experiment_dir}: {exc}") from None
    hp = Hyperparams.from_params(results.params_of(best, spec.space.names()))
    epochs = int(best["best_epoch"]) if spec.retrain.epochs == "auto" else spec.retrain.epochs
    config = TrialConfig(hp, image_size=spec.data.image_size, epochs=epochs, seed=spec.search.seed,
                         workers=spec.dataloader_workers)
    return RetrainPlan(config, str(best["trial_id"]), float(best[spec.search.metric]))


def retrain_and_predict(experiment_dir: Path, progress: Callable[[str], None] = print,
                        images: Optional[DecodedImages] = None) -> Path:
    """Retrains the experiment's best configuration into final/, then predicts data.test when it is set.
    `images`: the labelled images the search already indexed and decoded (else they are indexed again, and the
    decoded cache found again)."""
    experiment_dir = Path(experiment_dir)
    spec = load_experiment(experiment_dir)
    folder = retrain(spec, experiment_dir, progress, images)
    predict_test(spec, experiment_dir, progress)
    return folder


def retrain(spec: Spec, experiment_dir: Path, progress: Callable[[str], None],
            images: Optional[DecodedImages]) -> Path:
    plan = plan_retrain(spec, experiment_dir)
    labelled = images if images is not None else labelled_images(spec, progress)
    progress(f"retrain: trial {plan.trial_id}'s configuration ({spec.search.metric} {plan.trial_value:.4f}) on all "
             f"{len(labelled)} labelled images for {plan.config.epochs} epoch(s)")
    run = TrainingRun(plan.config, labelled.classes, labelled)
    while run.epoch < plan.config.epochs:
        try:
            metrics = run.step()
        except (NonFiniteLoss, torch.OutOfMemoryError) as exc:
            raise UserError(f"retrain: trial {plan.trial_id}'s configuration failed on all the data at epoch "
                            f"{run.epoch + 1} ({type(exc).__name__}: {str(exc).splitlines()[0]}); no model was saved. "
                            f"Set retrain.epochs, or retrain another configuration") from None
        progress(f"retrain: epoch {metrics['epoch']}/{plan.config.epochs}  train_loss {metrics['train_loss']:.4f}  "
                 f"{metrics['images_per_s']:.0f} img/s")
    folder = artifact.save(experiment_dir / FINAL, run.model, labelled.classes, run.preprocessing, plan.config,
                           {"tta": spec.retrain.tta, "trained_on_images": len(labelled),
                            "source_trial": plan.trial_id, f"trial_{spec.search.metric}": plan.trial_value})
    progress(f"retrain: model saved to {folder}")
    return folder


def predict_test(spec: Spec, experiment_dir: Path,
                 progress: Callable[[str], None]) -> Optional[PredictionReport]:
    """Predicts data.test with the retrained model, when the spec names test images."""
    if spec.data.test_path is None:
        return None
    check_test_images(spec)
    report = predict(experiment_dir / FINAL, spec.data.test_path, experiment_dir / PREDICTIONS,
                     workers=spec.dataloader_workers, progress=progress)
    progress(f"predict: {report.images} predictions written to {report.out}")
    if report.accuracy is not None:
        progress(f"predict: test accuracy {report.accuracy:.4f} (against {spec.data.test_path / 'test_labels.csv'})")
    return report


def load_experiment(experiment_dir: Path) -> Spec:
    """The spec a search ran with, placed at the folder it is read from (which may have been moved)."""
    saved = experiment_dir / EXPERIMENT_SPEC
    if not saved.is_file():
        raise UserError(f"{experiment_dir}: not a tuneprod experiment folder (no {EXPERIMENT_SPEC}); pass the "
                        f"folder `tuneprod search` printed, e.g. tuneprod_runs/demo")
    return load_spec(saved).placed(experiment_dir.absolute())

