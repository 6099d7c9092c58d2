"""`resnext predict` and `resnext batch-predict`: the val transform of training, a model in eval
mode under inference_mode, and results that stream out as batches finish."""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from rich.table import Table

from resnext_cli import ui
from resnext_cli.config import BatchPredictConfig, PredictConfig
from resnext_cli.data.batches import get_batch
from resnext_cli.data.folders import list_images
from resnext_cli.data.images import load_rgb
from resnext_cli.data.loaders import collate_skipping_failures, make_loader
from resnext_cli.errors import EXIT_FAILED, EXIT_OK, UserError
from resnext_cli.files import make_folder
from resnext_cli.model.engines import InferenceModel, OnnxModel, load_inference_model, load_onnx_model, top_k
from resnext_cli.model.trust import BatchOutput, UnknownDetector
from resnext_cli.outputs.plots import plot_format, predictions_figure, save_figure
from resnext_cli.outputs.results import ResultWriter, Row

# ---------------------------------------------------------------- predict


def predict(cfg: PredictConfig) -> list[dict[str, Any]]:
    plot_fmt = plot_format(cfg.plot) if cfg.plot else None
    for image in cfg.images:
        p = Path(image)
        if not p.exists():
            raise UserError(f"The image {image} does not exist.")
        if p.is_dir():
            raise UserError(
                f"{image} is a folder; predict takes image files. For a folder of images use "
                f"`resnext batch-predict {image}`."
            )
    engine = load_inference_model(cfg, announce=not cfg.json)
    dataset = engine.dataset([(image, -1) for image in cfg.images])
    batch = get_batch(collate_skipping_failures([dataset[i] for i in range(len(dataset))]), engine.spec)
    if batch.failures:
        problems = "; ".join(f"{cfg.images[i]} ({reason})" for i, reason in batch.failures)
        raise UserError(f"Could not read the image(s): {problems}.")
    assert batch.inputs is not None
    output = engine.predict(batch.inputs)
    verdicts = unknown_verdicts(output, len(cfg.images))
    results = [
        {
            "path": image,
            "topk": [{"class": c, "prob": round(p, 6)} for c, p in ranked],
            "checkpoint": engine.source,
            "unknown_score": score,
            "known": known,
        }
        for image, ranked, (score, known) in zip(cfg.images, top_k(output.probs, engine.classes, cfg.topk),
                                                 verdicts)  # fmt: skip
    ]
    if cfg.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        _print_prediction_tables(results, engine.calibration.unknown)
    if cfg.plot and plot_fmt:
        pictures = [load_rgb(image, engine.preprocessing.decode_min_size) for image in cfg.images]
        save_prediction_plot(cfg.plot, plot_fmt, pictures, results)
        if not cfg.json:
            ui.info(f"Saved {cfg.plot}")
    return results


def unknown_verdicts(output: BatchOutput, count: int) -> list[tuple[float | None, bool | None]]:
    """(unknown_score rounded for output, known) per row; (None, None) without a detector."""
    if output.unknown_score is None or output.known is None:
        return [(None, None)] * count
    return [(round(float(s), 6), bool(k)) for s, k in zip(output.unknown_score, output.known)]


def _print_prediction_tables(results: list[dict[str, Any]], detector: UnknownDetector | None) -> None:
    for result in results:
        title = result["path"]
        if result["known"] is False and detector is not None:
            title += (f": unknown, unlike the classes it was trained on (unknown score "
                      f"{result['unknown_score']:.2f} > {detector.threshold:.2f}); the nearest classes:")  # fmt: skip
        table = Table("#", "class", "prob", title=title, title_justify="left", box=None)
        for rank, entry in enumerate(result["topk"], 1):
            table.add_row(str(rank), entry["class"], f"{entry['prob']:.2%}")
        ui.console().print(table)


def save_prediction_plot(path: str, fmt: str, pictures: list[Any], results: list[dict[str, Any]]) -> None:
    """Each image under a title line `class: prob` (`unknown?` first for an unknown), side by
    side; never a window."""
    titles = [f"{'unknown? ' if r.get('known') is False else ''}{r['topk'][0]['class']}: "
              f"{r['topk'][0]['prob']:.1%}" for r in results]  # fmt: skip
    target = Path(path)
    make_folder(target.parent)
    save_figure(target, predictions_figure(pictures, titles), fmt)


# ---------------------------------------------------------------- batch-predict


def batch_predict(cfg: BatchPredictConfig) -> int:
    """Predict every image in DIR; returns the exit code (1 when none could be predicted)."""
    paths = _images_in_folder(cfg)
    engine: InferenceModel | OnnxModel = (
        load_onnx_model(cfg.onnx, cfg.class_indices, cfg.tta, cfg) if cfg.onnx else load_inference_model(cfg)
    )
    if cfg.reject_unknown and engine.calibration.unknown is None:
        raise UserError(f"--reject-unknown needs an unknown score, and {engine.source} has none (a "
                        "checkpoint from before calibration existed); `resnext calibrate` fits one.")  # fmt: skip
    writer = ResultWriter(cfg.output, cfg.topk, cfg.resume_output, cfg.reject_unknown) if cfg.output else None
    earlier = writer.done if writer else {}
    if earlier:
        paths = [p for p in paths if p not in earlier]
        ui.note(f"Resuming {cfg.output}: {len(earlier)} image(s) already there, {len(paths)} to go.")
    ui.note(f"{len(paths)} images in {cfg.data}  |  {engine.describe()}")
    loader = make_loader(engine.dataset([(p, -1) for p in paths]), batch_size=cfg.batch_size,
                         workers=engine.decode_workers(paths, cfg.workers),
                         pin_memory=engine.pin_memory)  # fmt: skip
    summary = BatchSummary(cfg.reject_unknown)
    started = time.perf_counter()
    bar = ui.progress(total=len(paths), desc="predict", unit="img")
    finished = False
    try:
        for rows in _predicted_rows(loader, engine, cfg.topk, paths):
            summary.add(rows, bar, cfg.quiet)
            if writer:
                writer.add(rows)
            bar.update(len(rows))
        finished = True
    finally:
        bar.close()
        if writer:
            writer.close(keep=finished)
    summary.show(time.perf_counter() - started, cfg.output)
    return EXIT_OK if summary.per_class or any(earlier.values()) else EXIT_FAILED


def _images_in_folder(cfg: BatchPredictConfig) -> list[str]:
    assert cfg.data is not None
    folder = Path(cfg.data)
    if not folder.exists():
        raise UserError(f"The folder {cfg.data} does not exist.")
    if not folder.is_dir():
        raise UserError(
            f"{cfg.data} is a file; batch-predict takes a folder. For single images use "
            f"`resnext predict {cfg.data}`."
        )
    paths = list_images(folder, cfg.recursive)
    if paths:
        return paths
    nested = [] if cfg.recursive else list_images(folder, recursive=True)
    if nested:
        raise UserError(
            f"No image files in {cfg.data} itself, but its sub-folders hold {len(nested)}. To "
            f"predict them all, add --recursive: resnext batch-predict {shlex.quote(cfg.data)} "
            "--recursive", EXIT_FAILED,
        )  # fmt: skip
    raise UserError(f"No image files in {cfg.data} (nor in its sub-folders).", EXIT_FAILED)


class BatchSummary:
    """What batch-predict tells at the end: images per class and the unreadable files."""

    def __init__(self, reject_unknown: bool = False) -> None:
        self.reject_unknown = reject_unknown
        self.per_class: Counter[str] = Counter()
        self.failures: list[tuple[str, str]] = []  # the first few, for the summary
        self.failure_count = 0
        self.unknown = 0  # predicted images whose `known` is false

    def add(self, rows: list[Row], bar: Any, quiet: bool) -> None:
        for path, ranked, error, score, known in rows:
            if ranked:
                self.per_class[ranked[0][0]] += 1
                self.unknown += known is False
                verdict = f"  unknown (score {score:.2f})" if known is False else ""
                if not quiet:
                    bar.write(f"image: {path}  class: {ranked[0][0]}  prob: {ranked[0][1]:.3f}{verdict}")
            else:
                self.failure_count += 1
                if len(self.failures) < 20:
                    self.failures.append((path, error))
                bar.write(f"Warning: unreadable {path}: {error}", file=sys.stderr)

    def show(self, seconds: float, output: str | None) -> None:
        predicted = sum(self.per_class.values())
        console = ui.console()
        console.print(
            f"Predicted {predicted} image(s), {self.failure_count} unreadable, in {seconds:.1f} s "
            f"({predicted / max(seconds, 1e-9):.1f} images/s).",
            markup=False,
        )
        if self.per_class:
            table = Table("class", "images", box=None)
            for name, count in sorted(self.per_class.items(), key=lambda kv: (-kv[1], kv[0])):
                table.add_row(name, str(count))
            console.print(table)
        if self.unknown:
            where = "their class left empty in the output" if self.reject_unknown else "known: false"
            console.print(f"{self.unknown} of {predicted} image(s) look like none of the classes "
                          f"({where}; counted above under their nearest class).", markup=False)  # fmt: skip
        if self.failures:
            shown = "\n".join(f"  {path}: {reason}" for path, reason in self.failures)
            rest = self.failure_count - len(self.failures)
            more = f"\n  ... and {rest} more (the output file lists them all)" if rest else ""
            ui.warn(f"{self.failure_count} file(s) could not be read:\n{shown}{more}")
        if output:
            console.print(f"Results: {output}", markup=False)


def _predicted_rows(
    loader: Any, engine: InferenceModel | OnnxModel, k: int, paths: list[str]
) -> Iterator[list[Row]]:
    """One list of rows per batch, in file order, failures in their place."""
    for loaded in loader:
        batch = get_batch(loaded, engine.spec)
        ranked_by_index: dict[int, Any] = {}
        verdicts: dict[int, tuple[float | None, bool | None]] = {}
        if batch.inputs is not None:
            output = engine.predict(batch.inputs)
            ranked_by_index = dict(zip(batch.indices, top_k(output.probs, engine.classes, k)))
            verdicts = dict(zip(batch.indices, unknown_verdicts(output, len(batch.indices))))
        errors = dict(batch.failures)
        order = sorted([*ranked_by_index, *errors])
        yield [(paths[i], ranked_by_index.get(i), errors.get(i, ""), *verdicts.get(i, (None, None)))
               for i in order]  # fmt: skip
