"""Labelled files -> batches of uint8 tensors: the dataset that never raises on a bad file,
the epoch-keyed sampler that makes runs repeatable and resumable, the loader, and how many
decoding processes to use."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
from typing import Any, Callable, Iterator, NamedTuple

import torch
import torchvision.transforms.functional as F
from torch.utils.data import DataLoader

from resnext_cli.config import available_cores
from resnext_cli.data.images import describe_failure, load_rgb, read_header, typical_short_side
from resnext_cli.data.transforms import Box, CropPlan, Preprocessing


def default_workers(device_type: str = "cpu") -> int:
    """Decoding workers. A CUDA machine gets every core (16 workers measured 1.3x faster than 8
    on a 16-core H100 box: the GPU waits for decoded images); elsewhere half the cores, 1 to 8,
    leaving the rest to the model."""
    if device_type == "cuda":
        return available_cores()
    return max(1, min(8, available_cores() // 2))


def inference_workers(
    paths: list[str], requested: int | None, device_type: str, decode_min_size: int
) -> int:
    """--workers as given; by default `default_workers()` decoding processes, except on a
    small CPU-only machine (at most 3 cores, where that is one worker) with small images
    (shorter side <= 2x the resize size): there decoding in the main process is faster,
    because the worker takes a core from the model while a small JPEG decodes in a fraction
    of the model's time per image (measured, resnet18 on 2 cores: 0.85-0.90 of model-only
    speed vs 0.75-0.76 with the worker). Large photos keep their worker: the reduced-size
    decode overlapped with the model is what makes them fast."""
    if requested is not None:
        workers = requested
    elif device_type == "cpu" and available_cores() <= 3 and _small(paths, decode_min_size):
        workers = 0
    else:
        workers = default_workers(device_type)
    return min(workers, len(paths))


def _small(paths: list[str], decode_min_size: int) -> bool:
    """Small images: a median shorter side of at most twice the resize size (headers only)."""
    return (typical_short_side(paths) or 0) <= 2 * decode_min_size


class EncodedImage(NamedTuple):
    """An image for the device to decode and crop (`batches.get_batch`): a JPEG's bytes, or, for
    what the GPU decoder does not take (PNG, CMYK...), Pillow's upright RGB pixels."""

    data: torch.Tensor  # 1-D uint8 file bytes (jpeg) or 3 x H x W uint8 pixels
    jpeg: bool
    orientation: int  # EXIF orientation still to apply to the decoded JPEG (1: none)
    box: Box  # the crop, in the upright picture's pixels
    flip: bool


class Sample(NamedTuple):
    image: Any  # uint8 tensor or EncodedImage; None when the file could not be read
    label: int
    index: int
    failure: str | None


class LoadedBatch(NamedTuple):
    images: torch.Tensor | None  # uint8 crops; None when every file failed, or with `encoded`
    labels: torch.Tensor
    indices: list[int]  # positions in the dataset's `samples`
    failures: list[tuple[int, str]]  # (position, reason) of files that could not be decoded
    encoded: list[EncodedImage] | None = None  # decoding on the device: one per index


def image_dataset(
    samples: list[tuple[str, int]], preprocessing: Preprocessing, *, train: bool = False,
    augment_seed: int | None = None, on_device: bool = False,
) -> ImageListDataset:  # fmt: skip
    """The dataset every command reads images through: decoded and cropped by Pillow in the
    loader's workers, or (`on_device`) read and planned there and decoded on the device."""
    transform = preprocessing.train_transform() if train else preprocessing.eval_transform()
    crops = preprocessing.crop_plan(train) if on_device else None
    return ImageListDataset(samples, transform, preprocessing.decode_min_size, augment_seed,
                            crops=crops)  # fmt: skip


class ImageListDataset:
    """(path, label) pairs; a file that fails to decode yields a failure, never an exception.

    Indexed by position, or by (epoch, position) from an `EpochSampler`: then the random
    augmentation is seeded from (augment_seed, epoch, position) alone, so it is the same whichever
    worker decodes the image, however many workers there are, and after a resume. A sampler that
    draws an image more than once an epoch (`balance.ClassBalancedSampler`) adds the draw's
    `repeat` number, 0 for the first, so that each draw gets its own augmentation.
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        transform: Callable,
        decode_min_size: int | None,
        augment_seed: int | None = None,
        crops: CropPlan | None = None,
    ) -> None:
        self.samples = samples
        self.transform = transform
        self.decode_min_size = decode_min_size
        self.augment_seed = augment_seed
        self.crops = crops  # set: read bytes and plan the crop here, decode on the device

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, ...]) -> Sample:
        epoch, index, *repeat = key if isinstance(key, tuple) else (0, key)
        path, label = self.samples[index]
        try:
            with self._seeded(epoch, index, repeat[0] if repeat else 0):
                image = self._read(path) if self.crops is None else self._encode(path, self.crops)
        except Exception as exc:  # any decoder error means "unreadable", never a crash
            return Sample(None, label, index, describe_failure(exc))
        return Sample(image, label, index, None)

    @contextlib.contextmanager
    def _seeded(self, epoch: int, index: int, repeat: int = 0) -> Iterator[None]:
        """Random draws keyed by (seed, epoch, image[, repeat]) alone; torch's own RNG left as
        it was."""
        if self.augment_seed is None:
            yield
            return
        seed = mix_seed(self.augment_seed, epoch, index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(seed, repeat, -2) if repeat else seed)
            yield

    def _read(self, path: str) -> torch.Tensor:
        return self.transform(load_rgb(path, self.decode_min_size))

    def _encode(self, path: str, crops: CropPlan) -> EncodedImage:
        """The crop is drawn on the size Pillow's reduced decode would have (so both paths draw
        the same box), then scaled to the full-size picture the GPU decodes."""
        header = read_header(path, self.decode_min_size)
        box, flip = crops.draw(*header.draft_size)
        if not header.device_jpeg:  # Pillow decodes it here (from the bytes read), as on the CPU path
            pixels = F.pil_to_tensor(load_rgb(io.BytesIO(header.content), self.decode_min_size))
            return EncodedImage(pixels, False, 1, box, flip)
        sx = header.size[0] / header.draft_size[0]
        sy = header.size[1] / header.draft_size[1]
        full = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        data = torch.frombuffer(bytearray(header.content), dtype=torch.uint8)
        return EncodedImage(data, True, header.orientation, full, flip)


class EpochSampler:
    """A permutation per epoch that depends only on (seed, epoch); yields (epoch, position).

    Unlike a sampler drawing from a running generator, epoch k's order can be rebuilt without
    replaying epochs 1..k-1, which is what an exact `--resume` needs. Under torchrun each process
    takes every world_size-th position: with `pad` (training) the order is first padded by
    repeating its start so all processes take the same number of steps; without (validation)
    every image is seen exactly once across processes.
    """

    def __init__(
        self,
        size: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
    ) -> None:
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0
        self.rank, self.world_size, self.pad = rank, world_size, pad

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.pad:
            return -(-self.size // self.world_size)
        return len(range(self.rank, self.size, self.world_size))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(mix_seed(self.seed, self.epoch, -1))
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        if self.pad and self.world_size > 1 and order:
            total = len(self) * self.world_size
            order = (order * -(-total // len(order)))[:total]
        return iter([(self.epoch, i) for i in order[self.rank :: self.world_size]])


def mix_seed(seed: int, epoch: int, index: int) -> int:
    """A well-spread 63-bit seed from three small integers (splitmix64's finaliser)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB)
    x &= (1 << 64) - 1
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x ^= x >> 27
    return x & ((1 << 63) - 1)


def collate_skipping_failures(samples: list[Sample]) -> LoadedBatch:
    good = [s for s in samples if s.failure is None]
    encoded = [s.image for s in good if isinstance(s.image, EncodedImage)]
    return LoadedBatch(
        images=torch.stack([s.image for s in good]) if good and not encoded else None,
        labels=torch.tensor([s.label for s in good], dtype=torch.long),
        indices=[s.index for s in good],
        failures=[(s.index, s.failure) for s in samples if s.failure is not None],
        encoded=encoded or None,
    )


def make_loader(
    dataset: ImageListDataset,
    *,
    batch_size: int,
    workers: int,
    sampler: EpochSampler | None = None,
    pin_memory: bool = False,
    drop_last: bool = False,
) -> DataLoader:
    """Decoding in worker processes kept alive across epochs; in file order without a sampler."""
    return DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=batch_size,
        sampler=sampler,  # type: ignore[arg-type]
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        pin_memory=pin_memory,
        drop_last=drop_last,
        collate_fn=collate_skipping_failures,
        worker_init_fn=_quiet_when_stopped if workers > 0 else None,
    )


def _quiet_when_stopped(worker_id: int) -> None:
    """A decoding worker stays quiet when the main process stops (Ctrl-C, SIGTERM), which then
    says in one paragraph how to resume and stops the workers itself.

    SIGTERM to the whole process group (`kill -- -PGID`, a scheduler's job step) reaches the
    workers too: each ends at once with status 0, which the loader does not call a crash (it
    would otherwise run the main process's handler, a traceback from every worker, or die by
    the signal, reported as a crashed worker). And a worker hands each batch's shared memory to
    the main process over a local connection (multiprocessing's resource sharer): a main
    process stopped in the middle of taking one resets it, and multiprocessing would print that
    thread's ConnectionResetError traceback under the main process's message."""
    signal.signal(signal.SIGTERM, _exit_quietly)
    sys.excepthook = _unless_the_main_process_left


def _exit_quietly(signum: int, frame: Any) -> None:
    os._exit(0)


def _unless_the_main_process_left(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    if not issubclass(kind, ConnectionError):
        sys.__excepthook__(kind, value, tb)
