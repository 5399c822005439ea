"""A corpus of bad inputs, each given to `tuneprod search --data` as a user would: it must be handled (silently
where the image is fine, with a warning that names the files where something is skipped) or refused with a
one-line error and exit status 2; never a hang, never a traceback. The command runs for real up to the moment Ray
would start (every data check is done by then), in a subprocess with a time limit. Slow: about 3 minutes."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import shrunk_space, write_image_folder

pytestmark = pytest.mark.slow  # a fresh interpreter per case (torch and Ray imports): about 5 s each

UNTIL_RAY = """
import sys
import tuneprod.tuning.tuner as tuner
class DataChecked(Exception):
    pass
def checked(*args, **kwargs):
    raise DataChecked
tuner.start_ray = checked
from tuneprod.cli import main
try:
    sys.exit(main(sys.argv[1:]))
except DataChecked:
    print("tuneprod: the data passed its checks")
"""


def image(path: Path, mode="RGB", size=(24, 24), **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 120 if mode in ("L", "P") else None).save(path, **save)
    return path


def exif_rotated(path):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    return image(path, size=(24, 16), exif=exif)


def sixteen_bit(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((24, 24), 40000, dtype=np.uint16)).save(path)
    return path


def manifest(root, rows, header="path,label"):
    train = root / "train"
    (train / "manifest.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    return train / "manifest.csv"


def manifest_of_folder(root, extra=(), header="path,label"):
    rows = [f"{p.relative_to(root / 'train').as_posix()},{p.parent.name}" for p in sorted((root / "train").rglob("*.png"))]
    return manifest(root, rows + list(extra), header)


def loop(path):
    path.symlink_to(path)
    return path


# name: (what to do to a good data folder root/{train,test}, expectation, fragments the output must hold)
CASES = {
    "truncated PNG": (lambda r: (r / "train/red/t.png").write_bytes((r / "train/red/0.png").read_bytes()[:50]),
                      "warn", ["t.png"]),
    "zero-byte JPEG": (lambda r: (r / "train/red/z.jpg").write_bytes(b""), "warn", ["z.jpg"]),
    "text named .jpg": (lambda r: (r / "train/red/notes.jpg").write_text("hello"), "warn", ["notes.jpg"]),
    "CMYK JPEG": (lambda r: image(r / "train/red/cmyk.jpg", "CMYK"), "ok", []),
    "16-bit PNG": (lambda r: sixteen_bit(r / "train/red/deep.png"), "ok", []),
    "palette PNG": (lambda r: image(r / "train/red/pal.png", "P"), "ok", []),
    "alpha PNG": (lambda r: image(r / "train/red/alpha.png", "RGBA"), "ok", []),
    "EXIF-rotated JPEG": (lambda r: exif_rotated(r / "train/red/rot.jpg"), "ok", []),
    "1x1 image": (lambda r: image(r / "train/red/dot.png", size=(1, 1)), "ok", []),
    "12000x12000 JPEG": (lambda r: image(r / "train/red/huge.jpg", "L", size=(12000, 12000)), "ok", []),
    "named pipe": (lambda r: os.mkfifo(r / "train/red/pipe.png"), "warn", ["pipe.png"]),
    "symlink loop": (lambda r: loop(r / "train/red/loop.png"), "warn", ["loop.png"]),
    "dangling symlink": (lambda r: (r / "train/red/gone.png").symlink_to(r / "nowhere.png"), "warn", ["gone.png"]),
    "empty class folder": (lambda r: (r / "train/purple").mkdir(), "warn", ["purple"]),
    "one-image class": (lambda r: image(r / "train/solo/0.png"), "error", ["solo (1)"]),
    "all-corrupt class": (lambda r: [(r / f"train/bad/{i}.png").parent.mkdir(exist_ok=True) or
                                     (r / f"train/bad/{i}.png").write_bytes(b"x") for i in range(3)],
                          "error", ["bad (0)"]),
    "image outside any class folder": (lambda r: image(r / "train/loose.png"), "warn", ["loose.png"]),
    "OS junk files": (lambda r: [(r / "train/red" / n).write_bytes(b"junk")
                                 for n in (".DS_Store", "Thumbs.db", "desktop.ini", "._0.png")], "ok", []),
    "unicode names": (lambda r: (r / "train/blue").rename(r / "train/café ñandú 日本")
                      or image(r / "train/café ñandú 日本/ü 1.png"), "ok", []),
    "manifest: missing rows' files": (lambda r: manifest_of_folder(r, ["red/absent.png,red"]), "error",
                                      ["do not exist", "absent.png"]),
    "manifest: wrong columns": (lambda r: manifest_of_folder(r, header="file,class"), "error",
                                ["lacks the column(s) label, path"]),
    "manifest: duplicate rows": (lambda r: manifest_of_folder(r, ["red/0.png,red", "red/1.png,red"]), "warn",
                                 ["2 repeated row(s)"]),
    "manifest: one image, two labels": (lambda r: manifest_of_folder(r, ["red/0.png,green"]), "error",
                                        ["two labels", "'red' and 'green'"]),
    "manifest: label with a separator": (lambda r: manifest(r, ["red/0.png,red|x", "red/1.png,red|x",
                                                                "green/0.png,green", "green/1.png,green"]),
                                         "error", ["'red|x'", "must not contain '|'"]),
    "manifest: not a table": (lambda r: (r / "train/manifest.csv").write_bytes(b"\x00\xff\x10 garbage\n\"x"),
                              "error", ["manifest.csv"]),
    "test set: missing folder": (lambda r: shutil.rmtree(r / "test"), "ok", []),  # --data: no test/, none asked
    "test set: no images": (lambda r: [p.unlink() for p in (r / "test").iterdir()], "error",
                            ["data.test", "must be a folder holding images"]),
    "test set: a corrupt image": (lambda r: (r / "test/broken.jpg").write_bytes(b"nope"), "ok", []),
    "test set: labels naming unknown classes": (lambda r: (r / "test/test_labels.csv").write_text(
        "file,label\nt0.png,red\nt1.png,mauve\n"), "warn", ["no class for: mauve"]),
    "test set: labels file without its columns": (lambda r: (r / "test/test_labels.csv").write_text("a,b\n1,2\n"),
                                                  "error", ["test_labels.csv: must have columns file,label"]),
}


def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_image_folder(root / "train", per_class=4, size=24)
    (root / "test").mkdir()
    for i in range(2):
        shutil.copy(root / "train" / "red" / f"{i}.png", root / "test" / f"t{i}.png")
    return root


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_handled_or_refused_in_one_line(case, tmp_path):
    make, expected, fragments = CASES[case]
    root = data_root(tmp_path)
    make(root)
    data = root / "train" / "manifest.csv" if (root / "train" / "manifest.csv").exists() else root
    space = shrunk_space("demo.yaml", tmp_path, data={"image_size": 32, "val_groups": None})
    args = ["search", str(space), "--data", str(data), "--storage", str(tmp_path / "runs")]
    if data != root and (root / "test").is_dir():
        args += ["--test", str(root / "test")]
    env = {**os.environ, "TUNEPROD_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-c", UNTIL_RAY, *args], capture_output=True, text=True, timeout=120,
                         env=env)
    said = run.stdout + run.stderr
    assert "Traceback" not in said, said
    if expected == "error":  # one line, after any warning that lists skipped files
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 2 and lines[-1].startswith("tuneprod search: error:"), said
        assert all(line.startswith(("tuneprod: warning:", "  ")) for line in lines[:-1]), said
    else:
        assert run.returncode == 0 and "the data passed its checks" in run.stdout, said
        assert ("warning" in run.stderr) == (expected == "warn"), said
    for fragment in fragments:
        assert fragment in said, (fragment, said)
