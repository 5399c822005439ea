"""The search-space YAML: schema, loading and validation, done once at the edge.

Every problem is reported as one line, "FILE: FIELD: the value is V, but must be ...", and raised as
SpecError. Unknown keys are errors. Paths are resolved against the current directory at load time, so Ray
workers (which run elsewhere) see absolute paths.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import operator
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator


class UserError(Exception):
    """A problem with the user's input: the CLI prints it as one line and exits with status 2."""


class SpecError(UserError):
    pass


class SearchInterrupted(UserError):
    """Ctrl-C (or a lost driver) left trials unfinished; `tuneprod resume` continues them from their checkpoints."""


AUGMENT_POLICIES = ("none", "light", "medium", "heavy", "viewpoint")
# gpu: whole batches augmented on the trial's device (its GPU, or its CPU when it has none);
# cpu: per image with albumentations in DataLoader workers.
AUGMENT_DEVICES = ("gpu", "cpu")
OPTIMIZERS = ("adamw", "adam", "sgd")
LR_SCHEDULES = ("cosine", "step", "exponential", "constant")
POOLINGS = ("avg", "gem")
HEADS = ("linear", "cosine", "arcface")
EMBEDDING_HEADS = ("cosine", "arcface")
# head: the head's cosines (or logits); knn / centroid: similarity to the training images' embeddings.
PREDICTION_RULES = ("head", "knn", "centroid")
FINETUNE_SCHEDULES = ("full", "lp-ft")
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int")
# Test-time views, averaged: flip mirrors every view; scale adds a centre zoom; crops adds the four corners.
TTA_VIEWS = ("flip", "scale", "crops")
EXPERIMENT_SPEC = "search_space.yaml"  # the validated spec as a search ran it, kept in its experiment folder


@dataclass(frozen=True)
class Hyperparams:
    """What one trial trains with: every searchable parameter, with the default used when the space omits it."""

    backbone: str = "resnet18"
    pretrained: bool = False
    augment: str = "light"
    augment_device: str = "gpu"
    optimizer: str = "adamw"
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    warmup_epochs: float = 0.0
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    batch_size: int = 32
    dropout: float = 0.0
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    pooling: str = "avg"
    gem_p: float = 3.0
    gem_learnable: bool = True
    head: str = "linear"
    embedding_size: int = 512
    scale: float = 30.0
    margin: float = 0.3  # radians
    subcenters: int = 1
    predict_by: str = "head"
    knn_k: int = 5
    fusion: float = 0.5  # the head's share when predicting by the gallery
    finetune: str = "full"
    probe_epochs: int = 1  # lp-ft: epochs with the body frozen
    layer_decay: float = 1.0
    ema_decay: float = 0.0  # 0: no moving average

    @property
    def predicts_by_gallery(self) -> bool:
        return self.head in EMBEDDING_HEADS and self.predict_by != "head"

    @classmethod
    def from_params(cls, params: dict) -> "Hyperparams":
        """Builds from a trial's parameters; keys that are not hyperparameters (Ray's extras) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in known})


@dataclass(frozen=True)
class TrialConfig:
    """Everything a training run needs: hyperparameters plus settings that come from the spec, not the search."""

    hp: Hyperparams
    image_size: int
    epochs: int  # the lr schedule's horizon and the number of epochs run
    seed: int = 0  # data order, augmentation, mixing, dropout
    workers: int = 0
    init_seed: Optional[int] = None  # the new weights' (the head's, when pretrained); default: seed

    @property
    def weights_seed(self) -> int:
        return self.seed if self.init_seed is None else self.init_seed


@dataclass(frozen=True)
class Param:
    """The values one hyperparameter may take."""

    kind: type
    choices: tuple = ()
    gt: Optional[float] = None
    ge: Optional[float] = None
    lt: Optional[float] = None
    le: Optional[float] = None

    def normalised(self, value: Any) -> Any:
        """An allowed value in its declared type: YAML's 1e2 is a float, a batch size must be an int."""
        return int(value) if self.kind is int else float(value) if self.kind is float else value

    def problem(self, value: Any) -> Optional[str]:
        """What the value must be, or None when it is allowed."""
        if self.kind is bool:
            return None if isinstance(value, bool) else "true or false"
        if self.kind is str:
            if not isinstance(value, str):
                return "a string"
            return None if not self.choices or value in self.choices else f"one of {', '.join(self.choices)}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "an integer" if self.kind is int else "a number"
        if not math.isfinite(value):
            return "a finite number"
        if self.kind is int and value != int(value):
            return "an integer"
        bounds = [(self.gt, ">", operator.gt), (self.ge, ">=", operator.ge),
                  (self.lt, "<", operator.lt), (self.le, "<=", operator.le)]
        failed = [f"{symbol} {bound:g}" for bound, symbol, holds in bounds
                  if bound is not None and not holds(value, bound)]
        return " and ".join(failed) or None


PARAMS: dict[str, Param] = {
    "backbone": Param(str),
    "pretrained": Param(bool),
    "augment": Param(str, choices=AUGMENT_POLICIES),
    "augment_device": Param(str, choices=AUGMENT_DEVICES),
    "optimizer": Param(str, choices=OPTIMIZERS),
    "lr": Param(float, gt=0, le=10),
    "lr_schedule": Param(str, choices=LR_SCHEDULES),
    "warmup_epochs": Param(float, ge=0),
    "weight_decay": Param(float, ge=0),
    "momentum": Param(float, ge=0, lt=1),
    "nesterov": Param(bool),
    "batch_size": Param(int, ge=1),
    "dropout": Param(float, ge=0, lt=1),
    "label_smoothing": Param(float, ge=0, lt=1),
    "mixup_alpha": Param(float, ge=0),
    "cutmix_alpha": Param(float, ge=0),
    "mix_prob": Param(float, ge=0, le=1),
    "pooling": Param(str, choices=POOLINGS),
    "gem_p": Param(float, ge=1, le=16),
    "gem_learnable": Param(bool),
    "head": Param(str, choices=HEADS),
    "embedding_size": Param(int, ge=8),
    "scale": Param(float, gt=0, le=100),
    "margin": Param(float, ge=0, le=1.5),
    "subcenters": Param(int, ge=1, le=16),
    "predict_by": Param(str, choices=PREDICTION_RULES),
    "knn_k": Param(int, ge=1),
    "fusion": Param(float, ge=0, le=1),
    "finetune": Param(str, choices=FINETUNE_SCHEDULES),
    "probe_epochs": Param(int, ge=1),
    "layer_decay": Param(float, gt=0, le=1),
    "ema_decay": Param(float, ge=0, lt=1),
}
# Parameters that act only when another one takes certain values.
APPLIES_WHEN: dict[str, tuple[str, tuple]] = {
    "gem_p": ("pooling", ("gem",)),
    "gem_learnable": ("pooling", ("gem",)),
    "embedding_size": ("head", EMBEDDING_HEADS),
    "scale": ("head", EMBEDDING_HEADS),
    "subcenters": ("head", EMBEDDING_HEADS),
    "predict_by": ("head", EMBEDDING_HEADS),
    "margin": ("head", ("arcface",)),
    "knn_k": ("predict_by", ("knn",)),
    "fusion": ("predict_by", ("knn", "centroid")),
    "probe_epochs": ("finetune", ("lp-ft",)),
}


def timm_model_problem(name: str) -> Optional[str]:
    """Checks a backbone against timm's registry (imported lazily: it pulls in torch)."""
    import timm

    if timm.is_model(name):
        return None
    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"a timm model name, see timm.list_models(){hint}"


# ---------------------------------------------------------------------------------------------- schema
_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_uri(location: Any) -> bool:
    """An object store's folder (s3://, gs://, ...) rather than a local path."""
    return isinstance(location, str) and bool(_URI.match(location)) and not location.startswith("file://")


def _location(value: Any) -> Any:
    return value if value is None or isinstance(value, Path) or is_uri(value) else \
        Path(value) if isinstance(value, str) else value


# A local path, or an object store's folder as a URI string (tuneprod/storage.py reads and writes both).
Location = Annotated[Union[Path, str], BeforeValidator(_location)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(_Strict):
    train: Optional[Location] = None
    test: Optional[Location] = None
    demo: Optional[Path] = None
    val_fraction: float = Field(0.2, gt=0, lt=1)
    # Hold out whole groups (a manifest column, or a regex whose first group is read from each image's path)
    # instead of single images; see data.grouped_split for the rule.
    val_groups: Optional[str] = Field(None, min_length=1)
    image_size: int = Field(224, ge=16, le=2048)
    workers: Optional[int] = Field(None, ge=0)
    # The decoded-image cache, on node-local disk; default $TUNEPROD_CACHE or ~/.cache/tuneprod.
    cache_dir: Optional[Path] = None

    @model_validator(mode="after")
    def _train_or_demo(self):
        if self.train is None and self.demo is None:
            raise ValueError("data.train: missing, but must be an image folder or a CSV/Parquet manifest "
                             "(or set data.demo to a folder for the built-in demo set)")
        return self

    @property
    def train_path(self) -> Location:
        # The demo's manifest carries each photo's camera elevation, for val_groups: elevation.
        return self.train if self.train is not None else self.demo / "train.csv"

    @property
    def test_path(self) -> Optional[Location]:
        if self.test is not None or self.demo is None or self.train is not None:
            return self.test
        return self.demo / "test"


class SearcherSpec(_Strict):
    type: Literal["optuna", "random"] = "optuna"
    n_startup_trials: int = Field(8, ge=0)
    multivariate: bool = True


class SchedulerSpec(_Strict):
    """asha: a trial waits (paused, checkpointed) at a rung until reduction_factor trials have reported there; the
    best 1/reduction_factor go on, the others stop. asha_promotion: the others wait on, to be promoted if later
    trials rank below them (ASHA's paper). asha_stopping: Ray's ASHAScheduler, which decides at once and so lets the
    first trial at a rung through. fifo: every trial runs max_epochs. See tuning/scheduler.py."""

    type: Literal["asha", "asha_promotion", "asha_stopping", "fifo"] = "asha"
    max_epochs: int = Field(10, ge=1)
    # auto: from the data, so that the first comparison comes once each class has been seen often enough
    # (tuning/scheduler.py: auto_grace_period).
    grace_period: Union[Literal["auto"], int] = "auto"
    reduction_factor: float = Field(3.0, gt=1)
    # What ranks trials at a rung: the search metric by default; val_loss separates trials earlier when accuracy is
    # still flat (benchmarks/search_efficiency.py measures both against the trials' final accuracy).
    rung_metric: Optional[Literal["val_acc", "val_loss"]] = None

    @field_validator("grace_period", mode="before")
    @classmethod
    def _epochs(cls, value):
        value = _auto_or_number(value, lambda v: v >= 1 and v == int(v), "'auto' or an integer >= 1")
        return value if value == "auto" else int(value)

    @model_validator(mode="after")
    def _grace_within_max(self):
        if self.grace_period != "auto" and self.grace_period > self.max_epochs:
            raise ValueError(f"search.scheduler.grace_period: the value is {self.grace_period}, "
                             f"but must be <= search.scheduler.max_epochs ({self.max_epochs})")
        return self


class SearchSpec(_Strict):
    metric: Literal["val_acc", "val_loss"] = "val_acc"
    mode: Optional[Literal["max", "min"]] = None
    num_samples: int = Field(16, ge=1)
    max_concurrent_trials: Optional[int] = Field(None, ge=1)
    time_budget_s: Optional[float] = Field(None, gt=0)
    # Retries of a trial whose worker process or node was lost, each from its last checkpoint. A trial's own failure
    # (NaN loss, out of memory, a model that cannot take the image size) is recorded once and never retried.
    max_failures: int = Field(3, ge=0)
    seed: int = 0
    searcher: SearcherSpec = SearcherSpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    start_from: list[dict[str, Any]] = []

    @property
    def direction(self) -> str:
        return self.mode or ("max" if self.metric == "val_acc" else "min")


def _auto_or_number(value: Any, allowed: Callable[[float], bool], expected: str) -> Any:
    """For fields that take 'auto' or a number: one message naming both, instead of one per union branch."""
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not allowed(value):
        raise ValueError(expected)
    return value


class ResourcesSpec(_Strict):
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: Union[Literal["auto"], float] = "auto"

    @field_validator("gpus_per_trial", mode="before")
    @classmethod
    def _gpu_fraction(cls, value):
        # A trial trains on one device, so more than one GPU per trial would sit idle.
        return _auto_or_number(value, lambda v: 0 <= v <= 1, "'auto' or a fraction of one GPU in [0, 1]")


class FinalSpec(_Strict):
    """The final stage: `members` distinct configurations x `seeds`, each trained on all labelled data, soft-voted
    (optionally souped) with test-time augmentation. `select`: which configurations, and their votes: `top`, the
    best by the search metric, equal votes; `greedy`, ensemble selection over every trial's validation predictions,
    weighted votes. `members: auto`: as many members as fit in the time the search leaves (at least as many as
    train at once on the cluster), shared out by the selection's weights, so that a selection that keeps picking
    one configuration trains it with more seeds. `time_share`: the least share of search.time_budget_s the trials
    leave to the final stage and predictions (with members: auto; 0: what one round of members needs). `epochs`:
    see member_epochs."""

    enabled: bool = True
    members: Union[Literal["auto"], int] = 1
    seeds: int = Field(1, ge=1)
    select: Literal["top", "greedy"] = "top"
    epochs: Union[Literal["auto", "best"], int] = "auto"
    tta: tuple[str, ...] = ("flip", "crops")  # measured best by benchmarks/accuracy.py on every set
    soup: bool = False
    time_share: float = Field(0.0, ge=0, lt=1)

    @field_validator("members", mode="before")
    @classmethod
    def _positive(cls, value):
        return _auto_or_number(value, lambda v: v >= 1 and v == int(v), "'auto' or an integer >= 1")

    @field_validator("epochs", mode="before")
    @classmethod
    def _epochs(cls, value):
        if value == "best":
            return value
        return _auto_or_number(value, lambda v: v >= 1 and v == int(v), "'auto', 'best' or an integer >= 1")

    @model_validator(mode="after")
    def _seeds_follow_auto_members(self):
        if self.members == "auto" and self.seeds != 1:
            raise ValueError(f"final.seeds: the value is {self.seeds}, but with final.members: auto the seeds follow "
                             f"the selection's votes; leave it at 1, or set final.members to a number")
        if self.members != "auto" and self.time_share:
            raise ValueError(f"final.time_share: the value is {self.time_share:g}, but only final.members: auto can "
                             f"use the time it keeps; set final.members: auto, or remove final.time_share")
        return self

    @field_validator("tta", mode="before")
    @classmethod
    def _views(cls, value):
        if isinstance(value, bool):  # the older form: true meant the mirror
            return ("flip",) if value else ()
        expected = f"a list of views from {', '.join(TTA_VIEWS)} (e.g. [flip, scale]), or [] for none"
        if not isinstance(value, (list, tuple)) or not all(v in TTA_VIEWS for v in value) \
                or len(set(value)) != len(value):
            raise ValueError(expected)
        return tuple(value)


def member_epochs(final_epochs: Union[str, int], best_epoch: int, epochs_run: int, max_epochs: int) -> int:
    """The epochs a member trains (its learning-rate schedule spans them), by final.epochs: a number, as set; `best`,
    its trial's best epoch (where its metric peaked); `auto`, the same, unless the trial peaked at the last epoch it
    ran, short of max_epochs: stopped at a rung or cut by the budget while still improving, its best epoch is only
    a floor, and the member trains for max_epochs, the horizon the search planned for every trial."""
    if final_epochs not in ("auto", "best"):
        return int(final_epochs)
    if final_epochs == "auto" and best_epoch >= epochs_run:
        return max(max_epochs, best_epoch)
    return best_epoch


@dataclass(frozen=True)
class Dimension:
    """A searched parameter: a distribution, optionally active only when other parameters match `when`."""

    name: str
    distribution: str  # one of DISTRIBUTIONS
    values: tuple  # the choices, or (low, high)
    log: bool = False
    when: tuple = ()  # ((param, allowed values), ...)

    def contains(self, value: Any) -> bool:
        if self.distribution == "choice":
            return value in self.values
        low, high = self.values
        return isinstance(value, (int, float)) and low <= value <= high


@dataclass(frozen=True)
class Space:
    """The validated `space` section: fixed values, and searched dimensions in sampling order (file order, except
    that a dimension comes after the parameters its `when` names)."""

    dimensions: tuple[Dimension, ...]
    fixed: dict

    def names(self) -> list[str]:
        return [d.name for d in self.dimensions] + list(self.fixed)

    def values_of(self, name: str) -> tuple:
        """Every value a choice or fixed parameter can take (the default when the space leaves it out)."""
        if name in self.fixed:
            return (self.fixed[name],)
        searched = [d.values for d in self.dimensions if d.name == name]
        return searched[0] if searched else (getattr(Hyperparams(), name),)


@dataclass(frozen=True)
class Spec:
    path: Path
    data: DataSpec
    search: SearchSpec
    resources: ResourcesSpec
    final: FinalSpec
    space: Space
    name: str
    storage: Location  # a folder, or a bucket's URI (then the driver's own files are kept in a local mirror)
    document: dict  # the validated YAML with absolute paths: saved beside the results, reloaded by retrain
    # Where images given as URIs were fetched from: {"train": ObjectListing, ...} (train/cache.py's `localised`).
    sources: dict = dataclasses.field(default_factory=dict)

    @property
    def experiment_dir(self) -> Path:
        """The experiment's folder on this machine: where the driver writes its own files (with a bucket for
        storage, the local mirror they are uploaded from)."""
        if is_uri(self.storage):
            from tuneprod.storage import mirror_folder

            return mirror_folder(self.storage) / self.name
        return self.storage / self.name

    @property
    def remote(self) -> Optional[str]:
        """The experiment's folder in the bucket, when storage is one."""
        if not is_uri(self.storage):
            return None
        from tuneprod.storage import join

        return join(self.storage, self.name)

    def named(self, name: str) -> "Spec":
        """The same spec under another experiment name, in the same storage."""
        return dataclasses.replace(self, name=name, document={**self.document, "name": name})

    def placed(self, experiment_dir: Path) -> "Spec":
        """The same spec writing to another experiment folder."""
        storage, name = experiment_dir.parent, experiment_dir.name
        return dataclasses.replace(self, name=name, storage=storage,
                                   document={**self.document, "name": name, "storage": str(storage)})

    def search_values(self, name: str) -> list:
        """Every value of a parameter that the space or a start_from point can give a trial (for a range: its
        ends)."""
        return sorted(set(self.space.values_of(name)) | {p[name] for p in self.search.start_from if name in p})

    @property
    def longest_warmup_epochs(self) -> float:
        """The longest learning-rate warm-up a trial may get (grace_period auto puts the first rung after it)."""
        return max(self.search_values("warmup_epochs"))

    def pretrained_backbones(self) -> list[str]:
        """The backbones some trial may train from pretrained weights."""
        return self.search_values("backbone") if True in self.search_values("pretrained") else []

    @property
    def dataloader_workers(self) -> int:
        """One CPU of a trial runs the training loop; the rest decode and augment."""
        if self.data.workers is not None:
            return self.data.workers
        return max(0, int(self.resources.cpus_per_trial) - 1)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.document, sort_keys=False))


class _Document(_Strict):
    data: DataSpec
    search: SearchSpec = SearchSpec()
    resources: ResourcesSpec = ResourcesSpec()
    final: Optional[FinalSpec] = None
    retrain: Optional[FinalSpec] = None  # the section's older name, still read (experiments saved with it)
    space: dict[str, Any] = {}
    name: Optional[str] = None
    storage: Location = Path("tuneprod_runs")

    @model_validator(mode="after")
    def _one_final_section(self):
        if self.final is not None and self.retrain is not None:
            raise ValueError("retrain: the older name of the final section; keep only final")
        return self

    @model_validator(mode="after")
    def _time_share_of_a_budget(self):
        final = self.final or self.retrain
        if final is not None and final.time_share and self.search.time_budget_s is None:
            raise ValueError(f"final.time_share: the value is {final.time_share:g}, but it is a share of "
                             f"search.time_budget_s, which is not set; set search.time_budget_s, or remove "
                             f"final.time_share")
        return self


# ---------------------------------------------------------------------------------------------- loading
class _YamlLoader(yaml.SafeLoader):
    """PyYAML reads 1e-4 as a string (YAML 1.1); users write learning rates that way, so read it as a float."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_spec(path: Union[str, Path], overrides: Optional[dict] = None) -> Spec:
    """Reads and validates a search-space YAML. `overrides` maps dotted fields to values (CLI flags)."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_YamlLoader)
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file; pass a search-space YAML such as search_spaces/demo.yaml") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read it ({exc.strerror}); pass a search-space YAML file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SpecError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: the file must hold a mapping with at least a `data` section")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value, path)
    return spec_from_dict(raw, path)


def spec_from_dict(raw: dict, path: Path) -> Spec:
    try:
        doc = _Document.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(f"{path}: {_describe(exc)}") from None
    try:
        space = parse_space(doc.space)
        search = doc.search.model_copy(update={"start_from": check_start_points(doc.search.start_from, space)})
    except ValueError as exc:
        raise SpecError(f"{path}: {exc}") from None
    data = doc.data.model_copy(update={k: _absolute(getattr(doc.data, k))
                                       for k in ("train", "test", "demo", "cache_dir")})
    name, storage = doc.name or path.stem, _absolute(doc.storage)
    final = doc.final or doc.retrain or FinalSpec()
    document = doc.model_copy(update={"data": data, "name": name, "storage": storage, "final": final,
                                      "retrain": None}).model_dump(mode="json", exclude_none=True)
    return Spec(path=path, data=data, search=search, resources=doc.resources, final=final,
                space=space, name=name, storage=storage, document=document)


def _absolute(path: Optional[Location]) -> Optional[Location]:
    return path if path is None or is_uri(path) else Path(path).expanduser().absolute()


def _set_dotted(raw: dict, dotted: str, value: Any, path: Path) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for depth, key in enumerate(parents):
        if node.get(key) is None:  # `data:` left empty in the file
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict):
            field = ".".join(parents[:depth + 1])
            raise SpecError(f"{path}: {field}: the value is {node!r}, but must be a mapping")
    node[leaf] = value


def _describe(exc: ValidationError) -> str:
    """The first pydantic error in the project's one-line form."""
    err = exc.errors()[0]
    loc = ".".join(str(part) for part in err["loc"])
    kind, ctx, value = err["type"], err.get("ctx", {}), err.get("input")
    if kind == "value_error" and str(ctx.get("error", "")).startswith(("data.", "search.", "final.", "retrain:")):
        return str(ctx["error"])
    if kind == "extra_forbidden":
        return f"{loc}: unknown key; remove it or check its spelling"
    if kind == "missing":
        return f"{loc}: missing, but is required"
    expectations = {
        "greater_than": lambda: f"> {ctx.get('gt')}",
        "greater_than_equal": lambda: f">= {ctx.get('ge')}",
        "less_than": lambda: f"< {ctx.get('lt')}",
        "less_than_equal": lambda: f"<= {ctx.get('le')}",
        "literal_error": lambda: f"one of {ctx.get('expected')}",
        "int_parsing": lambda: "an integer",
        "int_from_float": lambda: "an integer",
        "float_parsing": lambda: "a number",
        "bool_parsing": lambda: "true or false",
        "bool_type": lambda: "true or false",
        "int_type": lambda: "an integer",
        "float_type": lambda: "a number",
        "string_type": lambda: "a string",
        "dict_type": lambda: "a mapping",
        "model_type": lambda: "a mapping",
        "list_type": lambda: "a list",
        "path_type": lambda: "a path",
        "value_error": lambda: str(ctx.get("error", err["msg"])),
    }
    expected = expectations.get(kind, lambda: err["msg"])()
    return f"{loc}: the value is {value!r}, but must be {expected}"


# ---------------------------------------------------------------------------------------------- space
def parse_space(raw: dict) -> Space:
    """Turns the `space` mapping into dimensions and fixed values; raises ValueError with the field named."""
    dimensions, fixed = [], {}
    for name, entry in raw.items():
        field = f"space.{name}"
        if name not in PARAMS:
            close = difflib.get_close_matches(name, PARAMS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f"; known: {', '.join(PARAMS)}"
            raise ValueError(f"{field}: unknown parameter{hint}")
        if isinstance(entry, dict):
            dimension = _parse_dimension(name, entry, names=[other for other in raw if other != name])
            for value in dimension.values:
                _check_value(f"{field}.{dimension.distribution}", name, value)
            if dimension.distribution == "choice":
                dimension = dataclasses.replace(dimension, values=tuple(PARAMS[name].normalised(v)
                                                                        for v in dimension.values))
            dimensions.append(dimension)
        else:
            _check_value(field, name, entry)
            fixed[name] = PARAMS[name].normalised(entry)
    space = Space(_conditions_first(dimensions), fixed)
    _check_conditions(space)
    _check_applicable(space)
    return space


def _check_applicable(space: Space) -> None:
    """A parameter of a head or schedule the space never uses would be searched (or set) for nothing."""
    for name in space.names():
        if name in APPLIES_WHEN:
            other, allowed = APPLIES_WHEN[name]
            possible = space.values_of(other)
            if not set(possible) & set(allowed):
                raise ValueError(f"space.{name}: applies only when {other} is {' or '.join(allowed)}, but "
                                 f"space.{other} never is (it takes {list(possible)}); set space.{other} to use it, "
                                 f"or remove {name}")


def _check_conditions(space: Space) -> None:
    """A `when` value that the named parameter can never take would silently switch the parameter off."""
    for dimension in space.dimensions:
        for other, allowed in dimension.when:
            possible = space.values_of(other)
            numeric_range = any(d.name == other and d.distribution != "choice" for d in space.dimensions)
            impossible = [v for v in allowed if v not in possible]
            if impossible and not numeric_range:
                raise ValueError(f"space.{dimension.name}.when.{other}: the value is {impossible[0]!r}, but must "
                                 f"be one of the values space.{other} takes: {list(possible)}")


def _conditions_first(dimensions: list[Dimension]) -> tuple[Dimension, ...]:
    """Orders dimensions so each comes after those its `when` names (file order otherwise)."""
    pending, ordered = list(dimensions), []
    while pending:
        placed = {d.name for d in ordered}
        ready = next((d for d in pending if all(n in placed or n not in {p.name for p in pending}
                                                for n, _ in d.when)), None)
        if ready is None:
            raise ValueError(f"space.{pending[0].name}.when: the conditions form a cycle "
                             f"({', '.join(d.name for d in pending)}); one parameter must not depend on itself")
        ordered.append(ready)
        pending.remove(ready)
    return tuple(ordered)


def _parse_dimension(name: str, entry: dict, names: list[str]) -> Dimension:
    field = f"space.{name}"
    kinds = [key for key in entry if key in DISTRIBUTIONS]
    unknown = [key for key in entry if key not in DISTRIBUTIONS and key not in ("when", "log")]
    if unknown:
        raise ValueError(f"{field}.{unknown[0]}: unknown key; use one of {', '.join(DISTRIBUTIONS)}, with optional log, when")
    if len(kinds) != 1:
        raise ValueError(f"{field}: the value is {entry!r}, but must hold exactly one of {', '.join(DISTRIBUTIONS)}")
    kind = kinds[0]
    values = entry[kind]
    log = entry.get("log", kind == "loguniform")
    if not isinstance(values, list) or not values:
        raise ValueError(f"{field}.{kind}: the value is {values!r}, but must be a non-empty list")
    if kind != "choice":
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) \
                or not values[0] < values[1]:
            raise ValueError(f"{field}.{kind}: the value is {values!r}, but must be [low, high] numbers with low < high")
        if log and values[0] <= 0:
            raise ValueError(f"{field}.{kind}: the value is {values!r}, but must have low > 0 on a log scale")
        if kind == "int" and not all(float(v).is_integer() for v in values):
            raise ValueError(f"{field}.int: the value is {values!r}, but must be two integers")
    if not isinstance(log, bool) or (log and kind == "choice"):
        raise ValueError(f"{field}.log: the value is {log!r}, but must be true or false (and only for uniform/int)")
    return Dimension(name, kind, tuple(values), log=log, when=_parse_when(field, entry.get("when"), names))


def _parse_when(field: str, when: Any, names: list[str]) -> tuple:
    if when is None:
        return ()
    if not isinstance(when, dict) or not when:
        raise ValueError(f"{field}.when: the value is {when!r}, but must be a mapping like {{optimizer: sgd}}")
    conditions = []
    for other, allowed in when.items():
        if other not in names:
            raise ValueError(f"{field}.when.{other}: the value is {other!r}, but must name another parameter "
                             f"of space")
        conditions.append((other, tuple(allowed) if isinstance(allowed, list) else (allowed,)))
    return tuple(conditions)


def _check_value(field: str, name: str, value: Any) -> None:
    problem = PARAMS[name].problem(value)
    if problem is None and name == "backbone":
        problem = timm_model_problem(value)
    if problem:
        raise ValueError(f"{field}: the value is {value!r}, but must be {problem}")


def check_start_points(points: list[dict], space: Space) -> list[dict]:
    """A start_from entry names parameters of the space; searched ones must lie inside their distribution.
    Returns the entries with values in their declared types."""
    searched = {d.name: d for d in space.dimensions}
    fixed = space.fixed
    for i, point in enumerate(points):
        for name, value in point.items():
            field = f"search.start_from[{i}].{name}"
            if name not in PARAMS:
                raise ValueError(f"{field}: unknown parameter; known: {', '.join(PARAMS)}")
            if name not in searched and name not in fixed:
                # Optuna would drop it without a word: only parameters of the space reach a trial.
                raise ValueError(f"{field}: the value is {value!r}, but {name} is not in space; add it to space "
                                 f"(fixed or searched) or remove it from this entry")
            _check_value(field, name, value)
            if name in fixed and value != fixed[name]:
                raise ValueError(f"{field}: the value is {value!r}, but must be {fixed[name]!r} "
                                 f"(space.{name} fixes it)")
            dimension = searched.get(name)
            if dimension and not dimension.contains(value):
                allowed = (f"one of {list(dimension.values)}" if dimension.distribution == "choice"
                           else f"within space.{name} [{dimension.values[0]}, {dimension.values[1]}]")
                raise ValueError(f"{field}: the value is {value!r}, but must be {allowed}")
    return [{name: PARAMS[name].normalised(value) for name, value in point.items()} for point in points]
