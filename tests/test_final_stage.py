"""The final stage assembled from real (tiny) members, trained by a plain loop in place of the Ray tasks: the
ensemble folder, soups, a failing member left out, and nothing left behind when every member fails."""
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from tests.helpers import write_image_folder
from tuneprod.tuning.endings import TrialEndings
from tuneprod.final import artifact
from tuneprod.final.stage import MemberFailed, final_stage, train_member
from tuneprod.spec import UserError, spec_from_dict
from tuneprod.train.cache import decoded
from tuneprod.train.data import index_images
from tuneprod.tuning.results import TrialRecord, trials_table, write_results

NAMES = ["backbone", "pretrained", "lr"]


@pytest.fixture
def experiment(tmp_path, monkeypatch):
    images = decoded(index_images(write_image_folder(tmp_path / "images", per_class=4)), 24)
    # "Pretrained" weights for test_resnet, so that members share a start and can be souped.
    weights = tmp_path / "weights"
    weights.mkdir()
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()},
              str(weights / "test_resnet.safetensors"))
    monkeypatch.setenv("TUNEPROD_WEIGHTS", str(weights))
    records = [TrialRecord(str(n), {"backbone": "test_resnet", "pretrained": True, "lr": lr},
                           [{"epoch": 1, "val_acc": acc}])
               for n, (lr, acc) in enumerate([(0.01, 0.9), (0.02, 0.8), (0.03, 0.7)])]
    write_results(tmp_path, trials_table(records, NAMES, "val_acc", "max", TrialEndings(None, 1)), NAMES, "val_acc")

    def local_members(spec, plans, labelled, folder, progress):
        failures = {}
        for plan in plans:
            try:
                if plan.config.hp.lr == 0.02:  # stands in for a member whose loss turned NaN
                    raise MemberFailed(f"{plan.name} failed at epoch 1: NonFiniteLoss")
                train_member(plan, labelled, folder / plan.name, torch.device("cpu"), progress)
            except MemberFailed as exc:
                failures[plan.name] = str(exc)
        return failures

    return tmp_path, images, local_members


def spec_for(final: dict):
    return spec_from_dict({"data": {"train": "x", "image_size": 24}, "final": final,
                           "space": {"backbone": "test_resnet", "pretrained": True,
                                     "lr": {"choice": [0.01, 0.02, 0.03]}, "batch_size": 4}}, Path("s.yaml"))


def test_members_vote_soups_stand_in_and_a_failed_member_is_left_out(experiment):
    folder, images, local_members = experiment
    lines = []
    spec = spec_for({"members": 3, "tta": ["flip", "scale"], "soup": True})
    final = final_stage(spec, folder, lines.append, images, local_members)
    description = json.loads((final / "ensemble.json").read_text())
    assert description["members"] == ["member_1", "member_3"]  # member_2 (lr 0.02) failed
    assert description["soups"] == {"soup_1": ["member_1", "member_3"]}
    assert description["vote"] == ["soup_1"] and description["tta"] == ["flip", "scale"]
    ensemble = artifact.load(final, torch.device("cpu"))
    soup = ensemble.members["soup_1"].model.state_dict()
    first, third = (ensemble.members[m].model.state_dict() for m in ("member_1", "member_3"))
    assert torch.allclose(soup["fc.weight"], (first["fc.weight"] + third["fc.weight"]) / 2, atol=1e-6)
    assert any("soup_1 averages member_1, member_3" in line for line in lines)
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # no staging left


def test_every_member_failing_saves_nothing(experiment):
    folder, images, local_members = experiment
    spec = spec_for({"members": 3, "epochs": 1})
    (folder / "final").mkdir()
    (folder / "final" / "ensemble.json").write_text("{}")  # an earlier final stage stays as it was
    failing = TrialRecord("x", {"backbone": "test_resnet", "pretrained": True, "lr": 0.02},
                          [{"epoch": 1, "val_acc": 0.5}])
    write_results(folder, trials_table([failing], NAMES, "val_acc", "max", TrialEndings(None, 1)), NAMES, "val_acc")
    with pytest.raises(UserError, match="every member failed"):
        final_stage(spec, folder, lambda _: None, images, local_members)
    assert (folder / "final" / "ensemble.json").read_text() == "{}"
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []
