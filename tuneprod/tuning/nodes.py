"""What a search asks of the cluster's other nodes before any trial: that they see the local folders it reads and
writes. A cloud node sees none of the head's disk: without this check, every trial would fail on it with Ray's
"a local path on the head node is not accessible by worker nodes", and its images would not be there either."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Optional

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from tuneprod.spec import Spec, UserError, is_uri
from tuneprod.train.cache import DecodedImages

CHECK_TIMEOUT_S = 120  # a node that cannot run a tiny task in this time is not one to plan for


def _exists(path: str) -> bool:
    return os.path.exists(path)


def check_seen_by_every_node(spec: Spec, images: DecodedImages) -> None:
    """Refuses, in one line, a local --storage folder or local images that some other node cannot see (a bucket,
    or a folder every node mounts, would do). Images from a bucket are fetched by each node itself."""
    others = [node for node in ray.nodes()
              if node["Alive"] and node["NodeID"] != ray.get_runtime_context().get_node_id()]
    if not others:
        return
    marker: Optional[Path] = None
    checks = []  # (field, the folder as the user named it, a path inside it that every node must see)
    if not is_uri(spec.storage):
        storage = Path(spec.storage)
        storage.mkdir(parents=True, exist_ok=True)
        marker = storage / f".tuneprod-seen-{uuid.uuid4().hex[:12]}"  # this folder, not one of the same name
        marker.touch()
        checks.append(("storage", storage, marker, "--storage s3://bucket/prefix"))
    if images.cache.source is None and len(images):
        checks.append(("data.train", spec.data.train_path, images.cache.files()[images.rows[0]],
                       "data.train (or --data) s3://bucket/prefix"))
    try:
        for field, folder, path, bucket in checks:
            seen = ray.get([ray.remote(_exists).options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(str(path)) for node in others], timeout=CHECK_TIMEOUT_S)
            blind = [node["NodeManagerAddress"] for node, ok in zip(others, seen) if not ok]
            if blind:
                raise UserError(f"{field}: {folder} is a folder on this machine, but Ray node(s) "
                                f"{', '.join(sorted(set(blind)))} cannot see it; use a bucket ({bucket}) or a folder "
                                f"every node mounts at the same path (EFS, NFS)")
    finally:
        if marker is not None:
            marker.unlink(missing_ok=True)
