"""`resnext calibrate [RUN]`: refit a checkpoint's temperature and unknown threshold on labelled
photos (by default the run's val split, as `train` does at its end), and write them into it.

The unknown score's training-set statistics (the feature bank, or class means) stay as `train`
stored them; they are computed from the run's training images only when the checkpoint has
none (one from before calibration existed) or another `--unknown-score` is asked for.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from resnext_cli import ui
from resnext_cli.config import UNKNOWN_ACCEPT, UNKNOWN_SCORE, CalibrateConfig, InferenceConfig
from resnext_cli.data.folders import discover_dataset
from resnext_cli.errors import UserError
from resnext_cli.model import checkpoint as ckpt
from resnext_cli.model.calibration import (
    FitInputs,
    Outputs,
    collect_outputs,
    fit_calibration,
    stored_size,
    train_subsample,
    write_calibration,
)
from resnext_cli.model.engines import InferenceModel, load_inference_model
from resnext_cli.model.trust import FEATURE_COMPONENTS, Calibration, parse_score, threshold_text
from resnext_cli.outputs.evaluation import calibration_summary, evaluation_samples


def calibrate(cfg: CalibrateConfig) -> Calibration:
    """Fit, report on the photos it was fitted on, and write the checkpoint in place."""
    path = checkpoint_path(cfg.run_dir)
    checkpoint = ckpt.load_checkpoint(path)
    previous = Calibration.from_checkpoint(checkpoint, str(path))
    engine = load_inference_model(dataclasses.replace(_inference(cfg, path), calibration=False), announce=False)
    data = cfg.data or engine.trained_on
    if data is None:
        raise UserError(f"{path} does not record the data it was trained on; pass the labelled photos: "
                        "resnext calibrate RUN --data DIR.")  # fmt: skip
    chosen = evaluation_samples(data, engine.classes, path.parent)
    for message in chosen.warnings:
        ui.warn(message)
    ui.note(f"Calibrating {path} on {len(chosen.samples)} images ({chosen.description})  |  {engine.describe()}")
    val = collect_outputs(engine, chosen.samples, cfg.batch_size, cfg.workers, "calibrate")
    for image, reason in val.unreadable:
        ui.warn(f"skipped unreadable file {image}: {reason}")
    score = cfg.unknown_score or (previous.unknown.name if previous.unknown else UNKNOWN_SCORE)
    inputs = FitInputs(val, None, None, _kept_statistics(previous, score))
    if inputs.stats is None and any(c in FEATURE_COMPONENTS for c in parse_score(score)):
        inputs.train_features, inputs.train_labels = _training_features(engine, checkpoint, cfg)
    accept = cfg.unknown_threshold or (previous.unknown.accept if previous.unknown else UNKNOWN_ACCEPT)
    fitted_on = f"{chosen.description} ({len(val.labels)} images), by resnext calibrate"
    calibration = fit_calibration(inputs, score, accept, fitted_on)
    write_calibration(path, calibration, checkpoint)
    _report(calibration, previous, val, path)
    return calibration


def checkpoint_path(run: str | None) -> Path:
    """RUN's best.pt, a checkpoint given as such, or the latest finished run's best.pt."""
    if run is None:
        run_dir = ckpt.latest_run()
        ui.note(f"Calibrating the latest finished run, {ckpt.describe_run(run_dir)} (pass RUN to choose "
                "another).")  # fmt: skip
        return run_dir / "best.pt"
    path = Path(run)
    return path / "best.pt" if path.is_dir() else path


def _inference(cfg: CalibrateConfig, path: Path) -> InferenceConfig:
    return InferenceConfig(checkpoint=str(path), device=cfg.device, precision=cfg.precision,
                           channels_last=cfg.channels_last, decode=cfg.decode)  # fmt: skip


def _kept_statistics(previous: Calibration, score: str) -> tuple[dict[str, torch.Tensor], int] | None:
    """The training-set statistics already in the checkpoint, if they are the asked score's."""
    if previous.unknown is None or previous.unknown.name != score:
        return None
    return previous.unknown.stats, previous.unknown.k


def _training_features(
    engine: InferenceModel, checkpoint: dict, cfg: CalibrateConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of a bounded, class-balanced sample of the run's own training images."""
    config = checkpoint["config"] if isinstance(checkpoint["config"], dict) else {}
    data = config.get("data")
    if not data or not Path(str(data)).exists():
        raise UserError(f"The unknown score needs the features of the images {engine.source} was trained "
                        f"on, and its training data ({data}) is not there. Calibrate with a score of the "
                        "logits alone (--unknown-score msp), or restore the data.")  # fmt: skip
    layout = discover_dataset(str(data), float(config.get("val_split", 0.1)), int(config.get("seed") or 0))
    if layout.classes != engine.classes:
        raise UserError(f"The classes in {data} are no longer those of {engine.source}; cannot compute its "
                        "training features.")  # fmt: skip
    train = collect_outputs(engine, train_subsample(layout.train), cfg.batch_size, cfg.workers,
                            "training features")  # fmt: skip
    return train.features, train.labels


def _report(calibration: Calibration, previous: Calibration, val: Outputs, path: Path) -> None:
    before = calibration_summary(val.logits, val.labels, previous.temperature)
    after = calibration_summary(val.logits, val.labels, calibration.temperature)
    ui.info(f"Temperature {previous.temperature:.3g} -> {calibration.temperature:.3g}: ECE {before['ece']:.3f} -> "
            f"{after['ece']:.3f}, NLL {before['nll']:.3f} -> {after['nll']:.3f} (on these "
            f"{len(val.labels)} images).")  # fmt: skip
    detector = calibration.unknown
    if detector is not None:
        ui.info(f"Unknown score {detector.name}: above {detector.threshold:.3g} an image is `unknown` "
                f"({threshold_text(detector, 'images')}; {stored_size(detector) / 1e3:,.0f} KB).")
    ui.info(f"Wrote the temperature and the unknown score into {path}.")
