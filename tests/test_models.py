"""Backbones and where their pretrained weights come from (offline: a local weights folder)."""
import pytest
import timm
import torch
from safetensors.torch import save_file

from tuneprod.train.models import WeightsError, create_model, ensure_pretrained_weights


@pytest.fixture
def weights_dir(tmp_path, monkeypatch):
    torch.manual_seed(0)
    pretrained = timm.create_model("test_resnet", num_classes=1000)  # an "ImageNet" model, head included
    save_file({k: v.contiguous() for k, v in pretrained.state_dict().items()}, str(tmp_path / "test_resnet.safetensors"))
    monkeypatch.setenv("TUNEPROD_WEIGHTS", str(tmp_path))
    return pretrained.state_dict()


@pytest.mark.parametrize("classes", [5, 1000])
def test_pretrained_body_loads_but_the_head_starts_fresh(weights_dir, classes):
    model = create_model("test_resnet", classes, pretrained=True, dropout=0.0, image_size=32)
    state = model.state_dict()
    assert torch.equal(state["conv1.0.weight"], weights_dir["conv1.0.weight"])
    assert not torch.equal(state["fc.weight"][:5], weights_dir["fc.weight"][:5])  # even at 1000 classes
    assert state["fc.weight"].shape[0] == classes


def test_not_pretrained_ignores_the_weights(weights_dir):
    model = create_model("test_resnet", 5, pretrained=False, dropout=0.0, image_size=32)
    assert not torch.equal(model.state_dict()["conv1.0.weight"], weights_dir["conv1.0.weight"])


def test_fixed_size_models_are_built_for_the_run_size():
    model = create_model("test_vit", 3, pretrained=False, dropout=0.1, image_size=32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_weights_that_do_not_fit_are_refused(tmp_path, monkeypatch):
    save_file({"a": torch.zeros(3)}, str(tmp_path / "test_resnet.safetensors"))
    monkeypatch.setenv("TUNEPROD_WEIGHTS", str(tmp_path))
    with pytest.raises(WeightsError, match="do not fit"):
        ensure_pretrained_weights("test_resnet", 32)


def test_cpu_preset_weights_load_offline_from_the_lite_package():
    # search_spaces/cpu.yaml's backbone: its ImageNet weights come from a PyPI package, with no network.
    from tuneprod.train.models import _lite_package_file, _read_state

    shipped = _read_state(_lite_package_file("tf_efficientnet_lite0"))
    model = create_model("tf_efficientnet_lite0", 7, pretrained=True, dropout=0.0, image_size=64)
    first_conv = model.state_dict()["conv_stem.weight"]
    assert any(v.shape == first_conv.shape and torch.equal(v, first_conv) for v in shipped.values())


def test_a_headed_model_gets_the_same_pretrained_body_from_the_lite_package():
    from tuneprod.spec import Hyperparams
    from tuneprod.train.heads import build_model

    plain = create_model("tf_efficientnet_lite0", 7, pretrained=True, dropout=0.0, image_size=64).state_dict()
    headed = build_model(Hyperparams(backbone="tf_efficientnet_lite0", pretrained=True, head="arcface",
                                     pooling="gem"), 7, 64).state_dict()
    body = {key[len("body."):]: value for key, value in headed.items() if key.startswith("body.")}
    assert body and all(torch.equal(value, plain[key]) for key, value in body.items())
