"""A run's report.html, for `resnext report` and the end of `train`: one self-contained page
(every image inlined as a data: URI, no script, no network) built from the run's files and its
evaluation folder, which is (re)made first when missing or older than best.pt."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resnext_cli import ui
from resnext_cli.config import EvaluateConfig, ReportConfig
from resnext_cli.data.balance import SELECTION_NAMES
from resnext_cli.errors import UserError
from resnext_cli.files import atomic_write_text
from resnext_cli.model.checkpoint import (
    best_of_run,
    read_class_indices,
    read_metrics,
    read_run_config,
    read_run_record,
    run_folder_lock,
)
from resnext_cli.outputs.evaluation import evaluate_into_folder, read_evaluation
from resnext_cli.outputs.html_parts import BASE_STYLE, escape, image_tag, thumbnail_tag
from resnext_cli.outputs.plots import compared_curves_png, training_curves_png, write_png
from resnext_cli.outputs.run_index import (
    RunSummary,
    config_differences,
    config_text,
    duration,
    read_summary,
    resolve_run,
    side_by_side,
)


@dataclass
class Comparison:
    """`report --compare OTHER`: both runs as `resnext runs` reads them, their curves overlaid."""

    this: RunSummary
    other: RunSummary
    curves_png: bytes


@dataclass
class RunFiles:
    """What the report shows, read back from the files `train` and `evaluate` wrote."""

    run_dir: Path
    config: dict[str, Any]
    metrics: list[dict[str, str]]
    classes: list[str]
    curves_png: bytes
    evaluation: dict[str, Any] | None = None  # eval/metrics.json
    per_class: list[dict[str, str]] = field(default_factory=list)
    confusion_png: bytes | None = None
    mistakes: list[dict[str, str]] = field(default_factory=list)
    not_evaluated: str = ""  # why there is no evaluation
    record: dict[str, Any] | None = None  # run.json: status, wall time of every session
    comparison: Comparison | None = None  # --compare OTHER
    heatmaps: dict[tuple[str, str], Path] = field(default_factory=dict)  # eval/heatmaps: (path, class)
    reliability_png: bytes | None = None  # eval/reliability.png (calibration, issue 25)


def write_report(cfg: ReportConfig) -> Path:
    """Evaluate best.pt if its eval/ folder is missing or stale, then write report.html; under
    the run folder's lock (which `train` already holds when it reports at its end)."""
    assert cfg.run_dir is not None
    with run_folder_lock(Path(cfg.run_dir)):
        run = read_run(cfg)
        page = render_html(run, cfg.gallery)
        path = run.run_dir / "report.html"
        atomic_write_text(path, page)
    ui.info(f"Report: {path}")
    return path


def read_run(cfg: ReportConfig) -> RunFiles:
    assert cfg.run_dir is not None
    run_dir = Path(cfg.run_dir)
    needed = ["config.yaml", "metrics.csv", "class_indices.json"]
    missing = [name for name in needed if not (run_dir / name).is_file()]
    if not run_dir.is_dir() or missing:
        raise UserError(
            f"{cfg.run_dir} is not a finished run folder (missing: {', '.join(missing) or 'all'}). "
            "Give a folder written by `resnext train`, e.g. runs/exp, after its first epoch."
        )
    config = read_run_config(run_dir)
    metrics = read_metrics(run_dir / "metrics.csv")
    if not metrics:
        raise UserError(f"{run_dir}/metrics.csv has no completed epoch yet; nothing to report.")
    comparison = read_comparison(run_dir, cfg.compare) if cfg.compare else None
    curves = run_dir / "results.png"
    if curves.is_file():
        curves_png = curves.read_bytes()
    else:  # a run from before plots existed
        curves_png = training_curves_png(metrics)
        write_png(curves, curves_png)
    run = RunFiles(run_dir, config, metrics, read_class_indices(run_dir / "class_indices.json"),
                   curves_png, record=read_run_record(run_dir), comparison=comparison)  # fmt: skip
    _read_evaluation(run, cfg)
    return run


def read_comparison(run_dir: Path, other: str) -> Comparison:
    """The other run (a folder, or a name beside RUN) read back, and both runs' curves drawn on
    the same axes; before any evaluation, so that a wrong name fails at once."""
    other_dir = resolve_run(other, run_dir.parent)
    this, that = read_summary(run_dir), read_summary(other_dir)
    if not that.rows:
        raise UserError(f"{other_dir} has no completed epoch yet; there are no curves to compare with.")
    names = (this.name, that.name) if this.name != that.name else (str(run_dir), str(other_dir))
    return Comparison(this, that, compared_curves_png([(names[0], this.rows), (names[1], that.rows)]))


def _read_evaluation(run: RunFiles, cfg: ReportConfig) -> None:
    """The eval/ folder if it is newer than best.pt (and of the asked data), else a new one."""
    best, out = run.run_dir / "best.pt", run.run_dir / "eval"
    if not best.is_file():
        run.not_evaluated = f"{best} does not exist."
        return
    metrics_file = out / "metrics.json"
    current = metrics_file.is_file() and metrics_file.stat().st_mtime >= best.stat().st_mtime
    recorded = read_evaluation(out) if current else None
    if recorded is not None and cfg.data is not None and recorded.metrics.get("data") != cfg.data:
        recorded = None  # an evaluation of other data
    if recorded is not None and cfg.unknown is not None and recorded.metrics.get("unknown_data") != cfg.unknown:
        recorded = None  # without the unknowns asked for
    if recorded is None:
        data = cfg.data or run.config.get("data")
        evaluation = EvaluateConfig(checkpoint=str(best), data=data, out=str(out),
                                    batch_size=cfg.batch_size, workers=cfg.workers,
                                    device=cfg.device, decode=cfg.decode, heatmaps=cfg.gallery,
                                    unknown=cfg.unknown)  # fmt: skip
        try:
            evaluation.validate()
            evaluate_into_folder(evaluation, quiet=True)
        except UserError as exc:
            run.not_evaluated = f"Could not evaluate {best} on {data}: {exc}"
            ui.warn(f"{run.not_evaluated} The report has no per-class metrics or mistakes; "
                    f"`resnext report {run.run_dir} --data DIR` adds them.")  # fmt: skip
            return
        recorded = read_evaluation(out)
    run.evaluation = recorded.metrics
    run.per_class = recorded.per_class
    run.mistakes = recorded.mistakes
    run.confusion_png = recorded.confusion_png
    run.heatmaps = recorded.heatmaps
    run.reliability_png = recorded.reliability_png


# ---------------------------------------------------------------- HTML

STYLE = BASE_STYLE + """
tr.avg td { font-weight: 600; border-top: 2px solid #ccc; }
img.figure { max-width: 100%; height: auto; border: 1px solid #eee; }
table.config td { text-align: left; }
.bar { display: inline-block; height: .8rem; background: #4a7bd0; vertical-align: middle; }
td.recall { text-align: left; white-space: nowrap; }
.gallery figure.explained { width: 508px; }
.gallery figure.explained img { margin-right: 4px; }
"""


def render_html(run: RunFiles, gallery: int) -> str:
    title = f"resnext run {run.run_dir.name}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="muted">{escape(str(run.run_dir))}</p>',
        _summary(run),
        '<h2 id="curves">Training curves</h2>',
        image_tag(run.curves_png, "png", "training curves: loss, accuracy and learning rate per epoch"),
        _comparison(run),
        '<h2 id="confusion">Confusion matrix</h2>',
        _evaluation_note(run),
    ]
    if run.confusion_png is not None:
        parts.append(image_tag(run.confusion_png, "png", "confusion matrix"))
    parts += ['<h2 id="per-class">Per-class metrics</h2>', _per_class_table(run)]
    parts += ['<h2 id="balance">Class balance: recall by training images</h2>', _balance_section(run)]
    parts += ['<h2 id="mistakes">Most confident mistakes</h2>', _gallery(run, gallery)]
    parts += ['<h2 id="trust">Calibration and unknown images</h2>', _trust_section(run)]
    parts += ['<h2 id="config">Config</h2>', _config_table(run.config)]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _summary(run: RunFiles) -> str:
    best = best_of_run(run.record, run.config, run.metrics) or {"val_acc": float("nan"), "epoch": "?"}
    cards = [
        ("best val accuracy", f"{best['val_acc']:.2%}"),
        ("at epoch", f"{best['epoch']} of {run.metrics[-1]['epoch']}"),
        ("architecture", str(run.config.get("arch", "?"))),
        ("classes", str(len(run.classes))),
        ("training time", _training_time(run)[0]),
    ]
    if run.evaluation:
        cards.insert(1, ("evaluated accuracy", f"{run.evaluation['accuracy']:.2%}"))
        if "top5" in run.evaluation:
            cards.insert(2, ("top-5", f"{run.evaluation['top5']:.2%}"))
    body = "".join(f'<div class="card">{escape(k)}<b>{escape(v)}</b></div>' for k, v in cards)
    return f'<div class="cards">{body}</div><p class="muted">{escape(_training_time(run)[1])}</p>'


def _training_time(run: RunFiles) -> tuple[str, str]:
    """The run's time as a user waited for it: run.json's wall clock over every session (setup
    and feature caching included, which the epochs' own seconds leave out); for a run from
    before run.json, the epochs' seconds, saying so. Returns the card's value and a note."""
    epochs = duration(sum(float(r["seconds"]) for r in run.metrics), spaced=True)
    wall = (run.record or {}).get("wall_seconds")
    if not isinstance(wall, (int, float)) or wall <= 0:
        return epochs, (f"Training time: {epochs}, the epochs alone (this run has no run.json, "
                        "which times setup and feature caching too).")  # fmt: skip
    sessions = int((run.record or {}).get("sessions") or 1)
    over = f" over {sessions} sessions" if sessions > 1 else ""
    clock = duration(wall, spaced=True)
    return clock, (f"Training time: {clock} of wall clock{over} (run.json: setup and feature caching "
                   f"included); the epochs themselves took {epochs}.")  # fmt: skip


def _comparison(run: RunFiles) -> str:
    """--compare OTHER: the curves overlaid, the metrics side by side, the config differences."""
    c = run.comparison
    if c is None:
        return ""
    head = f"<tr><th></th><th>{escape(c.this.name)}</th><th>{escape(c.other.name)}</th></tr>"
    metrics = "".join(f"<tr><td>{escape(label)}</td><td>{escape(x)}</td><td>{escape(y)}</td></tr>"
                      for label, (x, y) in side_by_side(c.this, c.other))  # fmt: skip
    differences = config_differences(c.this.config, c.other.config)
    config = "".join(f"<tr><td>{escape(key)}</td><td>{escape(config_text(x))}</td>"
                     f"<td>{escape(config_text(y))}</td></tr>" for key, x, y in differences)  # fmt: skip
    return "\n".join([
        f'<h2 id="compare">Compared with {escape(c.other.name)}</h2>',
        f'<p class="muted">{escape(c.other.path)}. Solid lines: val; dashed: train.</p>',
        image_tag(c.curves_png, "png", f"training curves of {c.this.name} and {c.other.name}"),
        f'<table class="compare">{head}{metrics}</table>',
        f"<h3>Config differences ({len(differences)})</h3>",
        f'<table class="config">{head}{config}</table>' if differences
        else '<p class="muted">Same config.</p>',
    ])  # fmt: skip


def _evaluation_note(run: RunFiles) -> str:
    if run.evaluation is None:
        return f'<p class="muted">Not evaluated: {escape(run.not_evaluated)}</p>'
    e = run.evaluation
    unreadable = f", {e['unreadable']} unreadable" if e.get("unreadable") else ""
    return (
        f'<p class="muted">{escape(Path(str(e.get("checkpoint", "best.pt"))).name)} on '
        f"{escape(str(e.get('images', e.get('data', ''))))}: {e['n']} images{escape(unreadable)}, "
        f"accuracy {e['accuracy']:.2%}, macro F1 {e['macro_f1']:.2%}.</p>"
    )


def _per_class_table(run: RunFiles) -> str:
    if not run.per_class:
        return '<p class="muted">No evaluation (see above).</p>'
    head = "<tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>"
    rows = [
        f"<tr><td>{escape(r['class'])}</td><td>{float(r['precision']):.2%}</td>"
        f"<td>{float(r['recall']):.2%}</td><td>{float(r['f1']):.2%}</td>"
        f"<td>{escape(r['support'])}</td></tr>"
        for r in run.per_class
    ]
    e = run.evaluation or {}
    for kind in ("macro", "weighted"):
        rows.append(
            f'<tr class="avg"><td>{kind} avg</td><td>{e[kind + "_precision"]:.2%}</td>'
            f'<td>{e[kind + "_recall"]:.2%}</td><td>{e[kind + "_f1"]:.2%}</td>'
            f"<td>{e['n']}</td></tr>"
        )
    return f'<table class="per-class">{head}{"".join(rows)}</table>'


def _balance_section(run: RunFiles) -> str:
    """Balanced accuracy and macro-F1 beside accuracy, what the run did about imbalance, and
    each class's recall from the most trained class down, so that the tail is seen at once."""
    e = run.evaluation
    if e is None or not run.per_class:
        return '<p class="muted">No evaluation (see above).</p>'
    select_by = SELECTION_NAMES.get(str(run.config.get("select_by")), "accuracy")
    prior = {"uniform": "every class equally likely", "train": "classes as frequent as in training"}
    assumed = f" Predictions assume {prior[e['prior']]} (prior {e['prior']})." if e.get("prior") in prior else ""
    text = (f"Balanced accuracy <b>{e.get('balanced_accuracy', 0):.2%}</b>, macro-F1 "
            f"<b>{e['macro_f1']:.2%}</b>, accuracy {e['accuracy']:.2%}. Trained with --balance "
            f"{escape(run.config.get('balance', 'none'))}; best epoch chosen by val "
            f"{escape(select_by)}.{escape(assumed)}")  # fmt: skip
    counted = any(r.get("train_images") for r in run.per_class)
    if not counted:
        text += " The checkpoint does not record its training images per class (an older run)."
    head = "<tr><th>class</th><th>train images</th><th>val images</th><th>recall</th></tr>"
    rows = []
    for r in run.per_class:  # per_class.csv: most training images first
        recall = float(r["recall"])
        rows.append(f"<tr><td>{escape(r['class'])}</td><td>{escape(r.get('train_images') or '?')}</td>"
                    f"<td>{escape(r['support'])}</td><td class=\"recall\"><span class=\"bar\" "
                    f'style="width:{recall * 12:.2f}rem"></span> {recall:.2%}</td></tr>')  # fmt: skip
    return f'<p>{text}</p><table class="balance">{head}{"".join(rows)}</table>'


def _gallery(run: RunFiles, limit: int) -> str:
    if run.evaluation is None:
        return '<p class="muted">No evaluation (see above).</p>'
    if not run.mistakes:
        return '<p class="muted">No mistakes: every evaluated image was classified correctly.</p>'
    shown = run.mistakes[:limit]
    figures = []
    for m in shown:
        picture = thumbnail_tag(m["path"], f"{m['true']} predicted as {m['predicted']}")
        explained = _mistake_heatmaps(run, m)
        css = ' class="explained"' if explained else ""
        figures.append(
            f"<figure{css}>{picture}{explained}"
            f"<figcaption>true <b>{escape(m['true'])}</b><br>predicted "
            f'<span class="wrong">{escape(m["predicted"])}</span>&nbsp;{float(m["prob"]):.1%}<br>'
            f'<span class="muted file">{escape(Path(m["path"]).name)}</span></figcaption></figure>'
        )
    more = len(run.mistakes) - len(shown)
    tail = f'<p class="muted">... and {more} more in eval/misclassified.csv.</p>' if more else ""
    return f'{_heatmaps_note(run)}<div class="gallery">{"".join(figures)}</div>{tail}'


def _mistake_heatmaps(run: RunFiles, mistake: dict[str, str]) -> str:
    """Beside the photo: where the model saw the predicted class, and the true one."""
    files = [run.heatmaps.get((mistake["path"], mistake[role])) for role in ("predicted", "true")]
    if not all(files):
        return ""
    return "".join(thumbnail_tag(str(path), f"heatmap of {role} class {mistake[role]}")
                   for role, path in zip(("predicted", "true"), files))  # fmt: skip


def _heatmaps_note(run: RunFiles) -> str:
    if run.heatmaps:
        return ('<p class="muted">Beside each photo, Grad-CAM heatmaps of where the model saw the '
                "predicted class (middle) and the true class (right); greyed: outside the crop the "
                "model saw, ringed: the peak.</p>")  # fmt: skip
    return ('<p class="muted">No heatmaps of these mistakes: `resnext evaluate` draws them with the '
            "[explain] extra (pip install 'resnext-cli[explain]').</p>")  # fmt: skip


def _trust_section(run: RunFiles) -> str:
    """The temperature with ECE and NLL before and after it, the reliability diagrams, the
    unknown score's rule and, when evaluate had --unknown photos, how well it told them."""
    e = run.evaluation or {}
    if "ece" not in e:
        return '<p class="muted">No calibration measured (see the evaluation above).</p>'
    rows = [("temperature", f"{e['temperature']:.3g}", ""),
            ("ECE (15 bins)", f"{e['ece_uncalibrated']:.3f}", f"{e['ece']:.3f}"),
            ("NLL", f"{e['nll_uncalibrated']:.3f}", f"{e['nll']:.3f}")]  # fmt: skip
    head = "<tr><th></th><th>raw softmax</th><th>calibrated</th></tr>"
    body = "".join(f"<tr><td>{escape(a)}</td><td>{escape(b)}</td><td>{escape(c)}</td></tr>" for a, b, c in rows[1:])
    fitted = f", fitted on {e['unknown_fitted_on']}" if e.get("unknown_fitted_on") else ""
    parts = [f"<p>Temperature {escape(rows[0][1])}{escape(fitted)} (<code>resnext calibrate</code> refits "
             "it on other labelled photos): the probabilities shown are softmax(logits / temperature). "
             f"Measured on the evaluated images:</p><table>{head}{body}</table>"]  # fmt: skip
    if run.reliability_png is not None:
        parts.append(image_tag(run.reliability_png, "png", "reliability diagrams before and after calibration"))
    if "unknown_score" in e:
        parts.append(f"<p>Unknown score <b>{escape(e['unknown_score'])}</b>: an image scoring above "
                     f"{e['unknown_threshold']:.3g} is <code>unknown</code> (the threshold accepts "
                     f"{e['unknown_accept']:.0%} of the photos it was set on); "
                     f"{e.get('known_accepted', 0):.1%} of the evaluated images are accepted as known.</p>")  # fmt: skip
    else:
        parts.append('<p class="muted">This checkpoint has no unknown score (<code>resnext calibrate</code> '
                     "fits one).</p>")  # fmt: skip
    if "unknown_auroc" in e:
        cards = [("unknown photos", str(e["unknown_images"])), ("AUROC", f"{e['unknown_auroc']:.3f}"),
                 ("FPR at 95% TPR", f"{e['unknown_fpr95']:.1%}"), ("rejected", f"{e['unknown_rejected']:.1%}")]  # fmt: skip
        body = "".join(f'<div class="card">{escape(k)}<b>{escape(v)}</b></div>' for k, v in cards)
        parts.append(f'<p class="muted">Photos of none of the classes: {escape(e["unknown_data"])}.</p>'
                     f'<div class="cards">{body}</div>')  # fmt: skip
    return "\n".join(parts)


def _config_table(config: dict[str, Any]) -> str:
    """As config.yaml writes it: true/false/null, so that one style is shown throughout."""
    rows = "".join(
        f"<tr><td>{escape(key)}</td><td>{escape(_yaml_scalar(value))}</td></tr>"
        for key, value in config.items()
    )
    return f'<table class="config">{rows}</table>'


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
