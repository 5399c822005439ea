"""The one place a trial meets Ray: a config dict in, one `tune.report` (with a checkpoint) per epoch out."""
from __future__ import annotations

import gc
import io
import logging
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow.fs
import ray
import torch
from ray import tune

from tuneprod.final.selection import KEPT_PREDICTIONS
from tuneprod.spec import Hyperparams, TrialConfig
from tuneprod.train.cache import DecodedImages
from tuneprod.train.loop import TrainingRun
from tuneprod.tuning.endings import FAILED_IN_EPOCH, FAILED_RESULT
from tuneprod.tuning.results import describe

STATE_FILE = re.compile(r"state_epoch(\d+)\.pt")  # a checkpoint's state, named by the epochs it holds
# Beside it, an empty object named alike: it keeps the checkpoint's folder in a bucket (where a folder is only a prefix
# of the objects in it) after the trial deleted the state, so that Ray, resuming from a folder its state names,
# finds it, and the trial goes on from a state still there (bucket_resume_state).
HELD_FILE = re.compile(r"held_epoch(\d+)")
UNNAMED_STATE = "state.pt"  # the file of a checkpoint saved by a tuneprod before states were named by epoch
KEPT_SCORE = "kept_predictions_score"  # in the saved state: the metric the kept predictions scored
# With a bucket for storage, Ray uploads its experiment state, which names each trial's checkpoint, at most this
# often; it saves that state every 10 s or more (19 times as long as a save takes, when that is longer). A driver
# lost between two saves leaves a state naming checkpoints that old: a trial in a bucket deletes only its states
# saved longer than BUCKET_STATES_KEPT_S before its newest, so that the one named is still there, however short its
# epochs.
RAY_SYNC_S = 5
BUCKET_STATES_KEPT_S = 120


def state_file(epoch: int) -> str:
    return f"state_epoch{epoch:04d}.pt"


def held_file(epoch: int) -> str:
    return f"held_epoch{epoch:04d}"


@dataclass(frozen=True)
class TrialData:
    """What every trial shares, handed over once through Ray's object store by `tune.with_parameters`."""

    train: DecodedImages  # rows of the decoded cache: a few bytes each, the pixels stay on disk
    val: DecodedImages
    image_size: int
    max_epochs: int
    seed: int
    workers: int
    metric: str  # the search's: the validation predictions at its best so far are kept
    mode: str


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
        state, kept = resume_state(), None
        if state:  # a restored experiment or a retried trial resumes where it stopped
            saved = torch.load(state, weights_only=True)
            run.load_state_dict(saved)
            kept = saved.get(KEPT_SCORE)
        while run.epoch < trial_config.epochs:
            metrics = run.step()
            if _better(metrics.get(data.metric), kept, data.mode):
                kept = metrics[data.metric]
                keep_predictions(run.val_probabilities, data.val, run.epoch)
            with tempfile.TemporaryDirectory() as folder:
                torch.save({**run.state_dict(), KEPT_SCORE: kept}, Path(folder) / state_file(run.epoch))
                (Path(folder) / held_file(run.epoch)).touch()
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
            delete_old_bucket_states()
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


def _better(value: Optional[float], kept: Optional[float], mode: str) -> bool:
    if value is None or not math.isfinite(value):
        return False
    return kept is None or (value > kept if mode == "max" else value < kept)


def keep_predictions(probabilities: np.ndarray, val: DecodedImages, epoch: int) -> None:
    """The validation probabilities into the trial's folder in the storage (for the final stage's ensemble
    selection), with the images' order: written beside, then moved over the previous ones, so that a reader never
    sees half a table."""
    storage = tune.get_context().get_storage()
    fs, folder = storage.storage_filesystem, storage.trial_fs_path
    buffer = io.BytesIO()
    np.savez(buffer, probabilities=probabilities, rows=val.rows, labels=val.labels, epoch=epoch)
    fs.create_dir(folder, recursive=True)
    partial = f"{folder}/.{KEPT_PREDICTIONS}.partial"
    with fs.open_output_stream(partial) as stream:
        stream.write(buffer.getvalue())
    fs.move(partial, f"{folder}/{KEPT_PREDICTIONS}")


def delete_old_bucket_states() -> None:
    """In a bucket, Ray keeps every checkpoint folder (it would delete a folder its lagging state still names); the
    trial deletes their states itself, all but those saved within BUCKET_STATES_KEPT_S of its newest."""
    storage = tune.get_context().get_storage()
    fs = storage.storage_filesystem
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        return  # Ray keeps the newest checkpoint alone: the state it names on a resume is whole and still there
    for path in states_to_delete(fs, storage.trial_fs_path, BUCKET_STATES_KEPT_S):
        fs.delete_file(path)


def states_to_delete(fs: pyarrow.fs.FileSystem, trial: str, kept_s: float) -> list[str]:
    """The states in the trial's checkpoint folders saved more than `kept_s` before its newest (by the bucket's
    clock, which also dates the states that an earlier run of the trial saved)."""
    states = [info for info in _checkpoint_files(fs, trial) if STATE_FILE.fullmatch(info.base_name)]
    newest = max((info.mtime_ns or 0 for info in states), default=0)
    return [info.path for info in states if (info.mtime_ns or 0) < newest - kept_s * 1e9]


def resume_state() -> Optional[io.BytesIO]:
    """The saved state this trial goes on from, or None to start afresh."""
    named = tune.get_checkpoint()
    storage = tune.get_context().get_storage()
    fs = storage.storage_filesystem
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        # The checkpoint Ray names is whole; a newer folder beside it may be a copy cut short.
        path = named_state(fs, named.path) if named else None
    else:
        path = bucket_resume_state(fs, storage.trial_fs_path, named.path if named else None)
    if path is None:
        return None
    with fs.open_input_stream(path) as stream:
        return io.BytesIO(stream.readall())


def named_state(fs: pyarrow.fs.FileSystem, checkpoint: str) -> Optional[str]:
    """The state in the checkpoint folder Ray names: its furthest, or the one unnamed file of a checkpoint that an
    older tuneprod saved (so that a search it started resumes its trials rather than restarting them)."""
    found = furthest_state(fs, checkpoint, math.inf, checkpoint_folders=False)
    unnamed = f"{checkpoint.rstrip('/')}/{UNNAMED_STATE}"
    if found is None and fs.get_file_info(unnamed).type == pyarrow.fs.FileType.File:
        return unnamed
    return found


def bucket_resume_state(fs: pyarrow.fs.FileSystem, trial: str, named: Optional[str]) -> Optional[str]:
    """In a bucket, Ray's state may name an older checkpoint than the trial saved, or none: the driver uploads that
    state every few seconds and may be lost between two uploads. The trial goes on from its furthest state whose
    epochs the driver recorded (its progress.csv in the bucket, or the checkpoint Ray names), so that no recorded
    epoch runs twice and none the rungs need goes unrecorded. An object appears whole or not at all, so every state
    listed is complete."""
    recorded = max(_recorded_epochs(fs, f"{trial}/progress.csv"), _held_epochs(fs, named) if named else 0)
    return furthest_state(fs, trial, recorded, checkpoint_folders=True)


def furthest_state(fs: pyarrow.fs.FileSystem, folder: str, up_to: float, checkpoint_folders: bool) -> Optional[str]:
    """The state holding the most epochs, at most `up_to`, in `folder` (or in its checkpoint_* folders); of two
    with as many, the newer: after a resume Ray numbers checkpoints again from the one it named, over older ones."""
    found = _checkpoint_files(fs, folder) if checkpoint_folders else _files(fs, folder, recursive=False)
    states = [(_epoch(STATE_FILE, info.base_name), info.mtime_ns or 0, info.path) for info in found
              if STATE_FILE.fullmatch(info.base_name)]
    usable = [state for state in states if state[0] <= up_to]
    return max(usable)[2] if usable else None


def _held_epochs(fs: pyarrow.fs.FileSystem, checkpoint: str) -> int:
    """The epochs a checkpoint folder held, its state deleted or not (0 for none, or for a folder that is gone)."""
    return max((_epoch(pattern, info.base_name) for info in _files(fs, checkpoint, recursive=False)
                for pattern in (STATE_FILE, HELD_FILE) if pattern.fullmatch(info.base_name)), default=0)


def _checkpoint_files(fs: pyarrow.fs.FileSystem, trial: str) -> list[pyarrow.fs.FileInfo]:
    trial = trial.rstrip("/")
    return [info for info in _files(fs, trial, recursive=True)
            if info.path[len(trial) + 1:].startswith("checkpoint_") and info.type == pyarrow.fs.FileType.File]


def _files(fs: pyarrow.fs.FileSystem, folder: str, recursive: bool) -> list[pyarrow.fs.FileInfo]:
    return fs.get_file_info(pyarrow.fs.FileSelector(folder.rstrip("/"), recursive=recursive, allow_not_found=True))


def _epoch(pattern: re.Pattern, name: str) -> int:
    return int(pattern.fullmatch(name).group(1))


def _recorded_epochs(fs: pyarrow.fs.FileSystem, progress: str) -> int:
    try:
        with fs.open_input_stream(progress) as stream:
            table = pd.read_csv(stream)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return 0
    return int(table["epoch"].max()) if "epoch" in table and table["epoch"].notna().any() else 0
