"""`resnext export`: ONNX or TorchScript, checked against the PyTorch model before it is kept."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from resnext_cli import ui
from resnext_cli.config import ExportConfig, InferenceConfig
from resnext_cli.data.batches import InputSpec, get_batch, pixel_batch
from resnext_cli.data.transforms import Preprocessing, write_preprocess_json
from resnext_cli.errors import EXIT_FAILED, UserError
from resnext_cli.files import atomic_write, atomic_write_text, make_folder
from resnext_cli.model.checkpoint import run_folder_lock, write_class_indices
from resnext_cli.model.engines import (
    UNKNOWN_ARRAYS,
    InferenceModel,
    load_inference_model,
    onnx_session,
    require_onnx,
    run_onnx,
    run_onnx_outputs,
    write_calibration_files,
)
from resnext_cli.model.networks import WithFeatures
from resnext_cli.model.trust import BatchOutput, Calibration

MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}


def realistic_batch(n: int, img_size: int, mean: Any, std: Any, seed: int = 0) -> torch.Tensor:
    """Normalised inputs with photo-like statistics: smooth colour fields plus fine noise,
    rather than white noise, which no real image resembles."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 6, 6, generator=generator) * 255
    smooth = F.interpolate(coarse, size=(img_size, img_size), mode="bicubic", align_corners=False)
    noise = torch.randn(n, 3, img_size, img_size, generator=generator) * 12
    pixels = (smooth + noise).clamp(0, 255).round().to(torch.uint8)
    preprocessing = Preprocessing(img_size, img_size, tuple(mean), tuple(std))
    batch = get_batch(pixel_batch(pixels), InputSpec(torch.device("cpu"), False, preprocessing))
    assert batch.inputs is not None
    return batch.inputs


def export(cfg: ExportConfig) -> Path:
    if cfg.format == "onnx":
        require_onnx("onnx", "onnxruntime", "onnxscript")
    engine = load_inference_model(
        InferenceConfig(checkpoint=cfg.checkpoint, run=cfg.run, device="cpu", precision="fp32",
                        channels_last=False)
    )
    out_dir = Path(cfg.out) if cfg.out else Path(engine.source).parent / "export"
    with run_folder_lock(out_dir):  # export/ of a run: never while train writes that run
        return export_into(engine, cfg, out_dir)


def refuse_existing_outputs(paths: list[Path], overwrite: bool) -> None:
    """Before any work: files already there are replaced only with --overwrite (exit 2)."""
    existing = [p for p in paths if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        raise UserError(
            f"{existing[0].parent} already holds {', '.join(p.name for p in existing)} (an "
            "earlier export, or files of yours). Pass --overwrite to replace them, or --out DIR to "
            "export elsewhere; nothing was written."
        )


def export_into(engine: InferenceModel, cfg: ExportConfig, out_dir: Path) -> Path:
    """The model file, checked against PyTorch before it is kept, then class_indices.json and
    preprocess.json; existing ones are replaced only with --overwrite."""
    target = out_dir / MODEL_FILES[cfg.format]
    refuse_existing_outputs([target, out_dir / "class_indices.json", out_dir / "preprocess.json"],
                            cfg.overwrite)  # fmt: skip
    make_folder(out_dir)
    prep = engine.preprocessing
    inputs = realistic_batch(8, prep.img_size, prep.mean, prep.std)
    # TorchScript keeps its one output (logits), so it carries the temperature, not the unknown score
    calibration = engine.calibration if cfg.format == "onnx" else Calibration(engine.calibration.temperature)
    with torch.inference_mode():
        expected = calibration.apply(engine.views(inputs))
    temporary = out_dir / f".{target.name}.tmp"
    try:
        if cfg.format == "onnx":
            _export_onnx(engine.model, inputs, temporary, cfg)
            outputs = run_onnx_outputs(onnx_session(temporary), inputs.numpy())
            actual = calibration.apply([(outputs[0], outputs[1])])
        else:
            _export_torchscript(engine.model, inputs, temporary)
            actual = calibration.apply([(_run_torchscript_file(temporary, inputs), None)])
        check_parity(expected, actual, cfg)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    write_companions(out_dir, engine, calibration, cfg)
    return target


def check_parity(expected: BatchOutput, actual: BatchOutput, cfg: ExportConfig) -> None:
    """The exported model's calibrated probabilities (and unknown scores) against PyTorch's:
    within --tolerance, and the same top class for every input, or nothing is written."""
    prob_diff = float((actual.probs - expected.probs).abs().max())
    agreement = float((actual.probs.argmax(1) == expected.probs.argmax(1)).float().mean())
    score_diff = 0.0
    if expected.unknown_score is not None and actual.unknown_score is not None:
        relative = (actual.unknown_score - expected.unknown_score).abs() / expected.unknown_score.abs().clamp(min=1)
        score_diff = float(relative.max())
    scores = f", unknown score {score_diff:.2e}" if expected.unknown_score is not None else ""
    ui.info(
        f"Parity with PyTorch on {len(expected.probs)} inputs: max difference of the calibrated "
        f"probabilities {prob_diff:.2e}{scores} (tolerance {cfg.tolerance:.0e}), top-1 agreement {agreement:.0%}."
    )  # fmt: skip
    if prob_diff > cfg.tolerance or score_diff > cfg.tolerance or agreement < 1.0:
        raise UserError(
            f"The exported {cfg.format} model disagrees with the PyTorch model (max probability "
            f"difference {prob_diff:.2e}{scores}, top-1 agreement {agreement:.0%}); nothing was "
            "written. Try another --opset, or report the architecture and versions.",
            EXIT_FAILED,
        )


def write_companions(out_dir: Path, engine: Any, calibration: Calibration, cfg: ExportConfig) -> None:
    """class_indices.json, preprocess.json and the calibration files beside the model."""
    write_class_indices(out_dir / "class_indices.json", engine.classes)
    outputs = ("logits, one per class of class_indices.json; probabilities: softmax(logits / the "
               "temperature in calibration.json)")  # fmt: skip
    if cfg.format == "onnx":
        outputs += ("; features: what the unknown score (calibration.json) reads: the pooled backbone "
                    "features that feed the head, then each layer2 channel's standard deviation")  # fmt: skip
    write_preprocess_json(out_dir / "preprocess.json", engine.preprocessing, {
        "arch": engine.arch,
        "format": cfg.format,
        "batch": "dynamic" if cfg.dynamic_batch else 1,
        "opset": cfg.opset if cfg.format == "onnx" else None,
        "output": outputs,
        "checkpoint": engine.source,
        **prior_record(engine),
    })  # fmt: skip
    written = write_calibration_files(out_dir, calibration, atomic_write_text,
                                      lambda path, data: atomic_write(path, lambda h: h.write(data)))  # fmt: skip
    if calibration.unknown is None:
        (out_dir / UNKNOWN_ARRAYS).unlink(missing_ok=True)  # an earlier export's, which no longer applies
    ui.info(f"Exported {MODEL_FILES[cfg.format]}, class_indices.json, preprocess.json and "
            f"{', '.join(written)} to {out_dir}")  # fmt: skip


def prior_record(engine: InferenceModel) -> dict[str, Any]:
    """preprocess.json's class prior: the training images per class and --balance, from which
    onnxruntime prediction (and `--prior`) adjusts the logits as predict does; and the offsets
    to add to the exported logits before softmax for the model's default prior (null: none)."""
    prior = engine.prior
    if prior is None or prior.class_counts is None:
        return {}
    offsets = None if prior.offsets is None else [round(float(v), 6) for v in prior.offsets]
    return {"class_counts": prior.class_counts, "balance": prior.balance, "prior": prior.name,
            "logit_offsets": offsets}  # fmt: skip


def _export_onnx(model: Any, inputs: torch.Tensor, path: Path, cfg: ExportConfig) -> None:
    example = inputs if cfg.dynamic_batch else inputs[:1]
    dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},) if cfg.dynamic_batch else None
    chatter = io.StringIO()  # the exporter narrates its stages on stdout
    try:
        with contextlib.redirect_stdout(chatter), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                WithFeatures(model), (example,), str(path), dynamo=True, input_names=["images"],
                output_names=["logits", "features"], dynamic_shapes=dynamic, opset_version=cfg.opset,
                external_data=False,
            )  # fmt: skip
    except Exception as exc:
        raise UserError(f"ONNX export failed (opset {cfg.opset}): {exc}", EXIT_FAILED) from None


def _export_torchscript(model: Any, inputs: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still loadable
        traced = torch.jit.trace(model, inputs[:1])
        traced.save(str(path))


def _run_torchscript_file(path: Path, inputs: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        return loaded(inputs).float()


def run_onnx_file(path: Path, inputs: np.ndarray) -> torch.Tensor:
    """The logits of an exported model file."""
    return run_onnx(onnx_session(path), inputs)
