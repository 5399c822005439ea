"""The one place a trial meets Ray: a config dict in, one `tune.report` (with a checkpoint) per epoch out."""
from __future__ import annotations

import gc
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from ray import tune

from tuneprod.spec import Hyperparams, TrialConfig
from tuneprod.train.cache import DecodedImages
from tuneprod.train.loop import TrainingRun
from tuneprod.tuning.endings import FAILED_IN_EPOCH, FAILED_RESULT
from tuneprod.tuning.results import describe

STATE_FILE = "state.pt"


@dataclass(frozen=True)
class TrialData:
    """What every trial shares, handed over once through Ray's object store by `tune.with_parameters`."""

    train: DecodedImages  # rows of the decoded cache: a few bytes each, the pixels stay on disk
    val: DecodedImages
    image_size: int
    max_epochs: int
    seed: int
    workers: int


def train_trial(config: dict, data: TrialData) -> None:
    # Ray logs a line per saved checkpoint, which is one per trial and epoch: drowns the search's progress.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    trial_config = TrialConfig(Hyperparams.from_params(config), image_size=data.image_size,
                               epochs=data.max_epochs, seed=data.seed, workers=data.workers)
    # The GPUs Ray assigned, not whether one is visible: a trial given none must not train on a GPU it shares
    # with the trials that were given it.
    device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
    run = None
    try:
        run = TrainingRun(trial_config, data.train.classes, data.train, data.val, device)
        checkpoint = tune.get_checkpoint()
        if checkpoint:  # a restored experiment or a retried trial resumes where it stopped
            with checkpoint.as_directory() as folder:
                run.load_state_dict(torch.load(Path(folder) / STATE_FILE, weights_only=True))
        while run.epoch < trial_config.epochs:
            metrics = run.step()
            with tempfile.TemporaryDirectory() as folder:
                torch.save(run.state_dict(), Path(folder) / STATE_FILE)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
    except Exception as exc:  # the trial's own failure: its last result, so that Ray does not retry it
        # No `epoch`: no rung may count it. Both metrics, NaN: Ray insists on the search metric in every result.
        tune.report({FAILED_RESULT: describe(exc), FAILED_IN_EPOCH: (run.epoch if run else 0) + 1,
                     "val_acc": math.nan, "val_loss": math.nan})
    finally:
        # A trial ASHA stops leaves through tune.report; its memory goes back to the GPU now, for the trials
        # packed beside it, not when Ray gets round to ending the process.
        del run
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
