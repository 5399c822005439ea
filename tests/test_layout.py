"""The rule the layout rests on: the training core (tuneprod/train) and the after-search stage (tuneprod/final)
run without Ray, and so do the report and dashboard, which read a search's results; tuneprod/tuning is the only
wing that imports it."""
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tuneprod"


def modules(wing: str) -> list[str]:
    return [f"tuneprod.{wing}.{path.stem}" for path in sorted((PACKAGE / wing).glob("*.py"))
            if path.stem != "__init__"]


def imports_ray(names: list[str]) -> bool:
    code = "; ".join(f"import {name}" for name in names) + "; import sys; print('ray' in sys.modules)"
    check = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    return check.stdout.strip() == "True"


def test_the_core_and_the_final_stage_do_not_import_ray():
    names = modules("train") + modules("final") + ["tuneprod.spec", "tuneprod.demo", "tuneprod.api", "tuneprod.report",
                                                    "tuneprod.dashboard", "tuneprod.tuning.results",
                                                    "tuneprod.tuning.endings", "tuneprod.storage"]
    assert len(names) >= 13
    assert not imports_ray(names)


def test_the_search_side_does():
    assert imports_ray(["tuneprod.tuning.final_tasks"]) and imports_ray(["tuneprod.tuning.tuner"])


def test_the_onnx_predict_path_does_not_import_torch():
    code = ("import tuneprod.cli, tuneprod.final.portable, tuneprod.final.predictions, sys; "
            "print(sorted(m for m in ('torch', 'timm', 'ray') if m in sys.modules))")
    check = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == "[]"
