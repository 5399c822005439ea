"""The search-space YAML: the shipped files load, and bad input fails with one line naming file and field."""
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from tests.helpers import SEARCH_SPACES
from tuneprod.spec import PARAMS, Hyperparams, SpecError, load_spec


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def error_for(tmp_path: Path, text: str) -> str:
    with pytest.raises(SpecError) as caught:
        load_spec(write(tmp_path, text))
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", ["demo.yaml", "effnet.yaml", "cpu.yaml"])
def test_shipped_spaces_load(name):
    spec = load_spec(SEARCH_SPACES / name)
    assert spec.name == Path(name).stem
    assert spec.data.train_path.is_absolute()
    assert "lr" in [d.name for d in spec.space.dimensions]


def test_effnet_starts_from_the_seed_recipe():
    spec = load_spec(SEARCH_SPACES / "effnet.yaml")
    first = spec.search.start_from[0]
    assert (first["backbone"], first["optimizer"], first["lr"], first["batch_size"], first["dropout"]) == \
        ("efficientnet_b2", "adam", 1e-4, 32, 0.3)
    assert spec.data.image_size == 256


def test_every_hyperparameter_has_a_rule():
    assert set(PARAMS) == {f.name for f in fields(Hyperparams)}


def test_scientific_notation_is_a_float(tmp_path):
    spec = load_spec(write(tmp_path, "data: {train: x}\nspace:\n  lr: 1e-4\n"))
    assert spec.space.fixed["lr"] == pytest.approx(1e-4)


@pytest.mark.parametrize("text, expected", [
    ("data: {train: x}\nspace:\n  lr: -1\n", "space.yaml: space.lr: the value is -1, but must be > 0"),
    ("data: {train: x}\nsearch: {foo: 1}\n", "space.yaml: search.foo: unknown key"),
    ("data: {train: x}\nspace:\n  lrr: 0.1\n", "space.lrr: unknown parameter (did you mean lr?)"),
    ("data: {train: x, val_fraction: 1.5}\n", "data.val_fraction: the value is 1.5, but must be < 1"),
    ("data: {train: x}\nspace:\n  optimizer: rmsprop\n", "space.optimizer: the value is 'rmsprop', but must be one of"),
    ("data: {train: x}\nspace:\n  batch_size: {int: [64, 16]}\n", "space.batch_size.int: the value is [64, 16]"),
    ("data: {train: x}\nspace:\n  lr: {loguniform: [0, 1]}\n", "low > 0 on a log scale"),
    ("data: {train: x}\nspace:\n  lr: {normal: [0, 1]}\n", "space.lr.normal: unknown key"),
    ("data: {train: x}\nspace:\n  dropout: {choice: [0.1, 1.5]}\n", "space.dropout.choice: the value is 1.5"),
    ("data: {train: x}\nspace:\n  backbone: resnet_5000\n", "space.backbone: the value is 'resnet_5000', but must be a timm model"),
    ("data: {train: x}\nspace:\n  momentum: {uniform: [0.8, 0.9], when: {optimiser: sgd}}\n",
     "space.momentum.when.optimiser: the value is 'optimiser', but must name another parameter of space"),
    ("data: {train: x}\nspace:\n  momentum: {uniform: [0.8, 0.9], when: {nesterov: true}}\n"
     "  nesterov: {choice: [true, false], when: {momentum: 0.9}}\n", "the conditions form a cycle"),
    ("data: {train: x}\nsearch: {scheduler: {max_epochs: 2, grace_period: 3}}\n", "grace_period: the value is 3, but must be <= "),
    ("data: {train: x}\nresources: {gpus_per_trial: -1}\n", "resources.gpus_per_trial: the value is -1, but must be 'auto'"),
    ("data: {image_size: 32}\n", "data.train: missing"),
    ("data: {train: x}\nsearch: {start_from: [{optimizer: adam}]}\nspace:\n  optimizer: {choice: [sgd, adamw]}\n",
     "search.start_from[0].optimizer: the value is 'adam', but must be one of ['sgd', 'adamw']"),
    ("data: {train: x}\nsearch: {start_from: [{lr: 1.0}]}\nspace:\n  lr: {loguniform: [1e-4, 1e-2]}\n",
     "search.start_from[0].lr: the value is 1.0, but must be within space.lr"),
    ("data: {train: x}\nsearch: {start_from: [{pretrained: true}]}\nspace:\n  pretrained: false\n",
     "search.start_from[0].pretrained: the value is True, but must be False (space.pretrained fixes it)"),
    ("data: {train: x}\nspace:\n  batch_size: .inf\n", "space.batch_size: the value is inf, but must be a finite"),
    ("data: {train: x}\nspace:\n  batch_size: .nan\n", "space.batch_size: the value is nan, but must be a finite"),
    ("data: {train: x}\nspace:\n  momentum: {uniform: [0.8, 0.9], when: {optimizer: SGD}}\n"
     "  optimizer: {choice: [sgd, adam]}\n",
     "space.momentum.when.optimizer: the value is 'SGD', but must be one of the values space.optimizer takes"),
    ("data: {train: x}\nsearch: {start_from: [{weight_decay: 0.1}]}\nspace:\n  lr: 0.1\n",
     "search.start_from[0].weight_decay: the value is 0.1, but weight_decay is not in space"),
    ("data: {train: x}\nresources: {gpus_per_trial: half}\n",
     "resources.gpus_per_trial: the value is 'half', but must be 'auto' or a fraction of one GPU in [0, 1]"),
    ("data: {train: x}\nresources: {gpus_per_trial: 2}\n", "resources.gpus_per_trial: the value is 2"),
    ("data: {train: x}\nretrain: {epochs: many}\n", "retrain.epochs: the value is 'many', but must be 'auto', 'best' or an integer"),
    ("data: {train: x}\nfinal: {members: 0}\n", "final.members: the value is 0, but must be 'auto' or an integer >= 1"),
    ("data: {train: x}\nfinal: {members: auto, seeds: 3}\n", "final.seeds: the value is 3, but with final.members: auto"),
    ("data: {train: x}\nsearch: {time_budget_s: 60}\nfinal: {members: 2, time_share: 0.4}\n",
     "final.time_share: the value is 0.4, but only final.members: auto can use the time it keeps"),
    ("data: {train: x}\nfinal: {members: auto, time_share: 0.4}\n",
     "final.time_share: the value is 0.4, but it is a share of search.time_budget_s, which is not set"),
    ("data: {train: x}\nsearch: {time_budget_s: 60}\nfinal: {members: auto, time_share: 1}\n",
     "final.time_share: the value is 1, but must be < 1"),
    ("data: {train: x}\nfinal: {tta: [flip, spin]}\n", "final.tta: the value is ['flip', 'spin'], but must be a list of views"),
    ("data: {train: x}\nfinal: {soups: true}\n", "final.soups: unknown key"),
    ("data: {train: x}\nfinal: {}\nretrain: {}\n", "retrain: the older name of the final section; keep only final"),
    ("data: {train: x, val_groups: ''}\n", "data.val_groups: the value is '', but must be"),
    ("data: {train: x}\nname: 2024\n", "name: the value is 2024, but must be a string"),
    ("data: [1,\n", "space.yaml: not valid YAML at line 2"),
    ("- just a list\n", "must hold a mapping"),
])
def test_bad_input_gives_one_line_naming_the_field(tmp_path, text, expected):
    assert expected in error_for(tmp_path, text)


def test_conditions_may_come_before_the_parameter_they_name(tmp_path):
    spec = load_spec(write(tmp_path, "data: {train: x}\nspace:\n  momentum: {uniform: [0.8, 0.9], when: "
                                     "{optimizer: sgd}}\n  lr: 0.1\n  optimizer: {choice: [sgd, adam]}\n"))
    assert [d.name for d in spec.space.dimensions] == ["optimizer", "momentum"]


def test_missing_file_or_a_folder_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "absent.yaml")
    with pytest.raises(SpecError, match="cannot read it"):
        load_spec(tmp_path)


def test_integer_parameters_get_integers(tmp_path):
    spec = load_spec(write(tmp_path, "data: {train: x}\nsearch: {start_from: [{batch_size: 32.0}]}\nspace:\n"
                                     "  batch_size: {choice: [1e2, 32]}\n  dropout: 0\n"))
    assert [type(v) for v in spec.space.dimensions[0].values] == [int, int]
    assert type(spec.search.start_from[0]["batch_size"]) is int and type(spec.space.fixed["dropout"]) is float


def test_readme_example_is_a_valid_space(tmp_path):
    readme = (SEARCH_SPACES.parent / "README.md").read_text()
    example = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    spec = load_spec(write(tmp_path, example))
    assert "momentum" in [d.name for d in spec.space.dimensions]


def test_overrides_fill_an_empty_section_and_refuse_a_scalar_one(tmp_path):
    spec = load_spec(write(tmp_path, "data:\nsearch:\n"), {"data.train": "imgs", "search.num_samples": 3})
    assert spec.data.train.name == "imgs" and spec.search.num_samples == 3
    with pytest.raises(SpecError, match="space.yaml: search: the value is 5, but must be a mapping"):
        load_spec(write(tmp_path, "data: {train: x}\nsearch: 5\n"), {"search.num_samples": 3})


def test_overrides_replace_fields_before_validation(tmp_path):
    path = write(tmp_path, "data: {train: a, test: b}\nsearch: {num_samples: 5}\n")
    spec = load_spec(path, {"data.train": str(tmp_path / "other"), "data.test": None, "search.num_samples": 2})
    assert spec.data.train == tmp_path / "other" and spec.data.test is None and spec.search.num_samples == 2
    with pytest.raises(SpecError, match="search.num_samples: the value is 0, but must be >= 1"):
        load_spec(path, {"search.num_samples": 0})


def test_demo_folder_supplies_train_and_test(tmp_path):
    spec = load_spec(write(tmp_path, "data: {demo: d}\n"))
    assert spec.data.train_path == Path.cwd() / "d" / "train.csv"  # the manifest, with each photo's elevation
    assert spec.data.test_path == Path.cwd() / "d" / "test"


def test_saved_document_reloads_to_the_same_spec(tmp_path):
    spec = load_spec(SEARCH_SPACES / "demo.yaml")
    copy = tmp_path / "copy.yaml"
    spec.save(copy)
    again = load_spec(copy)
    assert (again.space, again.data, again.search, again.name) == (spec.space, spec.data, spec.search, spec.name)
    assert yaml.safe_load(copy.read_text())["data"]["demo"] == str(spec.data.demo)
