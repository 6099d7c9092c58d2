"""Folder -> labelled file lists: class folders, train/val splits, the checks on the tree
alone (shared by `train` and `check-data`), and split.json, the record of a seeded split."""

from __future__ import annotations

import functools
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from resnext_cli.config import BALANCE_AUTO, BALANCE_AUTO_RATIO
from resnext_cli.errors import UserError
from resnext_cli.files import atomic_write_text

VAL_FOLDER_NAMES = ("val", "valid", "validation")


@functools.lru_cache(maxsize=1)
def image_extensions() -> frozenset[str]:
    """Every extension Pillow can open (lower case, with the dot)."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def is_image_name(path: str | Path) -> bool:
    return Path(path).suffix.lower() in image_extensions()


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


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
    found = counts[largest] / counts[smallest]
    return Finding(
        WARNING, "class_imbalance",
        f"Class imbalance: {largest!r} has {counts[largest]} training images, {smallest!r} only "
        f"{counts[smallest]} ({found:.1f}x).", [smallest], balance_hint(found),
    )  # fmt: skip


def balance_hint(ratio: float) -> str:
    """What training does about a largest / smallest class ratio, in the words of a hint."""
    if ratio >= BALANCE_AUTO_RATIO:
        done = f"`resnext train` counters it (--balance auto: {BALANCE_AUTO}, from {BALANCE_AUTO_RATIO:g}x)"
    else:
        done = f"`resnext train` leaves it as it is (--balance auto acts from {BALANCE_AUTO_RATIO:g}x)"
    return f"{done}; evaluate and report.html show balanced accuracy and recall per class."


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


def write_split(path: Path, split: dict[str, Any]) -> None:
    """split.json: how `discover_dataset` split a single folder (seed, share, both file lists)."""
    atomic_write_text(path, json.dumps(split, indent=1) + "\n")


def read_split_val(split_file: Path | None, folder: Path) -> list[tuple[str, str]] | None:
    """(path, class) of the val images a run held out of `folder`, if that run split it."""
    if split_file is None or not split_file.is_file():
        return None
    split = json.loads(split_file.read_text(encoding="utf-8"))
    root = Path(split.get("root", ""))
    if not root.exists() or root.resolve() != folder.resolve():
        return None
    return [(path, Path(path).relative_to(root).parts[0]) for path in split["val"]]
