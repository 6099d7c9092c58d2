"""The run folder and its files: checkpoints (best.pt, last.pt), class_indices.json,
config.yaml and metrics.csv, each with its writer beside its reader; every write is atomic.

A checkpoint is a plain dict of tensors and plain types (the README's "Checkpoint" table),
loaded only with `weights_only=True`, so opening a file never runs code from it.
"""

from __future__ import annotations

import datetime
import json
import os
import pickle
import time
from pathlib import Path
from typing import Any

import torch
import torchvision
import yaml

from resnext_cli import __version__
from resnext_cli.config import read_yaml_config
from resnext_cli.data.balance import SELECTION_COLUMNS
from resnext_cli.data.transforms import Preprocessing, resize_size
from resnext_cli.errors import UserError
from resnext_cli.files import (
    atomic_write,
    atomic_write_csv,
    atomic_write_text,
    make_folder,
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
    if class_counts is not None:
        checkpoint["class_counts"] = [int(c) for c in class_counts]
    return checkpoint


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
    return ckpt


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

    A folder that already holds checkpoints is never reused: nothing a user has is overwritten.
    """
    if out or name:
        check_run_dir(out, name, root)
        run_dir = Path(out) if out else Path(root) / str(name)
        make_folder(run_dir)
        return run_dir
    make_folder(Path(root))
    for i in range(1, 100_000):
        run_dir = Path(root) / ("exp" if i == 1 else f"exp{i}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
        except OSError as exc:
            raise UserError(f"Cannot create the run folder {run_dir}: {exc.strerror}.") from None
    raise UserError(f"Too many runs in {root}; pass --name or --out.")


LATEST = "latest"  # beside a run folder: the name of the newest run that finished
RUN_RECORD = "run.json"  # marks a folder as a run of this tool: its status and wall time
RUN_LOCK = "run.lock"  # held while a process writes the run (files.exclusive_lock)
RUN_FORMAT = "resnext-run/1"
RUN_STATUSES = ("running", "finished", "interrupted", "failed")


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


def end_run_record(run_dir: Path, status: str, since: float) -> None:
    """The session's end: `finished`, `interrupted` or `failed`, and its time added to
    `wall_seconds` (everything from the start of the session: data, feature caching, epochs)."""
    record = read_run_record(run_dir) or {"format": RUN_FORMAT, "created": _now(), "wall_seconds": 0.0}
    record.update(status=status, ended=_now(),
                  wall_seconds=float(record.get("wall_seconds", 0.0)) + time.perf_counter() - since)  # fmt: skip
    atomic_write_text(run_dir / RUN_RECORD, json.dumps(record, indent=1) + "\n")


def read_run_record(run_dir: Path) -> dict[str, Any] | None:
    """run.json as written by `start_run_record`; None where there is none (a folder that is not
    a run of this tool, or a run from before run.json existed) or it is not ours."""
    try:
        record = json.loads((Path(run_dir) / RUN_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == RUN_FORMAT else None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds")


def check_run_dir(out: str | None, name: str | None, root: str = "runs") -> None:
    """Before any slow setup: the run folder can be made there and holds no earlier run."""
    run_dir = Path(out) if out else Path(root) / name if name else Path(root)
    if (out or name) and any((run_dir / f).exists() for f in ("best.pt", "last.pt")):
        raise UserError(
            f"{run_dir} already holds a finished or started run (best.pt/last.pt). Choose "
            "another --out/--name, or move that folder away; nothing was overwritten."
        )
    existing = next(p for p in (run_dir, *run_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"Cannot create the run folder {run_dir}: {existing} is a file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(
            f"Cannot create the run folder {run_dir}: {existing} is not writable. Choose another "
            "--out."
        )


def mark_latest(run_dir: Path) -> None:
    """After a run finished: `runs/latest` names it, for commands that default to a run."""
    atomic_write_text(run_dir.parent / LATEST, run_dir.name + "\n")


def latest_run(root: str = "runs") -> Path:
    """The run `root/latest` names, else (runs from before it existed) the newest
    `root/*/best.pt`; a clear error naming the folder searched when there is none."""
    pointer = Path(root) / LATEST
    if pointer.is_file():
        named = Path(root) / pointer.read_text(encoding="utf-8").strip()
        if (named / "best.pt").is_file():
            return named
    candidates = sorted(Path(root).glob("*/best.pt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise UserError(
            f"No checkpoint given and no trained run found in {Path(root).absolute()} (looked for "
            f"{root}/{LATEST} and {root}/*/best.pt). Train one with `resnext train DATA`, pass "
            "--checkpoint PATH, or run this from the folder that holds runs/."
        )
    return candidates[-1].parent


def describe_run(run_dir: Path) -> str:
    """One line on a run, so that a default choice is visible: what, how far, how good."""
    rows = read_metrics(run_dir / "metrics.csv") if (run_dir / "metrics.csv").is_file() else []
    config = read_run_config(run_dir) if (run_dir / "config.yaml").is_file() else {}
    if not rows:
        return str(run_dir)
    column = SELECTION_COLUMNS.get(str(config.get("select_by")), "val_acc")  # the epoch of best.pt
    best = max(rows, key=lambda r: float(r.get(column) or r["val_acc"]))
    return (
        f"{run_dir} ({config.get('arch', '?')}, {rows[-1]['epoch']} of {config.get('epochs', '?')} "
        f"epochs, best val accuracy {float(best['val_acc']):.2%} at epoch {best['epoch']})"
    )


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
