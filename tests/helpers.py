"""Helpers shared by the tests: a tiny generated image folder and the real search-space files, shrunk."""
from __future__ import annotations

import logging
import os
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


class LocalS3:
    """An S3 endpoint on 127.0.0.1 (moto's server, as Ray's own tests use it), with one bucket: `uri(key)` is the
    pyarrow URI of a prefix in it. Credentials are set in the environment, so Ray workers started later see them."""

    BUCKET = "tuneprod-test"
    ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}

    def __init__(self):
        import boto3
        from moto.server import ThreadedMotoServer

        os.environ.update(self.ENV)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.endpoint = f"127.0.0.1:{self.server._server.server_port}"
        self.client = boto3.client("s3", endpoint_url=f"http://{self.endpoint}")
        self.client.create_bucket(Bucket=self.BUCKET)

    def uri(self, key: str = "", bucket: str = BUCKET) -> str:
        return f"s3://{bucket}/{key}?region=us-east-1&endpoint_override={self.endpoint}&scheme=http"

    def upload(self, folder: Path, prefix: str) -> None:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                self.client.upload_file(str(path), self.BUCKET, f"{prefix}/{path.relative_to(folder).as_posix()}")

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.BUCKET, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def stop(self) -> None:
        self.server.stop()
