"""The command line: help for every verb, and bad input as one line on stderr with exit status 2."""
import subprocess
import sys

import pytest

from tests.helpers import SEARCH_SPACES, write_image_folder


def tuneprod(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tuneprod.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("verb", ["search", "resume", "retrain", "predict", "report", "dashboard", "demo-data"])
def test_help(verb):
    result = tuneprod(verb, "--help")
    assert result.returncode == 0 and "usage: tuneprod " + verb in result.stdout


def test_bad_yaml_value(tmp_path):
    space = tmp_path / "x.yaml"
    space.write_text("data: {train: imgs}\nspace:\n  lr: -1\n")
    assert_user_error(tuneprod("search", space), "x.yaml: space.lr: the value is -1, but must be > 0")


def test_missing_data_fails_before_any_trial(tmp_path):
    result = tuneprod("search", SEARCH_SPACES / "demo.yaml", "--data", tmp_path / "absent", "--storage",
                      tmp_path / "runs", cwd=tmp_path)
    assert_user_error(result, "demo.yaml: data.train: the path", "does not exist")
    assert not (tmp_path / "runs").exists()


def test_class_with_one_image_fails_before_any_trial(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    for extra in sorted((root / "green").iterdir())[1:]:
        extra.unlink()
    result = tuneprod("search", SEARCH_SPACES / "demo.yaml", "--data", root, "--storage", tmp_path / "runs")
    assert_user_error(result, "green (1)")
    assert not (tmp_path / "runs").exists()


def test_retrain_and_predict_on_wrong_folders(tmp_path):
    assert_user_error(tuneprod("retrain", tmp_path), "not a tuneprod experiment folder")
    assert_user_error(tuneprod("predict", tmp_path, tmp_path), "not a tuneprod model folder")
    assert_user_error(tuneprod("report", tmp_path), "not a tuneprod experiment folder")
    assert_user_error(tuneprod("dashboard", tmp_path), "not a tuneprod experiment folder")


def test_report_and_dashboard_need_what_a_search_leaves(tmp_path):
    import socket

    from tuneprod.spec import EXPERIMENT_SPEC

    (tmp_path / EXPERIMENT_SPEC).write_text(f"data: {{train: {tmp_path}}}\n")  # a search that never got going
    assert_user_error(tuneprod("report", tmp_path), "holds no trials.parquet yet", f"tuneprod resume {tmp_path}")
    assert_user_error(tuneprod("dashboard", tmp_path), "holds no study.db")
    (tmp_path / "study.db").touch()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_user_error(tuneprod("dashboard", tmp_path, "--port", port), f"--port {port}: cannot listen",
                          f"--port {port + 1}")


def test_demo_data_refuses_a_non_empty_folder_and_bad_sizes(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("mine")
    assert_user_error(tuneprod("demo-data", tmp_path / "d"), str(tmp_path / "d"))
    assert_user_error(tuneprod("demo-data", tmp_path / "e", "--classes", "1"), "classes: the value is 1")
    result = tuneprod("demo-data", tmp_path / "f", "--classes", "3", "--size", "24", "--train-per-class", "2",
                      "--test-per-class", "1")
    assert result.returncode == 0 and "3 classes, 6 training and 3 test images" in result.stdout


@pytest.mark.slow
def test_a_budget_too_small_for_one_trial_and_the_final_stage_fails_before_any_trial(tmp_path):
    from tests.helpers import shrunk_space

    space = shrunk_space("demo.yaml", tmp_path, data={"demo": str(tmp_path / "demo"), "image_size": 32},
                         search={"time_budget_s": 1})
    result = tuneprod("search", space, "--storage", tmp_path / "runs", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    # Ray's own start-up warnings may come first; the error is the last line, and one line.
    assert "search.time_budget_s: the value is 1, but must be >= " in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "runs").exists()  # no experiment folder that looks like a search
