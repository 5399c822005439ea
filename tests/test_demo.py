"""Tests of the synthetic retail product image set."""

import csv
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from tuneprod import demo
from tuneprod.demo import class_designs, generate_demo, render_view

SMALL = {"classes": 4, "train_per_class": 4, "test_per_class": 3, "size": 32}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """One small generated set, shared by the read-only tests."""
    out_dir = tmp_path_factory.mktemp("shared") / "demo"
    return out_dir, generate_demo(out_dir, seed=1, **SMALL)


def read_labels(test_dir):
    """Rows of test_labels.csv as (file, label) pairs, after checking the header."""
    with open(test_dir / "test_labels.csv", newline="") as labels:
        rows = list(csv.reader(labels))
    assert rows[0] == ["file", "label"]
    return [tuple(row) for row in rows[1:]]


def all_bytes(directory):
    """Every file under `directory`, by relative path, with its bytes."""
    return {str(path.relative_to(directory)): path.read_bytes()
            for path in sorted(directory.rglob("*")) if path.is_file()}


def test_summary_and_train_folders_match_arguments(small_set):
    out_dir, summary = small_set
    assert summary == {"classes": 4, "train_images": 16, "test_images": 12, "size": 32, "path": str(out_dir)}
    class_dirs = sorted((out_dir / "train").iterdir())
    assert len(class_dirs) == 4
    assert all(len(list(class_dir.glob("*.png"))) == 4 for class_dir in class_dirs)


def test_test_labels_match_test_files_and_cover_every_class(small_set):
    out_dir, _ = small_set
    test_dir = out_dir / "test"
    rows = read_labels(test_dir)
    pngs = {path.name for path in test_dir.glob("*.png")}
    assert {file for file, _ in rows} == pngs
    assert len(rows) == len(pngs) == 12
    class_names = {path.name for path in (out_dir / "train").iterdir()}
    assert Counter(label for _, label in rows) == {name: 3 for name in class_names}


def test_train_manifest_lists_every_photo_with_its_elevation(small_set):
    out_dir, _ = small_set
    with open(out_dir / "train.csv", newline="") as manifest:
        rows = list(csv.DictReader(manifest))
    assert {row["path"] for row in rows} == {p.relative_to(out_dir).as_posix() for p in (out_dir / "train").rglob("*.png")}
    assert all(row["path"].split("/")[1] == row["label"] for row in rows)
    for name in {row["label"] for row in rows}:  # 4 views a class, elevations taken in turn
        assert Counter(row["elevation"] for row in rows if row["label"] == name) == {"0": 2, "30": 2}


def test_test_file_names_do_not_leak_labels(small_set):
    out_dir, _ = small_set
    class_names = [path.name for path in (out_dir / "train").iterdir()]
    for path in (out_dir / "test").glob("*.png"):
        assert re.fullmatch(r"test_\d{5}\.png", path.name)
        assert not any(name in path.name for name in class_names)


def test_images_are_rgb_of_requested_size(small_set):
    out_dir, _ = small_set
    for path in out_dir.rglob("*.png"):
        with Image.open(path) as image:
            assert image.mode == "RGB"
            assert image.size == (32, 32)


def test_same_seed_gives_same_bytes_and_other_seed_differs(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        generate_demo(tmp_path / name, seed=seed, **SMALL)
    first_files = all_bytes(tmp_path / "a")
    assert len(first_files) == 16 + 12 + 2  # images, test_labels.csv, train.csv
    assert first_files == all_bytes(tmp_path / "b")
    first_pngs = {data for name, data in first_files.items() if name.endswith(".png")}
    other_pngs = {data for name, data in all_bytes(tmp_path / "c").items() if name.endswith(".png")}
    assert not first_pngs & other_pngs


def test_high_elevation_changes_a_can_more_than_turning_it_a_little():
    can = next(design for design in class_designs(4, seed=0) if design.shape == "can")

    def view(azimuth, elevation):
        # Same generator seed: same light, background, scale and noise.
        return render_view(can, azimuth, elevation, 32, np.random.default_rng(7)).astype(float)

    level = view(40, 0)
    turned = np.abs(level - view(50, 0)).mean()
    from_above = np.abs(level - view(40, 60)).mean()
    assert level.shape == (32, 32, 3)
    assert from_above > 2 * turned


def test_views_spread_azimuths_and_cycle_elevations():
    views = demo._views(np.random.default_rng(0), 12, demo.TEST_ELEVATIONS)
    assert Counter(elevation for _, elevation in views) == {0.0: 4, 30.0: 4, 60.0: 4}
    azimuths = np.sort([azimuth for azimuth, _ in views])
    gaps = np.diff(np.append(azimuths, azimuths[0] + 360))
    assert azimuths.min() >= 0 and azimuths.max() < 360
    assert gaps.max() < 2 * 360 / 12


def test_designs_are_unique_and_share_shapes_and_body_colours():
    designs = class_designs(10, seed=0)
    assert len({design.name for design in designs}) == 10
    assert len({design.signature for design in designs}) == 10
    assert all(design.name.replace("_", "").isalnum() for design in designs)
    assert max(Counter(design.shape for design in designs).values()) >= 3
    assert max(Counter(design.body for design in designs).values()) >= 3
    assert max(Counter((design.shape, design.body) for design in designs).values()) >= 2


def test_existing_non_empty_out_dir_is_refused(tmp_path):
    out_dir = tmp_path / "demo"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_demo(out_dir, **SMALL)
    assert [path.name for path in out_dir.iterdir()] == ["keep.txt"]
    assert [path.name for path in tmp_path.iterdir()] == ["demo"]


def test_empty_out_dir_and_missing_parents_are_fine_and_no_temp_dir_remains(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    generate_demo(empty, **SMALL)
    generate_demo(tmp_path / "deep" / "er", **SMALL)
    assert (empty / "test" / "test_labels.csv").is_file()
    assert (tmp_path / "deep" / "er" / "train").is_dir()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["deep", "empty"]
    assert [path.name for path in (tmp_path / "deep").iterdir()] == ["er"]


def test_failure_midway_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []

    def failing_render(*args):
        calls.append(args)
        if len(calls) == 5:
            raise RuntimeError("interrupted")
        return render_view(*args)

    monkeypatch.setattr(demo, "render_view", failing_render)
    with pytest.raises(RuntimeError, match="interrupted"):
        generate_demo(tmp_path / "demo", **SMALL)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argument, value", [
    ("classes", 1), ("train_per_class", 1), ("test_per_class", 0), ("size", 15), ("classes", 2.5),
])
def test_bad_argument_is_named(tmp_path, argument, value):
    arguments = {**SMALL, argument: value}
    with pytest.raises(ValueError, match=f"^{argument}: the value is {value}"):
        generate_demo(tmp_path / "demo", **arguments)
    assert list(tmp_path.iterdir()) == []
