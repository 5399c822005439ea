"""How the search is set up, with hand-picked specs: searcher, scheduler, resources, --data. No trials run."""
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from tuneprod.api import data_overrides
from tuneprod.spec import UserError, spec_from_dict
from tuneprod.tuning.endings import TrialEndings
from tuneprod.tuning.scheduler import PromotingASHA
from tuneprod.tuning.tuner import _scheduler, _searcher, check_resources_fit, grace_period, trial_resources


def spec_of(**sections):
    return spec_from_dict({"data": {"train": "x"}, **sections}, Path("s.yaml"))


SPACE = {"optimizer": {"choice": ["sgd", "adamw"]}, "momentum": {"uniform": [0.8, 0.95], "when": {"optimizer": "sgd"}},
         "lr": {"loguniform": [1e-4, 1e-1]}, "dropout": 0.1}


def searcher_of(spec, folder: Path):
    """The searcher, keeping its study in `folder` (which a search creates before the searcher)."""
    folder.mkdir()
    return _searcher(spec.placed(folder), grace=1, endings=TrialEndings(folder, 4))


@pytest.mark.parametrize("warmup, expected", [(0.0, 1), (1.0, 2), ({"uniform": [0.0, 3.0]}, 4)])
def test_the_auto_grace_period_waits_out_the_longest_warm_up_a_trial_can_have(warmup, expected):
    """48 photos a class each epoch want 1 epoch; a warm-up in the space wants a whole epoch after its longest."""
    class Train(list):
        classes = tuple(range(10))

    spec = spec_of(space={"warmup_epochs": warmup}, search={"scheduler": {"max_epochs": 30, "reduction_factor": 3}})
    assert grace_period(spec, SimpleNamespace(train=Train([0] * 480))) == expected


def test_searcher_runs_start_points_first_then_samples_the_space(tmp_path):
    spec = spec_of(space=SPACE, search={"start_from": [{"optimizer": "adamw", "lr": 0.01}]})
    searcher = searcher_of(spec, tmp_path / "exp")
    first = searcher.suggest("t1")
    assert first == {"optimizer": "adamw", "lr": 0.01, "dropout": 0.1}
    for i in range(2, 12):
        config = searcher.suggest(f"t{i}")
        assert 1e-4 <= config["lr"] <= 1e-1 and config["dropout"] == 0.1
        assert ("momentum" in config) == (config["optimizer"] == "sgd")


def test_random_searcher_is_seeded(tmp_path):
    def draws(seed, run):
        searcher = searcher_of(spec_of(space=SPACE, search={"seed": seed, "searcher": {"type": "random"}}),
                               tmp_path / run)
        return [searcher.suggest(f"t{i}")["lr"] for i in range(3)]

    assert draws(1, "a") == draws(1, "b") != draws(2, "c")


def test_scheduler_options_reach_both_ashas_and_fifo_has_no_early_stopping():
    options = {"max_epochs": 27, "grace_period": 3, "reduction_factor": 3}
    spec = spec_of(search={"metric": "val_loss", "scheduler": options})
    promoting = _scheduler(spec, 3, TrialEndings(None, 9), print)
    assert isinstance(promoting, PromotingASHA) and promoting.rungs.milestones == (3, 9)
    assert promoting._sign == -1.0  # val_loss: lower ranks higher
    stopping = _scheduler(spec_of(search={"metric": "val_loss", "scheduler": {**options, "type": "asha_stopping"}}),
                          3, TrialEndings(None, 27), print)
    assert isinstance(stopping, ASHAScheduler)
    assert (stopping._max_t, stopping._time_attr, stopping._metric, stopping._mode) == \
        (27, "epoch", "val_loss", "min")
    assert [milestone for milestone, _ in stopping._brackets[0]._rungs] == [27, 9, 3]  # epochs where trials are cut
    assert isinstance(_scheduler(spec_of(search={"scheduler": {"type": "fifo"}}), 1, TrialEndings(None, 9), print), FIFOScheduler)


def test_rung_metric_val_loss_ranks_by_lower_loss_while_the_search_maximises_accuracy():
    spec = spec_of(search={"scheduler": {"max_epochs": 9, "grace_period": 1, "rung_metric": "val_loss"}})
    assert _scheduler(spec, 1, TrialEndings(None, 9), print)._sign == -1.0
    stopping = spec_of(search={"scheduler": {"type": "asha_stopping", "rung_metric": "val_loss"}})
    assert (_scheduler(stopping, 1, TrialEndings(None, 9), print)._metric, _scheduler(stopping, 1, TrialEndings(None, 9), print)._mode) == ("val_loss", "min")


@pytest.mark.parametrize("requested, cluster_gpus, expected", [("auto", 0, 0), ("auto", 4, 1), (0.25, 4, 0.25),
                                                                (0, 4, 0)])
def test_gpu_resources(requested, cluster_gpus, expected):
    spec = spec_of(resources={"cpus_per_trial": 3, "gpus_per_trial": requested})
    assert trial_resources(spec, cluster_gpus) == {"cpu": 3, "gpu": expected}


def test_a_trial_bigger_than_this_machine_is_refused_up_front():
    spec = spec_of(resources={"cpus_per_trial": 8})
    with pytest.raises(UserError, match="resources.cpus_per_trial: the value is 8, but must be <= 2"):
        check_resources_fit(spec, {"cpu": 8, "gpu": 0}, {"CPU": 2.0})
    with pytest.raises(UserError, match="resources.gpus_per_trial: the value is 0.5, but must be <= 0"):
        check_resources_fit(spec, {"cpu": 1, "gpu": 0.5}, {"CPU": 2.0})
    check_resources_fit(spec, {"cpu": 2, "gpu": 0.5}, {"CPU": 2.0, "GPU": 1.0})


def test_data_flag_takes_a_train_test_folder_or_the_training_images_alone(tmp_path):
    (tmp_path / "set" / "train").mkdir(parents=True)
    (tmp_path / "set" / "test").mkdir()
    assert data_overrides(tmp_path / "set", None) == {"data.train": str(tmp_path / "set" / "train"),
                                                      "data.demo": None, "data.test": str(tmp_path / "set" / "test")}
    assert data_overrides(tmp_path / "set" / "train", None) == {"data.train": str(tmp_path / "set" / "train"),
                                                                "data.demo": None, "data.test": None}
    assert data_overrides(None, tmp_path / "t") == {"data.test": str(tmp_path / "t")}


def test_pretrained_backbones_are_those_a_trial_may_load_weights_for():
    assert spec_of(space={"backbone": {"choice": ["resnet18", "resnet34"]}}).pretrained_backbones() == []
    assert spec_of(space={"backbone": {"choice": ["resnet34", "resnet18"]}, "pretrained": True}) \
        .pretrained_backbones() == ["resnet18", "resnet34"]
    assert spec_of(space={"pretrained": {"choice": [False, True]}}).pretrained_backbones() == ["resnet18"]


def test_packed_resources_give_each_trial_its_share_of_a_gpu():
    import pickle

    from tuneprod.tuning.packing import PackingTable, ProbePoint
    from tuneprod.tuning.tuner import PackedResources

    points = [ProbePoint(b, ips, b * 2**26) for b, ips in ((32, 680), (64, 1300), (128, 2475), (256, 2900))]
    packed = pickle.loads(pickle.dumps(PackedResources(PackingTable("H200", 141 * 2**30, {"efficientnet_b2": points}),
                                                       cpus_per_trial=2, cpus_per_gpu=16)))

    def share(config):
        return packed(config).required_resources

    assert share({"backbone": "efficientnet_b2", "batch_size": 32}) == {"CPU": 2, "GPU": 0.25}
    assert share({"backbone": "efficientnet_b2", "batch_size": 128}) == {"CPU": 2, "GPU": 1}
    assert share({"backbone": "resnet50", "batch_size": 32}) == {"CPU": 2, "GPU": 1}  # not measured


def test_search_values_include_start_points():
    spec = spec_of(space={"batch_size": {"int": [32, 64]}}, search={"start_from": [{"batch_size": 48}]})
    assert spec.search_values("batch_size") == [32, 48, 64]
    assert spec.search_values("backbone") == ["resnet18"]  # the default, when the space leaves it out


@pytest.fixture
def ray_with_a_gpu():
    """A local Ray that believes it has one GPU (the probe task itself is replaced: this machine has none)."""
    import ray

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _trial_data(tmp_path):
    from tests.helpers import write_image_folder
    from tuneprod.train.cache import decoded
    from tuneprod.train.data import index_images
    from tuneprod.tuning.trainable import TrialData

    images = decoded(index_images(write_image_folder(tmp_path / "images")), 16)
    return TrialData(train=images, val=images, image_size=16, max_epochs=1, seed=0, workers=0,
                     metric="val_acc", mode="max")


@pytest.mark.slow
def test_auto_packing_measures_once_on_a_gpu_and_falls_back_to_whole_gpus(ray_with_a_gpu, tmp_path, monkeypatch):
    from tuneprod.tuning import tuner
    from tuneprod.tuning.packing import PackingTable, ProbePoint

    spec = spec_of(space={"backbone": {"choice": ["test_resnet", "test_vit"]}, "batch_size": {"choice": [16, 32]}},
                   resources={"cpus_per_trial": 1, "gpus_per_trial": "auto"})
    data = _trial_data(tmp_path)

    def measured(backbones, image_size, num_classes, batch_sizes, record):  # runs in a Ray task with a GPU
        import ray as task_ray
        assert task_ray.get_gpu_ids()
        points = [ProbePoint(b, 100.0 * b ** 0.9, 2**20) for b in (16, 32, 64, 128, 256)]
        return PackingTable("FakeGPU", 80 * 2**30, {"test_resnet": points})

    monkeypatch.setattr(tuner, "measure_gpu", measured)
    said = []
    trainable, packing = tuner._trainable(spec, data, None, said.append)
    resources = trainable._resources
    assert resources({"backbone": "test_resnet", "batch_size": 16}).required_resources == {"CPU": 1, "GPU": 0.5}
    assert resources({"backbone": "test_vit", "batch_size": 16}).required_resources == {"CPU": 1, "GPU": 1}
    assert any("trials per FakeGPU: test_resnet batch 16: 2" in line for line in said)  # 2 CPUs: at most 2
    # Two packed batch-16 trials go no faster together than one batch of 32: 100 x 32^0.9 img/s, against
    # 100 x 16^0.9 for one alone, so a member alone runs at least 2 x 16^0.9 / 32^0.9 = 2^0.1 x a packed trial.
    assert packing.alone_speedup({"backbone": "test_resnet", "batch_size": 16}) == pytest.approx(2 ** 0.1)
    assert packing.alone_speedup({"backbone": "test_vit", "batch_size": 16}) == 1.0  # a whole GPU already

    def broken(*args):
        raise RuntimeError("CUDA error: no kernel image is available")

    monkeypatch.setattr(tuner, "measure_gpu", broken)
    said.clear()
    fallback, packing = tuner._trainable(spec, data, None, said.append)
    assert fallback._resources.required_resources == {"CPU": 1, "GPU": 1} and packing is None
    assert any("GPU measurement failed (RuntimeError: CUDA error: no kernel image" in line for line in said), said


def test_searches_started_at_once_with_one_name_get_a_folder_each(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from tuneprod.tuning.tuner import claim_experiment_dir

    spec = spec_of().placed(tmp_path / "runs" / "demo")
    with ThreadPoolExecutor(8) as pool:
        claimed = list(pool.map(lambda _: claim_experiment_dir(spec).experiment_dir, range(8)))
    assert sorted(p.name for p in claimed) == sorted(["demo"] + [f"demo_{n}" for n in range(2, 9)])
    assert all((p / "search_space.yaml").read_text().startswith("data:") for p in claimed)
