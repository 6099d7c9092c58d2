"""`resnext predict` and `resnext batch-predict`: the val transform of training, a model in eval
mode under inference_mode, and results that stream out as batches finish."""

from __future__ import annotations

import io
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from rich.table import Table

from resnext_cli import ui
from resnext_cli.batches import pixel_batch
from resnext_cli.config import BatchPredictConfig, PredictConfig
from resnext_cli.engines import InferenceModel, OnnxModel, load_inference_model, load_onnx_model, top_k
from resnext_cli.errors import EXIT_FAILED, EXIT_OK, UserError
from resnext_cli.files import atomic_write
from resnext_cli.folders import list_images
from resnext_cli.images import describe_failure, load_rgb
from resnext_cli.loaders import ImageListDataset, make_loader
from resnext_cli.outputs import ResultWriter, Row


# ---------------------------------------------------------------- predict


def predict(cfg: PredictConfig) -> list[dict[str, Any]]:
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
    transform = engine.preprocessing.eval_transform()
    pictures, problems = [], []
    for image in cfg.images:
        try:
            pictures.append(load_rgb(image, engine.preprocessing.decode_min_size))
        except Exception as exc:
            problems.append(f"{image} ({describe_failure(exc)})")
    if problems:
        raise UserError(f"Could not read the image(s): {'; '.join(problems)}.")
    probs = engine.probabilities(pixel_batch(torch.stack([transform(p) for p in pictures])))
    results = [
        {
            "path": image,
            "topk": [{"class": c, "prob": round(p, 6)} for c, p in ranked],
            "checkpoint": engine.source,
        }
        for image, ranked in zip(cfg.images, top_k(probs, engine.classes, cfg.topk))
    ]
    if cfg.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        _print_prediction_tables(results)
    if cfg.plot:
        save_prediction_plot(cfg.plot, pictures, results)
        if not cfg.json:
            ui.info(f"Saved {cfg.plot}")
    return results


def _print_prediction_tables(results: list[dict[str, Any]]) -> None:
    for result in results:
        table = Table("#", "class", "prob", title=result["path"], title_justify="left", box=None)
        for rank, entry in enumerate(result["topk"], 1):
            table.add_row(str(rank), entry["class"], f"{entry['prob']:.2%}")
        ui.console().print(table)


def save_prediction_plot(path: str, pictures: list[Any], results: list[dict[str, Any]]) -> None:
    """Each image under a title line `class: prob`, side by side in one PNG; never a window."""
    tile, title_h = 320, 36
    canvas = Image.new("RGB", (tile * len(pictures), tile + title_h), "white")
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=20)
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        font = ImageFont.load_default()
    for i, (picture, result) in enumerate(zip(pictures, results)):
        thumb = ImageOps.contain(picture, (tile, tile))  # up- or down-scaled to fit
        x = i * tile
        canvas.paste(thumb, (x + (tile - thumb.width) // 2, title_h + (tile - thumb.height) // 2))
        best = result["topk"][0]
        draw.text((x + 8, 8), f"{best['class']}: {best['prob']:.1%}", fill="black", font=font)
    target = Path(path)
    if target.parent and not target.parent.exists():
        raise UserError(f"Cannot save the plot: the folder {target.parent} does not exist.")
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    atomic_write(target, lambda handle: handle.write(buffer.getvalue()))


# ---------------------------------------------------------------- batch-predict


def batch_predict(cfg: BatchPredictConfig) -> int:
    """Predict every image in DIR; returns the exit code (1 when none could be predicted)."""
    paths = _images_in_folder(cfg)
    if not paths:
        return EXIT_FAILED
    engine: InferenceModel | OnnxModel = (
        load_onnx_model(cfg.onnx, cfg.class_indices) if cfg.onnx else load_inference_model(cfg)
    )
    writer = ResultWriter(cfg.output, cfg.topk, cfg.resume_output) if cfg.output else None
    earlier = writer.done if writer else {}
    if earlier:
        paths = [p for p in paths if p not in earlier]
        ui.console(stderr=True).print(
            f"Resuming {cfg.output}: {len(earlier)} image(s) already there, {len(paths)} to go.",
            markup=False,
        )
    ui.console(stderr=True).print(
        f"{len(paths)} images in {cfg.dir}  |  {engine.describe()}", markup=False
    )
    prep = engine.preprocessing
    dataset = ImageListDataset([(p, -1) for p in paths], prep.eval_transform(), prep.decode_min_size)
    loader = make_loader(dataset, batch_size=cfg.batch_size,
                         workers=engine.decode_workers(paths, cfg.workers),
                         pin_memory=engine.pin_memory)  # fmt: skip
    summary = BatchSummary()
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
    assert cfg.dir is not None
    folder = Path(cfg.dir)
    if not folder.exists():
        raise UserError(f"The folder {cfg.dir} does not exist.")
    if not folder.is_dir():
        raise UserError(
            f"{cfg.dir} is a file; batch-predict takes a folder. For single images use "
            f"`resnext predict {cfg.dir}`."
        )
    paths = list_images(folder, cfg.recursive)
    if not paths:
        hint = "" if cfg.recursive else " (sub-folders are searched with --recursive)"
        ui.warn(f"No image files in {cfg.dir}{hint}.")
    return paths


class BatchSummary:
    """What batch-predict tells at the end: images per class and the unreadable files."""

    def __init__(self) -> None:
        self.per_class: Counter[str] = Counter()
        self.failures: list[tuple[str, str]] = []  # the first few, for the summary
        self.failure_count = 0

    def add(self, rows: list[Row], bar: Any, quiet: bool) -> None:
        for path, ranked, error in rows:
            if ranked:
                self.per_class[ranked[0][0]] += 1
                if not quiet:
                    bar.write(f"image: {path}  class: {ranked[0][0]}  prob: {ranked[0][1]:.3f}")
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
    for batch in loader:
        ranked_by_index: dict[int, Any] = {}
        if batch.images is not None:
            ranked = top_k(engine.probabilities(batch), engine.classes, k)
            ranked_by_index = dict(zip(batch.indices, ranked))
        errors = dict(batch.failures)
        order = sorted([*ranked_by_index, *errors])
        yield [(paths[i], ranked_by_index.get(i), errors.get(i, "")) for i in order]
