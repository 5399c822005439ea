"""The self-describing model folder `final/`, enough for `predict` to rebuild everything with no flags.

    final/ensemble.json        classes, image size, how members combine (soft vote), which vote and its weights,
                               TTA views, and the ensemble selection that chose them (final.select: greedy)
    final/member_1/            one trained model: model.safetensors + model.json (classes, preprocessing,
    final/member_2/ ...          hyperparameters, epochs, seed, source trial)
    final/soup_1/              (when final.soup) the weight average of members that share a pretrained start

A folder written before ensembles (model.safetensors + model.json directly in final/) loads as one member.
"""
from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_model, save_model

from tuneprod.spec import TTA_VIEWS, Hyperparams, TrialConfig, UserError
from tuneprod.train.heads import build_model

FORMAT = "tuneprod-model/1"
ENSEMBLE_FORMAT = "tuneprod-ensemble/1"
WEIGHTS = "model.safetensors"
METADATA = "model.json"
ENSEMBLE = "ensemble.json"


class ArtifactError(UserError):
    pass


def write_model(folder: Path, model: torch.nn.Module, classes: tuple[str, ...], preprocessing: dict,
                config: TrialConfig, info: dict) -> Path:
    """Writes one model folder in place (inside a staging folder that `publish` later swaps in)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, str(folder / WEIGHTS))
    metadata = {"format": FORMAT, "classes": list(classes), "preprocessing": preprocessing,
                "hyperparams": asdict(config.hp), "epochs": config.epochs, "seed": config.seed, **info}
    (folder / METADATA).write_text(json.dumps(metadata, indent=2))
    return folder


def save(folder: Path, model: torch.nn.Module, classes: tuple[str, ...], preprocessing: dict,
         config: TrialConfig, info: dict) -> Path:
    """One model folder, written beside its destination and swapped in whole."""
    staging = staging_folder(Path(folder))
    write_model(staging, model, classes, preprocessing, config, info)
    return publish(staging, Path(folder))


def staging_folder(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"


def publish(staging: Path, folder: Path) -> Path:
    """Swaps a completely written folder into place: a crash never leaves a half-written model."""
    if folder.exists():
        retired = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
        folder.rename(retired)
        staging.rename(folder)
        shutil.rmtree(retired)
    else:
        staging.rename(folder)
    return folder


def write_ensemble(folder: Path, classes: tuple[str, ...], image_size: int, members: list[str], vote: list[str],
                   soups: dict[str, list[str]], tta: tuple[str, ...], info: dict) -> None:
    """`members`: every trained member; `vote`: the folders whose softmax probabilities are averaged (soups stand
    in for the members they average)."""
    description = {"format": ENSEMBLE_FORMAT, "classes": list(classes), "image_size": image_size,
                   "combine": "soft_vote", "vote": vote, "members": members, "soups": soups, "tta": list(tta),
                   **info}
    (Path(folder) / ENSEMBLE).write_text(json.dumps(description, indent=2))


@dataclass(frozen=True)
class Member:
    name: str
    model: torch.nn.Module
    metadata: dict

    @property
    def preprocessing(self) -> dict:
        return self.metadata["preprocessing"]


@dataclass(frozen=True)
class Ensemble:
    classes: tuple[str, ...]
    image_size: int
    members: dict[str, Member]  # every folder that can be scored: members and soups
    vote: tuple[str, ...]
    tta: tuple[str, ...]
    weights: Optional[tuple[float, ...]] = None  # each vote's share; None: equal


def load(folder: Path, device: torch.device) -> Ensemble:
    """An ensemble folder, or a single model folder (then a one-member ensemble)."""
    folder = Path(folder)
    if (folder / ENSEMBLE).is_file():
        description = _read_json(folder / ENSEMBLE, ENSEMBLE_FORMAT)
        names = list(dict.fromkeys(description["members"] + list(description["soups"]) + description["vote"]))
        members = {name: load_member(folder / name, device, name) for name in names}
        ensemble = Ensemble(tuple(description["classes"]), int(description["image_size"]), members,
                            tuple(description["vote"]), _views(description["tta"], folder / ENSEMBLE),
                            _weights(description, folder / ENSEMBLE))
    elif (folder / METADATA).is_file():
        member = load_member(folder, device, folder.name)
        tta = member.metadata.get("tta", False)  # a single model saved a bool: true meant the mirror
        views = _views(tta, folder / METADATA) if isinstance(tta, list) else ("flip",) if tta else ()
        ensemble = Ensemble(tuple(member.metadata["classes"]), int(member.preprocessing["image_size"]),
                            {member.name: member}, (member.name,), views)
    else:
        raise ArtifactError(f"{folder}: not a tuneprod model folder (needs {ENSEMBLE}, or {METADATA} and {WEIGHTS}); "
                            f"pass an experiment's final/ folder, e.g. tuneprod_runs/demo/final")
    for member in ensemble.members.values():
        if tuple(member.metadata["classes"]) != ensemble.classes or \
                member.preprocessing["image_size"] != ensemble.image_size:
            raise ArtifactError(f"{folder}/{member.name}: its classes or image size differ from the ensemble's")
    return ensemble


def load_member(folder: Path, device: torch.device, name: str) -> Member:
    if not (folder / METADATA).is_file() or not (folder / WEIGHTS).is_file():
        raise ArtifactError(f"{folder}: not a tuneprod model folder (needs {METADATA} and {WEIGHTS}); "
                            f"pass an experiment's final/ folder, e.g. tuneprod_runs/demo/final")
    metadata = _read_json(folder / METADATA, FORMAT)
    hp = Hyperparams(**metadata["hyperparams"])
    model = build_model(hp, len(metadata["classes"]), metadata["preprocessing"]["image_size"], pretrained=False)
    load_model(model, str(folder / WEIGHTS), device=str(device))
    return Member(name, model.to(device).eval(), metadata)


def _read_json(path: Path, expected_format: str) -> dict:
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: cannot read it ({exc}); the model folder is damaged") from None
    if not isinstance(content, dict) or content.get("format") != expected_format:
        found = content.get("format") if isinstance(content, dict) else None
        raise ArtifactError(f"{path}: format is {found!r}, but must be {expected_format!r}")
    return content


def _weights(description: dict, path: Path) -> Optional[tuple[float, ...]]:
    weights = description.get("weights")  # absent in ensembles saved before weighted votes
    if weights is None:
        return None
    if not isinstance(weights, list) or len(weights) != len(description["vote"]) or \
            not all(isinstance(w, (int, float)) and w >= 0 for w in weights) or not sum(weights) > 0:
        raise ArtifactError(f"{path}: weights is {weights!r}, but must be one number >= 0 per vote entry, not all 0")
    return tuple(float(w) for w in weights)


def _views(views, path: Path) -> tuple[str, ...]:
    if not isinstance(views, list) or not all(v in TTA_VIEWS for v in views):
        raise ArtifactError(f"{path}: tta is {views!r}, but must be a list of {', '.join(TTA_VIEWS)}")
    return tuple(views)
