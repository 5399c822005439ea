"""The final stage's members as Ray tasks: each member trains where the cluster has room for it (on a GPU node
when trials get GPUs, so a CPU-only head node never trains), several at once where resources allow. On one
machine the same path runs on the local Ray."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import ray
import torch

from tuneprod.final.stage import MemberPlan, train_member
from tuneprod.spec import Spec
from tuneprod.train.cache import DecodedImages
from tuneprod.tuning.tuner import start_ray, trial_resources

HEARTBEAT_S = 120  # seconds between progress lines while members train


def _member_task(plan: MemberPlan, images: DecodedImages, folder: str) -> float:
    """Trains one member; returns its seconds. Its per-epoch lines stay in the worker's log: relayed by Ray, lines
    from parallel members would interleave and be folded into 'repeated Nx' notes."""
    started = time.perf_counter()
    # The GPUs Ray assigned, not whether one is visible (as for trials).
    device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
    train_member(plan, images, Path(folder), device, progress=lambda _: None)
    return time.perf_counter() - started


def train_members(spec: Spec, plans: list[MemberPlan], images: DecodedImages, folder: Path,
                  progress: Callable[[str], None], address: Optional[str] = None) -> dict[str, str]:
    """Trains every member into folder/<name>; returns {name: why} for those that failed."""
    start_ray(address, progress)
    resources = trial_resources(spec, ray.cluster_resources().get("GPU", 0))
    task = ray.remote(_member_task).options(num_cpus=resources["cpu"], num_gpus=resources["gpu"], max_retries=0)
    pending = {task.remote(plan, images, str(folder / plan.name)): plan for plan in plans}
    try:
        return _collect(pending, len(plans), progress)
    except BaseException:  # Ctrl-C: members must not go on writing into a folder that is being removed
        for ref in pending:
            ray.cancel(ref, force=True)
        raise


def _collect(pending: dict, count: int, progress: Callable[[str], None]) -> dict[str, str]:
    """Waits for the members, popping each from `pending` as it ends; returns {name: why} for the failed."""
    failures, started = {}, time.monotonic()
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=HEARTBEAT_S)
        if not done:  # members can take hours on a GPU: say that they are still going
            progress(f"final: {count - len(pending)}/{count} member(s) trained, "
                     f"{time.monotonic() - started:.0f} s so far")
            continue
        plan = pending.pop(done[0])
        try:
            seconds = ray.get(done[0])
            progress(f"final: {plan.name} trained in {seconds:.0f} s ({count - len(pending)}/{count})")
        except ray.exceptions.RayError as exc:  # the member raised, or its worker died
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            failures[plan.name] = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
            progress(f"final: warning: {failures[plan.name]}; the ensemble goes on without it")
    return failures
