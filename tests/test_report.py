"""The report from hand-made results: the endings it counts come from the search's record, and a search whose
trials all failed still gets its page, quietly."""
import optuna
from optuna.trial import TrialState

from tests.helpers import shrunk_space
from tuneprod.report import write_report
from tuneprod.spec import EXPERIMENT_SPEC, load_spec
from tuneprod.tuning.endings import TrialEndings
from tuneprod.tuning.results import TrialRecord, study_storage, trials_table, write_results


def experiment(tmp_path, records, endings_of):
    folder = tmp_path / "exp"
    folder.mkdir()
    spec = load_spec(shrunk_space("demo.yaml", tmp_path, search={"num_samples": len(records)})).placed(folder)
    spec.save(folder / EXPERIMENT_SPEC)
    endings = TrialEndings(folder, spec.search.scheduler.max_epochs)
    endings_of(endings)
    names = spec.space.names()
    write_results(folder, trials_table(records, names, "val_acc", "max", endings), names, "val_acc")
    return folder


def test_a_search_whose_trials_all_failed_gets_its_report_without_optunas_warnings(tmp_path, capfd):
    records = [TrialRecord("a", {"lr": 0.1}, [], "OutOfMemoryError: CUDA out of memory"),
               TrialRecord("b", {"lr": 0.2}, [], "NonFiniteLoss: nan")]
    folder = experiment(tmp_path, records, lambda endings: None)
    study = optuna.create_study(storage=study_storage(folder), study_name="exp", direction="maximize")
    study.set_metric_names(["val_acc"])
    for _ in records:
        study.tell(study.ask(), state=TrialState.FAIL)
    capfd.readouterr()
    page = write_report(folder).read_text()
    assert "Study instance" not in capfd.readouterr().err
    assert "2 trials: 2 failed" in page and "No trial reported a result." in page


def test_the_summary_counts_the_endings_the_record_holds(tmp_path):
    history = [{"epoch": 1, "val_acc": 0.5, "val_loss": 1.0}]
    records = [TrialRecord(t, {"lr": 0.1}, history) for t in "abc"]

    def decide(endings):
        endings.stopped("a", 1)
        endings.cut_by_budget()  # b and c end after this, cut

    page = write_report(experiment(tmp_path, records, decide)).read_text()
    assert "3 trials: 1 stopped by the scheduler, 2 cut by the time budget" in page


def test_a_search_without_plotly_ends_with_a_warning_not_a_traceback(tmp_path, monkeypatch):
    """On the GPU check's machine plotly was missing: the report's import must fail inside the guard that keeps
    the search's results standing."""
    import sys

    from tuneprod import api
    monkeypatch.delitem(sys.modules, "tuneprod.report", raising=False)
    monkeypatch.setitem(sys.modules, "plotly", None)  # `import plotly...` now raises ImportError
    said = []
    api._report(tmp_path, said.append)
    assert len(said) == 1 and "warning: could not write the report" in said[0] and "plotly" in said[0]
