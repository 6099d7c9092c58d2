"""Picture -> fixed-size uint8 tensor, and uint8 batch -> normalised floats: the one place that
knows the sizes and statistics a model expects (`Preprocessing`), and preprocess.json, which
carries them beside an exported model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torchvision import transforms as T

from resnext_cli.errors import UserError
from resnext_cli.files import atomic_write_text

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_size(img_size: int) -> int:
    """The val resize that keeps the classic 256 -> 224 centre-crop ratio at any size."""
    return int(round(img_size * 256 / 224))


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects of its input: the centre crop `img_size` after resizing the shorter
    side to `resize_size` (evaluation), and the mean/std the pixels are standardised with."""

    img_size: int
    resize_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @classmethod
    def classic(cls, img_size: int) -> Preprocessing:
        """The tutorial's 256/224 ratio at any crop size, ImageNet statistics."""
        return cls(img_size, resize_size(img_size))

    @property
    def decode_min_size(self) -> int:
        """JPEGs may be decoded at a reduced scale as long as the shorter side stays this big."""
        return self.resize_size

    def train_transform(self) -> Callable[[Any], torch.Tensor]:
        return train_transform(self.img_size)

    def eval_transform(self) -> Callable[[Any], torch.Tensor]:
        return eval_transform(self.img_size, self.resize_size)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return normalize_batch(images, self.mean, self.std)


def train_transform(img_size: int) -> Callable[[Any], torch.Tensor]:
    """Random crop and flip, to a uint8 tensor: normalisation happens per batch on the device."""
    return T.Compose([T.RandomResizedCrop(img_size), T.RandomHorizontalFlip(), T.PILToTensor()])


def eval_transform(img_size: int, resize: int | None = None) -> Callable[[Any], torch.Tensor]:
    """Resize + centre crop, to a uint8 tensor (4x less to pass between processes than float)."""
    size = resize if resize is not None else resize_size(img_size)
    return T.Compose([T.Resize(size), T.CenterCrop(img_size), T.PILToTensor()])


def normalize_batch(
    images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """uint8 NCHW (any device, any layout) -> float, scaled to 0-1 and standardised."""
    scale = torch.tensor(std, device=images.device).view(1, -1, 1, 1) * 255.0
    shift = torch.tensor(mean, device=images.device).view(1, -1, 1, 1) * 255.0
    return (images.float() - shift) / scale


# ---------------------------------------------------------------- preprocess.json


def write_preprocess_json(path: Path, preprocessing: Preprocessing, about: dict[str, Any]) -> None:
    """Beside an exported model: how to turn an image into its input, for any runtime."""
    record = {
        "input": "float32 NCHW RGB: decode, resize shorter side, centre crop, /255, (x-mean)/std",
        "img_size": preprocessing.img_size,
        "resize_size": preprocessing.resize_size,
        "interpolation": "bilinear",
        "mean": list(preprocessing.mean),
        "std": list(preprocessing.std),
        **about,
    }
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def read_preprocess_json(path: Path) -> Preprocessing:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        img_size = int(record["img_size"])
        resize = int(record.get("resize_size") or resize_size(img_size))
        return Preprocessing(img_size, resize, tuple(record["mean"]), tuple(record["std"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"{path} (written by `resnext export` beside the model) is missing or unreadable "
            f"({exc}); it holds the image size and normalisation the model expects."
        ) from None
