"""cluster.yaml as Ray's own cluster launcher reads it: `ray up` runs prepare_config and validate_config (offline
for AWS when every node type states its resources)."""
import copy

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.helpers import ROOT


@pytest.fixture
def cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_ray_accepts_the_cluster_file(cluster):
    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert types[prepared["head_node_type"]]["resources"] == {"CPU": 0}  # no trial lands on the head
    workers = [t for name, t in types.items() if name != prepared["head_node_type"]]
    assert workers and all(t["resources"].get("GPU", 0) >= 1 and t["resources"]["CPU"] >= 4 for t in workers)
    assert any("pip install" in command and "tuneprod" in command for command in prepared["setup_commands"])
    # No shared folder: every node reaches the bucket through its instance profile, and joins with the token.
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())
    assert "~/.ray/auth_token" in prepared["file_mounts"]
    for commands in (prepared["head_start_ray_commands"], prepared["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token ray start" in command for command in commands)


def test_ray_refuses_a_broken_one(cluster):
    cluster["available_node_types"]["gpu_worker"]["max_workers"] = "many"
    with pytest.raises(Exception, match="many"):
        validate_config(prepare_config(cluster))
