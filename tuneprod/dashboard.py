"""`tuneprod dashboard`: optuna-dashboard on an experiment's study (history, each trial's learning curve,
parallel coordinates, importances), live while the search writes it, or after."""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Callable

from tuneprod.final.stage import load_experiment
from tuneprod.spec import UserError
from tuneprod.tuning.results import STUDY_DB, study_storage


def serve(experiment_dir: Path, host: str, port: int, progress: Callable[[str], None] = print) -> None:
    load_experiment(experiment_dir)  # a clear error for a folder that is not an experiment
    if not (experiment_dir / STUDY_DB).is_file():
        raise UserError(f"{experiment_dir}: holds no {STUDY_DB}; the dashboard needs a search started by this "
                        f"version of tuneprod")
    _check_free(host, port)
    import optuna_dashboard

    progress(f"tuneprod: dashboard of {experiment_dir} at http://{host}:{port} (Ctrl-C to stop)")
    try:
        optuna_dashboard.run_server(study_storage(experiment_dir), host=host, port=port)
    except KeyboardInterrupt:  # Ctrl-C is how a dashboard ends
        pass


def _check_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UserError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror}); pass another port, "
                            f"e.g. --port {port + 1}") from None
