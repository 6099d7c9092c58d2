"""Model outputs on a labelled folder -> an evaluation: which images (`evaluation_samples`),
their predictions (`score`), the metrics (`summarise`) and the eval/ folder of files
(`write_evaluation`, `read_evaluation`). Shared by `resnext evaluate`, `train` and `report`."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from resnext_cli import ui
from resnext_cli.config import EvaluateConfig
from resnext_cli.data.batches import get_batch
from resnext_cli.data.folders import find_splits, ignored_entries, list_images, read_split_val
from resnext_cli.data.loaders import make_loader
from resnext_cli.errors import EXIT_FAILED, UserError
from resnext_cli.files import atomic_write_csv, atomic_write_text, make_folder, read_csv
from resnext_cli.model.engines import InferenceModel, OnnxModel, load_inference_model
from resnext_cli.model.trust import BatchOutput, Calibration, apply_temperature, nll
from resnext_cli.outputs.metrics import (
    ClassificationReport,
    ReliabilityBin,
    auroc,
    classification_report,
    confusion_matrix,
    expected_calibration_error,
    fpr_at_tpr,
    reliability_bins,
)
from resnext_cli.outputs.plots import confusion_matrix_png, reliability_png, write_png


@dataclass
class EvaluationSet:
    samples: list[tuple[str, int]]  # labels index the model's classes
    description: str  # which images these are, for the user
    warnings: list[str]


@dataclass
class Prediction:
    path: str
    true: int
    predicted: int
    prob: float  # of the predicted class
    top5: bool  # the true class among the five most probable
    raw_prob: float | None = None  # of the predicted class, at temperature 1
    true_prob: float | None = None  # of the true class (NLL)
    raw_true_prob: float | None = None
    unknown_score: float | None = None  # None: the model has no unknown score
    known: bool | None = None


@dataclass
class UnknownEvaluation:
    """How well the unknown score tells `--unknown` photos from the evaluated ones."""

    folder: str
    rows: list[tuple[str, str, float, float, bool]]  # path, nearest class, its prob, score, known
    unreadable: list[tuple[str, str]]
    auroc: float
    fpr95: float  # share of unknowns accepted when 95% of the known images are
    rejected: float  # share of unknowns with known = false at the model's threshold


@dataclass
class Evaluation:
    classes: list[str]  # the model's
    predictions: list[Prediction]
    unreadable: list[tuple[str, str]]
    report: ClassificationReport
    matrix: list[list[int]]  # over the classes in `shown`
    shown: list[str]  # classes present in the data or predicted, in model order
    top5: float | None  # None with 5 classes or fewer
    trust: dict[str, Any] = field(default_factory=dict)  # the calibration and unknown rule used
    unknown: UnknownEvaluation | None = None  # with --unknown

    def metrics(self) -> dict[str, Any]:
        summary = self.report.summary()
        metrics: dict[str, Any] = {"accuracy": summary.pop("accuracy")}
        if self.top5 is not None:
            metrics["top5"] = self.top5
        metrics.update(summary, unreadable=len(self.unreadable))
        metrics.update(self.calibration_metrics())
        return metrics

    def reliability(self, calibrated: bool) -> list[ReliabilityBin]:
        """The reliability diagram's bins, of the probabilities shown or of the raw ones."""
        confidences = [p.prob if calibrated else _or(p.raw_prob, p.prob) for p in self.predictions]
        return reliability_bins(confidences, [p.predicted == p.true for p in self.predictions])

    def calibration_metrics(self) -> dict[str, Any]:
        """ECE (15 bins) and NLL before (raw softmax) and after the temperature; the unknown
        score's acceptance of these images and, with --unknown, how it tells the others."""
        correct = [p.predicted == p.true for p in self.predictions]
        shown = [p.prob for p in self.predictions]
        raw = [_or(p.raw_prob, p.prob) for p in self.predictions]
        out: dict[str, Any] = {
            "ece": expected_calibration_error(shown, correct),
            "nll": _mean_nll([_or(p.true_prob, 0.0) for p in self.predictions]),
            "ece_uncalibrated": expected_calibration_error(raw, correct),
            "nll_uncalibrated": _mean_nll([_or(p.raw_true_prob, _or(p.true_prob, 0.0)) for p in self.predictions]),
            **self.trust,
        }  # fmt: skip
        verdicts = [p.known for p in self.predictions if p.known is not None]
        if verdicts:
            out["known_accepted"] = sum(verdicts) / len(verdicts)
        if self.unknown is not None:
            u = self.unknown
            out.update(unknown_data=u.folder, unknown_images=len(u.rows), unknown_auroc=u.auroc,
                       unknown_fpr95=u.fpr95, unknown_rejected=u.rejected)  # fmt: skip
        return out


def evaluation_samples(data: str, classes: list[str], run_dir: Path | None) -> EvaluationSet:
    """DIR/<class>/* as it is; a dataset root's val folder; or, for a folder a run split itself,
    that run's recorded val split (never the images it trained on)."""
    splits = find_splits(data)  # the folders `train` would read
    if "val" in splits:
        scan, description = splits["val"], f"the val split {splits['val'].folder}"
    else:
        scan = splits["train"]
        split_file = run_dir / "split.json" if run_dir else None
        recorded = read_split_val(split_file, scan.folder)
        if recorded is not None:
            return _labelled(recorded, classes, scan.folder, f"the val split in {split_file}", [])
        description = f"all images in {scan.folder}"
    folder = scan.folder
    pairs = [(path, name) for name, paths in scan.classes.items() for path in paths]
    warnings = [finding.text() for finding in ignored_entries(scan)]
    empty = [name for name, paths in scan.classes.items() if not paths]
    if empty:
        warnings.append(f"Class folders with no images in {folder}: {', '.join(empty)}.")
    return _labelled(pairs, classes, folder, description, warnings)


def _labelled(
    pairs: list[tuple[str, str]], classes: list[str], folder: Path, description: str,
    warnings: list[str],
) -> EvaluationSet:  # fmt: skip
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({name for _, name in pairs if name not in index})
    if unknown:
        raise UserError(
            f"{folder} has classes the model does not know: {', '.join(unknown)}. The model's "
            f"classes are: {', '.join(classes)}. Classes are matched by folder name; rename or "
            "remove the others."
        )
    if not pairs:
        raise UserError(
            f"No images to evaluate in {folder}: expected class folders of images "
            "(DIR/<class>/*.jpg), or a dataset root with a val/ folder."
        )
    return EvaluationSet([(path, index[name]) for path, name in pairs], description, warnings)


def score(
    engine: InferenceModel | OnnxModel, samples: list[tuple[str, int]], batch_size: int,
    workers: int | None, warn: bool = True,
) -> Evaluation:  # fmt: skip
    """Predictions for every readable image; unreadable ones are left out (and, with `warn`,
    reported one by one)."""
    predictions, unreadable = predict_samples(engine, samples, batch_size, workers, warn)
    if not predictions:
        raise UserError("None of the images could be read (see the warnings above).", EXIT_FAILED)
    evaluation = summarise(engine.classes, predictions, unreadable)
    evaluation.trust = trust_rule(engine.calibration)
    return evaluation


def predict_samples(
    engine: InferenceModel | OnnxModel, samples: list[tuple[str, int]], batch_size: int,
    workers: int | None, warn: bool = True, desc: str = "evaluate",
) -> tuple[list[Prediction], list[tuple[str, str]]]:  # fmt: skip
    """The model's predictions for the readable images (labels -1: no true class), and the
    unreadable files with their reasons."""
    loader = make_loader(
        engine.dataset(samples),
        batch_size=batch_size,
        workers=engine.decode_workers([path for path, _ in samples], workers),
        pin_memory=engine.pin_memory,
    )
    predictions: list[Prediction] = []
    unreadable: list[tuple[str, str]] = []
    for loaded in ui.progress(loader, desc=desc, unit="batch"):
        batch = get_batch(loaded, engine.spec)
        for index, reason in batch.failures:
            unreadable.append((samples[index][0], reason))
            if warn:
                ui.warn(f"skipped unreadable file {samples[index][0]}: {reason}")
        if batch.inputs is not None:
            output = engine.predict(batch.inputs)
            paths = [samples[i][0] for i in batch.indices]
            predictions += batch_predictions(output, paths, batch.labels.cpu())
    return predictions, unreadable


def batch_predictions(output: BatchOutput, paths: list[str], labels: torch.Tensor) -> list[Prediction]:
    """One Prediction per row of a predicted batch (labels: -1 where there is no true class)."""
    k = min(5, output.probs.shape[1])
    top_probs, top_classes = torch.topk(output.probs, k, dim=1)
    hits = (top_classes == labels[:, None]).any(dim=1)
    true = labels.clamp(min=0)[:, None]
    true_probs, raw_true = output.probs.gather(1, true)[:, 0], output.raw_probs.gather(1, true)[:, 0]
    raw_top = output.raw_probs.gather(1, top_classes[:, :1])[:, 0]
    scores = output.unknown_score.tolist() if output.unknown_score is not None else [None] * len(paths)
    known = output.known.tolist() if output.known is not None else [None] * len(paths)
    return [
        Prediction(path, int(labels[i]), int(top_classes[i, 0]), float(top_probs[i, 0]), bool(hits[i]),
                   float(raw_top[i]), float(true_probs[i]), float(raw_true[i]), scores[i], known[i])
        for i, path in enumerate(paths)
    ]  # fmt: skip


def trust_rule(calibration: Calibration) -> dict[str, Any]:
    """What the probabilities and verdicts were computed with, for metrics.json."""
    rule: dict[str, Any] = {"temperature": calibration.temperature}
    if calibration.unknown is not None:
        u = calibration.unknown
        rule.update(unknown_score=u.name, unknown_threshold=u.threshold, unknown_accept=u.accept,
                    unknown_fitted_on=u.fitted_on)  # fmt: skip
    return rule


def score_unknowns(
    engine: InferenceModel | OnnxModel, folder: str, known: list[Prediction], batch_size: int,
    workers: int | None,
) -> UnknownEvaluation:  # fmt: skip
    """The model on `--unknown` photos (of none of its classes): their unknown scores against
    those of the evaluated images."""
    if engine.calibration.unknown is None:
        raise UserError(f"--unknown needs an unknown score, and {engine.source} has none (a checkpoint "
                        "from before calibration existed, or --no-calibration); `resnext calibrate` "
                        "fits one.")  # fmt: skip
    paths = list_images(Path(folder), recursive=True)
    if not paths:
        raise UserError(f"No image files in --unknown {folder} (nor in its sub-folders).")
    predictions, unreadable = predict_samples(engine, [(p, -1) for p in paths], batch_size, workers,
                                              warn=False, desc="unknowns")  # fmt: skip
    if not predictions:
        raise UserError(f"None of the images in --unknown {folder} could be read.", EXIT_FAILED)
    rows = [(p.path, engine.classes[p.predicted], p.prob, float(p.unknown_score or 0.0), bool(p.known))
            for p in predictions]  # fmt: skip
    inside = [float(p.unknown_score or 0.0) for p in known]
    outside = [row[3] for row in rows]
    return UnknownEvaluation(folder, rows, unreadable, auroc(inside, outside), fpr_at_tpr(inside, outside),
                             sum(not row[4] for row in rows) / len(rows))  # fmt: skip


def summarise(
    classes: list[str], predictions: list[Prediction], unreadable: list[tuple[str, str]]
) -> Evaluation:
    full = confusion_matrix(
        [p.true for p in predictions], [p.predicted for p in predictions], len(classes)
    )
    present = [
        i for i in range(len(classes)) if sum(full[i]) or any(row[i] for row in full)
    ]
    matrix = [[full[i][j] for j in present] for i in present]
    shown = [classes[i] for i in present]
    # with 5 classes or fewer the true class is always among the top 5: nothing to report
    top5 = sum(p.top5 for p in predictions) / len(predictions) if len(classes) > 5 else None
    report = classification_report(matrix, shown)
    return Evaluation(classes, predictions, unreadable, report, matrix, shown, top5)


def write_evaluation(out: Path, evaluation: Evaluation, about: dict[str, str]) -> None:
    """metrics.json (with `about`: what was evaluated), per_class.csv, confusion_matrix.csv and
    .png, misclassified.csv; each written atomically."""
    metrics = evaluation.metrics()
    rows = [["class", "precision", "recall", "f1", "support"]]
    rows += [[c.name, _num(c.precision), _num(c.recall), _num(c.f1), str(c.support)]
             for c in evaluation.report.per_class]  # fmt: skip
    atomic_write_csv(out / "per_class.csv", rows)
    rows = [["true\\pred", *evaluation.shown]]
    rows += [[name, *map(str, row)] for name, row in zip(evaluation.shown, evaluation.matrix)]
    atomic_write_csv(out / "confusion_matrix.csv", rows)
    title = f"{metrics['n']} images, accuracy {metrics['accuracy']:.2%}"
    write_png(out / "confusion_matrix.png",
              confusion_matrix_png(evaluation.matrix, evaluation.shown, title))  # fmt: skip
    rows = [["path", "true", "predicted", "prob"]]
    rows += [[m.path, evaluation.classes[m.true], evaluation.classes[m.predicted], _num(m.prob)]
             for m in mistakes(evaluation)]  # fmt: skip
    atomic_write_csv(out / "misclassified.csv", rows)
    write_png(out / "reliability.png", reliability_png(evaluation.reliability(False), evaluation.reliability(True),
                                                       metrics["temperature"]))  # fmt: skip
    if evaluation.unknown is not None:
        rows = [["path", "nearest", "prob", "unknown_score", "known"]]
        rows += [[p, c, _num(prob), _num(s), str(k).lower()] for p, c, prob, s, k in evaluation.unknown.rows]
        atomic_write_csv(out / "unknown.csv", rows)
    # last: a metrics.json newer than the checkpoint means the whole folder is complete
    text = json.dumps({**metrics, **about}, indent=2, ensure_ascii=False)
    atomic_write_text(out / "metrics.json", text + "\n")


def mistakes(evaluation: Evaluation) -> list[Prediction]:
    """Wrong predictions, most confident first (ties by path, so the order is stable)."""
    wrong = [p for p in evaluation.predictions if p.predicted != p.true]
    return sorted(wrong, key=lambda p: (-p.prob, p.path))




@dataclass
class EvaluationRun:
    evaluation: Evaluation
    out: Path  # the folder written
    seconds: float


def evaluate_into_folder(cfg: EvaluateConfig, quiet: bool = False) -> EvaluationRun:
    """Score the model on the data (by default what it was trained on) and write the
    evaluation folder."""
    talk = not (cfg.json or quiet)
    engine = load_inference_model(cfg, announce=talk)
    data = cfg.data or engine.trained_on
    if data is None:
        raise UserError(
            f"No data given, and {engine.source} does not record the data it was trained on. "
            "Pass the labelled images: resnext evaluate DATA (DATA/<class>/* or a dataset root)."
        )
    if talk and not cfg.data:
        ui.note(f"Data: {data}, which {engine.source} was trained on (pass DATA to choose other "
                "images).")  # fmt: skip
    run_dir = Path(engine.source).parent if not cfg.weights else None
    chosen = evaluation_samples(data, engine.classes, run_dir)
    for message in chosen.warnings:
        ui.warn(message)
    out = Path(cfg.out) if cfg.out else Path(engine.source).parent / "eval"
    make_folder(out)
    if talk:
        ui.note(f"Evaluating {len(chosen.samples)} images ({chosen.description})  |  "
                f"{engine.describe()}")  # fmt: skip
    started = time.perf_counter()
    evaluation = score(engine, chosen.samples, cfg.batch_size, cfg.workers, warn=not quiet)
    if cfg.unknown:
        evaluation.unknown = score_unknowns(engine, cfg.unknown, evaluation.predictions, cfg.batch_size,
                                            cfg.workers)  # fmt: skip
    seconds = time.perf_counter() - started
    about = {"checkpoint": engine.source, "data": data, "images": chosen.description}
    write_evaluation(out, evaluation, about)
    return EvaluationRun(evaluation, out, seconds)


@dataclass
class RecordedEvaluation:
    """An eval/ folder read back: what `write_evaluation` wrote."""

    metrics: dict[str, Any]  # metrics.json, with what was evaluated
    per_class: list[dict[str, str]]
    mistakes: list[dict[str, str]]  # misclassified.csv, most confident first
    confusion_png: bytes
    reliability_png: bytes | None = None  # absent in folders from before calibration existed


def read_evaluation(out: Path) -> RecordedEvaluation:
    reliability = out / "reliability.png"
    return RecordedEvaluation(
        json.loads((out / "metrics.json").read_text(encoding="utf-8")),
        read_csv(out / "per_class.csv"),
        read_csv(out / "misclassified.csv"),
        (out / "confusion_matrix.png").read_bytes(),
        reliability.read_bytes() if reliability.is_file() else None,
    )


def calibration_summary(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict[str, float]:
    """ECE (15 bins) and NLL of softmax(logits / temperature) against the labels."""
    probs = torch.softmax(apply_temperature(logits.double(), temperature), dim=1)
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).tolist()
    return {"ece": expected_calibration_error(confidence.tolist(), correct),
            "nll": nll(logits, labels, temperature)}  # fmt: skip


def _num(value: float) -> str:
    return f"{value:.6f}"


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _mean_nll(true_probs: list[float]) -> float:
    """Mean -log p(true class), with p floored at 1e-12 (a probability that rounded to 0)."""
    return sum(-math.log(max(p, 1e-12)) for p in true_probs) / len(true_probs) if true_probs else 0.0
