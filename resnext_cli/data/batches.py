"""Loaded batch -> the model's input on the device: the one step between the loader and the
model, for training, validation, feature extraction, evaluate, predict and export alike.

Two kinds of batches arrive. Pillow's: uint8 crops, which only move and get standardised.
Or, when decoding on the device, `EncodedImage`s: JPEG bytes decoded in one batched call
(torchcodec's nvJPEG decode on CUDA; torchvision's where torchcodec is not installed), turned
upright, then cropped, resized and flipped for the whole batch at once with `roi_align` (one box
per image; an adaptive number of samples per output pixel averages strong downscaling instead of
aliasing). A file the device cannot decode goes to Pillow; one that nothing reads becomes a
failure of the batch, reported like any other.
"""

from __future__ import annotations

import functools
import importlib
import io
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
import torchvision.transforms.functional as F
from torchvision.ops import roi_align

from resnext_cli.data.images import describe_failure, load_rgb
from resnext_cli.data.loaders import EncodedImage, LoadedBatch
from resnext_cli.data.transforms import Box, Preprocessing

CROP_CHUNK_BYTES = 1 << 30  # float32 pictures stacked for one roi_align call, at most


@dataclass(frozen=True)
class InputSpec:
    """Where and how a model takes its input."""

    device: torch.device
    channels_last: bool
    preprocessing: Preprocessing
    decode_on_device: bool = False  # the loader sends EncodedImages (see loaders.image_dataset)


class DeviceBatch(NamedTuple):
    inputs: torch.Tensor | None  # standardised float N x 3 x S x S on the device; None: nothing read
    labels: torch.Tensor  # on the device
    indices: list[int]  # positions in the dataset of the rows of `inputs`
    failures: list[tuple[int, str]]  # (position, reason): the loader's and the device's


def get_batch(batch: LoadedBatch, spec: InputSpec) -> DeviceBatch:
    """The model's input on the device, in its memory layout, with the labels beside it."""
    labels = batch.labels.to(spec.device, non_blocking=True)
    if batch.encoded is None:
        if batch.images is None:
            return DeviceBatch(None, labels, [], batch.failures)
        pixels = to_device(batch.images, spec.device, spec.channels_last)
        return DeviceBatch(spec.preprocessing.normalize(pixels), labels, batch.indices, batch.failures)
    pictures = decode_on_device(batch.encoded, spec.device)
    kept = [i for i, p in enumerate(pictures) if isinstance(p, torch.Tensor)]
    failures = batch.failures + [(batch.indices[i], p) for i, p in enumerate(pictures) if isinstance(p, str)]
    if not kept:
        return DeviceBatch(None, labels[:0], [], failures)
    crops = crop_and_flip([pictures[i] for i in kept], [batch.encoded[i] for i in kept],  # type: ignore[misc]
                          spec.preprocessing.img_size)  # fmt: skip
    inputs = spec.preprocessing.normalize(crops).contiguous(memory_format=layout(spec.channels_last))
    kept_labels = labels[torch.tensor(kept, device=labels.device)]
    return DeviceBatch(inputs, kept_labels, [batch.indices[i] for i in kept], failures)


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    return images.to(device, non_blocking=True, memory_format=layout(channels_last))


def layout(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def pixel_batch(pixels: torch.Tensor) -> LoadedBatch:
    """A LoadedBatch around uint8 pixels made in memory (export's parity inputs, benchmarks)."""
    return LoadedBatch(pixels, torch.zeros(len(pixels), dtype=torch.long), list(range(len(pixels))), [])


# ---------------------------------------------------------------- decoding on the device


def decode_on_device(encoded: list[EncodedImage], device: torch.device) -> list[torch.Tensor | str]:
    """Upright uint8 3 x H x W pictures on the device, or the reason a file could not be read."""
    out: list[torch.Tensor | str] = [e.data.to(device, non_blocking=True) for e in encoded]
    jpegs = [i for i, e in enumerate(encoded) if e.jpeg]
    if not jpegs:
        return out
    decoded = decode_jpegs([encoded[i].data for i in jpegs], device, [encoded[i].orientation for i in jpegs])
    for i, picture in zip(jpegs, decoded):
        # None: the device's decoder refused it, Pillow gets a go
        out[i] = pillow_fallback(encoded[i].data, device) if picture is None else picture
    return out


JPEG_DECODER_EXTRA = "pip install 'resnext-cli[gpu]'  (torchcodec)"


class JpegDecoder(NamedTuple):
    name: str
    decode: Callable[[Any, torch.device], Any]  # a 1-D uint8 tensor (or a list) -> 3 x H x W
    upright: bool  # applies the EXIF orientation itself


def torchcodec_decoder() -> JpegDecoder | None:
    """torchcodec's decode_jpeg: the maintained one (torchvision's decoders are deprecated since
    0.29, "removed in a future release"), whose nvJPEG decode fixed its own stream-ordering
    hazard (meta-pytorch/torchcodec PR 1634), and which applies EXIF orientation itself."""
    try:
        codec = importlib.import_module("torchcodec.decoders")
    except Exception:  # noqa: BLE001 - not installed, or built for another torch: not usable
        return None
    return JpegDecoder("torchcodec", lambda data, device: codec.decode_jpeg(data, mode="RGB", device=device),
                       upright=True)  # fmt: skip


def torchvision_decoder() -> JpegDecoder | None:
    """torchvision's decode_jpeg, while torchvision still has it (deprecated since 0.29)."""
    try:
        io_module = importlib.import_module("torchvision.io")
        decode, rgb = io_module.decode_jpeg, io_module.ImageReadMode.RGB
    except (ImportError, AttributeError):
        return None
    return JpegDecoder("torchvision", lambda data, device: decode(data, mode=rgb, device=device), upright=False)


JPEG_DECODERS = (torchcodec_decoder, torchvision_decoder)  # in order of preference


@functools.lru_cache(maxsize=1)
def jpeg_decoder() -> JpegDecoder | None:
    """The device path's JPEG decoder: the first of JPEG_DECODERS installed, or None (JPEGs
    then go to Pillow). Loaded on first use: a plain CPU run never imports either."""
    return next((found for found in (make() for make in JPEG_DECODERS) if found), None)


def decode_jpegs(
    data: list[torch.Tensor], device: torch.device, orientations: list[int] | None = None
) -> list[torch.Tensor | None]:
    """Upright pictures (per the EXIF `orientations`, 1 when not given): one batched decode; if
    the batch fails, each file alone (None: this decoder can't)."""
    decoder = jpeg_decoder()
    if decoder is None:  # `device.decode_on_device` said so before any batch
        raise RuntimeError(f"no JPEG decoder for the device: {JPEG_DECODER_EXTRA}")
    pictures = _decode_all(decoder, data, device)
    if decoder.upright:
        return pictures
    turns = orientations or [1] * len(data)
    return [None if p is None else orient(p, o) for p, o in zip(pictures, turns)]


def _decode_all(decoder: JpegDecoder, data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    if device.type == "cuda":
        # torchvision's nvJPEG decode can write into memory that kernels still queued on this
        # stream are about to read (pytorch/vision PR 9606, seen on H100s): a silently corrupted
        # previous batch. torchcodec fixed its own decoder (PR 1634); draining the stream first
        # orders the two whichever decodes (measured on an H100 with torchvision: within noise),
        # and stays until measured unnecessary with torchcodec.
        torch.cuda.current_stream(device).synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision >= 0.29 marks its image decoders deprecated
        try:
            return list(decoder.decode(data, device))
        except RuntimeError:
            return [_decode_one(decoder, d, device) for d in data]


def _decode_one(decoder: JpegDecoder, data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return decoder.decode(data, device)
    except RuntimeError:
        return None


def pillow_fallback(data: torch.Tensor, device: torch.device) -> torch.Tensor | str:
    """Pillow's full decode of the file's bytes (upright), or why it cannot be read."""
    try:
        picture = load_rgb(io.BytesIO(data.cpu().numpy().tobytes()))
    except Exception as exc:  # any decoder error means "unreadable", never a crash
        return describe_failure(exc)
    return F.pil_to_tensor(picture).to(device)


def orient(picture: torch.Tensor, orientation: int) -> torch.Tensor:
    """C x H x W turned as Pillow's exif_transpose turns an image with this EXIF orientation."""
    h, w = -2, -1
    if orientation == 2:
        return picture.flip(w)
    if orientation == 3:
        return picture.flip(h, w)
    if orientation == 4:
        return picture.flip(h)
    if orientation == 5:
        return picture.transpose(h, w)
    if orientation == 6:
        return picture.transpose(h, w).flip(w)
    if orientation == 7:
        return picture.transpose(h, w).flip(h, w)
    if orientation == 8:
        return picture.transpose(h, w).flip(h)
    return picture


def crop_and_flip(pictures: list[torch.Tensor], encoded: list[EncodedImage], size: int) -> torch.Tensor:
    """float N x 3 x size x size (0-255): each picture's box resized to size x size, flipped
    where asked. Pictures of one size share a roi_align call (chunked to bound memory)."""
    device = pictures[0].device
    out = torch.empty(len(pictures), 3, size, size, device=device)
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, picture in enumerate(pictures):
        by_size[tuple(picture.shape[-2:])].append(i)  # type: ignore[index]
    for (height, width), members in by_size.items():
        per_call = max(1, CROP_CHUNK_BYTES // (3 * height * width * 4))
        for start in range(0, len(members), per_call):
            chunk = members[start : start + per_call]
            stack = torch.stack([pictures[i] for i in chunk]).float()
            out[chunk] = _resized_crops(stack, [encoded[i].box for i in chunk], size)
    flips = torch.tensor([e.flip for e in encoded], device=device)
    return torch.where(flips[:, None, None, None], out.flip(-1), out)


def _resized_crops(stack: torch.Tensor, boxes: list[Box], size: int) -> torch.Tensor:
    rois = torch.tensor([[k, *box] for k, box in enumerate(boxes)], dtype=stack.dtype,
                        device=stack.device)  # fmt: skip
    # aligned=True: boxes are in pixel-edge coordinates, as Pillow's crop and resize use them
    return roi_align(stack, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1,
                     aligned=True)  # fmt: skip
