"""Finding images, decoding them robustly, transforms and loaders: one implementation for every
command, so train, predict and batch-predict see the same pixels.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple

from resnext_cli.errors import UserError

if TYPE_CHECKING:
    import torch
    from PIL import Image

VAL_FOLDER_NAMES = ("val", "valid", "validation")


@functools.lru_cache(maxsize=1)
def image_extensions() -> frozenset[str]:
    """Every extension Pillow can open (lower case, with the dot)."""
    from PIL import Image

    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def is_image_name(path: str | Path) -> bool:
    return Path(path).suffix.lower() in image_extensions()


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


# ---------------------------------------------------------------- decoding


def load_rgb(path: str | Path, min_size: int | None = None) -> Image.Image:
    """Decode any Pillow-readable file to 8-bit RGB, upright per its EXIF orientation.

    With `min_size`, JPEGs are decoded at the smallest DCT scale whose shorter side stays
    >= min_size (Pillow's draft mode): a 4000x3000 photo decodes several times faster.
    """
    from PIL import Image, ImageOps

    with bombs_are_errors(), Image.open(path) as img:
        if min_size and img.format == "JPEG":
            img.draft("RGB", (min_size, min_size))
        img.load()
        return to_rgb(ImageOps.exif_transpose(img))


@contextlib.contextmanager
def bombs_are_errors() -> Iterator[None]:
    """Over Pillow's pixel limit is unreadable, not a warning: a decompression bomb."""
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB without surprises: alpha over white, 16-bit and float scaled rather than clipped."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        low, high = img.getextrema() if img.mode != "I;16" else (0, 65535)
        if img.mode.startswith("I;16"):
            img = img.convert("I")
        scale = 255.0 / high if isinstance(high, (int, float)) and high > 255 else 1.0
        img = img.point(lambda v: v * scale).convert("L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def typical_short_side(paths: list[str], sample: int = 16) -> int | None:
    """Median shorter side of up to `sample` files spread over `paths`, from their headers
    only (no pixel is decoded); None when none of them can be opened."""
    from PIL import Image

    step = max(1, len(paths) // sample)
    sides = []
    for path in paths[::step][:sample]:
        try:
            with Image.open(path) as img:
                sides.append(min(img.size))
        except Exception:  # noqa: BLE001 - an unreadable file is reported when it is decoded
            continue
    return sorted(sides)[len(sides) // 2] if sides else None


def describe_failure(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


# ---------------------------------------------------------------- transforms


def resize_size(img_size: int) -> int:
    """The val resize that keeps the classic 256 -> 224 centre-crop ratio at any size."""
    return int(round(img_size * 256 / 224))


def train_transform(img_size: int) -> Any:
    """Random crop and flip, to a uint8 tensor: normalisation happens per batch on the device."""
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(img_size), T.RandomHorizontalFlip(), T.PILToTensor()])


def eval_transform(img_size: int) -> Any:
    """Resize + centre crop, to a uint8 tensor (4x less to pass between processes than float)."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(resize_size(img_size)), T.CenterCrop(img_size), T.PILToTensor()])


def normalize_batch(
    images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """uint8 NCHW (any device, any layout) -> float, scaled to 0-1 and standardised."""
    import torch

    scale = torch.tensor(std, device=images.device).view(1, -1, 1, 1) * 255.0
    shift = torch.tensor(mean, device=images.device).view(1, -1, 1, 1) * 255.0
    return (images.float() - shift) / scale


# ---------------------------------------------------------------- datasets


class Sample(NamedTuple):
    image: Any  # tensor, or None when the file could not be decoded
    label: int
    index: int
    failure: str | None


class LoadedBatch(NamedTuple):
    images: torch.Tensor | None  # None when every file of the batch failed
    labels: torch.Tensor
    indices: list[int]  # positions in the dataset's `samples`
    failures: list[tuple[int, str]]  # (position, reason) of files that could not be decoded


class ImageListDataset:
    """(path, label) pairs; a file that fails to decode yields a failure, never an exception.

    Indexed by position, or by (epoch, position) from an `EpochSampler`: then the random
    augmentation is seeded from (augment_seed, epoch, position) alone, so it is the same whichever
    worker decodes the image, however many workers there are, and after a resume.
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        transform: Callable,
        decode_min_size: int | None,
        augment_seed: int | None = None,
    ) -> None:
        self.samples = samples
        self.transform = transform
        self.decode_min_size = decode_min_size
        self.augment_seed = augment_seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> Sample:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        path, label = self.samples[index]
        try:
            picture = load_rgb(path, self.decode_min_size)
            if self.augment_seed is None:
                image = self.transform(picture)
            else:
                import torch

                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(_mix(self.augment_seed, epoch, index))
                    image = self.transform(picture)
        except Exception as exc:  # any decoder error means "unreadable", never a crash
            return Sample(None, label, index, describe_failure(exc))
        return Sample(image, label, index, None)


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
        import torch

        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(_mix(self.seed, self.epoch, -1))
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        if self.pad and self.world_size > 1 and order:
            total = len(self) * self.world_size
            order = (order * -(-total // len(order)))[:total]
        return iter([(self.epoch, i) for i in order[self.rank :: self.world_size]])


def _mix(seed: int, epoch: int, index: int) -> int:
    """A well-spread 63-bit seed from three small integers (splitmix64's finaliser)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB)
    x &= (1 << 64) - 1
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x ^= x >> 27
    return x & ((1 << 63) - 1)


def collate_skipping_failures(samples: list[Sample]) -> LoadedBatch:
    import torch

    good = [s for s in samples if s.failure is None]
    return LoadedBatch(
        images=torch.stack([s.image for s in good]) if good else None,
        labels=torch.tensor([s.label for s in good], dtype=torch.long),
        indices=[s.index for s in good],
        failures=[(s.index, s.failure) for s in samples if s.failure is not None],
    )


def make_loader(
    dataset: ImageListDataset,
    *,
    batch_size: int,
    workers: int,
    sampler: EpochSampler | None = None,
    pin_memory: bool = False,
    drop_last: bool = False,
) -> torch.utils.data.DataLoader:
    """Decoding in worker processes kept alive across epochs; in file order without a sampler."""
    from torch.utils.data import DataLoader

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
    )


# ---------------------------------------------------------------- dataset layout


@dataclass
class DatasetLayout:
    """Which files train and validate, with labels indexing `classes`."""

    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    split: dict[str, Any] | None = None  # how a single folder was split, for the run folder
    warnings: list[str] = field(default_factory=list)


@dataclass
class ClassFolders:
    """What `folder/<class>/**/<image>` holds: {class: sorted paths}, plus what was ignored."""

    folder: Path
    classes: dict[str, list[str]]
    hidden: list[str]  # hidden folders (".thumbs", "__MACOSX"), not classes
    stray: list[str]  # files beside the class folders


def scan_class_folders(folder: Path) -> ClassFolders:
    classes: dict[str, list[str]] = {}
    hidden, stray = [], []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if is_hidden(entry.name):
            if entry.is_dir():
                hidden.append(entry.name)
            continue
        if not entry.is_dir():
            stray.append(entry.name)
            continue
        paths = []
        for dirpath, dirnames, filenames in os.walk(entry.path):
            # a folder named like an image is listed (and later reported unreadable), not entered
            names = [f for f in filenames if is_image_name(f)]
            names += [d for d in dirnames if is_image_name(d)]
            dirnames[:] = sorted(d for d in dirnames if not is_hidden(d) and not is_image_name(d))
            paths.extend(os.path.join(dirpath, f) for f in sorted(names) if not is_hidden(f))
        classes[entry.name] = paths
    return ClassFolders(Path(folder), classes, hidden, stray)


def find_val_folder(root: Path) -> Path | None:
    return next((root / n for n in VAL_FOLDER_NAMES if (root / n).is_dir()), None)


def find_splits(root: str | Path) -> dict[str, ClassFolders]:
    """`train` and `val` from ROOT/train + ROOT/val|valid|validation; or `train` alone (ROOT/train,
    else ROOT itself), which training then splits by --val-split."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"The dataset folder {root} does not exist.")
    if not root.is_dir():
        raise UserError(f"--data must be a folder of class folders, but {root} is a file.")
    train_dir = root / "train" if (root / "train").is_dir() else root
    val_dir = find_val_folder(root) if train_dir != root else None
    splits = {"train": scan_class_folders(train_dir)}
    if val_dir is not None:
        splits["val"] = scan_class_folders(val_dir)
    return splits


ERROR, WARNING, INFO = "error", "warning", "info"  # error: training would refuse or learn nothing


@dataclass
class Finding:
    """One thing `check-data` (and, for the layout, `train`) tells about a dataset."""

    severity: str
    check: str
    message: str  # ends with ":" when `items` complete it
    items: list[str] = field(default_factory=list)  # the paths or classes concerned
    hint: str = ""  # what to do

    def text(self, limit: int = 10) -> str:
        shown = ", ".join(self.items[:limit])
        more = f" and {len(self.items) - limit} more" if len(self.items) > limit else ""
        listed = f" {shown}{more}." if self.items else ""
        return f"{self.message}{listed}{' ' + self.hint if self.hint else ''}"


def layout_findings(splits: dict[str, ClassFolders], imbalance_ratio: float = 5.0) -> list[Finding]:
    """What the folder tree alone shows: cheap enough for `train` to check on every start."""
    train, val = splits["train"], splits.get("val")
    found = [f for split in splits.values() for f in ignored_entries(split)]
    empty = [c for c, paths in train.classes.items() if not paths]
    if empty:
        found.append(Finding(ERROR, "empty_class_folders", f"Class folders with no images in "
                             f"{train.folder}:", empty, "Add images (any format Pillow reads) or "
                             "remove the folders."))  # fmt: skip
    if len(train.classes) < 2:
        have = f"only {next(iter(train.classes))!r}" if train.classes else "none"
        found.append(Finding(ERROR, "too_few_classes", f"{train.folder} must hold at least 2 class "
                             f"folders (DIR/<class>/<images>), found {have}.", [], "Expected "
                             "layout: DATA/train/<class>/*.jpg and DATA/val/<class>/*.jpg, or "
                             "DATA/<class>/*.jpg split with --val-split."))  # fmt: skip
    if val is not None:
        unknown = sorted(set(val.classes) - set(train.classes))
        if unknown:
            found.append(Finding(ERROR, "val_classes_missing_from_train", f"{val.folder} has "
                                 f"classes that {train.folder} does not:", unknown, "The model "
                                 "can only learn classes present in train; add their training "
                                 "images or remove them from val."))  # fmt: skip
        no_val = [c for c in sorted(train.classes) if not val.classes.get(c)]
        if no_val and len(no_val) < len(train.classes):
            found.append(Finding(WARNING, "train_classes_missing_from_val", "Classes with no "
                                 "validation images (their accuracy is never measured):", no_val))  # fmt: skip
        if not any(val.classes.values()):
            found.append(Finding(ERROR, "no_val_images", f"No validation images in {val.folder}.",
                                 [], "Add images to its class folders, or remove it so that "
                                 "--val-split holds out part of train."))  # fmt: skip
    imbalance = class_imbalance({c: len(p) for c, p in train.classes.items() if p}, imbalance_ratio)
    return found + ([imbalance] if imbalance else [])


def ignored_entries(split: ClassFolders) -> list[Finding]:
    found = []
    if split.hidden:
        found.append(Finding(INFO, "hidden_folders", f"Ignored hidden folders in {split.folder}:",
                             split.hidden))  # fmt: skip
    if split.stray:
        found.append(Finding(INFO, "stray_files", f"Ignored files outside class folders in "
                             f"{split.folder}:", split.stray))  # fmt: skip
    return found


def class_imbalance(counts: dict[str, int], ratio: float) -> Finding | None:
    if len(counts) < 2:
        return None
    largest, smallest = max(counts, key=counts.__getitem__), min(counts, key=counts.__getitem__)
    if counts[largest] < ratio * counts[smallest]:
        return None
    return Finding(
        WARNING, "class_imbalance",
        f"Class imbalance: {largest!r} has {counts[largest]} training images, {smallest!r} only "
        f"{counts[smallest]} ({counts[largest] / counts[smallest]:.1f}x).", [smallest],
        "Accuracy will favour the large classes; `resnext evaluate` shows per-class recall.",
    )  # fmt: skip


def discover_dataset(
    root: str | Path, val_split: float, seed: int, imbalance_ratio: float = 5.0
) -> DatasetLayout:
    """The train and val images with their labels; layout errors raise, the rest are warnings."""
    splits = find_splits(root)
    findings = layout_findings(splits, imbalance_ratio)
    errors = [f for f in findings if f.severity == ERROR]
    if errors:
        raise UserError(" ".join(f.text() for f in errors))
    warnings = [f.text() for f in findings]
    train_map, classes = splits["train"].classes, sorted(splits["train"].classes)
    if "val" in splits:
        val_map = splits["val"].classes
        index = {c: i for i, c in enumerate(classes)}
        train = [(p, index[c]) for c in classes for p in train_map[c]]
        val = [(p, index[c]) for c in classes for p in val_map.get(c, [])]
        layout = DatasetLayout(classes, train, val, None, warnings)
    else:
        folder = splits["train"].folder
        if folder != Path(root):
            warnings.append(f"No val folder beside {folder}; holding out {val_split:.0%} of it.")
        layout = split_stratified(train_map, val_split, seed)
        layout.warnings[:0] = warnings
        layout.split["root"] = str(folder)
    if not layout.val:
        raise UserError(
            f"No validation images in {root}: add a val/ folder of class folders, or use a "
            "larger --val-split."
        )
    return layout


def split_stratified(class_map: dict[str, list[str]], val_split: float, seed: int) -> DatasetLayout:
    """Per class, a seeded shuffle and the first `val_split` share to val (at least one image
    when the class has two or more), without copying any file."""
    classes = sorted(class_map)
    rng = random.Random(seed)
    train, val = [], []
    for label, name in enumerate(classes):
        paths = list(class_map[name])
        rng.shuffle(paths)
        n_val = max(1, round(len(paths) * val_split)) if len(paths) >= 2 else 0
        val += [(p, label) for p in sorted(paths[:n_val])]
        train += [(p, label) for p in sorted(paths[n_val:])]
    split = {
        "seed": seed,
        "val_split": val_split,
        "train": [p for p, _ in train],
        "val": [p for p, _ in val],
    }
    return DatasetLayout(classes, train, val, split, [])


def list_images(folder: str | Path, recursive: bool) -> list[str]:
    """Every image file in `folder` (by extension, any case), in sorted order."""
    folder = Path(folder)
    if recursive:
        found = []
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if not is_hidden(d)]
            found += [os.path.join(dirpath, f) for f in filenames if is_image_name(f)]
    else:
        # a folder named like an image is listed too, and then reported as unreadable
        found = [e.path for e in os.scandir(folder) if is_image_name(e.name)]
    return sorted(found)
