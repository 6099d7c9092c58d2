"""Model outputs on a labelled folder -> an evaluation: which images (`evaluation_samples`),
their predictions (`score`), the metrics (`summarise`) and the eval/ folder of files
(`write_evaluation`, `read_evaluation`). Shared by `resnext evaluate`, `train` and `report`."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from resnext_cli import ui
from resnext_cli.config import EvaluateConfig
from resnext_cli.data.batches import get_batch
from resnext_cli.data.folders import find_splits, ignored_entries, read_split_val
from resnext_cli.data.loaders import make_loader
from resnext_cli.errors import EXIT_FAILED, UserError
from resnext_cli.files import atomic_write_csv, atomic_write_text, make_folder, read_csv
from resnext_cli.model.distributed import DistContext, gather_objects, shard
from resnext_cli.model.engines import InferenceModel, OnnxModel, load_inference_model
from resnext_cli.outputs.metrics import ClassificationReport, classification_report, confusion_matrix
from resnext_cli.outputs.plots import confusion_matrix_png, write_png

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


@dataclass
class Evaluation:
    classes: list[str]  # the model's
    predictions: list[Prediction]
    unreadable: list[tuple[str, str]]
    report: ClassificationReport
    matrix: list[list[int]]  # over the classes in `shown`
    shown: list[str]  # classes present in the data or predicted, in model order
    top5: float | None  # None with 5 classes or fewer

    def metrics(self) -> dict[str, Any]:
        summary = self.report.summary()
        metrics: dict[str, Any] = {"accuracy": summary.pop("accuracy")}
        if self.top5 is not None:
            metrics["top5"] = self.top5
        metrics.update(summary, unreadable=len(self.unreadable))
        return metrics


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
    workers: int | None, warn: bool = True, ctx: DistContext = SINGLE_PROCESS,
) -> Evaluation:  # fmt: skip
    """Predictions for every readable image; unreadable ones are left out (and, with `warn`,
    reported one by one). Under torchrun (`ctx`) the images are dealt out a batch at a time and
    every process gets all the predictions back, in sample order."""
    positions = shard(range(len(samples)), ctx, block=batch_size)
    predictions, unreadable = _score_share(engine, [samples[i] for i in positions], batch_size, workers)
    predictions, unreadable = _in_sample_order(ctx, positions, predictions, unreadable)
    if warn:
        for path, reason in unreadable:
            ui.warn(f"skipped unreadable file {path}: {reason}")
    if not predictions:
        raise UserError("None of the images could be read (see the warnings above).", EXIT_FAILED)
    return summarise(engine.classes, predictions, unreadable)


def _score_share(
    engine: InferenceModel | OnnxModel, samples: list[tuple[str, int]], batch_size: int,
    workers: int | None,
) -> tuple[list[tuple[int, Prediction]], list[tuple[int, tuple[str, str]]]]:  # fmt: skip
    """(position in `samples`, prediction) for each readable image, (position, (path, reason))
    for each unreadable one."""
    loader = make_loader(
        engine.dataset(samples),
        batch_size=batch_size,
        workers=engine.decode_workers([path for path, _ in samples], workers),
        pin_memory=engine.pin_memory,
    )
    predictions: list[tuple[int, Prediction]] = []
    unreadable: list[tuple[int, tuple[str, str]]] = []
    k = min(5, len(engine.classes))
    for loaded in ui.progress(loader, desc="evaluate", unit="batch"):
        batch = get_batch(loaded, engine.spec)
        unreadable += [(index, (samples[index][0], reason)) for index, reason in batch.failures]
        if batch.inputs is None:
            continue
        probs = engine.probabilities(batch.inputs)
        top_probs, top_classes = torch.topk(probs, k, dim=1)
        hits = (top_classes == batch.labels.cpu()[:, None]).any(dim=1)
        for i, index in enumerate(batch.indices):
            path, label = samples[index]
            prediction = Prediction(path, label, int(top_classes[i, 0]), float(top_probs[i, 0]), bool(hits[i]))
            predictions.append((index, prediction))
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


def evaluate_into_folder(
    cfg: EvaluateConfig, quiet: bool = False, ctx: DistContext = SINGLE_PROCESS
) -> EvaluationRun:
    """Score the model on the data (by default what it was trained on) and write the
    evaluation folder (under torchrun: sharded over the processes, written by rank 0)."""
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
    if ctx.is_main:
        make_folder(out)
    if talk:
        ui.note(f"Evaluating {len(chosen.samples)} images ({chosen.description})  |  "
                f"{engine.describe()}")  # fmt: skip
    started = time.perf_counter()
    evaluation = score(engine, chosen.samples, cfg.batch_size, cfg.workers, warn=not quiet, ctx=ctx)
    seconds = time.perf_counter() - started
    about = {"checkpoint": engine.source, "data": data, "images": chosen.description}
    if ctx.is_main:
        write_evaluation(out, evaluation, about)
    return EvaluationRun(evaluation, out, seconds)


@dataclass
class RecordedEvaluation:
    """An eval/ folder read back: what `write_evaluation` wrote."""

    metrics: dict[str, Any]  # metrics.json, with what was evaluated
    per_class: list[dict[str, str]]
    mistakes: list[dict[str, str]]  # misclassified.csv, most confident first
    confusion_png: bytes


def read_evaluation(out: Path) -> RecordedEvaluation:
    return RecordedEvaluation(
        json.loads((out / "metrics.json").read_text(encoding="utf-8")),
        read_csv(out / "per_class.csv"),
        read_csv(out / "misclassified.csv"),
        (out / "confusion_matrix.png").read_bytes(),
    )


def _num(value: float) -> str:
    return f"{value:.6f}"
