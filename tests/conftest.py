"""Fixtures: a tiny generated image folder; the decoded-image cache kept out of the user's home."""
import os
from pathlib import Path

import pytest

from tests.helpers import LocalS3, write_image_folder


@pytest.fixture(autouse=True, scope="session")
def decoded_cache_in_tmp(tmp_path_factory):
    # Session-wide, so module-scoped fixtures (and the Ray workers the e2e tests start) see it too.
    os.environ["TUNEPROD_CACHE"] = str(tmp_path_factory.mktemp("decoded_cache"))


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "images")


@pytest.fixture(scope="session")
def s3():
    """A local S3 server (see helpers.LocalS3), one for the whole run, started by the first test that asks."""
    server = LocalS3()
    yield server
    server.stop()
