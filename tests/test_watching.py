"""Watching a search, from one small real search run as a user runs it (the command line, output to a pipe): the
console it prints, the study the dashboard reads, the dashboard itself, TensorBoard's HParams and the report
opened in headless Chromium. Slow (a minute or two on 2 cores)."""
import glob
import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from optuna.trial import TrialState
from PIL import Image

from tests.helpers import shrunk_space
from tuneprod.demo import generate_demo
from tuneprod.tuning.results import RAY_TRIAL_ID, load_study

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TRIALS = 10
# A plotly graph div keeps the traces it drew; one of them must hold points (or axes of parallel coordinates).
PLOTTED_DATA = """div => { const graph = div.querySelector('.js-plotly-plot');
    return !!graph && graph.data.some(trace => ['x', 'y', 'dimensions'].some(key => trace[key] && trace[key].length)); }"""


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    root = tmp_path_factory.mktemp("watching")
    generate_demo(root / "demo", classes=4, train_per_class=8, test_per_class=4, size=32)
    space = shrunk_space("demo.yaml", root, data={"demo": str(root / "demo"), "image_size": 32},
                         search={"num_samples": TRIALS, "time_budget_s": 900,
                                 "scheduler": {"type": "asha", "max_epochs": 4, "grace_period": 1,
                                               "reduction_factor": 2}},
                         final={"members": 2, "seeds": 1})
    run = subprocess.run([sys.executable, "-m", "tuneprod.cli", "search", str(space), "--storage", str(root / "runs")],
                         capture_output=True, text=True, cwd=root, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    return root / "runs" / "shrunk_demo", run


def test_the_console_is_a_few_plain_lines_without_ray_warnings(search):
    _, run = search
    lines = (run.stdout + run.stderr).splitlines()
    assert len(lines) <= 40, "\n".join(lines)
    assert not [line for line in lines if "WARNING" in line or "pid=" in line or "╭" in line], "\n".join(lines)
    views = [line for line in lines if line.startswith("search ")]
    assert views and f"{TRIALS}/{TRIALS} trials done" in views[-1]
    assert any("tuneprod dashboard" in line and "shrunk_demo" in line for line in lines)
    assert "\r" not in run.stdout  # not a terminal: no in-place rewriting


def test_the_study_holds_the_trials_of_the_table_in_their_states(search):
    experiment, _ = search
    table = pd.read_parquet(experiment / "trials.parquet")
    study = load_study(experiment)
    trials = {trial.user_attrs[RAY_TRIAL_ID]: trial for trial in study.trials}
    assert sorted(trials) == sorted(table["trial_id"]) and len(table) == TRIALS
    expected = {"ran": TrialState.COMPLETE, "sto": TrialState.PRUNED, "cut": TrialState.PRUNED,
                "fai": TrialState.FAIL}
    for row in table.itertuples():
        trial = trials[row.trial_id]
        assert trial.state == expected[row.ended[:3]], (row.ended, trial.state)
        if row.epochs_run:  # every epoch is on its learning curve, the one a scheduler stopped it at too
            assert sorted(trial.intermediate_values) == list(range(1, row.epochs_run + 1))
    assert (table["ended"].str.startswith("stopped by the scheduler")).any()
    assert study.user_attrs["rungs"] == [1, 2]


def test_tensorboard_hparams_hold_every_trial(search):
    from tensorboardX.proto import event_pb2, plugin_hparams_pb2

    experiment, _ = search
    table = pd.read_parquet(experiment / "trials.parquet")
    for trial_id in table["trial_id"]:
        starts = []
        for path in glob.glob(str(experiment / f"trial_{trial_id}" / "events.out.tfevents.*")):
            for value in _summary_values(Path(path).read_bytes(), event_pb2):
                if value.tag == "_hparams_/session_start_info":
                    data = plugin_hparams_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    starts.append(data.session_start_info.hparams)
        assert starts and {"lr", "backbone", "batch_size"} <= set(starts[-1]), trial_id


def _summary_values(data: bytes, event_pb2):
    """The summary values of a TFRecord file of Event protos (length, its CRC, the event, its CRC)."""
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
        offset += 12 + length + 4
        yield from event.summary.value


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_dashboard_serves_the_study_on_localhost(search):
    experiment, _ = search
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tuneprod.cli", "dashboard", str(experiment), "--port",
                               str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        page = _fetch(f"http://127.0.0.1:{port}/dashboard", deadline=time.monotonic() + 90)
        assert "Optuna Dashboard" in page
        studies = _fetch(f"http://127.0.0.1:{port}/api/studies", deadline=time.monotonic() + 10)
        assert '"study_name": "shrunk_demo"' in studies
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C
        output, _ = server.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}" in output and server.returncode == 0, output


def _fetch(url: str, deadline: float) -> str:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture(scope="module")
def chromium():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("Debian chromium is missing: .ci/run installs it")
        pytest.skip("needs Debian chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            # As root, offline: no sandbox, and none of Chromium's own calls home.
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"])
        yield browser
        browser.close()


def _pixel_spread(png: bytes) -> float:
    return float(np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32).std())


def test_the_report_renders_offline_with_every_plot_and_the_mistakes(search, chromium):
    experiment, run = search
    report = experiment / "report.html"
    assert f"report in {report}" in run.stdout
    page = chromium.new_page(viewport={"width": 1280, "height": 900})
    errors, requests = [], []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda request: requests.append(request.url))
    page.goto(report.as_uri())
    page.wait_for_load_state("load")
    assert not errors
    assert all(url.startswith(("file:", "data:")) for url in requests), requests  # nothing from a network
    plots = {element.get_attribute("data-plot"): element for element in page.query_selector_all(".plot")}
    assert set(plots) == {"curves", "importances", "parallel", "confusions"}
    for name, element in plots.items():
        assert element.evaluate(PLOTTED_DATA), name  # plotly drew data into it
        assert _pixel_spread(element.screenshot()) > 5, name  # and it is not a blank box
    assert page.locator("table").first.locator("tbody tr").count() == TRIALS
    images = page.query_selector_all("img.misclassified")
    assert images and all(image.evaluate("img => img.complete && img.naturalWidth > 0") for image in images)
    assert _pixel_spread(page.query_selector(".grid").screenshot()) > 5
    captions = page.inner_text(".grid")
    assert "true" in captions and "predicted" in captions
