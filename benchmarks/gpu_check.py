"""A short real search on this machine's accelerator: search_spaces/effnet.yaml shrunk, start to predictions.

The shrunk space keeps effnet.yaml's searcher, scheduler, resources (`gpus_per_trial: auto`) and final stage, with
generated 256 px JPEGs, few trials and epochs, two backbones, and one start point with a retrieval head (ArcFace,
predicted by cosine kNN). While `tuneprod search` runs, nvidia-smi is sampled every half second, so the figures a
GPU check asks for come out of one run: the search's wall time, how many trials shared the GPU at once, the peak and
the final GPU memory, and the final model's predictions.

    python benchmarks/gpu_check.py            # on a GPU: efficientnet_b0/b2 at 256 px; on a CPU: tiny models, 64 px

On an H200 a run took about 3 minutes, the packing probe's 1 to 1.5 minutes included (README, Performance). Without
plotly (a GPU machine may lack it) the search ends with a warning instead of its report.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from throughput import _generate_jpegs  # noqa: E402  (the same generated product photos)

GPU = torch.cuda.is_available()
EFFNET = Path(__file__).parents[1] / "search_spaces" / "effnet.yaml"


def main() -> None:
    args = _arguments()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        space = _shrunk_space(args, scratch)
        print(yaml.safe_dump(yaml.safe_load(space.read_text()), sort_keys=False, width=120, default_flow_style=None),
              flush=True)
        print(f"GPU memory before: {_gpu_memory_used()}", flush=True)
        with GpuSampler() as sampler:
            started = time.perf_counter()
            returncode = _search(space, scratch / "runs")
            wall = time.perf_counter() - started
        print(f"\nsearch exit status {returncode}, wall time {wall:.0f} s")
        print(f"GPU memory after: {_gpu_memory_used()}; peak during the search: {sampler.peak_memory_mib} MiB; "
              f"most processes on the GPU at once: {sampler.most_processes} (the trials, the probe or members)")
        _report_outputs(scratch / "runs" / "gpu_check")
    sys.exit(returncode)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="generated training images")
    parser.add_argument("--test-images", type=int, default=400)
    parser.add_argument("--classes", type=int, default=40)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3, help="the scheduler's max_epochs")
    parser.add_argument("--budget", type=int, default=240, help="search.time_budget_s (trials, members, predictions)")
    parser.add_argument("--size", type=int, default=256 if GPU else 64)
    parser.add_argument("--backbones", nargs="+",
                        default=["efficientnet_b0", "efficientnet_b2"] if GPU else ["test_efficientnet", "test_resnet"])
    return parser.parse_args()


def _shrunk_space(args: argparse.Namespace, scratch: Path) -> Path:
    """effnet.yaml with generated data, few short trials, random weights (the machine may have no internet) and
    a start point per backbone, the last with the retrieval head, GeM pooling and EMA weights."""
    train = _generate_jpegs(scratch / "train", args.images, args.classes)
    test = _labelled_test_folder(scratch, args.test_images, args.classes)
    raw = yaml.safe_load(EFFNET.read_text())
    raw["data"].update(train=str(train), test=str(test), image_size=args.size)
    raw["search"].update(num_samples=args.trials, time_budget_s=args.budget)
    raw["search"]["scheduler"].update(max_epochs=args.epochs, grace_period=1)
    raw["search"]["start_from"] = [{"backbone": args.backbones[0], "batch_size": 32},
                                   {"backbone": args.backbones[-1], "batch_size": 32, "head": "arcface",
                                    "predict_by": "knn", "pooling": "gem", "ema_decay": 0.99}]
    space = raw["space"]
    space.update(backbone={"choice": args.backbones}, pretrained=False, batch_size={"choice": [32, 64]},
                 head={"choice": ["linear", "arcface"]},
                 predict_by={"choice": ["head", "knn"], "when": {"head": "arcface"}},
                 pooling={"choice": ["avg", "gem"]}, ema_decay={"choice": [0.0, 0.99]})
    if not GPU:
        space["augment_device"] = "cpu"
        raw["resources"]["cpus_per_trial"] = 1
    raw["final"].update(members=2)
    raw["final"].pop("time_share")
    path = scratch / "effnet_gpu_check.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _labelled_test_folder(scratch: Path, count: int, classes: int) -> Path:
    """Unlabelled-looking test photos (other draws of the same classes) with a test_labels.csv beside them."""
    tree = _generate_jpegs(scratch / "test_tree", count, classes)
    test = scratch / "test"
    test.mkdir()
    with open(test / "test_labels.csv", "w", newline="") as labels:
        writer = csv.writer(labels)
        writer.writerow(["file", "label"])
        for photo in sorted(tree.glob("*/*.jpg")):
            name = f"t{photo.name}"
            shutil.move(photo, test / name)
            writer.writerow([name, photo.parent.name])
    return test


def _search(space: Path, storage: Path) -> int:
    """Runs the CLI as a user would, echoing its lines with the seconds since the start."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "tuneprod.cli", "search", str(space), "--storage", str(storage),
               "--name", "gpu_check"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as run:
        for line in run.stdout:
            print(f"[{time.perf_counter() - started:5.0f} s] {line}", end="", flush=True)
    return run.returncode


def _report_outputs(experiment: Path) -> None:
    final = experiment / "final"
    print(f"final model: {sorted(p.name for p in final.iterdir()) if final.is_dir() else 'none'}")
    predictions = experiment / "predictions.csv"
    if predictions.exists():
        print(f"predictions: {sum(1 for _ in open(predictions)) - 1} rows in {predictions.name}")
    trials = experiment / "trials.csv"
    if trials.exists():
        print(trials.read_text())


def _gpu_memory_used() -> str:
    if not GPU:
        return "no GPU"
    return subprocess.run(["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip()


class GpuSampler:
    """Every half second: the GPU's used memory and how many processes hold a context on it."""

    def __init__(self):
        self.peak_memory_mib, self.most_processes = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "GpuSampler":
        if GPU:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            memory = _query(["--query-gpu=memory.used"])
            processes = _query(["--query-compute-apps=pid"])
            if memory:
                self.peak_memory_mib = max(self.peak_memory_mib, int(memory[0]))
            self.most_processes = max(self.most_processes, len(processes))


def _query(fields: list[str]) -> list[str]:
    out = subprocess.run(["nvidia-smi", *fields, "--format=csv,noheader,nounits"], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if line.strip()]


if __name__ == "__main__":
    main()
