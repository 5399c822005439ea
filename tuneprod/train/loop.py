"""One training run in plain torch: a trial and the final retrain both use it; it knows nothing of Ray."""
from __future__ import annotations

import math
import time
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from timm.optim import param_groups_layer_decay
from timm.utils import ModelEmaV3

from tuneprod.spec import Hyperparams, TrialConfig
from tuneprod.train.augment import mix_batch
from tuneprod.train.cache import DecodedImages
from tuneprod.train.heads import HeadedModel, build_model, freeze_body
from tuneprod.train.models import preprocessing
from tuneprod.train.pipeline import evaluation_batches, training_batches

LOSS_CHECK_EVERY = 25  # steps between reading the summed loss back from the device


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: the trial is recorded as failed and the search goes on."""


def lr_factor(schedule: str, progress: float, horizon: float, warmup: float) -> float:
    """The learning-rate multiplier after `progress` epochs (fractional) of a run lasting `horizon` epochs.

    Linear warmup over `warmup` epochs, then cosine to 0, step (x0.1 at 50% and 75%), exponential (to 1%) or
    constant over the rest.
    """
    if warmup > 0 and progress < warmup:
        return progress / warmup
    t = min(max((progress - warmup) / max(horizon - warmup, 1e-9), 0.0), 1.0)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "step":
        return 0.1 ** ((t >= 0.5) + (t >= 0.75))
    if schedule == "exponential":
        return 0.01 ** t
    return 1.0


def parameter_groups(model: torch.nn.Module, hp: Hyperparams) -> list[dict]:
    """Every parameter once, at hp.lr; with layer_decay < 1, timm's grouping of the body into blocks, each block's
    lr scaled by layer_decay per block below the top (the head, neck and GeM at the full lr). Weight decay applies
    to every parameter either way."""
    if hp.layer_decay >= 1:
        return [{"params": list(model.parameters())}]
    body = model.body if isinstance(model, HeadedModel) else model
    groups = param_groups_layer_decay(body, weight_decay=hp.weight_decay, layer_decay=hp.layer_decay,
                                      weight_decay_exclude_1d=False)
    grouped = {id(p) for group in groups for p in group["params"]}
    rest = [p for p in model.parameters() if id(p) not in grouped]
    if rest:
        groups.append({"params": rest, "lr_scale": 1.0, "weight_decay": hp.weight_decay})
    # LambdaLR scales each group's own starting lr, so the per-block ratios hold through the schedule.
    return [{"params": group["params"], "weight_decay": group["weight_decay"], "lr": hp.lr * group["lr_scale"]}
            for group in groups]


def build_optimizer(model: torch.nn.Module, hp: Hyperparams) -> torch.optim.Optimizer:
    params = parameter_groups(model, hp)
    if hp.optimizer == "sgd":
        return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov and hp.momentum > 0,
                               weight_decay=hp.weight_decay)
    optimizer_class = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
    return optimizer_class(params, lr=hp.lr, weight_decay=hp.weight_decay)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def predict_logits(model: torch.nn.Module, batches: Iterable, device: torch.device) -> Iterator:
    """Yields (logits, labels) per batch of model-ready images on `device`."""
    model.eval()
    with torch.inference_mode(), autocast(amp_dtype(device)):
        for images, labels in batches:
            yield model(images).float(), labels


def amp_dtype(device: torch.device) -> Optional[torch.dtype]:
    """bf16 where the GPU has it natively (Ampere and newer), fp16 (with loss scaling) on older ones; on CPU none:
    autocast would slow the small models CPU runs use."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def autocast(dtype: Optional[torch.dtype]):
    return torch.autocast("cuda", dtype=dtype or torch.bfloat16, enabled=dtype is not None)


class TrainingRun:
    """A model, its optimizer and data, advanced one epoch at a time (`step`) for `config.epochs` epochs."""

    def __init__(self, config: TrialConfig, classes: tuple[str, ...], train: DecodedImages,
                 val: Optional[DecodedImages] = None, device: Optional[torch.device] = None):
        torch.manual_seed(config.weights_seed)
        self.config, self.classes = config, classes
        self.device = device or default_device()
        hp = config.hp
        self.model = build_model(hp, len(classes), config.image_size)
        if config.weights_seed != config.seed:
            torch.manual_seed(config.seed)
        self.preprocessing = {"image_size": config.image_size, **preprocessing(self.model)}
        self.model.to(self.device)
        if self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
        mean, std = self.preprocessing["mean"], self.preprocessing["std"]
        self.batch_size = min(hp.batch_size, len(train))
        self.train_batches = training_batches(train, config, self.batch_size, mean, std, self.device)
        self.val_batches = None if val is None else evaluation_batches(val, self.batch_size * 2, mean, std,
                                                                       self.device)
        self.train_images = train
        self.optimizer = build_optimizer(self.model, hp)
        # The moving average is what is evaluated and handed over; its decay warms up (timm's schedule), so that
        # short runs average recent weights rather than the initial ones.
        self.ema = ModelEmaV3(self.model, decay=hp.ema_decay, use_warmup=True) if hp.ema_decay > 0 else None
        self.targets_in_forward = getattr(self.model, "uses_targets", False)
        self.predicts_by_gallery = hp.predicts_by_gallery  # a HeadedModel that embeds a gallery to predict
        steps_per_epoch = len(self.train_batches)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(hp.lr_schedule, (step + 1) / steps_per_epoch, config.epochs, hp.warmup_epochs))
        self.amp_dtype = amp_dtype(self.device)  # once: the training loop's hot path needs only the answer
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.mix_rng = np.random.default_rng(config.seed)
        self.epoch = 0
        self.val_probabilities: Optional[np.ndarray] = None  # the last evaluation's, images x classes, float16

    def step(self) -> dict:
        """Trains one epoch, then evaluates on the validation set when there is one."""
        metrics = self.train_epoch()
        if self.val_batches is not None:
            metrics.update(self.evaluate())
        self.epoch += 1
        return {"epoch": self.epoch, **metrics}

    def train_epoch(self) -> dict:
        hp, model = self.config.hp, self.model
        model.train()
        if hp.finetune == "lp-ft":  # a linear probe first: the head learns before it can disturb the body
            freeze_body(model, self.epoch < hp.probe_epochs)
        # The loss is summed on the device and read back only every few steps: reading it waits for the GPU,
        # which would then idle while the host prepares the next batch.
        total_loss, seen, started = torch.zeros((), device=self.device), 0, time.perf_counter()
        for step, (images, labels) in enumerate(self.train_batches.epoch(self.epoch)):
            images, targets = mix_batch(images, labels, len(self.classes), hp.mixup_alpha, hp.cutmix_alpha,
                                        hp.mix_prob, self.mix_rng)
            with autocast(self.amp_dtype):
                logits = model(images, targets) if self.targets_in_forward else model(images)
                loss = F.cross_entropy(logits.float(), targets, label_smoothing=hp.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(model, step=self.scheduler.last_epoch)
            total_loss += loss.detach() * len(images)
            seen += len(images)
            if step % LOSS_CHECK_EVERY == 0:
                self._check_finite(total_loss)
        mean_loss = self._check_finite(total_loss) / max(seen, 1)
        elapsed = time.perf_counter() - started
        return {"train_loss": mean_loss, "lr": max(group["lr"] for group in self.optimizer.param_groups),
                "images_per_s": seen / elapsed if elapsed > 0 else 0.0}

    def _check_finite(self, total_loss: torch.Tensor) -> float:
        value = total_loss.item()
        if not math.isfinite(value):
            raise NonFiniteLoss(f"the training loss became {value} at epoch {self.epoch + 1} "
                                f"(lr {self.optimizer.param_groups[0]['lr']:.3g}); a lower lr usually helps")
        return value

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights evaluated and handed over: the moving average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def evaluate(self) -> dict:
        """Scores the validation set with the rule the final model predicts by (for a gallery rule, against the
        training images as they are now embedded; the gallery is dropped afterwards, as training moves on)."""
        model = self.eval_model
        total_loss, correct, seen, started = 0.0, 0, 0, time.perf_counter()
        embedded = 0  # gallery images: forward passes too, which the budget's speed must count
        if self.predicts_by_gallery:
            model.set_gallery(self._gallery_batches())
            embedded = len(model.gallery)
        probabilities = []
        try:
            for logits, labels in predict_logits(model, self.val_batches.epoch(), self.device):
                labels = labels.to(self.device)
                total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
                correct += (logits.argmax(1) == labels).sum().item()
                seen += len(labels)
                probabilities.append(logits.softmax(1).half().cpu())
        finally:
            if self.predicts_by_gallery:
                model.clear_gallery()
        # In the validation images' order, for ensemble selection after the search (half precision: 2 bytes a class).
        self.val_probabilities = torch.cat(probabilities).numpy()
        elapsed = time.perf_counter() - started
        return {"val_loss": total_loss / seen, "val_acc": correct / seen,
                "eval_images_per_s": (seen + embedded) / elapsed if elapsed > 0 else 0.0}

    def final_model(self) -> torch.nn.Module:
        """The trained model in eval mode, as it is saved: with its gallery (every training image embedded) when
        it predicts by one."""
        model = self.eval_model.eval()
        if self.predicts_by_gallery:
            model.set_gallery(self._gallery_batches())
        return model

    def _gallery_batches(self):
        mean, std = self.preprocessing["mean"], self.preprocessing["std"]
        return evaluation_batches(self.train_images, self.batch_size * 2, mean, std, self.device).epoch()

    def state_dict(self) -> dict:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "epoch": self.epoch,
                 "mix_rng": self.mix_rng.bit_generator.state}
        if self.ema is not None:
            state["ema"] = self.ema.module.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = state["epoch"]
        self.mix_rng.bit_generator.state = state["mix_rng"]
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])


def measure_speed(config: TrialConfig, classes: tuple[str, ...], train: DecodedImages, val: DecodedImages,
                  device: Optional[torch.device] = None, batches: int = 3) -> tuple[float, float]:
    """Images per second of training and of evaluation, through the real pipeline (cache, augmentation, model), on
    a few batches: the second pass is timed, the first pays the one-time costs."""
    rng = np.random.default_rng(config.seed)
    sample = min(len(train), config.hp.batch_size * batches)
    run = TrainingRun(config, classes, train.subset(rng.choice(len(train), sample, replace=False)),
                      val.subset(rng.choice(len(val), min(len(val), sample), replace=False)), device)
    for _ in range(2):
        trained = run.train_epoch()
        evaluated = run.evaluate()
    return trained["images_per_s"], evaluated["eval_images_per_s"]
