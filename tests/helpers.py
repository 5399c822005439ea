"""Helpers shared by the tests: a tiny generated image folder and the real search-space files, shrunk."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SEARCH_SPACES = ROOT / "search_spaces"
COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 230)]


def write_image_folder(root: Path, per_class: int = 6, size: int = 24, seed: int = 0) -> Path:
    """Three easy classes (red, green, blue squares on noise) in root/<class>/<n>.png."""
    rng = np.random.default_rng(seed)
    for name, colour in zip(("red", "green", "blue"), COLOURS):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 90, (size, size, 3)).astype(np.uint8)
            top, left = rng.integers(0, size // 3, 2)
            pixels[top:top + size // 2, left:left + size // 2] = colour
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def shrunk_space(source: str, tmp_path: Path, **sections) -> Path:
    """The real search_spaces/<source> with a tiny model, tiny images and the given section overrides."""
    raw = yaml.safe_load((SEARCH_SPACES / source).read_text())
    raw["space"]["backbone"] = {"choice": ["test_resnet", "test_efficientnet"]}
    raw["space"]["pretrained"] = False
    raw["search"]["start_from"] = []
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path = tmp_path / f"shrunk_{source}"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
