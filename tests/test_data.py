"""Indexing, the stratified split, RGB loading and decoding to the training size."""
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.helpers import write_image_folder
from tuneprod.data import DataError, decode_resized, index_images, load_rgb, stratified_split


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


def test_stratified_split_is_seeded_and_keeps_every_class_on_both_sides(tmp_path):
    image_set = index_images(write_image_folder(tmp_path / "i", per_class=10))
    train, val = stratified_split(image_set, 0.2, seed=1)
    assert np.bincount(val.labels).tolist() == [2, 2, 2] and np.bincount(train.labels).tolist() == [8, 8, 8]
    assert not set(train.paths) & set(val.paths)
    assert stratified_split(image_set, 0.2, seed=1)[1].paths == val.paths
    assert stratified_split(image_set, 0.2, seed=2)[1].paths != val.paths
    tiny_train, tiny_val = stratified_split(image_set.subset([0, 1, 10, 11, 20, 21]), 0.9, seed=0)
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
