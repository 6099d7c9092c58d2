"""`resnext predict` and `resnext batch-predict`: the val transform of training, a model in eval
mode under inference_mode, and results that stream out as batches finish."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from resnext_cli import ui
from resnext_cli.config import BatchPredictConfig, InferenceConfig, PredictConfig
from resnext_cli.errors import EXIT_FAILED, EXIT_OK, UserError

if TYPE_CHECKING:
    import torch


@dataclass
class Preprocessing:
    """What turns a file into model input; the same for every engine."""

    classes: list[str]
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str  # the checkpoint or model file, as shown to the user

    def transform(self) -> Any:
        from resnext_cli.data import eval_transform

        return eval_transform(self.img_size)

    @property
    def decode_min_size(self) -> int:
        from resnext_cli.data import resize_size

        return resize_size(self.img_size)

    runs_on_cpu = True

    def decode_workers(self, paths: list[str], requested: int | None) -> int:
        """--workers as given; by default `default_workers()` decoding processes, except on a
        small CPU-only machine (at most 3 cores, where that is one worker) with small images
        (shorter side <= 2x the resize size): there decoding in the main process is faster,
        because the worker takes a core from the model while a small JPEG decodes in a fraction
        of the model's time per image (measured, resnet18 on 2 cores: 0.85-0.90 of model-only
        speed vs 0.75-0.76 with the worker). Large photos keep their worker: the reduced-size
        decode overlapped with the model is what makes them fast."""
        from resnext_cli.config import available_cores, default_workers
        from resnext_cli.data import typical_short_side

        if requested is not None:
            workers = requested
        elif (
            self.runs_on_cpu
            and available_cores() <= 3
            and (typical_short_side(paths) or 0) <= 2 * self.decode_min_size
        ):
            workers = 0
        else:
            workers = default_workers()
        return min(workers, len(paths))


@dataclass
class InferenceModel(Preprocessing):
    model: torch.nn.Module = None  # type: ignore[assignment]
    arch: str = ""
    device: torch.device = None  # type: ignore[assignment]
    precision: str = "fp32"
    channels_last: bool = False

    @property
    def runs_on_cpu(self) -> bool:  # type: ignore[override]
        return self.device.type == "cpu"

    def describe(self) -> str:
        layout = ", channels-last" if self.channels_last else ""
        return f"{self.source} on {self.device} ({self.precision}{layout})"

    @property
    def pin_memory(self) -> bool:
        from resnext_cli.device import pin_memory_for

        return pin_memory_for(self.device)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities for a uint8 batch from `transform()`."""
        import torch

        from resnext_cli.device import autocast, model_inputs

        with torch.inference_mode(), autocast(self.device, self.precision):
            inputs = model_inputs(images, self.device, self.channels_last, self.mean, self.std)
            logits = self.model(inputs)
        return torch.softmax(logits.float(), dim=1).cpu()


def load_inference_model(cfg: InferenceConfig, announce: bool = True) -> InferenceModel:
    """A resnext checkpoint (given, or the newest runs/*/best.pt), or the tutorial's artefacts:
    a plain state dict with --arch and --class-indices."""
    from resnext_cli import checkpoint as ckpt
    from resnext_cli import models
    from resnext_cli.device import precision_for, prepare_model, select_device

    device = select_device(cfg.device)
    precision = precision_for(cfg.precision, device)
    mean, std = models.IMAGENET_MEAN, models.IMAGENET_STD
    if cfg.weights:
        assert cfg.arch and cfg.class_indices
        classes = ckpt.read_class_indices(cfg.class_indices)
        state = models.read_state_dict(cfg.weights)
        _check_class_count(state, classes, cfg.weights, cfg.class_indices)
        model = _weights_only_model(cfg.arch, len(classes), state, cfg.weights)
        source, img_size, arch = cfg.weights, cfg.img_size or 224, cfg.arch
    else:
        path = Path(cfg.checkpoint) if cfg.checkpoint else ckpt.latest_checkpoint()
        if announce and not cfg.checkpoint:
            ui.console(stderr=True).print(f"Using the newest checkpoint: {path}", markup=False)
        checkpoint = ckpt.load_checkpoint(path)
        classes = list(checkpoint["classes"])
        if cfg.class_indices:
            named = ckpt.read_class_indices(cfg.class_indices)
            _check_class_count(checkpoint["model"], named, str(path), cfg.class_indices)
            classes = named
        if cfg.arch and cfg.arch != checkpoint["arch"]:
            raise UserError(f"--arch {cfg.arch} disagrees with {path}, a {checkpoint['arch']}.")
        arch = checkpoint["arch"]
        model = _weights_only_model(arch, len(classes), checkpoint["model"], str(path))
        source = str(path)
        img_size = cfg.img_size or int(checkpoint["img_size"])
        mean, std = tuple(checkpoint["mean"]), tuple(checkpoint["std"])
    model.eval()
    prepare_model(model, device, cfg.channels_last)
    if cfg.compile:
        import torch

        model = torch.compile(model)
    return InferenceModel(
        classes, img_size, mean, std, source, model, arch, device, precision, cfg.channels_last
    )


@dataclass
class OnnxModel(Preprocessing):
    """An exported model on onnxruntime, with the class map and preprocessing written beside it."""

    session: Any = None

    pin_memory = False  # onnxruntime reads host memory

    def describe(self) -> str:
        return f"{self.source} on onnxruntime (CPU, fp32)"

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        import torch

        from resnext_cli.data import normalize_batch
        from resnext_cli.export import run_onnx

        inputs = normalize_batch(images, self.mean, self.std).numpy()
        return torch.softmax(run_onnx(self.session, inputs).float(), dim=1)


def load_onnx_model(path: str, class_indices: str | None) -> OnnxModel:
    from resnext_cli.checkpoint import read_class_indices
    from resnext_cli.export import onnx_session, require_onnx

    require_onnx("onnxruntime")
    model_file = Path(path)
    if not model_file.is_file():
        raise UserError(f"The ONNX model {path} does not exist.")
    preprocess_file = model_file.parent / "preprocess.json"
    try:
        preprocessing = json.loads(preprocess_file.read_text(encoding="utf-8"))
        img_size, mean, std = preprocessing["img_size"], preprocessing["mean"], preprocessing["std"]
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(
            f"{preprocess_file} (written by `resnext export` beside the model) is missing or "
            f"unreadable ({exc}); it holds the image size and normalisation the model expects."
        ) from None
    classes = read_class_indices(class_indices or model_file.parent / "class_indices.json")
    session = onnx_session(model_file)
    outputs = session.get_outputs()[0].shape[-1]
    if isinstance(outputs, int) and outputs != len(classes):
        raise UserError(f"{path} has {outputs} outputs but the class file names {len(classes)}.")
    return OnnxModel(classes, int(img_size), tuple(mean), tuple(std), str(model_file), session)


def _weights_only_model(
    arch: str, num_classes: int, state: dict[str, torch.Tensor], source: str
) -> torch.nn.Module:
    """Built on the meta device and given the file's tensors: no random init to throw away
    (0.2 s for resnet18, more for the large models, at every predict)."""
    import torch

    from resnext_cli import models

    with torch.device("meta"):
        model = models.build_model(arch, num_classes)
    if "fc.weight" not in state:
        raise UserError(f"{source} has no classifier (fc.*): it cannot predict classes.")
    models.apply_state_dict(model, state, source, log=lambda _: None, assign=True)
    return model


def _check_class_count(
    state: dict[str, torch.Tensor], classes: list[str], weights: str, class_file: str
) -> None:
    outputs = state["fc.weight"].shape[0] if "fc.weight" in state else None
    if outputs is not None and outputs != len(classes):
        raise UserError(
            f"{weights} has a classifier with {outputs} outputs but {class_file} names "
            f"{len(classes)} classes. Use the class_indices.json written with these weights."
        )


def top_k(probs: torch.Tensor, classes: list[str], k: int) -> list[list[tuple[str, float]]]:
    import torch

    values, indices = torch.topk(probs, min(k, len(classes)), dim=1)
    return [
        [(classes[i], float(v)) for v, i in zip(row_v.tolist(), row_i.tolist())]
        for row_v, row_i in zip(values, indices)
    ]


# ---------------------------------------------------------------- predict


def predict(cfg: PredictConfig) -> list[dict[str, Any]]:
    import torch

    from resnext_cli.data import describe_failure, load_rgb

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
    transform = engine.transform()
    pictures, problems = [], []
    for image in cfg.images:
        try:
            pictures.append(load_rgb(image, engine.decode_min_size))
        except Exception as exc:
            problems.append(f"{image} ({describe_failure(exc)})")
    if problems:
        raise UserError(f"Could not read the image(s): {'; '.join(problems)}.")
    probs = engine.probabilities(torch.stack([transform(p) for p in pictures]))
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
    from rich.table import Table

    for result in results:
        table = Table("#", "class", "prob", title=result["path"], title_justify="left", box=None)
        for rank, entry in enumerate(result["topk"], 1):
            table.add_row(str(rank), entry["class"], f"{entry['prob']:.2%}")
        ui.console().print(table)


def save_prediction_plot(path: str, pictures: list[Any], results: list[dict[str, Any]]) -> None:
    """Each image under a title line `class: prob`, side by side in one PNG; never a window."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    from resnext_cli.checkpoint import atomic_write

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


class ResultWriter:
    """Streams rows to `<output>.partial` one whole batch per write, renamed into place when the
    run ends: a reader never sees half a line, and an earlier file survives a failed run."""

    def __init__(self, output: str, topk: int, resume: bool = False) -> None:
        self.path = Path(output)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.jsonl = self.path.suffix.lower() == ".jsonl"
        self.topk = topk
        self.done: dict[str, bool] = {}  # path -> predicted (not an error), from an earlier run
        if not self.path.parent.is_dir():
            raise UserError(f"Cannot write {output}: the folder {self.path.parent} does not exist.")
        header = ["path", "class", "prob", "error"]
        for k in range(2, topk + 1):
            header += [f"class_{k}", f"prob_{k}"]
        try:
            earlier = self._earlier_lines(header) if resume else None
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise UserError(
                f"Cannot resume {output}: it is not an output of batch-predict ({exc}). Write to "
                "a new --output instead."
            ) from None
        try:
            self.handle = open(self.partial, "w", encoding="utf-8", newline="")
        except OSError as exc:
            raise UserError(f"Cannot write {self.partial}: {exc.strerror}.") from None
        if earlier:
            self.handle.write(earlier)
        elif not self.jsonl:
            self._write([header])

    def _earlier_lines(self, header: list[str]) -> str:
        """The complete lines of an interrupted (`.partial`) or finished earlier output; a torn
        last line is dropped, so its image is predicted again."""
        source = next((p for p in (self.partial, self.path) if p.is_file()), None)
        if source is None:
            return ""
        text = source.read_text(encoding="utf-8")
        text = text[: text.rfind("\n") + 1]
        lines = text.splitlines()
        if self.jsonl:
            for line in lines:
                record = json.loads(line)
                self.done[record["path"]] = not record["error"]
            return text
        if lines and next(csv.reader([lines[0]])) != header:
            raise UserError(
                f"{source} has other columns than this run would write (was --topk different?); "
                "resume with the same options, or write to a new --output."
            )
        for row in csv.reader(lines[1:]):
            self.done[row[0]] = not row[3]
        return text

    def add(self, rows: list[tuple[str, list[tuple[str, float]] | None, str]]) -> None:
        """rows: (path, ranked classes or None, error message or "")."""
        if self.jsonl:
            lines = [
                json.dumps(
                    {
                        "path": path,
                        "class": ranked[0][0] if ranked else None,
                        "prob": round(ranked[0][1], 6) if ranked else None,
                        "topk": [{"class": c, "prob": round(p, 6)} for c, p in ranked or []],
                        "error": error,
                    },
                    ensure_ascii=False,
                )
                + "\n"
                for path, ranked, error in rows
            ]
            self.handle.write("".join(lines))
        else:
            records = []
            for path, ranked, error in rows:
                cells = [path, "", "", error]
                if ranked:
                    cells[1:3] = [ranked[0][0], f"{ranked[0][1]:.6f}"]
                for k in range(1, self.topk):
                    if ranked and k < len(ranked):
                        cells += [ranked[k][0], f"{ranked[k][1]:.6f}"]
                    else:
                        cells += ["", ""]
                records.append(cells)
            self._write(records)
        self.handle.flush()

    def _write(self, records: list[list[str]]) -> None:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(records)
        self.handle.write(buffer.getvalue())

    def close(self, keep: bool) -> None:
        self.handle.close()
        if keep:
            os.replace(self.partial, self.path)


def batch_predict(cfg: BatchPredictConfig) -> int:
    """Predict every image in DIR; returns the exit code (1 when none could be predicted)."""
    from resnext_cli.data import ImageListDataset, list_images, make_loader

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
    dataset = ImageListDataset([(p, -1) for p in paths], engine.transform(), engine.decode_min_size)
    loader = make_loader(
        dataset,
        batch_size=cfg.batch_size,
        workers=engine.decode_workers(paths, cfg.workers),
        pin_memory=engine.pin_memory,
    )
    per_class: Counter[str] = Counter()
    failures: list[tuple[str, str]] = []  # the first few, for the summary
    failure_count = 0
    started = time.perf_counter()
    bar = ui.progress(total=len(paths), desc="predict", unit="img")
    finished = False
    try:
        for rows in _predicted_rows(loader, engine, cfg.topk, paths):
            for path, ranked, error in rows:
                if ranked:
                    per_class[ranked[0][0]] += 1
                    if not cfg.quiet:
                        bar.write(f"image: {path}  class: {ranked[0][0]}  prob: {ranked[0][1]:.3f}")
                else:
                    failure_count += 1
                    if len(failures) < 20:
                        failures.append((path, error))
                    bar.write(f"Warning: unreadable {path}: {error}", file=sys.stderr)
            if writer:
                writer.add(rows)
            bar.update(len(rows))
        finished = True
    finally:
        bar.close()
        if writer:
            writer.close(keep=finished)
    seconds = time.perf_counter() - started
    _print_batch_summary(per_class, failures, failure_count, seconds, cfg.output)
    return EXIT_OK if per_class or any(earlier.values()) else EXIT_FAILED


def _predicted_rows(
    loader: Any, engine: InferenceModel | OnnxModel, k: int, paths: list[str]
) -> Iterator[list[tuple[str, list[tuple[str, float]] | None, str]]]:
    """One list of rows per batch, in file order, failures in their place."""
    for batch in loader:
        ranked_by_index: dict[int, Any] = {}
        if batch.images is not None:
            ranked = top_k(engine.probabilities(batch.images), engine.classes, k)
            ranked_by_index = dict(zip(batch.indices, ranked))
        errors = dict(batch.failures)
        order = sorted([*ranked_by_index, *errors])
        yield [(paths[i], ranked_by_index.get(i), errors.get(i, "")) for i in order]


def _print_batch_summary(
    per_class: Counter[str],
    failures: list[tuple[str, str]],
    failure_count: int,
    seconds: float,
    output: str | None,
) -> None:
    from rich.table import Table

    predicted = sum(per_class.values())
    console = ui.console()
    console.print(
        f"Predicted {predicted} image(s), {failure_count} unreadable, in {seconds:.1f} s "
        f"({predicted / max(seconds, 1e-9):.1f} images/s).",
        markup=False,
    )
    if per_class:
        table = Table("class", "images", box=None)
        for name, count in sorted(per_class.items(), key=lambda kv: (-kv[1], kv[0])):
            table.add_row(name, str(count))
        console.print(table)
    if failures:
        shown = "\n".join(f"  {path}: {reason}" for path, reason in failures)
        rest = failure_count - len(failures)
        more = f"\n  ... and {rest} more (the output file lists them all)" if rest else ""
        ui.warn(f"{failure_count} file(s) could not be read:\n{shown}{more}")
    if output:
        console.print(f"Results: {output}", markup=False)
