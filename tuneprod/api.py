"""The Python API: the same verbs as the command line. Heavy modules (Ray, torch) load on first use."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence, Union

PathLike = Union[str, Path]


def data_overrides(data: Optional[PathLike], test: Optional[PathLike]) -> dict:
    """`data` replaces the spec's images: a folder with train/ (and test/) inside, or the training folder or
    manifest itself. The spec's test images belong to its own data, so they go unless `test` names new ones."""
    overrides = {}
    if data is not None:
        train, test_inside = _train_and_test(data)
        overrides = {"data.train": train, "data.demo": None, "data.test": test_inside}
    if test is not None:
        overrides["data.test"] = str(test)
    return overrides


def _train_and_test(data: PathLike) -> tuple[str, Optional[str]]:
    """(training images, test images or None) of a --data folder or bucket prefix."""
    from tuneprod.spec import is_uri

    if is_uri(data):
        from tuneprod.storage import RemoteFolder, join

        folder = RemoteFolder(str(data))
        if folder.exists("train"):
            return join(str(data), "train"), join(str(data), "test") if folder.exists("test") else None
        return str(data), None
    nested = Path(data) / "train"
    if nested.is_dir():
        return str(nested), str(Path(data) / "test") if (Path(data) / "test").is_dir() else None
    return str(data), None


def search(space: PathLike, *, data: Optional[PathLike] = None, test: Optional[PathLike] = None,
           num_samples: Optional[int] = None, name: Optional[str] = None, storage: Optional[PathLike] = None,
           address: Optional[str] = None, retrain: bool = True, verbose: bool = False,
           progress: Callable[[str], None] = print):
    """Runs the search a space file describes, then (unless retrain=False) the final stage: the best
    configurations trained on all labelled data, combined, and the test images predicted; then writes the report.
    `verbose`: Ray's own output instead of tuneprod's one-line view. Returns the SearchOutcome."""
    from tuneprod.spec import load_spec
    from tuneprod.tuning.tuner import run_search

    overrides = data_overrides(data, test)
    for key, value in (("search.num_samples", num_samples), ("name", name), ("storage", storage)):
        if value is not None:
            overrides[key] = value
    spec = load_spec(space, overrides)
    outcome = run_search(spec, address=address, progress=progress, final=retrain, verbose=verbose)
    return _finish(spec, outcome, retrain, address, progress)


def _finish(spec, outcome, retrain: bool, address: Optional[str], progress: Callable[[str], None]):
    from tuneprod.spec import UserError
    from tuneprod.tuning.final_tasks import retrain_and_predict

    try:
        if outcome.best_value is None:
            raise UserError(f"every trial failed; see the error column of {outcome.experiment_dir / 'trials.csv'}")
        if retrain and spec.final.enabled:
            retrain_and_predict(outcome.experiment_dir, progress, images=outcome.images, address=address,
                                auto_members=outcome.final_members)
    finally:  # a search whose trials all failed needs its report the most
        _report(outcome.experiment_dir, progress)
        _upload(outcome.experiment_dir, progress)
    return outcome


def _experiment(location: PathLike, trial_files: Sequence[str] = ()) -> Path:
    """An experiment folder on this machine: a local one as given; one in a bucket (s3://...) brought back into
    its local mirror, where the command then works (and from where its results go up again)."""
    from tuneprod.spec import is_uri

    if not is_uri(location):
        return Path(location)
    from tuneprod.storage import bring_back, mirror_folder, parent

    storage, name = parent(str(location))
    return bring_back(str(location), mirror_folder(storage) / name, trial_files)


def _upload(experiment_dir: Path, progress: Callable[[str], None]) -> None:
    """The driver's files up to the experiment's bucket folder, when its storage is one."""
    from tuneprod.final.stage import load_experiment
    from tuneprod.storage import ExperimentUploads

    spec = load_experiment(experiment_dir)
    if spec.remote is not None:
        ExperimentUploads(experiment_dir, spec.remote)(force=True)
        progress(f"tuneprod: results uploaded to {spec.remote}")


def _report(experiment_dir: Path, progress: Callable[[str], None]) -> None:
    try:
        from tuneprod.report import write_report  # plotly is imported here: its absence must not end the search

        progress(f"tuneprod: report in {write_report(experiment_dir)}")
    except Exception as exc:  # the search's results stand without it; `tuneprod report` can try again
        progress(f"tuneprod: warning: could not write the report ({type(exc).__name__}: {exc}); "
                 f"try `tuneprod report {experiment_dir}`")


def resume(experiment: PathLike, *, address: Optional[str] = None, retrain: bool = True, verbose: bool = False,
           progress: Callable[[str], None] = print):
    """Continues an interrupted search from its folder, then runs the final stage like `search`."""
    from tuneprod.final.stage import load_experiment
    from tuneprod.tuning.tuner import resume_search

    # Ray brings back its own state from the bucket; the study, the endings and each trial's reported epochs (for
    # the rungs) come back here.
    spec = load_experiment(_experiment(experiment, trial_files=["progress.csv"]))
    outcome = resume_search(spec, address=address, progress=progress, verbose=verbose)
    return _finish(spec, outcome, retrain, address, progress)


def report(experiment: PathLike) -> Path:
    """Writes <experiment>/report.html: trials, learning curves, importances, the final model's mistakes."""
    from tuneprod.report import write_report

    experiment_dir = _experiment(experiment)
    written = write_report(experiment_dir)
    _upload(experiment_dir, lambda _: None)
    return written


def dashboard(experiment: PathLike, host: str = "127.0.0.1", port: int = 8080,
              progress: Callable[[str], None] = print) -> None:
    """Serves optuna-dashboard on the experiment's study until interrupted."""
    from tuneprod.dashboard import serve
    from tuneprod.spec import is_uri

    experiment_dir = _experiment(experiment)
    refresh = None
    if is_uri(experiment):  # in a bucket: serve its newest study
        from tuneprod.storage import RemoteFolder
        from tuneprod.tuning.results import STUDY_DB

        def refresh():
            RemoteFolder(experiment).download(STUDY_DB, experiment_dir / STUDY_DB)
    serve(experiment_dir, host, port, progress, refresh)


def retrain(experiment: PathLike, *, address: Optional[str] = None, progress: Callable[[str], None] = print) -> Path:
    """Runs an experiment's final stage (its best configurations trained on all labelled data, into
    <experiment>/final) and predicts the spec's test images, if any. Returns the model folder."""
    from tuneprod.tuning.final_tasks import retrain_and_predict

    experiment_dir = _experiment(experiment)
    try:
        return retrain_and_predict(experiment_dir, progress, address=address)
    finally:
        _upload(experiment_dir, progress)


def predict(model: PathLike, images: PathLike, out: PathLike = "predictions.csv",
            tta: Optional[Sequence[str]] = None, batch_size: int = 64, progress: Callable[[str], None] = print):
    """Writes file,label,confidence and the top 5 for every image in a folder. `tta`: test-time views (flip,
    scale, crops; [] for none; default: as the model was saved). Returns a PredictionReport."""
    if _named(model).endswith(".onnx"):  # an exported model: onnxruntime, no torch
        from tuneprod.final.portable import predict as run_portable

        return run_portable(_onnx_file(model), Path(images), Path(out), tta=tta, batch_size=batch_size,
                            progress=progress)
    from tuneprod.final.inference import predict as run_predict

    return run_predict(_model(model), Path(images), Path(out), tta=tta, batch_size=batch_size, progress=progress)


def export(model: PathLike, out: Optional[PathLike] = None, tta: Optional[Sequence[str]] = None) -> Path:
    """Writes a final/ folder as one ONNX file (default: model.onnx beside the folder; for a folder in a bucket,
    model.onnx in the current folder) that takes uint8 RGB images at the model's size and returns the ensemble's
    probabilities, with its test-time views (default: as saved) and soft vote inside; labels.json beside it.
    `tuneprod predict model.onnx IMAGES` runs it."""
    from tuneprod.final.export import export as run_export
    from tuneprod.spec import is_uri

    if out is None and is_uri(model):  # beside the bucket's folder would be the cache, where nobody looks
        out = "model.onnx"
    return run_export(_model(model), None if out is None else Path(out), tta)


def _model(location: PathLike) -> Path:
    """A model folder on this machine (one in a bucket fetched once, into the cache, by its listing)."""
    from tuneprod.spec import is_uri

    if not is_uri(location):
        return Path(location)
    from tuneprod.storage import fetch_location
    from tuneprod.train.cache import default_root

    return fetch_location(str(location), default_root(), progress=lambda _: None)[0]


def _named(location: PathLike) -> str:
    """A path, or a URI's path (without the query that names its endpoint)."""
    from urllib.parse import urlsplit

    from tuneprod.spec import is_uri

    return urlsplit(str(location)).path if is_uri(location) else str(location)


def _onnx_file(location: PathLike) -> Path:
    """An exported model on this machine: one in a bucket fetched alone (its folder may hold a whole experiment)
    into the cache, under a name of its URI."""
    from tuneprod.spec import UserError, is_uri

    if not is_uri(location):
        return Path(location)
    import hashlib

    from tuneprod.storage import RemoteFolder, parent
    from tuneprod.train.cache import default_root

    folder, name = parent(str(location))
    local = default_root() / "models" / hashlib.sha256(str(location).encode()).hexdigest()[:16] / name
    if not RemoteFolder(folder).download(name, local):
        raise UserError(f"{location}: no such object; pass a model.onnx written by tuneprod export")
    return local


def demo_data(out_dir: PathLike, **options) -> dict:
    """Generates the synthetic product set (see tuneprod.demo.generate_demo for the options)."""
    from tuneprod.demo import generate_demo
    from tuneprod.spec import UserError

    try:
        return generate_demo(Path(out_dir), **options)
    except (ValueError, FileExistsError) as exc:
        raise UserError(str(exc)) from None
