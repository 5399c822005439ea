"""The self-describing model folder `final/`: safetensors weights plus model.json (classes, preprocessing,
hyperparameters), enough for `predict` to rebuild the model with no flags."""
from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from tuneprod.models import create_model
from tuneprod.spec import Hyperparams, TrialConfig, UserError

FORMAT = "tuneprod-model/1"
WEIGHTS = "model.safetensors"
METADATA = "model.json"


class ArtifactError(UserError):
    pass


def save(folder: Path, model: torch.nn.Module, classes: tuple[str, ...], preprocessing: dict,
         config: TrialConfig, info: dict) -> Path:
    """Writes the folder beside its destination, then swaps it in: a crash never leaves a half-written model."""
    folder = Path(folder)
    staging = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    save_model(model, str(staging / WEIGHTS))
    metadata = {"format": FORMAT, "classes": list(classes), "preprocessing": preprocessing,
                "hyperparams": asdict(config.hp), "epochs": config.epochs, "seed": config.seed, **info}
    (staging / METADATA).write_text(json.dumps(metadata, indent=2))
    if folder.exists():
        retired = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
        folder.rename(retired)
        staging.rename(folder)
        shutil.rmtree(retired)
    else:
        staging.rename(folder)
    return folder


def load(folder: Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    folder = Path(folder)
    if not (folder / METADATA).is_file() or not (folder / WEIGHTS).is_file():
        raise ArtifactError(f"{folder}: not a tuneprod model folder (needs {METADATA} and {WEIGHTS}); "
                            f"pass an experiment's final/ folder, e.g. tuneprod_runs/demo/final")
    metadata = json.loads((folder / METADATA).read_text())
    if metadata.get("format") != FORMAT:
        raise ArtifactError(f"{folder}/{METADATA}: format is {metadata.get('format')!r}, but must be {FORMAT!r}")
    hp = Hyperparams(**metadata["hyperparams"])
    model = create_model(hp.backbone, len(metadata["classes"]), pretrained=False, dropout=hp.dropout,
                         image_size=metadata["preprocessing"]["image_size"])
    load_model(model, str(folder / WEIGHTS), device=str(device))
    return model.to(device).eval(), metadata
