"""The search: data checked once, then Ray Tune with Optuna (TPE or random) and ASHA (or FIFO) over the space,
then the results table, the retrain on all labelled data and the test predictions."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import ray
from ray import tune

from tuneprod.final.ensemble import view_count
from tuneprod.final.inference import prediction_speedup, predicts_in_onnxruntime
from tuneprod.storage import ExperimentUploads, RemoteFolder
from tuneprod.spec import EXPERIMENT_SPEC, Hyperparams, SearchInterrupted, Spec, TrialConfig, UserError
from tuneprod.train.cache import DecodedImages, default_root, labelled_images, localised
from tuneprod.train.data import DataError, check_test_images, list_images, validation_split
from tuneprod.train.heads import build_model
from tuneprod.train.loop import default_device, measure_speed
from tuneprod.train.models import WeightsError, ensure_pretrained_weights
from tuneprod.tuning import results
from tuneprod.tuning.budget import (BudgetStopper, MemberPlan, Speed, Workload, final_estimate, minimum_seconds,
                                    restored_stopper, trial_seconds)
from tuneprod.tuning.console import SearchView
from tuneprod.tuning.endings import CUT, FAILED, FINISHED, STOPPED, TrialEndings
from tuneprod.tuning.nodes import check_seen_by_every_node
from tuneprod.tuning.packing import PROBE_RECORD, PackingTable, measure_gpu
from tuneprod.tuning.scheduler import (PromotingASHA, RecordingASHA, ResumableFIFO, RunningTrialsLimiter,
                                       auto_grace_period, milestones)
from tuneprod.tuning.space import DefineByRun, sampler
from tuneprod.tuning.restore import reported_epochs, resumed_at
from tuneprod.tuning.study import StudySearch, close_open_trials
from tuneprod.tuning.trainable import RAY_SYNC_S, TrialData, train_trial

DRIVER_UPLOAD_S = 10  # with a bucket for storage: the driver's files go up at most this often
PROBE_TIMEOUT_S = 900  # a GPU busy with other work, or a cluster that never gets one: give up, use whole GPUs


@dataclass(frozen=True)
class SearchOutcome:
    experiment_dir: Path  # on this machine (with a bucket for storage, the mirror uploaded from)
    remote: Optional[str]  # the experiment's folder in the bucket, if storage is one
    trials: int
    failed: int
    stopped_early: int
    best_value: Optional[float]
    images: DecodedImages  # the readable labelled images, so that the retrain need not index them again
    final_members: Optional[int] = None  # final.members auto: as many as fit in the time the trials left


def claim_experiment_dir(spec: Spec) -> Spec:
    """Never mixes two searches in one folder: a taken name gets a numeric suffix. The folder is claimed by creating
    its spec file exclusively, so that two searches started at once with one name still get one folder each; with a
    bucket for storage, a name the bucket holds (another machine's search) is taken too."""
    candidate, n = spec, 1
    while True:
        candidate.experiment_dir.mkdir(parents=True, exist_ok=True)
        try:
            with open(candidate.experiment_dir / EXPERIMENT_SPEC, "x"):
                pass
            taken = candidate.remote is not None and bool(RemoteFolder(candidate.remote).entries())
        except FileExistsError:
            taken = True
        if taken:
            n += 1
            candidate = spec.named(f"{spec.name}_{n}")
            continue
        candidate.save(candidate.experiment_dir / EXPERIMENT_SPEC)
        ExperimentUploads(candidate.experiment_dir, candidate.remote)(force=True)  # the bucket's name taken now
        return candidate


def run_search(spec: Spec, address: Optional[str] = None, progress: Callable[[str], None] = print,
               final: bool = True, verbose: bool = False) -> SearchOutcome:
    """`final`: whether the final stage follows, so that search.time_budget_s keeps time for it. `verbose`: Ray's
    own progress tables and its workers' output instead of tuneprod's one view."""
    spec = localised(spec, progress)
    images, data = _trial_data(spec, progress)
    grace = grace_period(spec, data)
    start_ray(address, progress, verbose)
    check_seen_by_every_node(spec, images)
    trainable, packing = _trainable(spec, data, address, progress)
    stopper = _budget(spec, data, images, grace, final and spec.final.enabled, progress, packing)
    # Only now, with every check passed, does the experiment folder appear.
    spec = claim_experiment_dir(spec)
    progress(f"tuneprod: results go to {spec.remote} (the driver's files via {spec.experiment_dir})" if spec.remote
             else f"tuneprod: results go to {spec.experiment_dir}")
    endings = TrialEndings.open(spec.experiment_dir, spec.search.scheduler.max_epochs)
    if stopper is not None:
        stopper.endings = endings
    scheduler = _scheduler(spec, grace, endings, progress)
    searcher, max_concurrent = _searcher(spec, grace, endings), spec.search.max_concurrent_trials
    if isinstance(scheduler, PromotingASHA) and max_concurrent:  # trials waiting at a rung must not count
        searcher, max_concurrent = RunningTrialsLimiter(searcher, max_concurrent, scheduler.rungs), None
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                    num_samples=spec.search.num_samples,
                                    max_concurrent_trials=max_concurrent,
                                    # A stopped trial's process exits, and so returns its GPU memory to the
                                    # trials after it (a reused actor keeps torch's cached blocks: ray #23971).
                                    reuse_actors=False,
                                    trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}"),
        run_config=tune.RunConfig(
            name=spec.name, storage_path=str(spec.storage), stop=stopper,
            sync_config=tune.SyncConfig(sync_period=RAY_SYNC_S),  # not its default of 5 minutes
            # In a bucket the trials delete their old states themselves (trainable.delete_old_bucket_states).
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None if spec.remote else 1),
            failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
            callbacks=[_view(spec, endings, stopper, show=not verbose),
                       UploadsDriverFiles(ExperimentUploads(spec.experiment_dir, spec.remote, DRIVER_UPLOAD_S))],
            verbose=1 if verbose else 0),
    )
    progress(f"tuneprod: watch it with `tuneprod dashboard {spec.experiment_dir}` or "
             f"`tensorboard --logdir {spec.experiment_dir}`")
    return _sized_final(spec, _fit(spec, tuner, images, endings, progress, verbose), stopper, progress)


def _sized_final(spec: Spec, outcome: SearchOutcome, stopper: Optional[BudgetStopper],
                 progress: Callable[[str], None]) -> SearchOutcome:
    """final.members auto under a time budget: as many members as fit in the time the trials left."""
    if stopper is None or not stopper.work.final or spec.final.members != "auto":
        return outcome
    members = stopper.final_members()
    progress(f"tuneprod: final.members auto: {members} member(s) fit in the {stopper.left_s():.0f} s left")
    return dataclasses.replace(outcome, final_members=members)


class UploadsDriverFiles(tune.Callback):
    """With a bucket for storage, the driver's own files (the study, the endings) go up as trials start, report
    and end, at most every DRIVER_UPLOAD_S, and when the search ends, so that a search resumed after losing its
    driver finds its study about as far along as Ray's state (a trial the study lacks goes on outside it).
    (Ray sends the rest itself: checkpoints from the workers, the experiment state from here.)"""

    def __init__(self, uploads: ExperimentUploads):
        self.uploads = uploads

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.uploads()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.uploads()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.uploads()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.uploads()

    def on_experiment_end(self, trials, **info) -> None:
        self.uploads(force=True)


def _view(spec: Spec, endings: TrialEndings, stopper: Optional[BudgetStopper], show: bool) -> SearchView:
    return SearchView(spec.search.num_samples, spec.search.metric, spec.search.direction, endings, stopper,
                      show=show)


def grace_period(spec: Spec, data: TrialData) -> int:
    options = spec.search.scheduler
    if options.grace_period != "auto":
        return options.grace_period
    return auto_grace_period(len(data.train), len(data.train.classes), options.max_epochs, options.reduction_factor,
                             spec.longest_warmup_epochs)


def _budget(spec: Spec, data: TrialData, images: DecodedImages, grace: int, final: bool,
            progress: Callable[[str], None], packing: Optional["PackedResources"]) -> Optional[BudgetStopper]:
    """search.time_budget_s covers the whole run: checked against one trial and the final stage at the speed
    measured here, then kept by a stopper that ends the trials in time for the final stage."""
    if spec.search.time_budget_s is None:
        return None
    return plan_budget(spec, _workload(spec, data, images, final), _measured_speed(spec, data, progress), grace,
                       progress, packing.alone_speedup if packing else None)


def plan_budget(spec: Spec, work: Workload, speed: Speed, grace: int, progress: Callable[[str], None],
                alone_speedup: Optional[Callable[[dict], float]] = None) -> BudgetStopper:
    """Refuses a budget that cannot hold one trial to its first rung plus what follows; says how it is split."""
    budget, final = spec.search.time_budget_s, work.final
    need, trial_s, least_final = minimum_seconds(work, speed, grace)
    need = max(need, trial_s / (1 - work.time_share))  # the trials' part of it must hold the one trial too
    if budget < need:
        raise UserError(f"{spec.path}: search.time_budget_s: the value is {budget:g}, but must be >= {need:.0f} to "
                        f"hold one trial to its first rung ({grace} epoch(s), ~{trial_s:.0f} s), the final stage "
                        f"(~{least_final.members_s + least_final.overhead_s:.0f} s) and the predictions "
                        f"(~{least_final.predict_s:.0f} s) at the speed measured here "
                        f"({speed.train_images_per_s:.0f} img/s training); raise it, or lower data.image_size, "
                        f"final.members or final.time_share")
    members = work.members * work.seeds
    most = final_estimate(work, speed,
                          [MemberPlan(work.epochs_for(work.max_epochs, work.max_epochs))] * members)
    after = (f"; then the final stage (~{most.members_s + most.overhead_s:.0f} s at most: {members} member(s) on "
             f"{work.slots} slot(s)) and predictions (~{most.predict_s:.0f} s{_engine(speed)}), re-planned from the "
             f"trials' speed and best epochs as they report" if final else "")
    if final and work.time_share:
        after += (f"; final.time_share keeps at least {work.time_share * budget:.0f} s for them, and "
                  f"final.members auto trains as many members as fit in what the trials leave")
    progress(f"tuneprod: budget {budget:.0f} s for the whole run: trials (an epoch ~"
             f"{trial_seconds(work, speed, 1):.0f} s at {speed.train_images_per_s:.0f} img/s){after}")
    return BudgetStopper(budget, work, speed, spec.search.metric, spec.search.direction, progress, alone_speedup)


def _engine(speed: Speed) -> str:
    if speed.predict_speedup == 1.0:
        return ""
    return f"; members run in onnxruntime, {speed.predict_speedup:.1f}x torch's speed here"


def _workload(spec: Spec, data: TrialData, images: DecodedImages, final: bool) -> Workload:
    test = spec.data.test_path
    slots = member_slots(spec)
    auto = spec.final.members == "auto"  # as many members as slots: the time of one
    return Workload(train_images=len(data.train), val_images=len(data.val), labelled_images=len(images),
                    test_images=len(list_images(test)) if final and test is not None else 0,
                    views=view_count(spec.final.tta), members=slots if auto else spec.final.members,
                    seeds=1 if auto else spec.final.seeds,
                    member_epochs=spec.final.epochs, max_epochs=spec.search.scheduler.max_epochs, slots=slots,
                    final=final, time_share=spec.final.time_share)


def member_slots(spec: Spec) -> int:
    """How many final-stage members the cluster trains at once, each with a trial's resources."""
    cluster = ray.cluster_resources()
    per_member = trial_resources(spec, cluster.get("GPU", 0))
    slots = int(cluster.get("GPU", 0) // per_member["gpu"]) if per_member["gpu"] else \
        int(cluster.get("CPU", 1) // per_member["cpu"])
    return max(1, slots)


def _measured_speed(spec: Spec, data: TrialData, progress: Callable[[str], None]) -> Speed:
    """A few batches of a trial the space can propose, with a trial's resources (on its GPU when trials get one)."""
    resources = trial_resources(spec, ray.cluster_resources().get("GPU", 0))
    config = TrialConfig(_probe_params(spec), image_size=data.image_size, epochs=data.max_epochs, seed=data.seed,
                         workers=data.workers)
    task = ray.remote(_probe).options(num_cpus=resources["cpu"], num_gpus=resources["gpu"], max_retries=0)
    try:
        return ray.get(task.remote(config, data.train.classes, data.train, data.val), timeout=PROBE_TIMEOUT_S)
    except Exception as exc:  # the budget is then kept from the trials' own reports alone
        cause = getattr(exc, "cause", None) or exc
        progress(f"tuneprod: warning: could not measure the training speed ({type(cause).__name__}: "
                 f"{(str(cause) or 'no message').splitlines()[0]}); the budget is planned from the trials' reports")
        return Speed(math.inf, math.inf)


def _probe(config: TrialConfig, classes: tuple[str, ...], train: DecodedImages, val: DecodedImages) -> Speed:
    """The probe's task: a trial's training and evaluation speeds, and how much faster the test predictions will
    run a model of its kind (untrained: speed does not depend on the weights; built only where predictions may run
    in onnxruntime)."""
    train_speed, eval_speed = measure_speed(config, classes, train, val)
    device = default_device()
    if not predicts_in_onnxruntime(device):
        return Speed(train_speed, eval_speed)
    model = build_model(config.hp, len(classes), config.image_size, pretrained=False)
    return Speed(train_speed, eval_speed, prediction_speedup(model, config.image_size, device))


def _probe_params(spec: Spec) -> Hyperparams:
    """The first start_from point, else each parameter's first choice (ranges: their geometric middle)."""
    params = dict(spec.space.fixed)
    for dimension in spec.space.dimensions:
        if dimension.distribution == "choice":
            params[dimension.name] = dimension.values[0]
        else:
            low, high = dimension.values
            middle = math.sqrt(low * high) if dimension.log else (low + high) / 2
            params[dimension.name] = round(middle) if dimension.distribution == "int" else middle
    if spec.search.start_from:
        params.update(spec.search.start_from[0])
    return Hyperparams.from_params(params)


def resume_search(spec: Spec, address: Optional[str] = None, progress: Callable[[str], None] = print,
                  verbose: bool = False) -> SearchOutcome:
    """Continues an interrupted search (the spec saved in its folder): unfinished trials restart from their last
    checkpoint, the searcher from its saved state; finished and failed trials stay as they were."""
    experiment_dir = spec.experiment_dir
    ray_experiment = spec.remote or str(experiment_dir)  # where Ray keeps the search's state
    if not tune.Tuner.can_restore(ray_experiment):
        raise UserError(f"{spec.remote or experiment_dir}: holds no saved search state to resume; start a new search "
                        f"instead")
    spec = localised(spec, progress)
    images, data = _trial_data(spec, progress)
    start_ray(address, progress, verbose)
    check_seen_by_every_node(spec, images)
    # The record the restored scheduler, budget, searcher and console all become (see TrialEndings.__reduce__).
    endings = TrialEndings.open(experiment_dir, spec.search.scheduler.max_epochs)
    for trial_id, epoch, _ in reported_epochs(experiment_dir, spec.search.metric):  # as far as each trial got
        endings.observe(trial_id, {"epoch": epoch})
    with resumed_at(experiment_dir):
        tuner = tune.Tuner.restore(ray_experiment, trainable=_trainable(spec, data, address, progress)[0],
                                   resume_unfinished=True, resume_errored=False, restart_errored=False)
    progress(f"tuneprod: resuming the search in {experiment_dir}")
    outcome = _fit(spec, tuner, images, endings, progress, verbose)
    return _sized_final(spec, outcome, restored_stopper(experiment_dir), progress)


def _trial_data(spec: Spec, progress: Callable[[str], None]) -> tuple[DecodedImages, TrialData]:
    """Everything checked before Ray starts: images, test folder, pretrained weights. The split is seeded, so a
    resumed search validates on the same images."""
    labelled = labelled_images(spec, progress)
    check_test_images(spec, labelled.classes)
    try:
        train, val = validation_split(labelled, spec.data.val_fraction, spec.search.seed)
    except DataError as exc:
        raise DataError(f"{spec.path}: {exc}") from None
    for backbone in spec.pretrained_backbones():
        progress(f"tuneprod: fetching pretrained weights for {backbone} (once, before the trials)")
        try:
            ensure_pretrained_weights(backbone, spec.data.image_size)
        except WeightsError as exc:
            raise WeightsError(f"{spec.path}: {exc}") from None
    held_out = f" (whole groups of data.val_groups: {spec.data.val_groups})" if spec.data.val_groups else ""
    progress(f"tuneprod: {len(labelled.classes)} classes, {len(train)} training and {len(val)} validation "
             f"images{held_out}")
    return labelled, TrialData(train=train, val=val, image_size=spec.data.image_size,
                               max_epochs=spec.search.scheduler.max_epochs, seed=spec.search.seed,
                               workers=spec.dataloader_workers, metric=spec.search.metric,
                               mode=spec.search.direction)


def _trainable(spec: Spec, data: TrialData, address: Optional[str],
               progress: Callable[[str], None]) -> tuple[object, Optional["PackedResources"]]:
    """The trainable with its resources, and the packing when trials share GPUs."""
    cluster = ray.cluster_resources()
    resources = trial_resources(spec, cluster.get("GPU", 0))
    if address in (None, "local"):  # a cluster may autoscale to fit; this machine will not
        check_resources_fit(spec, resources, cluster)
    if spec.resources.gpus_per_trial == "auto" and resources["gpu"]:
        resources = _packed(spec, data, cluster, progress)
    packing = resources if isinstance(resources, PackedResources) else None
    return tune.with_resources(tune.with_parameters(train_trial, data=data), resources), packing


@dataclass(frozen=True)
class PackedResources:
    """Per trial: its CPUs and 1/n of a GPU, n from the measured packing table for its backbone and batch size."""

    table: PackingTable
    cpus_per_trial: float
    cpus_per_gpu: float

    def trials_per_gpu(self, hp: Hyperparams) -> int:
        return self.table.trials_for(hp.backbone, hp.batch_size, self.cpus_per_trial, self.cpus_per_gpu)

    def __call__(self, config: dict) -> tune.PlacementGroupFactory:
        share = 1 / self.trials_per_gpu(Hyperparams.from_params(config))
        return tune.PlacementGroupFactory([{"CPU": self.cpus_per_trial, "GPU": share}])

    def alone_speedup(self, config: dict) -> float:
        """What a trial of this configuration would gain with its GPU to itself, as members have theirs."""
        hp = Hyperparams.from_params(config)
        return self.table.alone_speedup(hp.backbone, hp.batch_size, self.trials_per_gpu(hp))


def _packed(spec: Spec, data: TrialData, cluster: dict, progress: Callable[[str], None]):
    """Measures (once per GPU model, kept in the node's cache folder) how many trials of each backbone and batch
    size one GPU takes; falls back to a whole GPU per trial when the measurement fails."""
    backbones = spec.search_values("backbone")
    batch_sizes = spec.search_values("batch_size")
    progress(f"tuneprod: measuring how many trials share a GPU ({', '.join(backbones)}; batch sizes "
             f"{', '.join(map(str, batch_sizes))}; kept for later searches)")
    record = str(Path(spec.data.cache_dir or default_root()) / PROBE_RECORD)
    measure = ray.remote(num_gpus=1, max_calls=1)(measure_gpu)
    task = measure.remote(backbones, spec.data.image_size, len(data.train.classes), batch_sizes, record)
    try:
        table = ray.get(task, timeout=PROBE_TIMEOUT_S)
    except Exception as exc:  # a probe that fails must not stop the search: whole GPUs always work
        ray.cancel(task, force=True)
        cause = getattr(exc, "cause", None) or exc  # a RayTaskError wraps what the task raised
        progress(f"tuneprod: warning: the GPU measurement failed ({type(cause).__name__}: "
                 f"{(str(cause) or 'no message').splitlines()[0]}); each trial gets a whole GPU")
        return trial_resources(spec, cluster.get("GPU", 0))
    packed = PackedResources(table, spec.resources.cpus_per_trial, _cpus_per_gpu())
    shares = ", ".join(f"{b} batch {n}: {packed.trials_per_gpu(Hyperparams(backbone=b, batch_size=n))}"
                       for b in backbones for n in batch_sizes)
    progress(f"tuneprod: trials per {table.gpu_name}: {shares}")
    return packed


def _fit(spec: Spec, tuner: tune.Tuner, images: DecodedImages, endings: TrialEndings,
         progress: Callable[[str], None], verbose: bool) -> SearchOutcome:
    # Each epoch checkpoints and so snapshots the experiment state; with short demo epochs Ray would warn about
    # that on every epoch, though a local snapshot costs milliseconds.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if not verbose:
        # Ray's new output engine prints its start box and a TensorBoard hint into /tmp/ray whatever `verbose` is;
        # the old one, at verbose=0, prints nothing.
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    with _noticing_interrupts() as interrupted:
        grid = tuner.fit()
        if interrupted():  # half-run trials must not be tabled as stopped by ASHA, nor one of them retrained
            raise SearchInterrupted(f"the search was stopped before its trials finished; continue it with: "
                                    f"tuneprod resume {spec.remote or spec.experiment_dir}")
    return summarise(spec, grid, images, endings, progress)


@contextlib.contextmanager
def _noticing_interrupts():
    """Ray handles Ctrl-C itself: it saves the experiment, stops the trials and returns as if done. Its handler
    then puts back the handler it found, so finding ours in place after `fit` means the search was interrupted.
    Ours answers a second Ctrl-C, as Ray intends, by aborting."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield lambda: False
        return

    def abort(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, abort)
    try:
        yield lambda: signal.getsignal(signal.SIGINT) is abort
    finally:
        signal.signal(signal.SIGINT, previous)


def summarise(spec: Spec, grid, images: DecodedImages, endings: TrialEndings,
              progress: Callable[[str], None]) -> SearchOutcome:
    names = spec.space.names()
    metric, mode = spec.search.metric, spec.search.direction
    study = results.load_study(spec.experiment_dir)
    records = results.records_from_grid(grid, names, results.proposed_params(study, spec.space.fixed))
    table = results.trials_table(records, names, metric, mode, endings)  # every trial's ending is in the record now
    close_open_trials(study, endings)
    results.write_results(spec.experiment_dir, table, names, metric)
    counts = endings.counts(table["trial_id"])
    failed, stopped = counts[FAILED], counts[STOPPED] + counts[CUT]
    said = [f"{counts[FINISHED]} ran to the end", f"{counts[STOPPED]} stopped early by the scheduler",
            f"{counts[CUT]} cut by the time budget" if counts[CUT] else "", f"{failed} failed"]
    progress(f"tuneprod: {len(table)} trials: {', '.join(part for part in said if part)}")
    try:
        best = float(results.best_row(table, metric)[metric])
    except ValueError:
        return SearchOutcome(spec.experiment_dir, spec.remote, len(table), failed, stopped, None, images)
    progress(f"tuneprod: best {metric} {best:.4f}; configuration in {spec.experiment_dir / results.BEST_CONFIG}")
    return SearchOutcome(spec.experiment_dir, spec.remote, len(table), failed, stopped, best, images)


def _cpus_per_gpu() -> float:
    """On the GPU nodes (a CPU-only head node's CPUs cannot feed a GPU), the fewest CPUs per GPU."""
    gpu_nodes = [node["Resources"] for node in ray.nodes() if node["Alive"] and node["Resources"].get("GPU")]
    return min((r.get("CPU", 0) / r["GPU"] for r in gpu_nodes), default=1.0)


def start_ray(address: Optional[str], progress: Callable[[str], None], verbose: bool = False) -> None:
    """Quiet unless `verbose`: Ray's own warnings (token authentication, metrics of a trial cut before its first
    report) and the trials' output relayed by its workers name nothing a user can act on; tuneprod says what
    matters in its own lines, and each trial's output stays in Ray's logs."""
    if ray.is_initialized():
        return
    if not verbose:
        logging.getLogger("ray").setLevel(logging.ERROR)
        # Tune logs a trial's lost worker with Ray's traceback, and a stop with the trials not done: the console
        # view says both in a line (a retry from the checkpoint; the resume command).
        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    try:
        context = ray.init(address=address, logging_level=logging.INFO if verbose else logging.ERROR,
                           log_to_driver=verbose)
    except ConnectionError as exc:
        raise UserError(f"--address {address}: no Ray cluster answers there ({exc}); start one (`ray start --head`, "
                        f"`ray up cluster.yaml`) or leave --address out to run on this machine") from None
    if context.dashboard_url:
        progress(f"tuneprod: Ray dashboard at http://{context.dashboard_url} (its token: `ray get-auth-token`)")


def trial_resources(spec: Spec, cluster_gpus: float) -> dict:
    """`auto` gives each trial a whole GPU when the cluster has any (until packing is measured), else none."""
    gpus = spec.resources.gpus_per_trial
    if gpus == "auto":
        gpus = 1 if cluster_gpus >= 1 else 0
    return {"cpu": spec.resources.cpus_per_trial, "gpu": gpus}


def check_resources_fit(spec: Spec, resources: dict, cluster: dict) -> None:
    """A trial that asks for more than the machine has would wait forever: say so before starting."""
    for key, field in (("cpu", "cpus_per_trial"), ("gpu", "gpus_per_trial")):
        available = cluster.get(key.upper(), 0)
        if resources[key] > available:
            raise UserError(f"{spec.path}: resources.{field}: the value is {resources[key]:g}, but must be <= "
                            f"{available:g}, the {key.upper()}s Ray sees on this machine")


def _searcher(spec: Spec, grace: int, endings: TrialEndings) -> StudySearch:
    options, scheduler = spec.search.searcher, spec.search.scheduler
    rungs = [] if scheduler.type == "fifo" else milestones(grace, scheduler.reduction_factor, scheduler.max_epochs)
    notes = {"metric": spec.search.metric, "direction": spec.search.direction, "max_epochs": scheduler.max_epochs,
             "rungs": list(rungs), "scheduler": scheduler.type, "time_budget_s": spec.search.time_budget_s}
    return StudySearch(spec.experiment_dir, spec.experiment_dir.name, endings, notes,
                       space=DefineByRun(spec.space), metric=spec.search.metric, mode=spec.search.direction,
                       sampler=sampler(options.type, spec.search.seed, options.n_startup_trials,
                                       options.multivariate),
                       points_to_evaluate=[dict(point) for point in spec.search.start_from] or None)


def _scheduler(spec: Spec, grace: int, endings: TrialEndings, progress: Callable[[str], None]):
    options = spec.search.scheduler
    if options.type == "fifo":
        return ResumableFIFO()
    metric, mode = _rung_ranking(spec)
    if options.type == "asha_stopping":
        # By the epoch each result names: a trial resumed from a later checkpoint than Ray recorded counts on from it.
        return RecordingASHA(endings, time_attr="epoch", metric=metric, mode=mode,
                             max_t=options.max_epochs, grace_period=grace, reduction_factor=options.reduction_factor)
    stop_losers = options.type == "asha"
    scheduler = PromotingASHA(metric, mode, options.max_epochs, grace, options.reduction_factor,
                              spec.search.max_concurrent_trials, stop_losers, endings)
    rungs = ", ".join(map(str, scheduler.rungs.milestones)) or "none"
    how = "auto, from the data size and warm-up" if options.grace_period == "auto" else "search.scheduler.grace_period"
    others = "the others stop" if stop_losers else "the others wait, paused, for a later promotion"
    progress(f"tuneprod: trials are compared at epochs {rungs} (first rung: {how}): a trial waits, paused, until "
             f"{scheduler.rungs.peers} have reached its rung; the best 1/{options.reduction_factor:g} go on, {others}")
    return scheduler


def _rung_ranking(spec: Spec) -> tuple[str, str]:
    """The metric and mode that rank trials at the rungs: search.scheduler.rung_metric when set (val_loss lower is
    better, val_acc higher, whatever the search's mode), else the search metric and its direction."""
    rung_metric = spec.search.scheduler.rung_metric
    if rung_metric is None or rung_metric == spec.search.metric:
        return spec.search.metric, spec.search.direction
    return rung_metric, "min" if rung_metric == "val_loss" else "max"
