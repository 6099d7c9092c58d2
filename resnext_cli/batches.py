"""Loaded batch -> the model's input on the device: the one step between the loader and the
model, for training, validation, feature extraction, evaluate, predict and export alike."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from resnext_cli.loaders import LoadedBatch
from resnext_cli.transforms import Preprocessing


@dataclass(frozen=True)
class InputSpec:
    """Where and how a model takes its input."""

    device: torch.device
    channels_last: bool
    preprocessing: Preprocessing


def model_input(batch: LoadedBatch, spec: InputSpec) -> torch.Tensor:
    """The batch's uint8 pixels, on the device, standardised, in the model's memory layout."""
    assert batch.images is not None, "a batch with no decodable image has no model input"
    return spec.preprocessing.normalize(to_device(batch.images, spec.device, spec.channels_last))


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return images.to(device, non_blocking=True, memory_format=layout)


def pixel_batch(pixels: torch.Tensor) -> LoadedBatch:
    """A LoadedBatch around uint8 pixels made in memory (export's parity inputs, benchmarks)."""
    return LoadedBatch(pixels, torch.zeros(len(pixels), dtype=torch.long), list(range(len(pixels))), [])
