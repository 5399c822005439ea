"""`tuneprod report`: one self-contained HTML page about a finished search (plotly's script inlined, images as data
URIs, so it opens offline): the trials, their learning curves with the scheduler's rungs and stops, which
parameters mattered (Optuna's importance evaluators and plots), the best configuration beside the start points, the
final model and the test images it gets wrong."""
from __future__ import annotations

import base64
import html
import io
import json
import math
import warnings
from pathlib import Path
from typing import Optional

import optuna
import pandas as pd
import plotly.graph_objects as go
import plotly.offline
from optuna.trial import TrialState
from PIL import Image

from tuneprod.files import atomic_write
from tuneprod.final.artifact import ENSEMBLE, METADATA
from tuneprod.final.stage import FINAL, PREDICTIONS, load_experiment
from tuneprod.spec import Spec, UserError
from tuneprod.train.cache import localised
from tuneprod.train.data import TEST_LABELS, load_rgb
from tuneprod.tuning import results
from tuneprod.tuning.endings import CUT, FAILED, FINISHED, STOPPED, TrialEndings

REPORT = "report.html"
MISCLASSIFIED_SHOWN = 24
THUMBNAIL_PX = 112
CONFUSED_PAIRS_SHOWN = 15

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; } td, th { padding: 3px 8px; border-bottom: 1px solid #eee; }
th { background: #f6f6f6; text-align: left; } .note { color: #666; font-size: 0.9em; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
.grid figure { margin: 0; width: 130px; font-size: 0.75em; text-align: center; overflow-wrap: anywhere; }
td { white-space: nowrap; } .wide { overflow-x: auto; }
.grid img { width: 112px; height: 112px; object-fit: contain; image-rendering: pixelated; border: 1px solid #ccc; }
"""


def write_report(experiment_dir: Path) -> Path:
    experiment_dir = Path(experiment_dir)
    spec = load_experiment(experiment_dir)
    if not (experiment_dir / results.TRIALS_PARQUET).is_file():
        raise UserError(f"{experiment_dir}: holds no {results.TRIALS_PARQUET} yet; a report needs a finished "
                        f"search (`tuneprod resume {experiment_dir}` finishes an interrupted one)")
    table = results.read_table(experiment_dir)
    study = results.load_study(experiment_dir)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per in-memory study the plots are drawn from
    try:
        with warnings.catch_warnings():  # Optuna's notes on small samples: the report says what it drew from
            warnings.simplefilter("ignore")
            page = _page(spec, experiment_dir, table, study)
    finally:
        optuna.logging.set_verbosity(verbosity)
    path = experiment_dir / REPORT
    atomic_write(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return path


def _page(spec: Spec, experiment_dir: Path, table: pd.DataFrame, study: Optional[optuna.Study]) -> str:
    sections = [_summary(spec, table, study), _trials(spec, table), *_search_plots(spec, table, study),
                _best_vs_start(spec, table), *_final(spec, experiment_dir)]
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>tuneprod: {html.escape(spec.name)}</title>"
            f"<style>{STYLE}</style><script>{plotly.offline.get_plotlyjs()}</script></head><body>"
            + "".join(sections) + "</body></html>")


def _section(title: str, body: str, note: str = "") -> str:
    return f"<section><h2>{html.escape(title)}</h2>" + (f"<p class='note'>{note}</p>" if note else "") + body + \
        "</section>"


def _figure(figure: go.Figure, name: str) -> str:
    figure.update_layout(template="plotly_white", margin=dict(t=40, l=60, r=20, b=50), autosize=True)
    return f"<div class='plot' data-plot='{name}'>" + \
        figure.to_html(full_html=False, include_plotlyjs=False, default_width="100%",
                       config={"displaylogo": False}) + "</div>"


def _html_table(frame: pd.DataFrame) -> str:
    return "<div class='wide'>" + frame.astype(object).where(frame.notna(), "").to_html(
        index=False, float_format=lambda v: f"{v:.4g}", border=0, escape=True) + "</div>"


def _summary(spec: Spec, table: pd.DataFrame, study: Optional[optuna.Study]) -> str:
    metric = spec.search.metric
    words = {FINISHED: "ran to the end", STOPPED: "stopped by the scheduler", CUT: "cut by the time budget",
             FAILED: "failed"}
    ended = TrialEndings(spec.experiment_dir, spec.search.scheduler.max_epochs).counts(table["trial_id"])
    counts = ", ".join(f"{n} {words[kind]}" for kind, n in ended.items() if n)
    try:
        best = results.best_row(table, metric)
        headline = (f"best {metric} <b>{best[metric]:.4f}</b> (trial {html.escape(str(best['trial_id']))}, epoch "
                    f"{best['best_epoch']:.0f})")
    except ValueError:
        headline = "no trial reported a result"
    rungs = (study.user_attrs.get("rungs") if study else None) or []
    budget = spec.search.time_budget_s
    facts = [f"{len(table)} trials: {counts}", headline,
             f"scheduler {spec.search.scheduler.type}, rungs at epoch(s) {', '.join(map(str, rungs)) or 'none'} "
             f"of {spec.search.scheduler.max_epochs}",
             f"time budget {budget:.0f} s for the whole run" if budget else "no time budget"]
    return (f"<h1>tuneprod: {html.escape(spec.name)}</h1><p class='note'>{html.escape(str(spec.experiment_dir))}"
            f"</p><ul>" + "".join(f"<li>{fact}</li>" for fact in facts) + "</ul>")


def _trials(spec: Spec, table: pd.DataFrame) -> str:
    searched = [d.name for d in spec.space.dimensions]  # the fixed parameters are the same in every row
    columns = ["trial_id", "ended", spec.search.metric, "best_epoch", "epochs_run", *searched, "wall_time_s",
               "images_per_s"] + (["error"] if table["error"].notna().any() else [])
    shown = table[[c for c in dict.fromkeys(columns) if c in table.columns]]
    return _section("Trials", _html_table(shown), "Best first. <i>ended</i> says why each trial stopped where it "
                                                  "did; the fixed parameters are in search_space.yaml.")


def _search_plots(spec: Spec, table: pd.DataFrame, study: Optional[optuna.Study]) -> list[str]:
    if study is None:
        return [_section("Learning curves", "<p>This experiment has no study.db (it predates it).</p>")]
    rungs = study.user_attrs.get("rungs") or []
    if not any(trial.intermediate_values for trial in study.get_trials(deepcopy=False)):
        # Optuna's plots would only warn on stderr that there is nothing to draw.
        return [_section(title, "<p>No trial reported a result.</p>")
                for title in ("Learning curves", "Which parameters mattered", "Parallel coordinates")]
    return [_section("Learning curves", _figure(_curves(study, rungs, spec.search.metric), "curves"),
                     f"{spec.search.metric} after every epoch of every trial (Optuna's intermediate values). Dotted "
                     f"lines: the scheduler's rungs; crosses: where a trial was stopped."),
            *_importance_plots(study, rungs, spec.search.metric)]


def _curves(study: optuna.Study, rungs: list[int], metric: str) -> go.Figure:
    figure = optuna.visualization.plot_intermediate_values(study)
    for rung in rungs:
        figure.add_vline(x=rung, line_dash="dot", line_color="#888", annotation_text=f"rung {rung}")
    stops = [trial for trial in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
             if trial.intermediate_values]
    figure.add_trace(go.Scatter(x=[t.last_step for t in stops],
                                y=[t.intermediate_values[t.last_step] for t in stops],
                                mode="markers", name="stopped", marker=dict(symbol="x", size=11, color="#c0392b"),
                                text=[f"trial {t.number}" for t in stops]))
    figure.update_layout(title=None, xaxis_title="epoch", yaxis_title=metric, height=480)
    return figure


def comparable_study(study: optuna.Study, rungs: list[int]) -> tuple[optuna.Study, str]:
    """The trials as one in-memory study whose values are comparable: each trial's metric at the first rung (every
    trial the scheduler let reach it has a value there), or its final value without rungs. Optuna's importances
    and parallel coordinates read completed trials only, and most of a scheduled search is pruned."""
    direction = study.direction
    view = optuna.create_study(direction=direction)
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    epoch = rungs[0] if rungs else None
    for trial in trials:
        value = trial.intermediate_values.get(epoch) if epoch else trial.value
        if value is not None and math.isfinite(value):
            view.add_trial(optuna.trial.create_trial(params=trial.params, distributions=trial.distributions,
                                                     value=value))
    what = f"each trial's value at epoch {epoch}, the first rung" if epoch else "each trial's final value"
    return view, what


def _importance_plots(study: optuna.Study, rungs: list[int], metric: str) -> list[str]:
    view, what = comparable_study(study, rungs)
    note = f"From {len(view.trials)} trials, {what}."
    try:
        importances = optuna.visualization.plot_param_importances(
            view, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
        importances.update_layout(title=None, height=max(240, 40 * len(view.best_trial.params)))
        importance_html = _figure(importances, "importances")
    except (ValueError, RuntimeError) as exc:  # too few trials, or no parameter varied
        importance_html = f"<p>Cannot rank the parameters: {html.escape(str(exc))}</p>"
    coordinates = optuna.visualization.plot_parallel_coordinate(view, target_name=metric) if view.trials else None
    coordinates_html = _figure(coordinates.update_layout(title=None), "parallel") if coordinates else \
        "<p>No trial reported a result.</p>"
    return [_section("Which parameters mattered", importance_html,
                     note + " Optuna's fANOVA importance evaluator (parameters every trial has)."),
            _section("Parallel coordinates", coordinates_html, note)]


def _best_vs_start(spec: Spec, table: pd.DataFrame) -> str:
    metric, names = spec.search.metric, spec.space.names()
    try:
        best = results.best_row(table, metric)
    except ValueError:
        return ""
    rows = [{"": "best", "trial": best["trial_id"], metric: best[metric], **results.params_of(best, names)}]
    for number, point in enumerate(spec.search.start_from, start=1):
        match = _trial_of(table, dict(point), names)
        rows.append({"": f"start_from {number}", "trial": "" if match is None else match["trial_id"],
                     metric: None if match is None else match[metric], **dict(point)})
    shown = ["", "trial", metric] + [d.name for d in spec.space.dimensions] + \
        [key for point in spec.search.start_from for key in point]
    frame = pd.DataFrame(rows)
    body = _html_table(frame[[c for c in dict.fromkeys(shown) if c in frame.columns]])
    return _section("Best configuration and the start points", body,
                    "search.start_from points are tried first; the best trial's configuration is in "
                    f"{results.BEST_CONFIG}.")


def _trial_of(table: pd.DataFrame, point: dict, names: list[str]) -> Optional[pd.Series]:
    """The first trial run with a start point's values (as the table is ordered: its best run)."""
    for _, row in table.iterrows():
        params = results.params_of(row, names)
        if all(_same(params.get(key), value) for key, value in point.items()):
            return row
    return None


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


def _final(spec: Spec, experiment_dir: Path) -> list[str]:
    ensemble_file = experiment_dir / FINAL / ENSEMBLE
    if not ensemble_file.is_file():
        return [_section("Final model", "<p>No final stage was run (run <code>tuneprod retrain "
                                        f"{html.escape(str(experiment_dir))}</code>).</p>")]
    ensemble = json.loads(ensemble_file.read_text())
    rows = []
    for name in ensemble["members"]:
        info = json.loads((experiment_dir / FINAL / name / METADATA).read_text())
        rows.append({"member": name, "from trial": info.get("source_trial"),
                     f"trial {spec.search.metric}": info.get(f"trial_{spec.search.metric}"),
                     "epochs": info.get("epochs"), "seed": info.get("seed"),
                     "backbone": info.get("hyperparams", {}).get("backbone")})
    soups = "; ".join(f"{soup} averages {', '.join(members)}" for soup, members in ensemble["soups"].items())
    weights = ensemble.get("weights") or [1 / len(ensemble["vote"])] * len(ensemble["vote"])
    vote = ", ".join(f"{name} ({weight:.2f})" for name, weight in zip(ensemble["vote"], weights))
    facts = [f"soft vote of {vote}", f"test-time views: {', '.join(ensemble['tta']) or 'none'}",
             f"trained on {ensemble.get('trained_on_images', '?')} labelled images"] + ([soups] if soups else [])
    selection = ensemble.get("selection")
    if selection:  # final.select: greedy
        path = ", ".join(f"+{step['trial']} {step['score']:.4f}" for step in selection["path"])
        facts.append(f"ensemble selection over the trials' validation predictions, {selection['metric']} of the "
                     f"vote after each round: {path}; the first {selection.get('kept_rounds', '?')} kept")
    mistakes = _mistakes(spec, experiment_dir)
    facts += [mistakes[0]] if mistakes else []
    body = "<ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in facts) + "</ul>" + \
        _html_table(pd.DataFrame(rows))
    return [_section("Final model", body)] + (mistakes[1:] if mistakes else [])


def _mistakes(spec: Spec, experiment_dir: Path) -> list[str]:
    """[accuracy line, confusions section, misclassified grid section] when the test images have labels."""
    test = localised(spec, progress=lambda _: None).data.test_path  # a bucket's test images: this node's copy
    predictions_file = experiment_dir / PREDICTIONS
    if test is None or not predictions_file.is_file() or not (test / TEST_LABELS).is_file():
        return []
    truth = pd.read_csv(test / TEST_LABELS, dtype=str)
    predicted = pd.read_csv(predictions_file, dtype={"label": str, "error": str})
    if "error" in predicted.columns:  # unreadable test images have a row, but no prediction
        predicted = predicted[predicted["error"].isna()]
    scored = predicted.merge(truth, on="file", suffixes=("", "_true"))
    wrong = scored[scored["label"] != scored["label_true"]]
    accuracy = f"test accuracy {1 - len(wrong) / max(len(scored), 1):.4f} on {len(scored)} labelled test images"
    pairs = wrong.groupby(["label_true", "label"]).size().sort_values(ascending=False).head(CONFUSED_PAIRS_SHOWN)
    if pairs.empty:
        return [accuracy, _section("Most confused classes", "<p>No test image was misclassified.</p>")]
    names = [f"{true} → {predicted}" for true, predicted in pairs.index]
    bars = go.Figure(go.Bar(x=pairs.values[::-1], y=names[::-1], orientation="h", marker_color="#c0392b"))
    bars.update_layout(xaxis_title="test images", height=max(260, 28 * len(pairs)))
    bars.update_xaxes(dtick=max(1, math.ceil(pairs.max() / 10)))  # counts: whole ticks
    grid = "".join(_thumbnail(test / row.file, row.label_true, row.label, row.confidence)
                   for row in wrong.sort_values("confidence", ascending=False).head(MISCLASSIFIED_SHOWN)
                   .itertuples())
    return [accuracy,
            _section("Most confused classes", _figure(bars, "confusions"), "true class → predicted class"),
            _section("Misclassified test images", f"<div class='grid'>{grid}</div>",
                     f"The {min(len(wrong), MISCLASSIFIED_SHOWN)} most confident mistakes of {len(wrong)}.")]


def _thumbnail(path: Path, true: str, predicted: str, confidence: float) -> str:
    # As predict read it: upright (EXIF), transparency on white, any mode; a regular file only.
    image = Image.fromarray(load_rgb(path, at_least=THUMBNAIL_PX * 2))
    image.thumbnail((THUMBNAIL_PX * 2, THUMBNAIL_PX * 2))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    data = base64.b64encode(buffer.getvalue()).decode()
    return (f"<figure><img class='misclassified' src='data:image/jpeg;base64,{data}' alt='{html.escape(path.name)}'>"
            f"<figcaption>true <b>{html.escape(true)}</b><br>predicted <b>{html.escape(predicted)}</b> "
            f"({confidence:.2f})</figcaption></figure>")
