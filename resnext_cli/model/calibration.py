"""Fitting a checkpoint's calibration: the temperature and the unknown detector (`model.trust`)
from a model's outputs on held-out labelled images and its training images' features, then
writing them into the checkpoint. `train` does it at its end (from the feature cache when the
backbone never moved), `resnext calibrate` on any labelled photos later."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from resnext_cli import ui
from resnext_cli.data.batches import get_batch
from resnext_cli.data.loaders import make_loader
from resnext_cli.errors import EXIT_FAILED, UserError
from resnext_cli.model.checkpoint import load_checkpoint, save_torch
from resnext_cli.model.engines import InferenceModel, adjust_for_prior
from resnext_cli.model.trust import (
    BANK_LIMIT,
    Calibration,
    UnknownDetector,
    balanced_subsample,
    fit_detector,
    fit_statistics,
    fit_temperature,
    parse_score,
)


@dataclass
class Outputs:
    """A model's raw outputs on labelled images (the readable ones, in order)."""

    logits: torch.Tensor  # fp32, CPU
    features: torch.Tensor  # networks.logits_and_features': pooled, then the channel spread
    labels: torch.Tensor
    unreadable: list[tuple[str, str]]
    pooled: int | None = None  # how many leading feature columns are pooled (None: all)


def collect_outputs(
    engine: InferenceModel, samples: list[tuple[str, int]], batch_size: int, workers: int | None,
    desc: str,
) -> Outputs:  # fmt: skip
    """Logits and pooled features of every readable image, through the eval transform (no TTA:
    what the calibration is fitted on must be what prediction computes: the logits adjusted
    for the engine's class prior, the step before the temperature)."""
    loader = make_loader(engine.dataset(samples), batch_size=batch_size,
                         workers=engine.decode_workers([p for p, _ in samples], workers),
                         pin_memory=engine.pin_memory)  # fmt: skip
    logits, features, labels, unreadable = [], [], [], []
    for loaded in ui.progress(loader, desc=desc, unit="batch"):
        batch = get_batch(loaded, engine.spec)
        unreadable += [(samples[i][0], reason) for i, reason in batch.failures]
        if batch.inputs is None:
            continue
        with torch.inference_mode():
            (batch_logits, batch_features), = engine.views(batch.inputs)  # fmt: skip
        logits.append(adjust_for_prior(batch_logits, engine.prior).cpu())  # as predict computes them
        features.append(batch_features.cpu())
        labels.append(batch.labels.cpu())
    if not logits:
        raise UserError(f"None of the {len(samples)} images for {desc} could be read.", EXIT_FAILED)
    return Outputs(torch.cat(logits), torch.cat(features), torch.cat(labels), unreadable,
                   engine.model.fc.in_features)  # fmt: skip


def train_subsample(samples: list[tuple[str, int]], limit: int = BANK_LIMIT) -> list[tuple[str, int]]:
    """The training images whose features the unknown score keeps: all of them up to `limit`,
    else a class-balanced, seeded subsample (so that the pass over them and the stored
    statistics stay bounded whatever the size of the training set)."""
    labels = torch.tensor([label for _, label in samples])
    return [samples[i] for i in balanced_subsample(labels, limit).tolist()]


@dataclass
class FitInputs:
    """What calibration is fitted from."""

    val: Outputs  # held-out labelled images: the temperature, the score's standardisation, threshold
    train_features: torch.Tensor | None  # the training images' features (None: keep `stats`)
    train_labels: torch.Tensor | None
    stats: tuple[dict[str, torch.Tensor], int] | None = None  # fitted already (recalibrating)


def fit_calibration(inputs: FitInputs, score: str, accept: float, fitted_on: str) -> Calibration:
    """The temperature on the val logits (LBFGS on the NLL), then the unknown score's
    statistics on the training features (or those given), standardised and thresholded on the
    val images (`fitted_on` says which) at the calibrated temperature."""
    val = inputs.val
    temperature = fit_temperature(val.logits, val.labels)
    components = parse_score(score)
    if inputs.stats is not None:
        stats, k = inputs.stats
    else:
        assert inputs.train_features is not None and inputs.train_labels is not None
        # the training features are laid out as val's (the same model's): as many pooled columns
        stats, k = fit_statistics(components, inputs.train_features, inputs.train_labels, pooled=val.pooled)
    detector = fit_detector(components, stats, k, val.logits, val.features, temperature, accept)
    return Calibration(temperature, replace(detector, fitted_on=fitted_on))


def write_calibration(path: Path, calibration: Calibration, checkpoint: dict[str, Any] | None = None) -> None:
    """The checkpoint (as read from `path`, or given) with `temperature` and `unknown` set,
    written atomically in place; its weights and every other key stay as they were."""
    checkpoint = dict(checkpoint) if checkpoint is not None else load_checkpoint(path)
    checkpoint["temperature"] = float(calibration.temperature)
    if calibration.unknown is not None:
        checkpoint["unknown"] = calibration.unknown.to(torch.device("cpu")).to_state()
    save_torch(checkpoint, path)


def stored_size(detector: UnknownDetector) -> int:
    """Bytes the unknown score adds to a checkpoint (its tensors as stored)."""
    state: dict[str, Any] = detector.to_state()
    tensors = [*state["stats"].values(), state["quantiles"]]
    return sum(t.numel() * t.element_size() for t in tensors)
