"""Fixtures: a tiny generated image folder."""
from pathlib import Path

import pytest

from tests.helpers import write_image_folder


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "images")
