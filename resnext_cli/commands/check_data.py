"""`resnext check-data DIR`: read every file once, in parallel, and say what would hurt training
before anyone trains: layout, unreadable files, odd modes, EXIF rotation, tiny images, duplicates
and train/val leaks. `train` runs the part that needs no decoding (`layout_findings`)."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import UnidentifiedImageError
from rich.console import Console
from rich.table import Table

from resnext_cli import ui
from resnext_cli.config import BALANCE_AUTO_RATIO, SELECT_AUTO_RATIO, CheckDataConfig, available_cores
from resnext_cli.data.folders import (
    ERROR,
    INFO,
    WARNING,
    ClassFolders,
    Finding,
    balance_hint,
    find_splits,
    layout_findings,
)
from resnext_cli.data.images import (
    decode_rgb,
    describe_failure,
    open_image,
    read_image_bytes,
    unidentified,
)
from resnext_cli.errors import EXIT_FAILED, EXIT_OK

EXIF_ORIENTATION = 0x0112


@dataclass
class FileFacts:
    """What one read of a file tells: its content hash and how it decodes."""

    path: str
    size_bytes: int = 0
    sha256: str = ""
    error: str = ""  # why it cannot be decoded; empty when it can
    format: str = ""
    mode: str = ""
    width: int = 0
    height: int = 0
    exif_rotated: bool = False


def check_data(cfg: CheckDataConfig) -> int:
    """Prints the summary (stderr with --json, whose findings go to stdout); exit 1 on errors."""
    assert cfg.data is not None
    started = time.perf_counter()
    splits = find_splits(Path(cfg.data))
    findings = layout_findings(splits, cfg.imbalance_ratio) + balance_findings(splits, cfg.imbalance_ratio)
    paths = [p for split in splits.values() for paths in split.classes.values() for p in paths]
    facts = read_files(paths, cfg.workers)
    findings += file_findings(splits, facts, cfg.min_size)
    ok = not any(f.severity == ERROR for f in findings)
    seconds = time.perf_counter() - started
    _print_summary(cfg.data, splits, facts, findings, ok, seconds, stderr=cfg.json)
    if cfg.json:
        print(json.dumps(_json_result(cfg.data, splits, facts, findings, ok, seconds), indent=2,
                         ensure_ascii=False))  # fmt: skip
    return EXIT_OK if ok else EXIT_FAILED


def balance_findings(splits: dict[str, ClassFolders], imbalance_ratio: float) -> list[Finding]:
    """What training will do about imbalance below check-data's warning: a train split uneven
    enough for --balance auto to act, and a val split uneven enough for --select-by auto."""
    found = []
    for name, split in splits.items():
        counts = {c: len(paths) for c, paths in split.classes.items() if paths}
        if len(counts) < 2:
            continue
        large, small = max(counts, key=counts.__getitem__), min(counts, key=counts.__getitem__)
        ratio = counts[large] / counts[small]
        what = f"{large!r} {counts[large]} images, {small!r} {counts[small]} ({ratio:.1f}x)"
        if name == "train" and BALANCE_AUTO_RATIO <= ratio < imbalance_ratio:
            found.append(Finding(INFO, "mild_class_imbalance", f"Uneven training classes: {what}.",
                                 [small], balance_hint(ratio)))  # fmt: skip
        if name == "val" and ratio >= SELECT_AUTO_RATIO:
            found.append(Finding(INFO, "val_imbalance", f"Uneven val classes: {what}.", [small],
                                 "`resnext train` picks the best epoch by balanced accuracy "
                                 "(--select-by auto): accuracy would favour the large classes."))  # fmt: skip
    return found


def read_files(paths: list[str], workers: int | None) -> dict[str, FileFacts]:
    """Each file read once (hash + decode), in worker processes, with a progress bar."""
    if workers is None:
        workers = available_cores()
    facts: dict[str, FileFacts] = {}
    bar = ui.progress(total=len(paths), desc="check", unit="file")
    try:
        if workers <= 1 or len(paths) < 64:
            results: Any = map(inspect_file, paths)
            pool = None
        else:
            pool = multiprocessing.Pool(min(workers, 32))
            results = pool.imap(inspect_file, paths, chunksize=16)
        for fact in results:
            facts[fact.path] = fact
            bar.update()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    return facts


def inspect_file(path: str) -> FileFacts:
    """Never raises: a file that cannot be read or decoded is described in `error`."""
    facts = FileFacts(path)
    try:
        content = read_image_bytes(path)  # a regular file, read with a bound
    except OSError as exc:
        facts.error = describe_failure(exc)
        return facts
    facts.size_bytes, facts.sha256 = len(content), hashlib.sha256(content).hexdigest()
    try:
        with open_image(io.BytesIO(content)) as img:
            facts.format, facts.mode = img.format or "", img.mode
            facts.width, facts.height = img.size
            facts.exif_rotated = img.getexif().get(EXIF_ORIENTATION, 1) not in (1, 0, None)
            decode_rgb(img, 64)  # as training decodes it; a reduced JPEG decode reads every byte
    except UnidentifiedImageError:  # worded as train words it (its message names our buffer)
        facts.error = describe_failure(unidentified(path))
    except Exception as exc:  # any decoder error means unreadable
        facts.error = describe_failure(exc)
    return facts


def file_findings(
    splits: dict[str, ClassFolders], facts: dict[str, FileFacts], min_size: int
) -> list[Finding]:
    found: list[Finding] = []
    every = [facts[p] for split in splits.values() for paths in split.classes.values() for p in paths]
    bad = [f for f in every if f.error]
    if bad:
        found.append(Finding(WARNING, "unreadable_files", f"{len(bad)} file(s) cannot be decoded; "
                             "train skips them (and reports each once).",
                             [f"{f.path}: {f.error}" for f in bad]))  # fmt: skip
    for name, split in splits.items():
        dead = [c for c, paths in split.classes.items() if paths and all(facts[p].error for p in paths)]
        if dead:
            severity = ERROR if name == "train" else WARNING
            found.append(Finding(severity, "classes_without_readable_images", f"Class folders in "
                                 f"{split.folder} where no image can be decoded.", dead))  # fmt: skip
    good = [f for f in every if not f.error]
    modes = Counter(f.mode for f in good if f.mode != "RGB")
    if modes:
        shown = ", ".join(f"{mode} {count}" for mode, count in modes.most_common())
        found.append(Finding(INFO, "non_rgb_modes", f"Images not stored as RGB ({shown}); they are "
                             "converted on load (alpha over white, CMYK and 16-bit handled).",
                             [f"{f.path}: {f.mode}" for f in good if f.mode != "RGB"]))  # fmt: skip
    rotated = [f.path for f in good if f.exif_rotated]
    if rotated:
        found.append(Finding(INFO, "exif_rotated", f"{len(rotated)} image(s) carry an EXIF "
                             "rotation; they are turned upright on load.", rotated))  # fmt: skip
    tiny = [f for f in good if min(f.width, f.height) < min_size]
    if tiny:
        found.append(Finding(WARNING, "tiny_images", f"{len(tiny)} image(s) with a side under "
                             f"{min_size} px: upscaled to the crop size, they carry little detail.",
                             [f"{f.path}: {f.width}x{f.height}" for f in tiny]))  # fmt: skip
    found += duplicate_findings(splits, facts)
    return found


def duplicate_findings(splits: dict[str, ClassFolders], facts: dict[str, FileFacts]) -> list[Finding]:
    """Byte-identical files (by SHA-256) within a split, and across train and val (a leak)."""
    found: list[Finding] = []
    by_split: dict[str, dict[str, list[str]]] = {}
    for name, split in splits.items():
        groups: dict[str, list[str]] = defaultdict(list)
        for paths in split.classes.values():
            for p in paths:
                if facts[p].sha256:
                    groups[facts[p].sha256].append(p)
        by_split[name] = groups
        repeated = [sorted(g) for g in groups.values() if len(g) > 1]
        if repeated:
            extra = sum(len(g) - 1 for g in repeated)
            found.append(Finding(WARNING, f"duplicates_in_{name}", f"{extra} duplicate "
                                 f"file(s) in {split.folder} ({len(repeated)} group(s) of identical "
                                 "content): they weigh those images more.",
                                 [" = ".join(g) for g in sorted(repeated)]))  # fmt: skip
    if "val" in by_split:
        train, val = by_split["train"], by_split["val"]
        leaks = sorted(h for h in val if h in train)
        if leaks:
            found.append(Finding(WARNING, "train_val_leak", f"{len(leaks)} val image(s) also in "
                                 "train (identical content): val accuracy overstates how the "
                                 "model does on new images.",
                                 [f"{val[h][0]} = {train[h][0]}" for h in leaks]))  # fmt: skip
    return found


def _print_summary(
    data: str, splits: dict[str, ClassFolders], facts: dict[str, FileFacts], findings: list[Finding],
    ok: bool, seconds: float, stderr: bool,
) -> None:  # fmt: skip
    console: Console = ui.console(stderr=stderr)
    names = sorted({c for s in splits.values() for c in s.classes})
    table = Table("class", *splits, title=data, title_justify="left", box=None)
    for name in names:
        table.add_row(name, *(str(len(s.classes.get(name, []))) for s in splits.values()))
    table.add_section()
    table.add_row("total", *(str(sum(map(len, s.classes.values()))) for s in splits.values()))
    console.print(table)
    if len(splits) == 1:
        console.print(f"No val folder: `resnext train` holds out --val-split of {splits['train'].folder}.",
                      markup=False)  # fmt: skip
    style = {ERROR: "bold red", WARNING: "yellow", INFO: "cyan"}
    for finding in sorted(findings, key=lambda f: [ERROR, WARNING, INFO].index(f.severity)):
        console.print(f"[{style[finding.severity]}]{finding.severity}[/] ", end="")
        console.print(finding.message, markup=False)
        for item in finding.items[:5]:
            console.print(f"    {item}", markup=False)
        if len(finding.items) > 5:
            console.print(f"    ... and {len(finding.items) - 5} more (--json lists all)", markup=False)
        if finding.hint:
            console.print(f"    {finding.hint}", markup=False)
    verdict = "[green]OK to train[/]" if ok else "[bold red]Training would fail[/] (errors above)"
    counts = Counter(f.severity for f in findings)
    console.print(f"{verdict}: {len(facts)} files read in {seconds:.1f} s; {counts[ERROR]} "
                  f"error(s), {counts[WARNING]} warning(s), {counts[INFO]} note(s).")  # fmt: skip


def _json_result(
    data: str, splits: dict[str, ClassFolders], facts: dict[str, FileFacts], findings: list[Finding],
    ok: bool, seconds: float,
) -> dict[str, Any]:  # fmt: skip
    return {
        "data": data,
        "ok": ok,
        "files": len(facts),
        "seconds": round(seconds, 3),
        "splits": {
            name: {
                "folder": str(s.folder),
                "images": sum(map(len, s.classes.values())),
                "readable": sum(not facts[p].error for ps in s.classes.values() for p in ps),
                "classes": {c: len(ps) for c, ps in s.classes.items()},
            }
            for name, s in splits.items()
        },
        "findings": [asdict(f) for f in findings],
    }
