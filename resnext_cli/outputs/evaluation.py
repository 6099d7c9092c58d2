"""Model outputs on a labelled folder -> an evaluation: which images (`evaluation_samples`),
their predictions (`score`), the metrics (`summarise`) and the eval/ folder of files
(`write_evaluation`, `read_evaluation`). Shared by `resnext evaluate`, `train` and `report`."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from resnext_cli import ui
from resnext_cli.config import EXPLAIN_DEFAULT, EvaluateConfig
from resnext_cli.data.batches import get_batch
from resnext_cli.data.folders import (
    ClassFolders,
    find_splits,
    find_val_folder,
    ignored_entries,
    list_images,
    path_digests_each,
    read_split,
    split_val_in,
)
from resnext_cli.data.loaders import make_loader
from resnext_cli.errors import EXIT_FAILED, UserError
from resnext_cli.files import atomic_write_csv, atomic_write_text, make_folder, read_csv
from resnext_cli.model.cam import require_captum
from resnext_cli.model.checkpoint import run_folder_lock
from resnext_cli.model.distributed import DistContext, gather_objects, shard
from resnext_cli.model.engines import InferenceModel, OnnxModel, load_inference_model
from resnext_cli.model.trust import BatchOutput, Calibration, apply_temperature, nll
from resnext_cli.outputs.heatmaps import (
    explain_images,
    overlay_name,
    read_explain_json,
    write_explain_json,
    write_overlay,
)
from resnext_cli.outputs.metrics import (
    ClassificationReport,
    ClassScores,
    ReliabilityBin,
    auroc,
    classification_report,
    confusion_matrix,
    expected_calibration_error,
    fpr_at_tpr,
    reliability_bins,
)
from resnext_cli.outputs.plots import confusion_matrix_png, reliability_png, write_png

SINGLE_PROCESS = DistContext()


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
    class_counts: list[int] | None = None  # the model's training images per class, if recorded
    trust: dict[str, Any] = field(default_factory=dict)  # the calibration and unknown rule used
    unknown: UnknownEvaluation | None = None  # with --unknown

    def by_training_count(self) -> list[tuple[ClassScores, int | None]]:
        """Per-class scores with the class's training images, the most first, so that the
        rare classes (the tail) come together at the end; in model order when not recorded."""
        counts = dict(zip(self.classes, self.class_counts or []))
        rows = [(scores, counts.get(scores.name)) for scores in self.report.per_class]
        return sorted(rows, key=lambda row: -(row[1] or 0))

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


@dataclass
class TrainingRecord:
    """What a checkpoint says about its training data: the folder (config `data`) and the
    digests of the files it trained on (checkpoint.TRAIN_DIGESTS); None where not recorded."""

    source: str = "the model"
    data: str | None = None
    digests: torch.Tensor | None = None

    def used(self, paths: list[str]) -> list[bool]:
        """Per path: did this model train on that file?"""
        if self.digests is None or not paths:
            return [False] * len(paths)
        wanted = torch.tensor(path_digests_each(paths), dtype=torch.int64)
        return torch.isin(wanted, self.digests).tolist()

    def split(self, folder: Path) -> bool:
        """Is `folder` the one this model's run split itself (it had no val folder)?"""
        if not self.data or not Path(self.data).is_dir():
            return False
        root = Path(self.data)
        train = root / "train" if (root / "train").is_dir() else root
        self_split = train == root or find_val_folder(root) is None
        return self_split and train.resolve() == folder.resolve()


def evaluation_samples(
    data: str, classes: list[str], run_dir: Path | None, trained: TrainingRecord | None = None
) -> EvaluationSet:
    """DIR/<class>/* as it is; a dataset root's val folder; or, for a folder a run split itself,
    that run's recorded val split (never the images it trained on). Warns when the checkpoint
    records that it trained on some of the images chosen."""
    trained = trained or TrainingRecord()
    splits = find_splits(data)  # the folders `train` would read
    if "val" in splits:
        chosen = _every_image(splits["val"], classes, f"the val split {splits['val'].folder}")
    else:
        chosen = _single_folder(splits["train"], classes, run_dir, trained)
    used = sum(trained.used([path for path, _ in chosen.samples]))
    if used:
        chosen.warnings.append(
            f"{used} of these {len(chosen.samples)} images were used to train this model "
            f"({trained.source} records the files it trained on): accuracy on them overstates how "
            "it does on new images. Evaluate images it never saw (its val split, a test folder)."
        )
    return chosen


def _single_folder(
    scan: ClassFolders, classes: list[str], run_dir: Path | None, trained: TrainingRecord
) -> EvaluationSet:
    """A folder of class folders: its recorded val split if a run split it, else every image."""
    split_file = run_dir / "split.json" if run_dir else None
    split = read_split(split_file)
    recorded = split_val_in(split, scan.folder) if split else None
    if recorded is not None:
        return _labelled(recorded, classes, scan.folder, f"the val split in {split_file}", [])
    if not trained.split(scan.folder):
        return _every_image(scan, classes, f"all images in {scan.folder}")
    # the folder the model's run split itself, without a split record that applies to it
    record = f"its split record {split_file} {'is for another folder' if split else 'is missing'}"
    if trained.digests is None:
        raise UserError(
            f"{trained.source} was trained on part of {scan.folder} (the rest held out for "
            f"validation), but {record} and the checkpoint does not list its training files: "
            f"evaluating all of {scan.folder} would score the model on its own training images. "
            "Restore split.json beside the checkpoint, or evaluate a folder it did not train on."
        )
    every = _every_image(scan, classes, "")
    held_out = [s for s, used in zip(every.samples, trained.used([p for p, _ in every.samples])) if not used]
    if not held_out:
        raise UserError(f"{trained.source} was trained on every image in {scan.folder}; there is "
                        "nothing it has not seen to evaluate.")  # fmt: skip
    description = (f"the {len(held_out)} images of {scan.folder} that {trained.source} did not "
                   f"train on: {record}, the checkpoint lists its training files")  # fmt: skip
    return EvaluationSet(held_out, description, every.warnings)


def _every_image(scan: ClassFolders, classes: list[str], description: str) -> EvaluationSet:
    pairs = [(path, name) for name, paths in scan.classes.items() for path in paths]
    warnings = [finding.text() for finding in ignored_entries(scan)]
    empty = [name for name, paths in scan.classes.items() if not paths]
    if empty:
        warnings.append(f"Class folders with no images in {scan.folder}: {', '.join(empty)}.")
    return _labelled(pairs, classes, scan.folder, description, warnings)


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
    workers: int | None, warn: bool = True, ctx: DistContext = SINGLE_PROCESS,
) -> Evaluation:  # fmt: skip
    """Predictions for every readable image; unreadable ones are left out (and, with `warn`,
    reported one by one). Under torchrun (`ctx`) the images are dealt out a batch at a time and
    every process gets all the predictions back, in sample order."""
    positions = shard(range(len(samples)), ctx, block=batch_size)
    predictions, unreadable = predict_samples(engine, [samples[i] for i in positions], batch_size, workers)
    predictions, unreadable = _in_sample_order(ctx, positions, predictions, unreadable)
    if warn:
        for path, reason in unreadable:
            ui.warn(f"skipped unreadable file {path}: {reason}")
    if not predictions:
        raise UserError("None of the images could be read (see the warnings above).", EXIT_FAILED)
    prior = engine.prior
    evaluation = summarise(engine.classes, predictions, unreadable, prior.class_counts if prior else None)
    evaluation.trust = trust_rule(engine.calibration)
    return evaluation


def predict_samples(
    engine: InferenceModel | OnnxModel, samples: list[tuple[str, int]], batch_size: int,
    workers: int | None, desc: str = "evaluate",
) -> tuple[list[tuple[int, Prediction]], list[tuple[int, tuple[str, str]]]]:  # fmt: skip
    """(position in `samples`, prediction) for each readable image (labels -1: no true class),
    (position, (path, reason)) for each unreadable one."""
    loader = make_loader(
        engine.dataset(samples),
        batch_size=batch_size,
        workers=engine.decode_workers([path for path, _ in samples], workers),
        pin_memory=engine.pin_memory,
    )
    predictions: list[tuple[int, Prediction]] = []
    unreadable: list[tuple[int, tuple[str, str]]] = []
    for loaded in ui.progress(loader, desc=desc, unit="batch"):
        batch = get_batch(loaded, engine.spec)
        unreadable += [(index, (samples[index][0], reason)) for index, reason in batch.failures]
        if batch.inputs is not None:
            output = engine.predict(batch.inputs)
            paths = [samples[i][0] for i in batch.indices]
            predictions += zip(batch.indices, batch_predictions(output, paths, batch.labels.cpu()))
    return predictions, unreadable


def _in_sample_order(
    ctx: DistContext, positions: list[int], predictions: list[tuple[int, Prediction]],
    unreadable: list[tuple[int, tuple[str, str]]],
) -> tuple[list[Prediction], list[tuple[str, str]]]:  # fmt: skip
    """Every process's results (its share's indices mapped back to sample positions), sorted."""
    mine = ([(positions[i], p) for i, p in predictions], [(positions[i], u) for i, u in unreadable])
    everyone = gather_objects(ctx, mine)
    merged_predictions = sorted((item for part in everyone for item in part[0]), key=lambda t: t[0])
    merged_unreadable = sorted((item for part in everyone for item in part[1]), key=lambda t: t[0])
    return [p for _, p in merged_predictions], [u for _, u in merged_unreadable]


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
    indexed, failed = predict_samples(engine, [(p, -1) for p in paths], batch_size, workers, desc="unknowns")
    predictions, unreadable = [p for _, p in indexed], [u for _, u in failed]
    if not predictions:
        raise UserError(f"None of the images in --unknown {folder} could be read.", EXIT_FAILED)
    rows = [(p.path, engine.classes[p.predicted], p.prob, float(p.unknown_score or 0.0), bool(p.known))
            for p in predictions]  # fmt: skip
    inside = [float(p.unknown_score or 0.0) for p in known]
    outside = [row[3] for row in rows]
    return UnknownEvaluation(folder, rows, unreadable, auroc(inside, outside), fpr_at_tpr(inside, outside),
                             sum(not row[4] for row in rows) / len(rows))  # fmt: skip


def summarise(
    classes: list[str], predictions: list[Prediction], unreadable: list[tuple[str, str]],
    class_counts: list[int] | None = None,
) -> Evaluation:  # fmt: skip
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
    return Evaluation(classes, predictions, unreadable, report, matrix, shown, top5, class_counts)


def write_evaluation(out: Path, evaluation: Evaluation, about: dict[str, str]) -> None:
    """metrics.json (with `about`: what was evaluated), per_class.csv, confusion_matrix.csv and
    .png, misclassified.csv; each written atomically."""
    metrics = evaluation.metrics()
    rows = [["class", "precision", "recall", "f1", "support", "train_images"]]
    rows += [[c.name, _num(c.precision), _num(c.recall), _num(c.f1), str(c.support),
              "" if count is None else str(count)]
             for c, count in evaluation.by_training_count()]  # fmt: skip
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
    heatmaps: int = 0  # overlays written into out/heatmaps/


def evaluate_into_folder(
    cfg: EvaluateConfig, quiet: bool = False, ctx: DistContext = SINGLE_PROCESS
) -> EvaluationRun:
    """Score the model on the data (by default what it was trained on) and write the
    evaluation folder (under torchrun: sharded over the processes, written by rank 0)."""
    talk = not (cfg.json or quiet)
    engine = load_inference_model(cfg, announce=talk)
    data = cfg.data or trained_on_data(engine)
    if talk and not cfg.data:
        ui.note(f"Data: {data}, which {engine.source} was trained on (pass DATA to choose other "
                "images).")  # fmt: skip
    run_dir = Path(engine.source).parent if not cfg.weights else None
    trained = TrainingRecord(engine.source, engine.trained_on, engine.train_digests)
    chosen = evaluation_samples(data, engine.classes, run_dir, trained)
    for message in chosen.warnings:
        ui.warn(message)
    out = Path(cfg.out) if cfg.out else Path(engine.source).parent / "eval"
    # eval/ of a run: never while train writes that run; under torchrun rank 0 writes it
    with run_folder_lock(out) if ctx.is_main else contextlib.nullcontext():
        if ctx.is_main:
            make_folder(out)
        if talk:
            ui.note(f"Evaluating {len(chosen.samples)} images ({chosen.description})  |  "
                    f"{engine.describe()}")  # fmt: skip
        started = time.perf_counter()
        evaluation = score(engine, chosen.samples, cfg.batch_size, cfg.workers, warn=not quiet, ctx=ctx)
        if cfg.unknown and ctx.is_main:  # only rank 0 writes what it finds
            evaluation.unknown = score_unknowns(engine, cfg.unknown, evaluation.predictions, cfg.batch_size,
                                                cfg.workers)  # fmt: skip
        seconds = time.perf_counter() - started
        about = {"checkpoint": engine.source, "data": data, "images": chosen.description,
                 "prior": engine.prior.name if engine.prior else None}  # fmt: skip
        heatmaps = 0
        if ctx.is_main:
            heatmaps = write_mistake_heatmaps(out / HEATMAPS, engine, mistakes(evaluation)[: cfg.heatmaps],
                                              cfg, warn=not quiet)  # fmt: skip
            write_evaluation(out, evaluation, about)
    return EvaluationRun(evaluation, out, seconds, heatmaps)


def trained_on_data(engine: InferenceModel | OnnxModel) -> str:
    """The data folder the checkpoint records, for an evaluation without DATA."""
    data = getattr(engine, "trained_on", None)
    if data is None:
        raise UserError(
            f"No data given, and {engine.source} does not record the data it was trained on. "
            "Pass the labelled images: resnext evaluate DATA (DATA/<class>/* or a dataset root)."
        )
    if not os.path.isabs(data) and not Path(data).exists():
        raise UserError(
            f"{engine.source} records its data as {data!r}, relative to the folder it was trained "
            "from (runs before absolute paths were recorded), which is not this one. Pass the "
            "data: resnext evaluate DATA, or run this from that folder."
        )
    return data


HEATMAPS = "heatmaps"  # eval/heatmaps/: overlays of the most confident mistakes, explain.json


def write_mistake_heatmaps(
    folder: Path, engine: InferenceModel, shown: list[Prediction], cfg: EvaluateConfig, warn: bool = True
) -> int:
    """For each mistake, most confident first, the Grad-CAM heatmaps of the predicted and the
    true class side by side: `NN_<stem>_<class>.png` and explain.json in `folder` (what an
    earlier evaluation left there goes first). Without captum a warning, not a failure: the
    evaluation stands without them. Returns how many heatmaps were written."""
    for entry in read_explain_json(folder):  # an earlier evaluation's, listed by it: ours to replace
        (folder / Path(str(entry.get("overlay", ""))).name).unlink(missing_ok=True)
    (folder / "explain.json").unlink(missing_ok=True)
    if not shown:
        return 0
    try:
        require_captum()
    except UserError as exc:
        if warn:
            ui.warn(f"No heatmaps of the mistakes: {exc}")
        return 0
    make_folder(folder)
    rank = {m.path: i for i, m in enumerate(shown, 1)}
    names = {m.path: (engine.classes[m.predicted], engine.classes[m.true]) for m in shown}
    samples = [(m.path, [m.predicted, m.true]) for m in shown]
    entries: list[dict[str, Any]] = []
    taken: set[str] = set()
    for explained, _ in explain_images(engine, samples, EXPLAIN_DEFAULT, cfg.batch_size, 0):
        for item in explained:
            role = "predicted" if item.class_name == names[item.path][0] else "true"
            name = overlay_name(item.path, item.class_name, taken, prefix=f"{rank[item.path]:02d}_")
            write_overlay(folder, name, item, f"{role} {item.class_name} {item.prob:.1%}")
            entries.append({**item.record(name), "role": role})
    write_explain_json(folder, entries)
    return len(entries)


@dataclass
class RecordedEvaluation:
    """An eval/ folder read back: what `write_evaluation` wrote."""

    metrics: dict[str, Any]  # metrics.json, with what was evaluated
    per_class: list[dict[str, str]]
    mistakes: list[dict[str, str]]  # misclassified.csv, most confident first
    confusion_png: bytes
    heatmaps: dict[tuple[str, str], Path] = field(default_factory=dict)  # (path, class) -> overlay
    reliability_png: bytes | None = None  # absent in folders from before calibration existed


def read_evaluation(out: Path) -> RecordedEvaluation:
    reliability = out / "reliability.png"
    heatmaps = {(str(e["path"]), str(e.get("class"))): out / HEATMAPS / Path(str(e["overlay"])).name
                for e in read_explain_json(out / HEATMAPS) if e.get("overlay")}  # fmt: skip
    return RecordedEvaluation(
        json.loads((out / "metrics.json").read_text(encoding="utf-8")),
        read_csv(out / "per_class.csv"),
        read_csv(out / "misclassified.csv"),
        (out / "confusion_matrix.png").read_bytes(),
        heatmaps,
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
