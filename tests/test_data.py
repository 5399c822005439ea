"""Indexing, the stratified split, RGB loading and decoding to the training size."""
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.helpers import write_image_folder
from tuneprod.train.data import DataError, decode_resized, grouped_split, index_images, load_rgb, validation_split


def test_folder_index_labels_by_sorted_class_folder(image_folder):
    image_set = index_images(image_folder)
    assert image_set.classes == ("blue", "green", "red")
    assert len(image_set) == 18
    assert all(image_set.classes[label] == path.parent.name for path, label in zip(image_set.paths, image_set.labels))


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_manifest_paths_are_relative_to_the_manifest(image_folder, suffix):
    rows = [{"path": f"images/{p.parent.name}/{p.name}", "label": p.parent.name}
            for p in sorted(image_folder.rglob("*.png"))]
    manifest = image_folder.parent / f"manifest{suffix}"
    table = pd.DataFrame(rows)
    table.to_csv(manifest, index=False) if suffix == ".csv" else table.to_parquet(manifest)
    image_set = index_images(manifest)
    assert len(image_set) == 18 and image_set.classes == ("blue", "green", "red")
    assert all(p.is_file() for p in image_set.paths)


def test_manifest_errors(tmp_path, image_folder):
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,label\na.png,x\n")
    with pytest.raises(DataError, match="lacks the column"):
        index_images(manifest)
    manifest.write_text("path,label\nmissing.png,x\nmissing2.png,x\n")
    with pytest.raises(DataError, match="2 file.* do not exist"):
        index_images(manifest)


def test_missing_path_empty_folder_and_small_class(tmp_path, image_folder):
    with pytest.raises(DataError, match="does not exist"):
        index_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders with images"):
        index_images(tmp_path / "empty")
    for extra in list((image_folder / "red").iterdir())[1:]:
        extra.unlink()
    with pytest.raises(DataError, match=r"at least 2 readable images.*red \(1\)"):
        index_images(image_folder)


def test_single_class_is_an_error(tmp_path):
    root = write_image_folder(tmp_path / "one")
    for name in ("green", "blue"):
        for f in (root / name).iterdir():
            f.unlink()
        (root / name).rmdir()
    with pytest.raises(DataError, match="only the class 'red'"):
        index_images(root)


def test_validation_split_is_seeded_and_keeps_every_class_on_both_sides(tmp_path):
    image_set = index_images(write_image_folder(tmp_path / "i", per_class=10))
    train, val = validation_split(image_set, 0.2, seed=1)
    assert np.bincount(val.labels).tolist() == [2, 2, 2] and np.bincount(train.labels).tolist() == [8, 8, 8]
    assert not set(train.paths) & set(val.paths)
    assert validation_split(image_set, 0.2, seed=1)[1].paths == val.paths
    assert validation_split(image_set, 0.2, seed=2)[1].paths != val.paths
    tiny_train, tiny_val = validation_split(image_set.subset([0, 1, 10, 11, 20, 21]), 0.9, seed=0)
    assert len(tiny_train) == 3 and len(tiny_val) == 3  # at least one image stays on each side


@pytest.mark.parametrize("mode, suffix", [("L", "png"), ("P", "png"), ("RGBA", "png"), ("CMYK", "jpg"),
                                          ("LA", "png"), ("RGB", "webp"), ("RGB", "bmp")])
def test_any_mode_loads_as_rgb(tmp_path, mode, suffix):
    path = tmp_path / f"x.{suffix}"
    Image.new("RGB", (7, 5), (200, 30, 30)).convert(mode).save(path)
    pixels = load_rgb(path)
    assert pixels.shape == (5, 7, 3) and pixels.dtype == np.uint8
    grey = mode in ("L", "LA")
    assert abs(int(pixels[2, 3, 0]) - (89 if grey else 200)) < 12  # the colour survives, not just the shape


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    assert (load_rgb(path) == 40000 // 256).all()


def test_transparent_background_becomes_white(tmp_path):
    path = tmp_path / "t.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(path)
    assert (load_rgb(path) == 255).all()


@pytest.mark.parametrize("shape", [(300, 200), (20, 30), (64, 64)])
def test_decode_resized_gives_the_square_training_size(tmp_path, shape):
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.full((*shape, 3), 128, dtype=np.uint8)).save(path, quality=95)
    pixels = decode_resized(path, 64)
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    assert abs(int(pixels.mean()) - 128) <= 2  # a reduced-scale JPEG decode keeps the content


# ------------------------------------------------------------------------ shift-aware validation (val_groups)
def test_grouped_split_holds_out_whole_groups_per_class():
    # Class 0: groups a (3 images), b (2), c (1); class 1: groups x (2), y (2).
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    groups = np.array(["a", "a", "a", "b", "b", "c", "x", "x", "y", "y"])
    for seed in range(20):
        train, val = grouped_split(labels, groups, 0.25, seed, ("p", "q"))
        assert sorted(train + val) == list(range(10)) and not set(train) & set(val)
        for label in (0, 1):
            val_groups = {groups[i] for i in val if labels[i] == label}
            train_groups = {groups[i] for i in train if labels[i] == label}
            assert val_groups and train_groups and not val_groups & train_groups
        # Class 1 needs round(4 * 0.25) = 1 image: one whole group of 2 is held out, never both.
        assert len([i for i in val if labels[i] == 1]) == 2


def test_grouped_split_takes_groups_until_the_fraction_is_reached():
    labels = np.zeros(8, dtype=int)
    groups = np.array(list("abcdefgh"))  # one image per group: like an image split
    train, val = grouped_split(labels, groups, 0.5, 0, ("p",))
    assert len(val) == 4 and len(train) == 4
    assert grouped_split(labels, groups, 0.5, 0, ("p",)) == (train, val)  # seeded
    assert any(grouped_split(labels, groups, 0.5, seed, ("p",))[1] != val for seed in range(1, 5))
    train, val = grouped_split(labels, groups, 0.99, 0, ("p",))
    assert len(train) == 1  # at least one group always trains


def test_grouped_split_refuses_a_class_with_one_group():
    with pytest.raises(DataError, match=r"data.val_groups: class 'q' has all its 2 images in the one group 'x'"):
        grouped_split(np.array([0, 0, 1, 1]), np.array(["a", "b", "x", "x"]), 0.5, 0, ("p", "q"))


def grouped_manifest(image_folder, tmp_path, views):
    paths = sorted(image_folder.rglob("*.png"))
    table = pd.DataFrame({"path": [p.relative_to(tmp_path).as_posix() for p in paths],
                          "label": [p.parent.name for p in paths],
                          "view": [views[i % len(views)] for i in range(len(paths))]})
    table.to_csv(tmp_path / "m.csv", index=False)
    return tmp_path / "m.csv"


def test_val_groups_from_a_manifest_column(image_folder, tmp_path):
    image_set = index_images(grouped_manifest(image_folder, tmp_path, ["front", "top", "side"]),
                             val_groups="view")
    assert set(image_set.groups) == {"front", "top", "side"}
    train, val = validation_split(image_set, 0.3, seed=0)
    for label in range(3):
        held = {g for g, l in zip(val.groups, val.labels) if l == label}
        kept = {g for g, l in zip(train.groups, train.labels) if l == label}
        assert held and kept and not held & kept


def test_val_groups_from_a_path_regex(image_folder):
    # Files are 0.png .. 5.png: group by even/odd last digit.
    image_set = index_images(image_folder, val_groups=r"/(\d)\.png$")
    assert image_set.groups[:6] == ("0", "1", "2", "3", "4", "5")
    image_set = index_images(image_folder, val_groups=r"^(\w+)/")  # the class folder: one group per class
    with pytest.raises(DataError, match="has all its 6 images in the one group 'blue'"):
        validation_split(image_set, 0.2, seed=0)


@pytest.mark.parametrize("pattern, message", [
    ("view", r"it has no \(group\)"),  # a folder has no columns, so this is a regex without a group
    (r"(\d+)deg", r"but matches no image path \(e.g. not 'blue/0.png'\)"),
    (r"/([0-2])\.png", r"matches 9 of 18 image paths"),
    ("([", "must be a regular expression with a group"),
    (r"\d", "it has no \\(group\\)"),
])
def test_bad_val_groups_are_one_line_errors(image_folder, pattern, message):
    with pytest.raises(DataError, match=message) as caught:
        index_images(image_folder, val_groups=pattern)
    assert "\n" not in str(caught.value) and str(caught.value).startswith("data.val_groups: ")


def test_unknown_manifest_column_names_the_columns(image_folder, tmp_path):
    with pytest.raises(DataError, match=r"must be a column of the manifest \(view\) or a regular expression"):
        index_images(grouped_manifest(image_folder, tmp_path, ["a", "b"]), val_groups="viewpoint")
