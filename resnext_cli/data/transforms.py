"""Picture -> fixed-size uint8 tensor, and uint8 batch -> normalised floats: the one place that
knows the sizes and statistics a model expects (`Preprocessing`), and preprocess.json, which
carries them beside an exported model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision.transforms.functional as F
from PIL import Image
from torchvision import transforms as T

from resnext_cli.errors import UserError
from resnext_cli.files import atomic_write_text

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # RandomResizedCrop's defaults
Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in a picture's pixels (edges)


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

    def crop_plan(self, train: bool) -> CropPlan:
        """The same crops as the transforms above, as boxes, for decoding on the device."""
        return CropPlan(self.img_size, self.resize_size, train)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return normalize_batch(images, self.mean, self.std)


@dataclass(frozen=True)
class CropPlan:
    """Where a picture is cropped, as a box in its pixels: the training draw (RandomResizedCrop's
    box and a coin for the flip, from torch's RNG, which the loader seeds per image and epoch) or
    the eval resize + centre crop. The Pillow transforms and the device path both use it, so
    both take the same crop of the same image in the same epoch."""

    img_size: int
    resize_size: int
    train: bool

    def draw(self, width: int, height: int) -> tuple[Box, bool]:
        if not self.train:
            return centre_crop_box(width, height, self.img_size, self.resize_size), False
        # torchvision's own draw; it reads only the size, so a meta tensor (no memory) stands in
        top, left, h, w = T.RandomResizedCrop.get_params(
            torch.empty((1, height, width), device="meta"), list(CROP_SCALE), list(CROP_RATIO)
        )
        flip = bool(torch.rand(1) < 0.5)  # RandomHorizontalFlip's coin, in the same order
        return (left, top, left + w, top + h), flip


def centre_crop_box(width: int, height: int, img_size: int, resize: int) -> Box:
    """Resize(resize) then CenterCrop(img_size), as the region of the original it keeps."""
    short, long = sorted((width, height))
    new_long = int(resize * long / short)  # torchvision's rounding of the long side
    new_w, new_h = (resize, new_long) if width <= height else (new_long, resize)
    top, left = int(round((new_h - img_size) / 2.0)), int(round((new_w - img_size) / 2.0))
    sx, sy = width / new_w, height / new_h
    return (left * sx, top * sy, (left + img_size) * sx, (top + img_size) * sy)


class RandomCropFlip:
    """RandomResizedCrop + horizontal flip to a uint8 tensor (torchvision's defaults and random
    draws), with the box from `CropPlan`. Normalisation happens per batch on the device."""

    def __init__(self, img_size: int) -> None:
        self.size = img_size
        self.plan = CropPlan(img_size, img_size, train=True)

    def __call__(self, picture: Image.Image) -> torch.Tensor:
        (x0, y0, x1, y1), flip = self.plan.draw(*picture.size)
        out = F.resized_crop(picture, int(y0), int(x0), int(y1 - y0), int(x1 - x0),
                             [self.size, self.size], T.InterpolationMode.BILINEAR, antialias=True)  # fmt: skip
        return F.pil_to_tensor(F.hflip(out) if flip else out)


def train_transform(img_size: int) -> Callable[[Any], torch.Tensor]:
    """Random crop and flip, to a uint8 tensor: normalisation happens per batch on the device."""
    return RandomCropFlip(img_size)


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
