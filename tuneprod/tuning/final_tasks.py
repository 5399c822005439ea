"""The final stage on the cluster: the Ray side of the Ray-free final stage (tuneprod/final). Members train as
Ray tasks where the cluster has room (on a GPU node when trials get GPUs, so a CPU-only head never trains), several
at once where resources allow, each retried from scratch when its worker or node is lost (search.max_failures);
the test images are scored as Ray tasks over shards, with the trials' resources. Nothing travels through a shared
folder: a member's files come back to the driver as the task's result, and each shard carries its images' bytes.
On one machine the same path runs on the local Ray."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import ray
import torch

from tuneprod.final.inference import Scores, Scorer, score_images
from tuneprod.final.stage import MemberPlan, final_stage, load_experiment, predict_test, train_member
from tuneprod.spec import Spec
from tuneprod.train.cache import DecodedImages, localised
from tuneprod.tuning.budget import shard_sizes
from tuneprod.tuning.tuner import member_slots, start_ray, trial_resources

HEARTBEAT_S = 120  # seconds between progress lines while members train


def retrain_and_predict(experiment_dir: Path, progress: Callable[[str], None] = print,
                        images: Optional[DecodedImages] = None, address: Optional[str] = None,
                        auto_members: Optional[int] = None) -> Path:
    """Runs the final stage into final/ on the cluster, then predicts data.test there when it is set.
    `auto_members`: what final.members 'auto' trains (the search's count of what fits; else one per slot)."""
    experiment_dir = Path(experiment_dir)
    spec = localised(load_experiment(experiment_dir), progress)
    start_ray(address, progress)
    folder = final_stage(spec, experiment_dir, progress, images, train_members, member_slots(spec), auto_members)
    predict_test(spec, experiment_dir, progress, cluster_scorer(spec))
    return folder


def _resources(spec: Spec) -> dict:
    resources = trial_resources(spec, ray.cluster_resources().get("GPU", 0))
    return {"num_cpus": resources["cpu"], "num_gpus": resources["gpu"]}


def _device() -> torch.device:
    # The GPUs Ray assigned, not whether one is visible (as for trials).
    return torch.device("cuda" if ray.get_gpu_ids() else "cpu")


def _member_task(plan: MemberPlan, images: DecodedImages) -> tuple[dict[str, bytes], float]:
    """Trains one member in a scratch folder on its node; returns the folder's files and its seconds. Its
    per-epoch lines stay in the worker's log: relayed by Ray, lines from parallel members would interleave."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        folder = train_member(plan, images, Path(scratch) / plan.name, _device(), progress=lambda _: None)
        files = {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*")
                 if path.is_file()}
    return files, time.perf_counter() - started


def train_members(spec: Spec, plans: list[MemberPlan], images: DecodedImages, folder: Path,
                  progress: Callable[[str], None]) -> dict[str, str]:
    """Trains every member into folder/<name>; returns {name: why} for those that failed. A member whose worker or
    node is lost is trained again from scratch, up to search.max_failures times; one that fails by itself (NaN
    loss, out of memory) is not, as it would fail again."""
    task = ray.remote(_member_task).options(**_resources(spec), max_retries=spec.search.max_failures,
                                            retry_exceptions=False)
    pending = {task.remote(plan, images): plan for plan in plans}
    try:
        return _collect(pending, len(plans), folder, progress)
    except BaseException:  # Ctrl-C: members must not go on
        for ref in pending:
            ray.cancel(ref, force=True)
        raise


def _collect(pending: dict, count: int, folder: Path, progress: Callable[[str], None]) -> dict[str, str]:
    """Waits for the members, popping each from `pending` as it ends and writing its files into folder/<name>;
    returns {name: why} for the failed."""
    failures, started = {}, time.monotonic()
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=HEARTBEAT_S)
        if not done:  # members can take hours on a GPU: say that they are still going
            progress(f"final: {count - len(pending)}/{count} member(s) trained, "
                     f"{time.monotonic() - started:.0f} s so far")
            continue
        plan = pending.pop(done[0])
        try:
            files, seconds = ray.get(done[0])
        except ray.exceptions.RayError as exc:  # the member raised, or its worker died more often than allowed
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            failures[plan.name] = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
            progress(f"final: warning: {failures[plan.name]}; the ensemble goes on without it")
            continue
        _write_files(folder / plan.name, files)
        progress(f"final: {plan.name} trained in {seconds:.0f} s ({count - len(pending)}/{count})")
    return failures


def _write_files(folder: Path, files: dict[str, bytes]) -> None:
    for relative, content in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(content)


def _score_shard(model: dict[str, bytes], images: list[tuple[str, Optional[bytes]]], views: Sequence[str],
                 scored: Sequence[str], batch_size: int, workers: int) -> Scores:
    """Scores one shard on its worker: the model and the images written to a scratch folder there (an image the
    driver could not read as a regular file arrives as None, and counts as unreadable)."""
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(scratch) / "model"
        _write_files(model_dir, model)
        paths = []
        for number, (name, content) in enumerate(images):
            path = Path(scratch) / "images" / f"{number}{Path(name).suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            if content is not None:
                path.write_bytes(content)
            paths.append(path)
        return score_images(model_dir, paths, views, scored, batch_size, workers, progress=lambda _: None)


def cluster_scorer(spec: Spec) -> Scorer:
    """Scores images as Ray tasks over shards (budget.shard_sizes), a few in flight per slot, in the order given."""

    def score(model_dir: Path, paths: Sequence[Path], views: Sequence[str], scored: Sequence[str], batch_size: int,
              workers: int, progress: Callable[[str], None]) -> Scores:
        model = ray.put({p.relative_to(model_dir).as_posix(): p.read_bytes() for p in Path(model_dir).rglob("*")
                         if p.is_file()})
        task = ray.remote(_score_shard).options(**_resources(spec), max_retries=spec.search.max_failures,
                                                retry_exceptions=False)
        sizes = shard_sizes(len(paths), member_slots(spec))
        shards = [list(paths[sum(sizes[:n]):sum(sizes[:n + 1])]) for n in range(len(sizes))]
        in_flight = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        refs, results, started = {}, {}, time.monotonic()
        for number, shard in enumerate(shards):
            # Only regular files are read: a named pipe would block, a link loop or a dangling link fails.
            images = [(p.name, p.read_bytes() if p.is_file() else None) for p in shard]
            refs[task.remote(model, images, views, scored, batch_size, workers)] = number
            while len(refs) >= in_flight or (number == len(shards) - 1 and refs):
                done, _ = ray.wait(list(refs), num_returns=1)
                results[refs.pop(done[0])] = ray.get(done[0])
                images_done = sum(len(shards[n]) for n in results)
                progress(f"predict: {len(results)}/{len(shards)} shard(s), {images_done}/{len(paths)} images, "
                         f"{time.monotonic() - started:.0f} s")
        return _merge([results[n] for n in range(len(shards))], [len(s) for s in shards])

    return score


def _merge(parts: list[Scores], sizes: list[int]) -> Scores:
    offsets = [sum(sizes[:n]) for n in range(len(sizes))]
    labels = {name: [label for part in parts for label in part.member_labels[name]]
              for name in (parts[0].member_labels if parts else {})}
    return Scores(torch.cat([part.votes for part in parts]) if parts else torch.zeros(0, 0), labels,
                  [offset + i for part, offset in zip(parts, offsets) for i in part.unreadable])
