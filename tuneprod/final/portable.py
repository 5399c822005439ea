"""Predictions from an exported model.onnx (final/export.py) with onnxruntime: the same CSV as from a final/
folder, without torch (pip install "tuneprod[export]")."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from tuneprod.final.predictions import PredictionReport, image_paths, write_predictions
from tuneprod.spec import UserError
from tuneprod.train.data import decode_resized, find_unreadable, read_test_labels

ONNX_FORMAT = "tuneprod-onnx/1"  # final/export.py writes it


class PortableModelError(UserError):
    pass


@dataclass
class PortableModel:
    """An exported ensemble in an onnxruntime session, with what its metadata says."""

    path: Path
    session: object  # onnxruntime.InferenceSession
    classes: tuple[str, ...]
    image_size: int
    tta: tuple[str, ...]

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """The ensemble's class probabilities for uint8 RGB images (N x size x size x 3)."""
        size = self.image_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise PortableModelError(f"{self.path}: the images are {images.dtype} {tuple(images.shape)}, but must be "
                                     f"uint8 (N, {size}, {size}, 3): RGB at the model's image size")
        return self.session.run(None, {self.session.get_inputs()[0].name: images})[0]


def load(path: Path, threads: Optional[int] = None) -> PortableModel:
    try:
        import onnxruntime  # noqa: F401  (here for the message; new_session uses it)
    except ImportError:
        raise PortableModelError(f"{path}: an ONNX model needs onnxruntime: pip install 'tuneprod[export]'") from None
    if not Path(path).is_file():
        raise PortableModelError(f"{path}: no such file; pass a model.onnx written by tuneprod export")
    try:
        session = new_session(str(path), threads)
    except Exception as exc:  # onnxruntime raises its own kinds for a damaged or foreign file
        raise PortableModelError(f"{path}: cannot load it as an ONNX model ({str(exc).splitlines()[0]})") from None
    metadata = session.get_modelmeta().custom_metadata_map
    if metadata.get("format") != json.dumps(ONNX_FORMAT):
        raise PortableModelError(f"{path}: format is {metadata.get('format')!r}, but must be {ONNX_FORMAT!r} "
                                 f"(a file written by tuneprod export)")
    described = {key: json.loads(metadata[key]) for key in ("classes", "image_size", "tta")}
    return PortableModel(Path(path), session, tuple(described["classes"]), int(described["image_size"]),
                         tuple(described["tta"]))


def new_session(model: Union[str, bytes], threads: Optional[int] = None):
    """An onnxruntime session on the CPU for a file's path or a graph's bytes (threads: onnxruntime's default when
    None)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def predict(model_path: Path, images: Path, out: Path, tta: Optional[Sequence[str]] = None, batch_size: int = 64,
            progress: Callable[[str], None] = print) -> PredictionReport:
    """Writes the predictions CSV for a folder of images (or one image), scored against a test_labels.csv beside
    them when there is one. The test-time views are the ones exported; `tta` may only repeat them."""
    model = load(Path(model_path))
    if tta is not None and set(tta) != set(model.tta):  # the views' order is fixed by the graph
        raise PortableModelError(f"--tta: the value is {','.join(tta) or 'none'}, but {model_path} was exported "
                                 f"with {','.join(model.tta) or 'none'}; export again with --tta to change the views")
    root, paths = image_paths(Path(images))
    truth = read_test_labels(root)
    unreadable = set(find_unreadable(list(paths)))
    readable = [p for p in paths if p not in unreadable]
    votes = []
    for start in range(0, len(readable), batch_size):
        batch = np.stack([decode_resized(p, model.image_size) for p in readable[start:start + batch_size]])
        votes.append(model.probabilities(batch))
        done = start + len(batch)
        if len(votes) % 20 == 0 or done == len(readable):
            progress(f"predict: {done}/{len(readable)} images")
    probabilities = np.concatenate(votes) if votes else np.zeros((0, len(model.classes)), np.float32)
    return write_predictions(Path(out), root, paths, [i for i, p in enumerate(paths) if p in unreadable],
                             probabilities, model.classes, truth, images=Path(images))
