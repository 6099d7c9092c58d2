"""`resnext predict` and `resnext batch-predict`: the val transform of training, a model in eval
mode under inference_mode, and results that stream out as batches finish."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shlex
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from rich.table import Table

from resnext_cli import ui
from resnext_cli.config import EXPLAIN_DEFAULT, BatchPredictConfig, PredictConfig
from resnext_cli.data.batches import get_batch
from resnext_cli.data.folders import list_images
from resnext_cli.data.images import load_rgb
from resnext_cli.data.loaders import collate_skipping_failures, make_loader
from resnext_cli.errors import EXIT_FAILED, EXIT_OK, UserError, interruption
from resnext_cli.files import make_folder, printable
from resnext_cli.model.cam import require_captum
from resnext_cli.model.distributed import (
    INFERENCE_TIMEOUT,
    DistContext,
    barrier,
    broadcast_object,
    check_same_items,
    gather_objects,
    init_distributed,
    process_device,
    shard,
    shutdown,
)
from resnext_cli.model.engines import InferenceModel, OnnxModel, load_inference_model, load_onnx_model, top_k
from resnext_cli.model.trust import BatchOutput, UnknownDetector
from resnext_cli.outputs.heatmaps import Explained, explain_images, overlay_image
from resnext_cli.outputs.plots import (
    explained_predictions_figure,
    plot_format,
    predictions_figure,
    save_figure,
)
from resnext_cli.outputs.result_files import OutputFiles, path_key
from resnext_cli.outputs.results import Column, ResultRow, ResultSchema

# ---------------------------------------------------------------- predict


def predict(cfg: PredictConfig) -> list[dict[str, Any]]:
    plot_fmt = plot_format(cfg.plot) if cfg.plot else None
    if cfg.explain:
        require_captum()  # before the model loads: say at once what to install
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
    explained = _explain_predictions(engine, cfg.images) if cfg.explain else []
    for result, item in zip(results, explained):
        result["explain"] = item.record()
    if cfg.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        _print_prediction_tables(results, engine.calibration.unknown)
    _save_plot(cfg, plot_fmt, engine, results, explained)
    return results


def _explain_predictions(engine: InferenceModel, images: list[str]) -> list[Explained]:
    """The default heatmap of each image's predicted class, in the images' order."""
    found = {}
    for explained, _ in explain_images(engine, [(image, None) for image in images], EXPLAIN_DEFAULT,
                                       batch_size=len(images), workers=0):  # fmt: skip
        found.update({item.path: item for item in explained})
    return [found[image] for image in images]


def _save_plot(
    cfg: PredictConfig, fmt: str | None, engine: InferenceModel, results: list[dict[str, Any]],
    explained: list[Explained],
) -> None:  # fmt: skip
    """--plot FILE: the images titled with their prediction; with --explain, beside each its
    heatmap and the probabilities (into explain.png, explain2.png... without --plot)."""
    if not (cfg.plot or explained):
        return
    target = Path(cfg.plot) if cfg.plot else free_path(Path("explain.png"))
    make_folder(target.parent)
    pictures = [load_rgb(image, engine.preprocessing.decode_min_size) for image in cfg.images]
    if explained:
        overlays = [overlay_image(item) for item in explained]
        rankings = [[(e["class"], e["prob"]) for e in r["topk"]] for r in results]
        figure = explained_predictions_figure(pictures, overlays, rankings, cfg.images)
    else:
        titles = [f"{'unknown? ' if r.get('known') is False else ''}{r['topk'][0]['class']}: "
                  f"{r['topk'][0]['prob']:.1%}" for r in results]  # fmt: skip
        figure = predictions_figure(pictures, titles)
    save_figure(target, figure, fmt or "png")
    (ui.note if cfg.json else ui.info)(f"Saved {target}")
    for item in explained if not cfg.json else []:
        peak = item.peak
        where = f"at ({peak[0]}, {peak[1]}) in the photo's pixels" if peak else "nowhere (no evidence)"
        ui.info(f"{item.path}: heatmap of {item.class_name} peaks {where}")


def free_path(path: Path) -> Path:
    """`path`, or the first of path2, path3... (same suffix) that does not exist yet."""
    for i in range(1, 100_000):
        candidate = path if i == 1 else path.with_name(f"{path.stem}{i}{path.suffix}")
        if not candidate.exists():
            return candidate
    raise UserError(f"Too many files named like {path}; pass --plot FILE.")


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


# ---------------------------------------------------------------- batch-predict

# after every other column (issue 25): the unknown score and its verdict (empty without a detector)
TRUST_COLUMNS = (Column("unknown_score", "float32"), Column("known", "bool"))


def batch_predict(cfg: BatchPredictConfig) -> int:
    """Predict every image in DIR; returns the exit code (1 when none could be predicted).
    Under torchrun the sorted images are dealt out a batch at a time; each process writes its
    own part of the output, and rank 0 merges the parts when all are done."""
    ctx = init_distributed(cfg.device, timeout=INFERENCE_TIMEOUT)
    if not ctx.is_main:
        ui.silence()
    try:
        with contextlib.ExitStack() as held:
            return _batch_predict(dataclasses.replace(cfg, device=process_device(ctx, cfg.device)),
                                  ctx, held)  # fmt: skip
    finally:
        shutdown(ctx)


def _batch_predict(cfg: BatchPredictConfig, ctx: DistContext, held: contextlib.ExitStack) -> int:
    paths = _images_in_folder(cfg)
    check_same_items(ctx, paths, str(cfg.data))
    files = OutputFiles(cfg.output, ctx.rank, ctx.world_size) if cfg.output else None
    refused = _claim_output(files, cfg, ctx, held) if files else None
    if refused is not None:
        return refused  # the other processes: rank 0 said why
    engine: InferenceModel | OnnxModel = (
        load_onnx_model(cfg.onnx, cfg.class_indices, cfg.tta, cfg, cfg.prior)
        if cfg.onnx
        else load_inference_model(cfg)
    )
    if cfg.reject_unknown and engine.calibration.unknown is None:
        raise UserError(f"--reject-unknown needs an unknown score, and {engine.source} has none (a "
                        "checkpoint from before calibration existed); `resnext calibrate` fits one.")  # fmt: skip
    schema = ResultSchema(tuple(printable(c) for c in engine.classes), cfg.topk, cfg.save_probs, TRUST_COLUMNS)
    journal = files.open_journal(schema, cfg.resume_output) if files else None
    earlier = files.earlier_rows(schema, journal, cfg.resume_output) if files and journal else {}
    share = shard(paths, ctx, block=cfg.batch_size)
    todo = [p for p in share if path_key(printable(p)) not in earlier] if earlier else share
    already = _note_progress(cfg, ctx, engine, len(share) - len(todo), len(todo))
    loader = make_loader(engine.dataset([(p, -1) for p in todo]), batch_size=cfg.batch_size,
                         workers=engine.decode_workers(todo, cfg.workers),
                         pin_memory=engine.pin_memory)  # fmt: skip
    summary = BatchSummary(cfg.reject_unknown)
    started = time.perf_counter()
    bar = ui.progress(total=len(todo), desc="predict", unit="img")
    try:
        for rows in _predicted_rows(loader, engine, schema, todo, cfg.reject_unknown):
            summary.add(rows, bar, cfg.quiet)
            if journal:
                journal.add(rows)
            bar.update(len(rows))
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: what was written so far stays resumable
        if journal is None:
            raise
        what, code = interruption(exc)
        raise UserError(f"{what}. The rows written so far are in {files.journal_path if files else ''}; "
                        "the same command with --resume-output continues it.", code) from None  # fmt: skip
    finally:
        bar.close()
        if journal:
            journal.close()
    barrier(ctx)  # every part is complete
    summary = summary.combined(ctx, any(earlier.values()))
    seconds = time.perf_counter() - started
    if ctx.is_main:
        if files:
            files.finish(schema, paths, resumed=already > 0 or bool(earlier))
        summary.show(seconds, cfg.output)
    return EXIT_OK if summary.per_class or summary.earlier_predicted else EXIT_FAILED


def _claim_output(files: OutputFiles, cfg: BatchPredictConfig, ctx: DistContext,
                  held: contextlib.ExitStack) -> int | None:  # fmt: skip
    """Rank 0 takes the output's lock (held to the end) and checks what is there; the others
    learn the outcome before any of them opens its part (a refusal: its exit code)."""
    refusal = None
    if ctx.is_main:
        make_folder(files.path.parent)
        try:
            held.enter_context(files.lock())
            files.claim(cfg.resume_output, cfg.overwrite)
        except UserError as exc:
            refusal = (str(exc), exc.exit_code)
            if not ctx.enabled:
                raise
    refusal = broadcast_object(ctx, refusal)
    if refusal is not None and ctx.is_main:
        raise UserError(*refusal)
    return refusal[1] if refusal is not None else None


def _note_progress(cfg: BatchPredictConfig, ctx: DistContext, engine: InferenceModel | OnnxModel,
                   already: int, todo: int) -> int:  # fmt: skip
    """What is left to do, over all processes; returns how many images were done before."""
    counts = gather_objects(ctx, (already, todo))
    already, todo = sum(a for a, _ in counts), sum(t for _, t in counts)
    if cfg.resume_output and already:
        ui.note(f"Resuming {cfg.output}: {already} image(s) already there, {todo} to go.")
    processes = f" over {ctx.world_size} processes" if ctx.enabled else ""
    ui.note(f"{todo} images in {cfg.data}{processes}  |  {engine.describe()}")
    return already


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

    SHOWN = 20  # unreadable files named in the summary

    def __init__(self, reject_unknown: bool = False) -> None:
        self.reject_unknown = reject_unknown
        self.per_class: Counter[str] = Counter()
        self.failures: list[tuple[str, str]] = []  # the first few, for the summary
        self.failure_count = 0
        self.earlier_predicted = False  # a resumed output already held a predicted image
        self.unknown = 0  # predicted images whose `known` is false

    def add(self, rows: list[ResultRow], bar: Any, quiet: bool) -> None:
        for row in rows:
            if row.ranked:
                self.per_class[row.ranked[0][0]] += 1
                known = row.extra.get("known")
                self.unknown += known is False
                verdict = f"  unknown (score {row.extra['unknown_score']:.2f})" if known is False else ""
                if not quiet:
                    bar.write(f"image: {row.path}  class: {row.ranked[0][0]}  prob: {row.ranked[0][1]:.3f}{verdict}")
            else:
                self.failure_count += 1
                if len(self.failures) < self.SHOWN:
                    self.failures.append((row.path, row.error))
                bar.write(f"Warning: unreadable {row.path}: {row.error}", file=sys.stderr)

    def combined(self, ctx: DistContext, earlier_predicted: bool) -> BatchSummary:
        """The counts of every process (each printed its own images as they came)."""
        total = BatchSummary(self.reject_unknown)
        for part in gather_objects(ctx, (self.per_class, self.failures, self.failure_count,
                                         earlier_predicted, self.unknown)):  # fmt: skip
            per_class, failures, count, earlier, unknown = part
            total.per_class.update(per_class)
            total.failures += failures[: self.SHOWN - len(total.failures)]
            total.failure_count += count
            total.earlier_predicted |= earlier
            total.unknown += unknown
        return total

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
    loader: Any, engine: InferenceModel | OnnxModel, schema: ResultSchema, paths: list[str],
    reject_unknown: bool = False,
) -> Iterator[list[ResultRow]]:
    """One list of rows per batch, in file order, failures in their place; names that are not
    UTF-8 escaped (`files.printable`), so that no row is lost to them."""
    for loaded in loader:
        batch = get_batch(loaded, engine.spec)
        rows = {i: ResultRow(printable(paths[i]), error=printable(reason)) for i, reason in batch.failures}
        if batch.inputs is not None:
            output = engine.predict(batch.inputs)
            ranked = top_k(output.probs, list(schema.classes), schema.topk)
            verdicts = unknown_verdicts(output, len(batch.indices))
            for n, i in enumerate(batch.indices):
                saved = output.probs[n].tolist() if schema.save_probs else None
                score, known = verdicts[n]
                rows[i] = ResultRow(printable(paths[i]), ranked[n], probs=saved,
                                    extra={"unknown_score": score, "known": known},
                                    rejected=reject_unknown and known is False)  # fmt: skip
        yield [rows[i] for i in sorted(rows)]
