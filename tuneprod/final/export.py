"""A final/ folder as one ONNX graph: uint8 RGB images (N x H x W x 3, any N, at the model's image size) in, the
ensemble's class probabilities out, with everything `predict` does between: normalisation by each member's
preprocessing, its test-time views, softmax, the weighted soft vote, and a gallery member's scoring (k nearest
neighbours, or class centroids computed once here). Class names, image size, views and members go into the file's
metadata and a labels.json beside it; final/portable.py runs it with onnxruntime alone."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from tuneprod.files import atomic_write
from tuneprod.final import artifact
from tuneprod.final.ensemble import soft_vote, view_probabilities
from tuneprod.final.portable import ONNX_FORMAT, new_session
from tuneprod.spec import TTA_VIEWS
from tuneprod.train.heads import HeadedModel, centroid_scores, class_centroids, gallery_scores

OPSET = 18  # the kNN vote's ScatterElements with add needs 16; onnxruntime has run 18 since 1.14
INPUT, OUTPUT = "images", "probabilities"


class GalleryPrediction(nn.Module):
    """A member that predicts by its gallery, with what its rule needs from the gallery computed once, so that the
    graph holds only the per-image arithmetic (centroids: classes x dim, not the whole gallery)."""

    def __init__(self, model: HeadedModel):
        super().__init__()
        self.model, self.rule = model, model.predict_by
        if self.rule == "centroid":
            centroids, present = class_centroids(model.gallery.float(), model.gallery_labels, model.num_classes)
            self.register_buffer("centroids", centroids)
            self.register_buffer("present", present)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        model = self.model
        embeddings = model.embed(images)
        if self.rule == "centroid":
            scores = centroid_scores(embeddings, self.centroids, self.present)
        else:
            scores = gallery_scores(embeddings, model.gallery.float(), model.gallery_labels, model.num_classes,
                                    self.rule, model.knn_k)
        return model.fused(embeddings, scores)


class PortableEnsemble(nn.Module):
    """The ensemble's whole prediction as one module of fixed structure: what is exported."""

    def __init__(self, ensemble: artifact.Ensemble):
        super().__init__()
        members = [ensemble.members[name] for name in ensemble.vote]
        self.models = nn.ModuleList(exportable(member.model) for member in members)
        self.register_buffer("means", torch.tensor([m.preprocessing["mean"] for m in members]).view(-1, 1, 3, 1, 1))
        self.register_buffer("stds", torch.tensor([m.preprocessing["std"] for m in members]).view(-1, 1, 3, 1, 1))
        self.weights, self.views = ensemble.weights, ensemble.tta

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.permute(0, 3, 1, 2).float() / 255
        return soft_vote([view_probabilities(model, (pixels - mean) / std, self.views)
                          for model, mean, std in zip(self.models, self.means, self.stds)], self.weights)


def exportable(model: nn.Module) -> nn.Module:
    if isinstance(model, HeadedModel) and model.needs_gallery and len(model.gallery):
        return GalleryPrediction(model)
    return model


def export(model_dir: Path, out: Optional[Path] = None, tta: Optional[Sequence[str]] = None) -> Path:
    """Writes the ONNX file (default: model.onnx beside the final/ folder) and labels.json beside it. `tta`: the
    test-time views (default: the ensemble's)."""
    model_dir = Path(model_dir)
    ensemble = artifact.load(model_dir, torch.device("cpu"))
    if tta is not None:
        if not set(tta) <= set(TTA_VIEWS):
            raise artifact.ArtifactError(f"--tta: the value is {','.join(tta)}, but must be views from "
                                         f"{', '.join(TTA_VIEWS)}")
        ensemble = dataclasses.replace(ensemble, tta=tuple(tta))
    out = Path(out) if out is not None else model_dir.parent / "model.onnx"
    if out.suffix != ".onnx":
        raise artifact.ArtifactError(f"--out: the value is {str(out)!r}, but must end in .onnx")
    import onnx.helper

    graph = to_onnx(ensemble)
    metadata = describe(ensemble)
    onnx.helper.set_model_props(graph, {key: json.dumps(value) for key, value in metadata.items()})
    atomic_write(out, lambda path: Path(path).write_bytes(graph.SerializeToString()))
    atomic_write(out.with_name("labels.json"), lambda path: Path(path).write_text(json.dumps(metadata, indent=2)))
    return out


def describe(ensemble: artifact.Ensemble) -> dict:
    return {"format": ONNX_FORMAT, "classes": list(ensemble.classes), "image_size": ensemble.image_size,
            "tta": list(ensemble.tta), "vote": list(ensemble.vote),
            "weights": list(ensemble.weights) if ensemble.weights else None}


def to_onnx(ensemble: artifact.Ensemble):
    """The ensemble as an onnx.ModelProto; a member that cannot be exported is named, with the operation."""
    import onnx

    portable = PortableEnsemble(ensemble).eval()
    try:
        return onnx.load_from_string(_trace(portable, _images(ensemble.image_size)))
    except Exception as exc:  # which member: each is tried alone, so that the message can name it
        for name in ensemble.vote:
            alone = artifact.Ensemble(ensemble.classes, ensemble.image_size, {name: ensemble.members[name]},
                                      (name,), ensemble.tta)
            try:
                _trace(PortableEnsemble(alone).eval(), _images(ensemble.image_size))
            except Exception as member_exc:
                raise artifact.ArtifactError(f"{name}: cannot be exported to ONNX: {_reason(member_exc)}") from None
        raise artifact.ArtifactError(f"the ensemble cannot be exported to ONNX: {_reason(exc)}") from None


def _trace(module: nn.Module, example: torch.Tensor) -> bytes:
    """torch.onnx's TorchScript-based exporter, with the batch dimension left free. (Its torch.export-based one took
    25 times as long for a test model here, and needs onnxscript.)"""
    buffer = io.BytesIO()
    # Quiet: the exporter's notes on traced shapes and its deprecation, and on a failure the whole graph, printed.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), buffer, input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, opset_version=OPSET,
                          dynamo=False)
    return buffer.getvalue()


def _images(image_size: int) -> torch.Tensor:
    """The exported ensemble's input: uint8 RGB, N x H x W x 3."""
    return torch.zeros(2, image_size, image_size, 3, dtype=torch.uint8)


class OnnxRunner:
    """One model as an onnxruntime session, called as the torch module is (normalised float N x 3 x H x W in, its
    output out, as float32 on the CPU): how predictions run a member on a CPU (final/inference.py)."""

    def __init__(self, model: nn.Module, image_size: int, threads: int):
        self.session = new_session(_trace(model.eval(), torch.zeros(2, 3, image_size, image_size)), threads)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {INPUT: images.float().contiguous().numpy()})[0])


def _reason(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__

