"""The training core on its own (no Ray): schedules, one trial's training, failure and resume."""
import math

import pytest
import torch

from tests.helpers import write_image_folder
from tuneprod.spec import Hyperparams, TrialConfig
from tuneprod.train.cache import decoded
from tuneprod.train.data import index_images, validation_split
from tuneprod.train.loop import NonFiniteLoss, TrainingRun, build_optimizer, lr_factor, measure_speed


@pytest.mark.parametrize("schedule, progress, horizon, warmup, expected", [
    ("cosine", 0.0, 10, 0, 1.0),
    ("cosine", 5.0, 10, 0, 0.5),
    ("cosine", 10.0, 10, 0, 0.0),
    ("cosine", 1.0, 10, 2, 0.5),          # halfway through warmup
    ("cosine", 6.0, 10, 2, 0.5),          # cosine midpoint of the 8 post-warmup epochs
    ("step", 4.9, 10, 0, 1.0),
    ("step", 5.0, 10, 0, 0.1),
    ("step", 8.0, 10, 0, 0.01),
    ("exponential", 5.0, 10, 0, 0.1),
    ("exponential", 10.0, 10, 0, 0.01),
    ("constant", 7.0, 10, 0, 1.0),
    ("constant", 12.0, 10, 0, 1.0),
])
def test_lr_factor(schedule, progress, horizon, warmup, expected):
    assert lr_factor(schedule, progress, horizon, warmup) == pytest.approx(expected, abs=1e-9)


def test_optimizers():
    model = torch.nn.Linear(2, 2)
    sgd = build_optimizer(model, Hyperparams(optimizer="sgd", momentum=0.8, nesterov=True, weight_decay=0.1))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.8
    assert isinstance(build_optimizer(model, Hyperparams(optimizer="adamw")), torch.optim.AdamW)
    assert type(build_optimizer(model, Hyperparams(optimizer="adam"))) is torch.optim.Adam


def small_run(tmp_path, **hyperparams):
    image_set = decoded(index_images(write_image_folder(tmp_path / "images", per_class=8)), 32)
    train, val = validation_split(image_set, 0.25, seed=0)
    hp = Hyperparams(**{"backbone": "test_resnet", "batch_size": 8, "lr": 3e-3, **hyperparams})
    return TrainingRun(TrialConfig(hp, image_size=32, epochs=3), image_set.classes, train, val)


@pytest.mark.parametrize("augment_device", ["gpu", "cpu"])
def test_one_trial_trains_by_itself(tmp_path, augment_device):
    run = small_run(tmp_path, augment="medium", mixup_alpha=0.2, label_smoothing=0.1, warmup_epochs=1,
                    augment_device=augment_device)
    history = [run.step() for _ in range(3)]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for h in history:
        assert set(h) == {"epoch", "train_loss", "lr", "images_per_s", "val_loss", "val_acc", "eval_images_per_s"}
        assert math.isfinite(h["train_loss"]) and 0 <= h["val_acc"] <= 1
        assert h["images_per_s"] > 0 and h["eval_images_per_s"] > 0
    assert history[-1]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine ends at zero
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_non_finite_loss_fails_the_trial(tmp_path):
    run = small_run(tmp_path)
    with torch.no_grad():
        next(run.model.parameters()).fill_(float("nan"))  # what a diverged update leaves behind
    with pytest.raises(NonFiniteLoss, match="lower lr"):
        run.step()


def test_resuming_from_a_state_dict_continues_where_it_stopped(tmp_path):
    straight = small_run(tmp_path)
    straight.step()
    state = straight.state_dict()
    expected = straight.step()

    resumed = small_run(tmp_path / "again")
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(), state["model"].values()))
    got = resumed.step()
    assert got["epoch"] == 2
    assert got["lr"] == pytest.approx(expected["lr"])  # the schedule picks up mid-way, not from the start


def test_init_seed_fixes_the_new_weights_and_seed_the_rest(tmp_path):
    images = decoded(index_images(write_image_folder(tmp_path / "images", per_class=4)), 32)
    hp = Hyperparams(backbone="test_resnet", batch_size=4)
    runs = [TrainingRun(TrialConfig(hp, 32, epochs=1, seed=seed, init_seed=init), images.classes, images)
            for seed, init in ((1, 0), (2, 0), (2, None))]
    weights = [run.model.state_dict()["fc.weight"] for run in runs]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    orders = [list(next(iter(run.train_batches.epoch(0)))[1].tolist()) for run in runs]
    assert orders[1] == orders[2] and orders[0] != orders[1]  # data order follows seed


def test_speed_is_measured_on_a_few_batches_of_the_real_pipeline(tmp_path):
    image_set = decoded(index_images(write_image_folder(tmp_path / "images", per_class=8)), 32)
    train, val = validation_split(image_set, 0.25, seed=0)
    config = TrialConfig(Hyperparams(backbone="test_resnet", batch_size=4), image_size=32, epochs=10)
    train_speed, eval_speed = measure_speed(config, image_set.classes, train, val, batches=2)
    assert 0 < train_speed < math.inf and 0 < eval_speed < math.inf
