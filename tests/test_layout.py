"""The rule the layout rests on: the training core and the final stage's own logic run without Ray; only the
search side (tuner, trainable) and the member dispatch (remote) import it."""
import subprocess
import sys

RAY_FREE = ["data", "cache", "pipeline", "augment", "batch_augment", "models", "loop", "packing", "results",
            "ensemble", "artifact", "inference", "refit", "spec", "space", "demo"]


def test_core_modules_do_not_import_ray():
    imports = "; ".join(f"import tuneprod.{name}" for name in RAY_FREE)
    check = subprocess.run([sys.executable, "-c", f"{imports}; import sys; print('ray' in sys.modules)"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == "False"


def test_the_search_side_does_import_ray():
    check = subprocess.run([sys.executable, "-c", "import tuneprod.remote, sys; print('ray' in sys.modules)"],
                           capture_output=True, text=True)
    assert check.stdout.strip() == "True", check.stderr
