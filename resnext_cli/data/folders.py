"""Folder -> labelled file lists: class folders, train/val splits, the checks on the tree
alone (shared by `train` and `check-data`), and split.json, the record of a seeded split."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

from resnext_cli.config import BALANCE_AUTO, BALANCE_AUTO_RATIO
from resnext_cli.errors import UserError
from resnext_cli.files import atomic_write_text

VAL_FOLDER_NAMES = ("val", "valid", "validation")
TRAIN_FOLDER_NAMES = ("train", "training")


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
    outside: list[str] = field(default_factory=list)  # "link -> target": links not followed


def scan_class_folders(folder: Path, root: str | Path | None = None) -> ClassFolders:
    """The class folders of `folder` and their images. Links to folders are followed only
    where they resolve inside `root` (the data folder given, default `folder`): a dataset
    cannot make resnext read /usr. Links to files are followed (only regular files are read)."""
    inside = os.path.realpath(root if root is not None else folder)
    classes: dict[str, list[str]] = {}
    hidden: list[str] = []
    stray: list[str] = []
    outside: list[str] = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if is_hidden(entry.name):
            if entry.is_dir():
                hidden.append(entry.name)
            continue
        if not entry.is_dir():
            stray.append(entry.name)
            continue
        real = _followed(entry, inside, outside)
        if real is not None:
            classes[entry.name] = walk_images(entry.path, real, inside, outside)
    return ClassFolders(Path(folder), classes, hidden, stray, outside)


def _followed(entry: os.DirEntry, inside: str, outside: list[str]) -> str | None:
    """The real path of a folder entry, or None (and noted in `outside`) for a link that
    leads out of `inside`."""
    if not entry.is_symlink():
        return os.path.realpath(entry.path)
    real = os.path.realpath(entry.path)
    if _within(real, inside):
        return real
    outside.append(f"{entry.path} -> {real}")
    return None


def _within(real: str, top: str) -> bool:
    """Both resolved: `real` is `top` or below it."""
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def walk_images(top: str, real_top: str, inside: str, outside: list[str]) -> list[str]:
    """Image files under `top` in os.walk's top-down order, each folder's names sorted; hidden
    entries skipped; a folder named like an image listed (and later reported unreadable), not
    entered. Each real folder is entered once, so a link loop ends."""
    paths: list[str] = []
    seen = {real_top}
    pending = [(top, real_top)]
    while pending:
        folder, real = pending.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:  # unreadable folder: skipped, as os.walk does
            continue
        entries = [e for e in entries if not is_hidden(e.name)]
        paths.extend(e.path for e in entries if is_image_name(e.name))
        subfolders = []
        for e in entries:
            if is_image_name(e.name) or not e.is_dir():
                continue
            sub = os.path.join(real, e.name) if not e.is_symlink() else _followed(e, inside, outside)
            if sub is not None and sub not in seen:
                seen.add(sub)
                subfolders.append((e.path, sub))
        pending.extend(reversed(subfolders))
    return paths


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
    for split_dir in (train_dir, val_dir):
        if split_dir is not None and split_dir != root and not _inside(split_dir, root):
            raise UserError(
                f"{split_dir} is a link to {os.path.realpath(split_dir)}, outside {root}: resnext "
                "follows links to folders only within the data folder. Pass the folder it points "
                "to, or copy it into the data folder."
            )
    splits = {"train": scan_class_folders(train_dir, root)}
    if val_dir is not None:
        splits["val"] = scan_class_folders(val_dir, root)
    return splits


def _inside(path: Path, root: Path) -> bool:
    return _within(os.path.realpath(path), os.path.realpath(root))


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
    found += mixup_findings(splits)
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


def mixup_findings(splits: dict[str, ClassFolders]) -> list[Finding]:
    """Train and val mixed up: a train (or val) folder given alone while its sibling exists, so
    training would split it and ignore the other; or a val larger than train (swapped?)."""
    train, val = splits["train"], splits.get("val")
    parent, name = train.folder.parent, train.folder.name.lower()
    found = []
    sibling_val = find_val_folder(parent) if val is None and name in TRAIN_FOLDER_NAMES else None
    if sibling_val is not None:
        found.append(Finding(WARNING, "sibling_val_ignored", f"{train.folder} is the training folder "
                             f"of {parent}, but its sibling {sibling_val} is ignored: training holds "
                             f"out part of {train.folder} for validation instead.", [], f"To validate "
                             f"on {sibling_val.name}/, pass {parent}."))  # fmt: skip
    if val is None and name in VAL_FOLDER_NAMES and (parent / "train").is_dir():
        found.append(Finding(WARNING, "val_folder_as_data", f"{train.folder} is the validation folder "
                             f"of {parent} (beside {parent / 'train'}): training on it learns from "
                             "the images meant to measure the model.", [], f"To train on train/ and "
                             f"validate on {train.folder.name}/, pass {parent}."))  # fmt: skip
    n_train, n_val = (sum(map(len, s.classes.values())) for s in (train, val or train))
    if val is not None and n_val > n_train:
        found.append(Finding(WARNING, "val_larger_than_train", f"{val.folder} holds more images "
                             f"({n_val}) than {train.folder} ({n_train}), {n_val / max(n_train, 1):.1f}x: "
                             "are the folders swapped? The model learns only from train.", [],
                             "Usually train holds most of the images (e.g. 80-90%)."))  # fmt: skip
    return found


def ignored_entries(split: ClassFolders) -> list[Finding]:
    found = []
    if split.outside:
        found.append(Finding(WARNING, "links_outside_data", "Links to folders outside the data folder "
                             "were not followed (resnext reads only what is inside it):",
                             split.outside, "Copy those folders in, or pass the folder they point "
                             "to."))  # fmt: skip
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
    """split.json: how `discover_dataset` split a single folder (seed, share, both file lists);
    `train` gives it the resolved data folder, so root and paths are absolute and resolved."""
    atomic_write_text(path, json.dumps(split, indent=1) + "\n")


def read_split(split_file: Path | None) -> dict[str, Any] | None:
    """split.json as `write_split` wrote it; None where there is none; an error for a file that
    is not one (evaluating without it would widen the evaluation to the training images)."""
    if split_file is None or not split_file.is_file():
        return None
    try:
        split = json.loads(split_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        split = exc
    if not (isinstance(split, dict) and isinstance(split.get("root"), str)
            and isinstance(split.get("val"), list)):  # fmt: skip
        raise UserError(
            f"{split_file} is not a readable split record ({split}), so the images its run held "
            "out cannot be told from those it trained on. Restore it from the run, or evaluate a "
            "folder the run did not train on."
        )
    return split


def split_val_in(split: dict[str, Any], folder: Path) -> list[tuple[str, str]] | None:
    """(path under `folder`, class) of the val images of `split` when it split `folder`.

    Its root is absolute and resolved in runs since issue 24; older runs recorded the folder as
    given (relative to where train ran): it matches from this working folder too, or when it is
    the tail of `folder`'s resolved path (`flowers` for /data/flowers), the case of an evaluation
    from another working folder."""
    root, real = split["root"], folder.resolve()
    if os.path.isabs(root):
        same = os.path.realpath(root) == str(real)
    else:
        tail = tuple(part for part in Path(os.path.normpath(root)).parts if part != "..")
        same = os.path.realpath(root) == str(real) or (bool(tail) and real.parts[-len(tail):] == tail)
    if not same:
        return None
    relative = [os.path.relpath(path, root) for path in split["val"]]
    return [(str(folder / rel), Path(rel).parts[0]) for rel in relative]


def resolved_paths(paths: Iterable[str]) -> list[str]:
    """Absolute paths with every link resolved (os.path.realpath's result), each folder resolved
    once: one lstat per file (is it a link?) on top of what scanning cost."""
    folders: dict[str, str] = {}
    resolved = []
    for path in paths:
        head, name = os.path.split(os.path.abspath(path))
        if head not in folders:
            folders[head] = os.path.realpath(head)
        full = os.path.join(folders[head], name)
        resolved.append(os.path.realpath(full) if os.path.islink(full) else full)
    return resolved


def path_digests_each(paths: Iterable[str]) -> list[int]:
    """A signed 64-bit digest (BLAKE2b) of each file's resolved path, in order."""
    return [int.from_bytes(hashlib.blake2b(os.fsencode(p), digest_size=8).digest(), "little", signed=True)
            for p in resolved_paths(paths)]  # fmt: skip


def path_digests(paths: Iterable[str]) -> list[int]:
    """The digests of the files' resolved paths, sorted and unique: how a checkpoint records
    which files it trained on, 8 bytes a file, the names themselves not kept."""
    return sorted(set(path_digests_each(paths)))
