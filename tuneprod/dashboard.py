"""`tuneprod dashboard`: optuna-dashboard on an experiment's study (history, each trial's learning curve,
parallel coordinates, importances), live while the search writes it, or after. For an experiment in a bucket it
serves the study's latest snapshot there, fetched again every REFRESH_S."""
from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Callable, Optional

from tuneprod.final.stage import load_experiment
from tuneprod.spec import UserError
from tuneprod.tuning.results import STUDY_DB, study_storage


REFRESH_S = 30.0


def serve(experiment_dir: Path, host: str, port: int, progress: Callable[[str], None] = print,
          refresh: Optional[Callable[[], None]] = None) -> None:
    """`refresh`: fetches the study's file again (replacing it whole), every REFRESH_S while the dashboard runs."""
    load_experiment(experiment_dir)  # a clear error for a folder that is not an experiment
    if not (experiment_dir / STUDY_DB).is_file():
        raise UserError(f"{experiment_dir}: holds no {STUDY_DB}; the dashboard needs a search started by this "
                        f"version of tuneprod")
    _check_free(host, port)
    import optuna_dashboard

    progress(f"tuneprod: dashboard of {experiment_dir} at http://{host}:{port} (Ctrl-C to stop)")
    stop = threading.Event()
    if refresh is not None:
        threading.Thread(target=_refreshing, args=(refresh, stop), daemon=True).start()
    try:
        # With a refreshed file, no pooled connection may hold on to the one it replaced.
        optuna_dashboard.run_server(study_storage(experiment_dir, pooled=refresh is None), host=host, port=port)
    except KeyboardInterrupt:  # Ctrl-C is how a dashboard ends
        pass
    finally:
        stop.set()


def _refreshing(refresh: Callable[[], None], stop: threading.Event) -> None:
    while not stop.wait(REFRESH_S):
        try:
            refresh()
        except Exception:  # a bucket briefly out of reach: the last snapshot stays on show
            continue


def _check_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UserError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror}); pass another port, "
                            f"e.g. --port {port + 1}") from None
