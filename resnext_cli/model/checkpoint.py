"""The run folder and its files: checkpoints (best.pt, last.pt), class_indices.json,
config.yaml and metrics.csv, each with its writer beside its reader; every write is atomic.

A checkpoint is a plain dict of tensors and plain types (the README's "Checkpoint" table),
loaded only with `weights_only=True`, so opening a file never runs code from it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import pickle
import re
import time
import zipfile
from pathlib import Path
from typing import Any, ContextManager

import torch
import torchvision
import yaml

from resnext_cli import __version__
from resnext_cli.config import IMG_SIZE_MAX, IMG_SIZE_MIN, read_yaml_config
from resnext_cli.data.balance import SELECTION_COLUMNS
from resnext_cli.data.transforms import Preprocessing, resize_size
from resnext_cli.errors import UserError
from resnext_cli.files import (
    atomic_write,
    atomic_write_csv,
    atomic_write_text,
    exclusive_lock,
    make_folder,
    next_free_folder,
    printable,
    read_csv,
)

CHECKPOINT_FORMAT = "resnext-cli/1"
CHECKPOINT_KEYS = (
    "format", "model", "arch", "classes", "img_size", "mean", "std", "epoch", "val_acc",
    "config", "versions",
)  # fmt: skip; `resize_size` too since it exists (older files mean img_size * 256 // 224)
METRICS_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds",
                   "val_balanced_acc", "val_macro_f1")  # fmt: skip; new columns go at the end
RESUME_KEYS = ("optimizer", "scheduler", "scaler", "best_val_acc", "best_epoch", "metrics",
               "torch_rng_state")  # fmt: skip
# which files trained the model: int64 digests of their resolved paths (folders.path_digests),
# sorted; absent in checkpoints from before it existed and in those of other tools
TRAIN_DIGESTS = "train_path_digests"


# ---------------------------------------------------------------- torch files


def save_torch(obj: dict[str, Any], path: Path) -> None:
    atomic_write(path, lambda handle: torch.save(obj, handle))


def safe_torch_load(path: str | Path, what: str = "checkpoint") -> Any:
    """torch.load with weights_only=True, turning every failure into a clear message."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"The {what} {p} does not exist.")
    if not p.is_file():
        raise UserError(f"The {what} {p} is not a file.")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = next(
            (line.strip() for line in str(exc).splitlines() if "Unsupported" in line),
            "objects other than tensors and plain types",
        )
        raise UserError(
            f"Refused to load {p}: unpickling it could run code ({reason}). Only files that load "
            "with weights_only=True are accepted; if you trust the file, re-save its tensors with "
            "torch.save(model.state_dict(), path)."
        ) from None
    except Exception as exc:  # zip/pickle/EOF errors: a truncated or foreign file
        raise UserError(f"The {what} {p} could not be read: {exc}") from None


# ---------------------------------------------------------------- checkpoints


def build_checkpoint(
    model: torch.nn.Module,
    *,
    arch: str,
    classes: list[str],
    preprocessing: Preprocessing,
    epoch: int,
    val_acc: float,
    config: dict[str, Any],
    train_digests: torch.Tensor | None = None,
    class_counts: list[int] | None = None,
) -> dict[str, Any]:
    """`class_counts`: training images per class, the priors of logit adjustment (and of
    `predict --prior`); left out only where they are not known."""
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        # contiguous CPU copies: the file is the same whatever layout the model trained in
        "model": {
            k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
            for k, v in model.state_dict().items()
        },
        "arch": arch,
        "classes": list(classes),
        "img_size": int(preprocessing.img_size),
        "resize_size": int(preprocessing.resize_size),
        "mean": [float(m) for m in preprocessing.mean],
        "std": [float(s) for s in preprocessing.std],
        "epoch": int(epoch),
        "val_acc": float(val_acc),
        "config": config,
        "versions": {
            "resnext_cli": __version__,
            "torch": str(torch.__version__),  # a TorchVersion object otherwise
            "torchvision": str(torchvision.__version__),
        },
    }
    if train_digests is not None:
        checkpoint[TRAIN_DIGESTS] = train_digests
    if class_counts is not None:
        checkpoint["class_counts"] = [int(c) for c in class_counts]
    return checkpoint


def digests_tensor(digests: list[int]) -> torch.Tensor:
    """`TRAIN_DIGESTS`'s value: 8 bytes a training file."""
    return torch.tensor(digests, dtype=torch.int64)


def train_digests(ckpt: dict[str, Any]) -> torch.Tensor | None:
    """The digests of the files the checkpoint trained on; None when it does not record them (or
    holds something else under the key: an evaluation then just cannot tell)."""
    value = ckpt.get(TRAIN_DIGESTS)
    if not isinstance(value, torch.Tensor) or value.dtype != torch.int64 or value.dim() != 1:
        return None
    return value


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(
            f"{path} is not a resnext checkpoint (no format {CHECKPOINT_FORMAT!r}). For a plain "
            "state dict use --weights FILE --arch ARCH --class-indices class_indices.json."
        )
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"The checkpoint {path} is incomplete: keys {', '.join(missing)} missing.")
    problems = checkpoint_problems(ckpt)
    if problems:
        raise UserError(
            f"The checkpoint {path} is damaged or was edited: {'; '.join(problems)}. Use a best.pt "
            "or last.pt as `resnext train` wrote it."
        )
    return ckpt


def checkpoint_problems(ckpt: dict[str, Any]) -> list[str]:
    """What every command relies on, checked once at load, so that a tampered file is a clear
    error instead of a crash later or NaN probabilities (a zero std divides by zero)."""
    problems = []
    classes, model = ckpt["classes"], ckpt["model"]
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        problems.append("`classes` is not a list of class names")
    if not (isinstance(model, dict) and all(isinstance(v, torch.Tensor) for v in model.values())):
        problems.append("`model` is not a state dict of tensors")
    elif isinstance(classes, list) and getattr(model.get("fc.weight"), "ndim", 0) == 2:
        outputs = model["fc.weight"].shape[0]
        if outputs != len(classes):
            problems.append(f"its classifier has {outputs} outputs but `classes` names {len(classes)}")
    size, resize = ckpt["img_size"], ckpt.get("resize_size") or ckpt["img_size"]
    if not (_is_int(size) and IMG_SIZE_MIN <= size <= IMG_SIZE_MAX):
        problems.append(f"img_size {size!r} is not between {IMG_SIZE_MIN} and {IMG_SIZE_MAX}")
    elif not (_is_int(resize) and size <= resize <= 2 * IMG_SIZE_MAX):
        problems.append(f"resize_size {resize!r} is not between img_size and {2 * IMG_SIZE_MAX}")
    for key in ("mean", "std"):
        values = ckpt[key]
        if not (isinstance(values, (list, tuple)) and len(values) == 3
                and all(_is_number(v) and math.isfinite(v) for v in values)):  # fmt: skip
            problems.append(f"{key} {values!r} is not 3 finite numbers")
        elif key == "std" and min(values) <= 0:
            problems.append(f"std {values!r} is not positive (images would be divided by zero)")
    if not (_is_int(ckpt["epoch"]) and ckpt["epoch"] >= 0 and _is_number(ckpt["val_acc"])):
        problems.append(f"epoch {ckpt['epoch']!r} or val_acc {ckpt['val_acc']!r} is not a number")
    return problems


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def checkpoint_preprocessing(ckpt: dict[str, Any], img_size: int | None = None) -> Preprocessing:
    """What the checkpoint says its model expects; `img_size` overrides the crop (the resize
    then keeps the checkpoint's ratio). Checkpoints from before `resize_size` mean 256/224."""
    trained = int(ckpt["img_size"])
    resize = int(ckpt.get("resize_size") or resize_size(trained))
    if img_size is not None and img_size != trained:
        resize, trained = int(round(img_size * resize / trained)), img_size
    return Preprocessing(trained, resize, tuple(ckpt["mean"]), tuple(ckpt["std"]))


def with_training_state(
    checkpoint: dict[str, Any], *, optimizer: Any, scheduler: Any, scaler: Any,
    best_val_acc: float, best_epoch: int, metrics: list[dict[str, Any]],
) -> dict[str, Any]:  # fmt: skip
    """last.pt: a checkpoint plus what an exact resume needs (`load_resume_state` reads it)."""
    return {
        **checkpoint,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "best_val_acc": best_val_acc,
        "best_epoch": best_epoch,
        "metrics": metrics,
        "torch_rng_state": torch.get_rng_state(),
    }


def load_resume_state(run_dir: str | Path) -> dict[str, Any]:
    state = load_checkpoint(Path(run_dir) / "last.pt")
    missing = [k for k in RESUME_KEYS if k not in state]
    if missing:
        raise UserError(f"{run_dir}/last.pt lacks what a resume needs: {', '.join(missing)}.")
    return state


def save_epoch(
    run_dir: Path, best: dict[str, Any] | None, last: dict[str, Any], rows: list[dict[str, Any]]
) -> None:
    """The files of a finished epoch, in the order that keeps a run resumable if the process is
    killed between any two writes: best.pt first (a new best is never lost), then last.pt (the
    resume point, which records `best_val_acc` and the metrics so far), then metrics.csv, which
    a resume rewrites from last.pt anyway."""
    if best is not None:
        save_torch(best, run_dir / "best.pt")
    save_torch(last, run_dir / "last.pt")
    write_metrics(run_dir / "metrics.csv", rows)


# ---------------------------------------------------------------- the run folder


def make_run_dir(out: str | None, name: str | None, root: str = "runs") -> Path:
    """`--out DIR` as given, `runs/NAME`, or the next free `runs/exp`, `runs/exp2`, ...

    A folder is only written into when it is new, empty, or a run of this tool that never
    completed an epoch (`check_run_dir`): nothing a user has is overwritten.
    """
    if out or name:
        check_run_dir(out, name, root)
        run_dir = Path(out) if out else Path(root) / str(name)
        make_folder(run_dir)
        return run_dir
    return next_free_folder(Path(root), "exp", "run folder", f"Too many runs in {root}; pass --name or --out.")


LATEST = "latest"  # in the runs root: a pointer to the newest run that finished (LATEST_FORMAT)
LATEST_FORMAT = "resnext-latest/1"
RUN_RECORD = "run.json"  # marks a folder as a run of this tool: its status and wall time
RUN_LOCK = "run.lock"  # held while a process writes the run (files.exclusive_lock)
RUN_FORMAT = "resnext-run/1"
RUN_STATUSES = ("running", "finished", "interrupted", "failed")
VAL_NUMBERS = ("val_acc", "val_balanced_acc", "val_macro_f1")  # of best.pt, in run.json's `best`


def start_run_record(run_dir: Path) -> float:
    """run.json at the start of a run (or of a resumed one): status `running`; `created` and the
    `wall_seconds` of earlier sessions are kept. Returns the clock `end_run_record` measures from."""
    previous = read_run_record(run_dir) or {}
    record = {
        "format": RUN_FORMAT,
        "status": "running",
        "created": previous.get("created", _now()),
        "started": _now(),
        "ended": None,
        "wall_seconds": float(previous.get("wall_seconds", 0.0)),
        "sessions": int(previous.get("sessions", 0)) + 1,
    }
    atomic_write_text(run_dir / RUN_RECORD, json.dumps(record, indent=1) + "\n")
    return time.perf_counter()


def end_run_record(run_dir: Path, status: str, since: float, best: dict[str, Any] | None = None) -> None:
    """The session's end: `finished`, `interrupted` or `failed`, and its time added to
    `wall_seconds` (everything from the start of the session: data, feature caching, epochs).
    A finished run also records `best`: best.pt's epoch and its own val numbers, which differ
    from its epoch's row of metrics.csv where its head was finished after training (with the
    balanced sampler); a resumed session starts without it (`start_run_record`)."""
    record = read_run_record(run_dir) or {"format": RUN_FORMAT, "created": _now(), "wall_seconds": 0.0}
    record.update(status=status, ended=_now(),
                  wall_seconds=float(record.get("wall_seconds", 0.0)) + time.perf_counter() - since)  # fmt: skip
    if best is not None:
        record["best"] = best
    atomic_write_text(run_dir / RUN_RECORD, json.dumps(record, indent=1) + "\n")


def read_run_record(run_dir: Path) -> dict[str, Any] | None:
    """run.json as written by `start_run_record`; None where there is none (a folder that is not
    a run of this tool, or a run from before run.json existed) or it is not ours."""
    try:
        record = json.loads((Path(run_dir) / RUN_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == RUN_FORMAT else None


def run_folder_lock(folder: Path) -> ContextManager[Any]:
    """For a command that writes into a run folder (report: report.html, eval/; evaluate: eval/;
    export: export/): the lock of the run that `folder` is or is directly inside, so that it
    never writes while `train` (or another such command) writes the same run; a second writer
    gets exit 2. Elsewhere, no lock."""
    folder = Path(folder)
    run_dir = next((p for p in (folder, folder.parent) if p.is_dir() and is_run_folder(p)), None)
    if run_dir is None:
        return contextlib.nullcontext()
    return exclusive_lock(run_dir / RUN_LOCK, f"The run folder {run_dir}")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds")


def check_run_dir(out: str | None, name: str | None, root: str = "runs") -> None:
    """Before any slow setup: the run folder can be made there, and is new, empty, or a run of
    this tool that never completed an epoch (`refuse_taken_folder`)."""
    run_dir = Path(out) if out else Path(root) / name if name else Path(root)
    if (out or name) and run_dir.is_dir():
        refuse_taken_folder(run_dir)
    existing = next(p for p in (run_dir, *run_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"Cannot create the run folder {run_dir}: {existing} is a file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(
            f"Cannot create the run folder {run_dir}: {existing} is not writable. Choose another "
            "--out."
        )


# what a run of this tool leaves before its first epoch completes; such a folder may be reused
ABANDONED_RUN_FILES = frozenset(
    {RUN_RECORD, RUN_LOCK, "config.yaml", "class_indices.json", "split.json", "tb", "tracking.json"}
)
OS_LITTER = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})  # file browsers leave them anywhere
_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]+\.tmp$")  # files.atomic_write's


def refuse_taken_folder(run_dir: Path) -> None:
    """A UserError (exit 2) naming what is there, unless `run_dir` is empty (file browsers'
    litter aside) or holds only what a run of this tool leaves before its first epoch (run.json
    of ours, config.yaml, class_indices.json, split.json, a stale run.lock): that run is started
    again. A run with checkpoints is resumed with --resume, never started again over."""
    if any((run_dir / f).exists() for f in ("best.pt", "last.pt")) and is_run_folder(run_dir):
        raise UserError(
            f"{run_dir} already holds a run of resnext (best.pt/last.pt). Continue it with "
            f"`resnext train --resume {run_dir}`, or choose another --out/--name; nothing was "
            "changed."
        )
    entries = [e for e in folder_entries(run_dir) if e != RUN_LOCK]  # a live lock refuses on its own
    if read_run_record(run_dir) is not None:  # a run of ours: what it leaves before an epoch is ours
        entries = [e for e in entries if not _abandoned_run_file(e)]
    if not entries:
        return
    raise UserError(
        f"{run_dir} is not empty and not a run of resnext: it holds files resnext did not write "
        f"({listing(run_dir, entries)}). A run is written into a new or empty folder (or one whose "
        "resnext run never completed an epoch); choose another --out/--name, or move those files "
        "away. Nothing was changed."
    )


def claim_run_dir(run_dir: Path) -> None:
    """Under the run folder's lock, before a new run writes its first file: checked again (it
    may have changed since `check_run_dir`), and the run.json and split.json of a run that never
    completed an epoch there removed, so that nothing of it is taken for this run's."""
    refuse_taken_folder(run_dir)
    if read_run_record(run_dir) is not None:
        for name in (RUN_RECORD, "split.json"):
            (run_dir / name).unlink(missing_ok=True)


def _abandoned_run_file(name: str) -> bool:
    temporary = _TEMPORARY.match(name)
    return name in ABANDONED_RUN_FILES or bool(temporary and temporary["target"] in ABANDONED_RUN_FILES)


def folder_entries(folder: Path) -> list[str]:
    """The names in `folder`, sorted, without what file browsers leave in every folder."""
    return sorted(name for name in os.listdir(folder) if name not in OS_LITTER)


def listing(folder: Path, names: list[str], shown: int = 6) -> str:
    """'a.txt, photos/, notes.md and 12 more': what is in a folder, for a message."""
    marked = [printable(n) + ("/" if (folder / n).is_dir() else "") for n in names[:shown]]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(marked) + more


def is_run_folder(folder: Path) -> bool:
    """A run of this tool: run.json of ours, or (a run from before run.json existed) a best.pt
    or last.pt of ours."""
    return read_run_record(folder) is not None or any(
        is_checkpoint_file(Path(folder) / name) for name in ("best.pt", "last.pt")
    )


def is_checkpoint_file(path: Path) -> bool:
    """Whether `path` is a checkpoint of this tool, told from the first bytes of its pickle
    (torch.save's zip holds the tensors apart): nothing is unpickled, no tensor is read."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickle_name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            if pickle_name is None:
                return False
            with archive.open(pickle_name) as handle:
                head = handle.read(1 << 16)  # "format" is the dict's first key
    except (OSError, zipfile.BadZipFile, ValueError, RuntimeError):
        return False
    return CHECKPOINT_FORMAT.encode() in head


def mark_latest(run_dir: Path, root: str = "runs") -> None:
    """After a run finished: `ROOT/latest` (in the tool's runs root, wherever the run folder is)
    names it, for the commands that default to a run. Only a pointer this tool wrote is
    replaced; anything else there is left as it is, with a UserError saying so (the caller
    warns: a finished run never fails over its pointer)."""
    pointer = Path(root) / LATEST
    ours = pointer.is_file() and not pointer.is_symlink() and read_latest_pointer(pointer) is not None
    if pointer.is_symlink() or (pointer.exists() and not ours):
        inside = _inside(run_dir, Path(root))
        choose = f"--run {inside}" if inside else f"--checkpoint {run_dir / 'best.pt'}"
        raise UserError(
            f"{pointer} is not a pointer written by resnext (a file or folder of yours?), so it "
            f"was left as it is; choose this run with {choose}."
        )
    make_folder(Path(root))
    record = {"format": LATEST_FORMAT, "run": _inside(run_dir, Path(root)) or str(run_dir.resolve()),
              "finished": _now()}  # fmt: skip
    atomic_write_text(pointer, json.dumps(record, indent=1) + "\n")


def _inside(run_dir: Path, root: Path) -> str | None:
    """`run_dir` relative to `root` ('exp3', 'group/a'), or None when it is elsewhere."""
    try:
        return str(run_dir.resolve().relative_to(root.resolve()))
    except ValueError:
        return None


def read_latest_pointer(pointer: Path) -> Path | None:
    """The run `ROOT/latest` names, if this tool wrote it: the JSON of `mark_latest` (a path
    relative to ROOT, or absolute), or earlier versions' one line naming a run folder in ROOT.
    None for anything else (a user's file, a folder)."""
    try:
        with open(pointer, encoding="utf-8", errors="replace") as handle:
            text = handle.read(1 << 16)
    except OSError:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    if isinstance(record, dict) and record.get("format") == LATEST_FORMAT:
        named = record.get("run")
        return pointer.parent / named if isinstance(named, str) and named else None
    name = text.strip()
    legacy = name and "\n" not in name and "/" not in name and is_run_folder(pointer.parent / name)
    return pointer.parent / name if legacy else None


def choose_run(
    name: str | None = None, root: str = "runs", choose: str = "pass --checkpoint PATH"
) -> tuple[Path, str]:
    """The run a command without --checkpoint uses, and how it was chosen (the caller says it):
    `--run NAME`, else the run `ROOT/latest` names, else (runs from before the pointer) the run
    with the newest `ROOT/*/best.pt`; a clear error naming the folder searched when there is none,
    and how the command at hand takes a run instead (`choose`)."""
    if name is not None:
        return named_run(name, root), f"the run named {name} (--run)"
    pointer = Path(root) / LATEST
    named = read_latest_pointer(pointer) if pointer.is_file() else None
    if named is not None and (named / "best.pt").is_file():
        return named, "the latest finished run"
    candidates = sorted(Path(root).glob("*/best.pt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise UserError(
            f"No checkpoint given and no trained run found in {Path(root).absolute()} (looked for "
            f"{root}/{LATEST} and {root}/*/best.pt). Train one with `resnext train DATA`, {choose}, "
            "or run this from the folder that holds runs/."
        )
    return candidates[-1].parent, f"the run with the newest best.pt in {root}/ ({root}/{LATEST} names none)"


def latest_run(root: str = "runs") -> Path:
    """The run `choose_run` takes without --run."""
    return choose_run(None, root)[0]


def named_run(name: str, root: str = "runs") -> Path:
    """`--run NAME`: the run folder ROOT/NAME (a path to a run folder is taken too), which must
    hold a best.pt; the error lists the runs there are."""
    for run_dir in (Path(root) / name, Path(name)):
        if (run_dir / "best.pt").is_file():
            return run_dir
    run_dir = Path(root) / name
    if run_dir.is_dir():
        raise UserError(f"{run_dir} holds no best.pt: its run has not completed an epoch yet.")
    known = sorted(p.parent.name for p in Path(root).glob("*/best.pt"))
    raise UserError(
        f"No run named {name!r} in {Path(root).absolute()} (looked for {run_dir}/best.pt). "
        f"Runs there: {', '.join(known) if known else 'none'}. Give one of those names, or "
        "--checkpoint PATH."
    )


def describe_run(run_dir: Path) -> str:
    """One line on a run, so that a default choice is visible: what, how far, how good."""
    rows = read_metrics(run_dir / "metrics.csv") if (run_dir / "metrics.csv").is_file() else []
    config = read_run_config(run_dir) if (run_dir / "config.yaml").is_file() else {}
    best = best_of_run(read_run_record(run_dir), config, rows)
    if best is None:
        return str(run_dir)
    return (
        f"{run_dir} ({config.get('arch', '?')}, {rows[-1]['epoch']} of {config.get('epochs', '?')} "
        f"epochs, best val accuracy {best['val_acc']:.2%} at epoch {best['epoch']})"
    )


def best_of_run(record: dict[str, Any] | None, config: dict[str, Any],
                rows: list[dict[str, str]]) -> dict[str, Any] | None:  # fmt: skip
    """best.pt's epoch and val numbers (`epoch`, VAL_NUMBERS where known): run.json's `best`,
    which a finished run records, else metrics.csv's row of the epoch that --select-by chose
    (a run still going, stopped, or from before `best` was recorded); None before an epoch."""
    best = (record or {}).get("best")
    if isinstance(best, dict) and isinstance(best.get("epoch"), int) and isinstance(best.get("val_acc"), float):
        return best
    column = SELECTION_COLUMNS.get(str(config.get("select_by")), "val_acc")  # the epoch of best.pt
    row = best_row(rows, column) or best_row(rows, "val_acc")
    if row is None:
        return None
    numbers = {k: v for k in VAL_NUMBERS if (v := finite_number(row.get(k))) is not None}
    return {"epoch": int(row["epoch"]), **numbers}


def best_row(rows: list[dict[str, str]], column: str) -> dict[str, str] | None:
    """metrics.csv's row with the first highest finite value of `column`, as train chose its
    best epoch; None if the column was never reported."""
    best, value = None, -math.inf
    for row in rows:
        number = finite_number(row.get(column))
        if number is not None and (best is None or number > value):
            best, value = row, number
    return best


def finite_number(text: Any) -> float | None:
    """A metrics.csv cell as a number; None when empty, unreadable or not finite."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def write_run_config(run_dir: Path, config: dict[str, Any]) -> None:
    """config.yaml: the resolved config, which `--config` or `--resume` can feed back."""
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))


def read_run_config(run_dir: Path) -> dict[str, Any]:
    return read_yaml_config(str(run_dir / "config.yaml"))


def write_class_indices(path: Path, classes: list[str]) -> None:
    text = json.dumps({str(i): c for i, c in enumerate(classes)}, indent=4, ensure_ascii=False)
    atomic_write_text(path, text + "\n")


def read_class_indices(path: str | Path) -> list[str]:
    """The tutorial's `{"0": "daisy", ...}` map, as a list in index order."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"The class-indices file {p} does not exist.") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"The class-indices file {p} could not be read: {exc}.") from None
    expected = [str(i) for i in range(len(raw))] if isinstance(raw, dict) else None
    if not isinstance(raw, dict) or sorted(raw, key=_int_or_inf) != expected:
        raise UserError(
            f'{p} must map "0", "1", ... "N-1" to class names, like {{"0": "daisy", '
            '"1": "dandelion"}.'
        )
    return [str(raw[k]) for k in expected]


def _int_or_inf(key: str) -> float:
    return int(key) if key.isdigit() else float("inf")


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    """Every column for every row; a column an older run's rows lack (a resumed run from before
    it existed) is left empty."""
    table = [[_fmt(row.get(k, "")) for k in METRICS_COLUMNS] for row in rows]
    atomic_write_csv(path, [list(METRICS_COLUMNS), *table])


def read_metrics(path: Path) -> list[dict[str, str]]:
    """metrics.csv's rows as written (strings), one per completed epoch."""
    return read_csv(path)


def _fmt(value: Any) -> str:
    return f"{value:.6f}" if isinstance(value, float) else str(value)
