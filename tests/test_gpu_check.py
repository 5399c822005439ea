"""benchmarks/gpu_check.py: the shrunk effnet.yaml it runs on a GPU machine must validate here first, so that a change
to effnet.yaml or to the spec cannot spend a scarce GPU lease on a one-line YAML error."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402

from tuneprod.spec import load_spec  # noqa: E402


def test_the_gpu_checks_search_space_is_valid_and_keeps_what_it_checks(tmp_path):
    args = argparse.Namespace(images=40, test_images=8, classes=4, trials=8, epochs=3, budget=240, size=256,
                              backbones=["efficientnet_b0", "efficientnet_b2"])  # its GPU defaults, fewer images
    spec = load_spec(gpu_check._shrunk_space(args, tmp_path))
    assert spec.resources.gpus_per_trial == "auto" and spec.search.scheduler.max_epochs == 3
    assert spec.search.num_samples == 8 and spec.final.members == 2 and spec.data.image_size == 256
    retrieval = spec.search.start_from[-1]
    assert (retrieval["head"], retrieval["predict_by"], retrieval["pooling"]) == ("arcface", "knn", "gem")
    assert len(list((tmp_path / "train").glob("*/*.jpg"))) == 40
    labels = (tmp_path / "test" / "test_labels.csv").read_text().splitlines()
    assert labels[0] == "file,label" and len(labels) == 9 and len(list((tmp_path / "test").glob("*.jpg"))) == 8
