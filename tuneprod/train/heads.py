"""What sits on a timm body: GeM pooling, a linear, cosine or ArcFace head (with sub-centres), and prediction by
cosine similarity to a gallery of training-image embeddings (k nearest neighbours or class centroids), optionally
fused with the head's own cosines.

A model with an embedding head returns `scale` x a cosine per class as its logits, whatever rule it predicts by,
so the loss, evaluation, test-time views, the soft vote and the artifact treat it as any classifier. The gallery
is a buffer of the model: saved in its weights, so `predict` needs no training data.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import timm
import torch
import torch.nn.functional as F
from torch import nn

from tuneprod.spec import EMBEDDING_HEADS, Hyperparams
from tuneprod.train.models import create_model, load_pretrained_body, size_kwargs


def build_model(hp: Hyperparams, num_classes: int, image_size: int, pretrained: Optional[bool] = None) -> nn.Module:
    """The model a trial trains. timm's own classifier for the plain recipe (linear head, average pooling), which
    keeps earlier artifacts loadable; otherwise a HeadedModel on the timm body."""
    pretrained = hp.pretrained if pretrained is None else pretrained
    if hp.head == "linear" and hp.pooling == "avg":
        return create_model(hp.backbone, num_classes, pretrained, hp.dropout, image_size)
    kwargs = size_kwargs(hp.backbone, image_size)
    body = timm.create_model(hp.backbone, pretrained=False, num_classes=0,
                             global_pool="" if hp.pooling == "gem" else "avg", **kwargs)
    if pretrained:
        load_pretrained_body(body, hp.backbone, kwargs)
    return HeadedModel(body, num_classes, hp)


class GeM(nn.Module):
    """Generalised mean pooling: (mean x^p)^(1/p) over the positions; p = 1 is average pooling, large p tends to
    max pooling. p learnable or fixed. Computed in float32: x^p overflows half precision."""

    def __init__(self, p: float, learnable: bool, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        if learnable:
            self.p = nn.Parameter(torch.tensor(float(p)))
        else:
            self.register_buffer("p", torch.tensor(float(p)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        positions = (2, 3) if features.ndim == 4 else (1,)  # a CNN's map, or a transformer's tokens
        p = self.p.clamp(min=1.0)
        return features.float().clamp(min=self.eps).pow(p).mean(positions).pow(1.0 / p)


class CosineHead(nn.Module):
    """Class weights of `subcenters` unit vectors each; a class's cosine is that of its nearest sub-centre.
    ArcFace (margin > 0) adds margin x (the class's share of the target) to the angle in training: with one-hot
    targets, the standard margin on the true class; mixed or smoothed targets share it out."""

    def __init__(self, dim: int, num_classes: int, subcenters: int, scale: float, margin: float):
        super().__init__()
        self.num_classes, self.subcenters, self.scale, self.margin = num_classes, subcenters, scale, margin
        self.weight = nn.Parameter(torch.empty(num_classes * subcenters, dim))
        nn.init.xavier_uniform_(self.weight)

    def cosines(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Unit embeddings (B x dim) to cosines (B x classes), in float32 (see full_precision)."""
        with full_precision(embeddings):
            cosines = embeddings.float() @ F.normalize(self.weight.float(), dim=1).T
        return cosines.view(-1, self.num_classes, self.subcenters).amax(2)  # -1: any batch in an exported graph

    def forward(self, embeddings: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        cosines = self.cosines(embeddings)
        if targets is not None and self.margin > 0:
            return self.scale * add_margin(cosines, targets, self.margin)
        return self.scale * cosines


def full_precision(tensor: torch.Tensor):
    """Autocast off: cosines in bfloat16 are good to about 0.004, coarse enough to reorder near neighbours and,
    times the scale, to shift logits by a tenth."""
    return torch.autocast(tensor.device.type, enabled=False)


def add_margin(cosines: torch.Tensor, targets: torch.Tensor, margin: float) -> torch.Tensor:
    """cos(theta + margin x target) per class, the angle capped at pi so the logit keeps falling as it grows."""
    angles = torch.acos(cosines.clamp(-1 + 1e-7, 1 - 1e-7))
    return torch.cos((angles + margin * targets.to(angles.dtype)).clamp(max=math.pi))


def gallery_scores(embeddings: torch.Tensor, gallery: torch.Tensor, labels: torch.Tensor, num_classes: int,
                   rule: str, k: int) -> torch.Tensor:
    """Each class's similarity to unit embeddings (B x dim), in cosine units (B x classes).

    knn: the k most similar gallery images (all of them when k exceeds the gallery) vote with their similarity;
    a class scores the sum of its votes divided by k (0 without a vote). centroid: the cosine to the class's mean
    gallery embedding (-1 for a class with no gallery image). Ties go to the lower class index (argmax)."""
    if rule == "centroid":
        return centroid_scores(embeddings, *class_centroids(gallery, labels, num_classes))
    with full_precision(embeddings):
        similarities = embeddings.float() @ gallery.float().T
    top = similarities.topk(min(k, len(gallery)), dim=1)
    votes = similarities.new_zeros(similarities.shape[0], num_classes)  # shape[0]: any batch in an exported graph
    return votes.scatter_add_(1, labels[top.indices], top.values) / top.values.shape[1]


def class_centroids(gallery: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class's mean gallery embedding at unit length (classes x dim), and which classes have one."""
    sums = torch.zeros(num_classes, gallery.shape[1], device=gallery.device, dtype=gallery.dtype)
    sums.index_add_(0, labels, gallery)
    return F.normalize(sums.float(), dim=1), torch.bincount(labels, minlength=num_classes) > 0


def centroid_scores(embeddings: torch.Tensor, centroids: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    with full_precision(embeddings):
        scores = embeddings.float() @ centroids.T
    return torch.where(present, scores, torch.full_like(scores, -1.0))


class HeadedModel(nn.Module):
    """A timm body (no classifier), pooled (its own average pooling, or GeM), dropout, then a linear classifier,
    or an embedding neck (linear + batch norm, unit length) with a cosine or ArcFace head."""

    def __init__(self, body: nn.Module, num_classes: int, hp: Hyperparams):
        super().__init__()
        self.body, self.num_classes = body, num_classes
        self.pool = GeM(hp.gem_p, hp.gem_learnable) if hp.pooling == "gem" else None
        self.dropout = nn.Dropout(hp.dropout)
        self.embedded = hp.head in EMBEDDING_HEADS
        if self.embedded:
            self.neck = nn.Sequential(nn.Linear(body.num_features, hp.embedding_size),
                                      nn.BatchNorm1d(hp.embedding_size))
            self.head = CosineHead(hp.embedding_size, num_classes, hp.subcenters, hp.scale,
                                   hp.margin if hp.head == "arcface" else 0.0)
            self.predict_by, self.knn_k, self.fusion = hp.predict_by, hp.knn_k, hp.fusion
        else:
            self.head = nn.Linear(body.num_features, num_classes)
        self.needs_gallery = hp.predicts_by_gallery  # the one rule, in Hyperparams
        size = hp.embedding_size if self.embedded else 0
        self.register_buffer("gallery", torch.zeros(0, size))
        self.register_buffer("gallery_labels", torch.zeros(0, dtype=torch.long))

    @property
    def uses_targets(self) -> bool:
        """Whether training passes the targets to forward (ArcFace's margin needs them)."""
        return self.embedded and self.head.margin > 0

    def features(self, images: torch.Tensor) -> torch.Tensor:
        features = self.body(images)
        return self.dropout(self.pool(features) if self.pool is not None else features)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-length embeddings (B x embedding_size), float32."""
        return F.normalize(self.neck(self.features(images)).float(), dim=1)

    def forward(self, images: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self.embedded:
            return self.head(self.features(images))
        embeddings = self.embed(images)
        if self.training or not self.needs_gallery or len(self.gallery) == 0:
            return self.head(embeddings, targets if self.training else None)
        scores = gallery_scores(embeddings, self.gallery.float(), self.gallery_labels, self.num_classes,
                                self.predict_by, self.knn_k)
        return self.fused(embeddings, scores)

    def fused(self, embeddings: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """The logits of a prediction by gallery: its scores, fused with the head's own cosines."""
        return self.head.scale * ((1 - self.fusion) * scores + self.fusion * self.head.cosines(embeddings))

    @torch.no_grad()
    def set_gallery(self, batches: Iterable) -> None:
        """Embeds (images, labels) batches, in eval mode, as the gallery predictions are compared with."""
        was_training = self.training
        self.eval()
        embedded, labels = [], []
        for images, batch_labels in batches:
            embedded.append(self.embed(images))
            labels.append(batch_labels.to(images.device))
        self.train(was_training)
        self.gallery = torch.cat(embedded).to(self.gallery.dtype)
        self.gallery_labels = torch.cat(labels).long()

    def clear_gallery(self) -> None:
        self.gallery = self.gallery[:0]
        self.gallery_labels = self.gallery_labels[:0]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A saved gallery has its own length: take its shape before loading it.
        for name in ("gallery", "gallery_labels"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def classifier_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What a linear probe trains: the head (with the neck and GeM's p), or timm's classifier."""
    if isinstance(model, HeadedModel):
        return [p for name, p in model.named_parameters() if not name.startswith("body.")]
    return list(model.get_classifier().parameters())


def body_modules(model: nn.Module) -> list[nn.Module]:
    """The pretrained part, frozen during a linear probe."""
    if isinstance(model, HeadedModel):
        return [model.body]
    classifier = {id(p) for p in model.get_classifier().parameters()}
    return [m for m in model.children() if not any(id(p) in classifier for p in m.parameters())]


def freeze_body(model: nn.Module, frozen: bool) -> None:
    """Freezes (or thaws) the body: no gradients, and in eval mode, so batch norm keeps its pretrained
    statistics while the head is probed."""
    for module in body_modules(model):
        module.requires_grad_(not frozen)
        if frozen:
            module.eval()
