"""Run folders, checkpoints and the small files beside them; every write is atomic.

A checkpoint is a plain dict of tensors and plain types (see ../shared/INTERFACE.md), loaded only
with `weights_only=True`, so opening a file never runs code from it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resnext_cli.errors import EXIT_FAILED, UserError

if TYPE_CHECKING:
    import torch

CHECKPOINT_FORMAT = "resnext-cli/1"
CHECKPOINT_KEYS = (
    "format", "model", "arch", "classes", "img_size", "mean", "std", "epoch", "val_acc",
    "config", "versions",
)  # fmt: skip
METRICS_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


def atomic_write(path: Path, write: Any) -> None:
    """Write through `write(fileobj)` into a temporary file beside `path`, then rename over it."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise UserError(f"Cannot write {path}: {exc.strerror or exc}.", EXIT_FAILED) from None
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes 0600 files, which would hide results from others
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise UserError(
                f"Cannot write {path}: {exc.strerror or exc}. The previous file, if any, is "
                "unchanged.",
                EXIT_FAILED,
            ) from None
        raise


def _umask() -> int:
    """The process umask, read without changing it (os.umask would race other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def save_torch(obj: dict[str, Any], path: Path) -> None:
    import torch

    atomic_write(path, lambda handle: torch.save(obj, handle))


def safe_torch_load(path: str | Path, what: str = "checkpoint") -> Any:
    """torch.load with weights_only=True, turning every failure into a clear message."""
    import pickle

    import torch

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


def build_checkpoint(
    model: torch.nn.Module,
    *,
    arch: str,
    classes: list[str],
    img_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    epoch: int,
    val_acc: float,
    config: dict[str, Any],
) -> dict[str, Any]:
    import torch
    import torchvision

    from resnext_cli import __version__

    return {
        "format": CHECKPOINT_FORMAT,
        # contiguous CPU copies: the file is the same whatever layout the model trained in
        "model": {
            k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
            for k, v in model.state_dict().items()
        },
        "arch": arch,
        "classes": list(classes),
        "img_size": int(img_size),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "epoch": int(epoch),
        "val_acc": float(val_acc),
        "config": config,
        "versions": {
            "resnext_cli": __version__,
            "torch": str(torch.__version__),  # a TorchVersion object otherwise
            "torchvision": str(torchvision.__version__),
        },
    }


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


def make_run_dir(out: str | None, name: str | None, root: str = "runs") -> Path:
    """`--out DIR` as given, `runs/NAME`, or the next free `runs/exp`, `runs/exp2`, ...

    A folder that already holds checkpoints is never reused: nothing a user has is overwritten.
    """
    if out or name:
        run_dir = Path(out) if out else Path(root) / str(name)
        if any((run_dir / f).exists() for f in ("best.pt", "last.pt")):
            raise UserError(
                f"{run_dir} already holds a finished or started run (best.pt/last.pt). Choose "
                "another --out/--name, or move that folder away; nothing was overwritten."
            )
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


def make_folder(path: Path) -> None:
    """The folder and its parents, or a clear error (a file in the way, no permission...)."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file; a folder is needed there.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"Cannot create the folder {path}: {exc.strerror or exc}.") from None


def latest_checkpoint(root: str = "runs") -> Path:
    candidates = sorted(Path(root).glob("*/best.pt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise UserError(
            f"No checkpoint given and none found under {root}/*/best.pt. Train one with "
            "`resnext train --data DIR`, or pass --checkpoint PATH."
        )
    return candidates[-1]


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
    table = [[_fmt(row[k]) for k in METRICS_COLUMNS] for row in rows]
    atomic_write_csv(path, [list(METRICS_COLUMNS), *table])


def atomic_write_csv(path: Path, rows: list[list[str]]) -> None:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _fmt(value: Any) -> str:
    return f"{value:.6f}" if isinstance(value, float) else str(value)
