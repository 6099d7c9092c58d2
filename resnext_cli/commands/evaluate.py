"""`resnext evaluate`: accuracy, per-class metrics, a confusion matrix and the most confident
mistakes of a checkpoint on a labelled folder, with the val transform of training."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from rich.table import Table

from resnext_cli import ui
from resnext_cli.config import EvaluateConfig
from resnext_cli.model.distributed import INFERENCE_TIMEOUT, init_distributed, process_device, shutdown
from resnext_cli.outputs.evaluation import Evaluation, evaluate_into_folder


def evaluate(cfg: EvaluateConfig) -> Evaluation:
    """Score the model on the data, write the evaluation folder, and show the result. Under
    torchrun each process scores its share of the images and rank 0 writes and shows it all."""
    ctx = init_distributed(cfg.device, timeout=INFERENCE_TIMEOUT)
    if not ctx.is_main:
        ui.silence()
    try:
        device = process_device(ctx, cfg.device)
        result = evaluate_into_folder(dataclasses.replace(cfg, device=device), ctx=ctx)
    finally:
        shutdown(ctx)
    if not ctx.is_main:
        return result.evaluation
    if cfg.json:
        print(json.dumps(_json_result(result.evaluation, result.out), indent=2, ensure_ascii=False))
    else:
        _print_evaluation(result.evaluation, result.seconds, result.out)
        if result.heatmaps:
            ui.info(f"Heatmaps of the {result.heatmaps // 2} most confident mistakes (predicted and "
                    f"true class): {result.out}/heatmaps/")  # fmt: skip
    return result.evaluation


def _json_result(evaluation: Evaluation, out: Path) -> dict[str, Any]:
    result = {
        **evaluation.metrics(),
        "per_class": [{**vars(c), "train_images": count} for c, count in evaluation.by_training_count()],
        "unreadable_files": [{"path": p, "error": e} for p, e in evaluation.unreadable],
        "out": str(out),
    }
    if evaluation.unknown is not None:
        result["unknown_unreadable_files"] = [{"path": p, "error": e} for p, e in evaluation.unknown.unreadable]
    return result


def _print_evaluation(evaluation: Evaluation, seconds: float, out: Path) -> None:
    metrics = evaluation.metrics()
    top5 = f", top-5 {metrics['top5']:.2%}" if "top5" in metrics else ""
    counted = evaluation.class_counts is not None  # then rows go from the most trained class down
    extra = ["train images"] if counted else []
    table = Table("class", "precision", "recall", "f1", "support", *extra, box=None)
    for c, count in evaluation.by_training_count():
        table.add_row(c.name, f"{c.precision:.2%}", f"{c.recall:.2%}", f"{c.f1:.2%}", str(c.support),
                      *([str(count)] if counted else []))  # fmt: skip
    table.add_section()
    for c in (evaluation.report.macro, evaluation.report.weighted):
        table.add_row(c.name, f"{c.precision:.2%}", f"{c.recall:.2%}", f"{c.f1:.2%}", str(c.support))
    ui.show(table)
    unreadable = f", {len(evaluation.unreadable)} unreadable" if evaluation.unreadable else ""
    ui.info(f"Accuracy {metrics['accuracy']:.2%}{top5}, balanced accuracy {metrics['balanced_accuracy']:.2%}, "
            f"macro-F1 {metrics['macro_f1']:.2%} on {metrics['n']} images{unreadable} ({seconds:.1f} s).")  # fmt: skip
    for line in trust_lines(metrics):
        ui.info(line)
    unknown = ", unknown.csv" if evaluation.unknown is not None else ""
    ui.info(f"Wrote {out}/: metrics.json, per_class.csv, confusion_matrix.csv, confusion_matrix.png, "
            f"misclassified.csv, reliability.png{unknown}")  # fmt: skip


def trust_lines(metrics: dict[str, Any]) -> list[str]:
    """Calibration and unknown detection, as read in metrics.json."""
    lines = [f"Calibration: temperature {metrics['temperature']:.3g}; ECE {metrics['ece_uncalibrated']:.3f} "
             f"-> {metrics['ece']:.3f}, NLL {metrics['nll_uncalibrated']:.3f} -> {metrics['nll']:.3f} "
             "(raw softmax -> as shown)."]  # fmt: skip
    if "known_accepted" in metrics:
        lines.append(f"Unknown score {metrics['unknown_score']} (threshold {metrics['unknown_threshold']:.3g}): "
                     f"{metrics['known_accepted']:.1%} of these images accepted as known.")  # fmt: skip
    if "unknown_auroc" in metrics:
        lines.append(f"Unknowns ({metrics['unknown_data']}, {metrics['unknown_images']} images): AUROC "
                     f"{metrics['unknown_auroc']:.3f}, FPR at 95% TPR {metrics['unknown_fpr95']:.1%}, "
                     f"{metrics['unknown_rejected']:.1%} rejected at the threshold.")  # fmt: skip
    return lines
