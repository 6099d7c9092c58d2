"""Run folders read back, for `resnext runs` and `report --compare`: what each run is (config.yaml),
how far it got and how good it is (metrics.csv), how it ended and how long it took (run.json;
run.lock tells a run whose process died from one still going). Runs from before run.json still
list, their status told from their files. Nothing here writes."""

from __future__ import annotations

import datetime
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resnext_cli.errors import UserError
from resnext_cli.files import lock_state
from resnext_cli.model.checkpoint import (
    RUN_LOCK, RUN_RECORD, best_of_run, best_row, finite_number, read_metrics, read_run_config, read_run_record,
)

BALANCED = "val_balanced_acc"  # the imbalance issue's column, where a run reports it
ABSENT = object()  # a config key one of two runs does not have


@dataclass
class RunSummary:
    """One run folder, as `resnext runs` shows it (fractions 0-1, seconds, ISO 8601 dates)."""

    name: str
    path: str
    status: str  # finished | running | interrupted | failed | killed | stopped (before run.json)
    arch: str | None
    data: str | None
    epochs_done: int
    epochs: int | None
    best_val_acc: float | None  # best.pt's (checkpoint.best_of_run)
    best_epoch: int | None
    best_val_balanced_acc: float | None
    wall_seconds: float | None
    wall_from: str  # "run.json", or "epochs" (a run from before it: the epochs' own seconds)
    created: str | None
    last_epoch: dict[str, float] = field(default_factory=dict)  # metrics.csv's last row
    config: dict[str, Any] = field(default_factory=dict, repr=False)
    rows: list[dict[str, str]] = field(default_factory=list, repr=False)

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k not in ("config", "rows")}


def is_run_folder(path: Path) -> bool:
    """run.json, or (older runs) config.yaml with metrics.csv or a checkpoint."""
    if (path / RUN_RECORD).is_file():
        return True
    files = ("metrics.csv", "last.pt", "best.pt")
    return (path / "config.yaml").is_file() and any((path / f).is_file() for f in files)


def find_runs(root: Path) -> list[RunSummary]:
    """Every run folder directly in `root` (or `root` itself when it is one)."""
    if not root.is_dir():
        raise UserError(f"{root} is not a folder. Give the folder that holds your run folders "
                        "(default runs/, where `resnext train` writes them).")  # fmt: skip
    if is_run_folder(root):
        return [read_summary(root)]
    return [read_summary(path) for path in sorted(root.iterdir()) if path.is_dir() and is_run_folder(path)]


def resolve_run(name: str, root: Path) -> Path:
    """A run given as a folder, or by its name in `root`; a clear error otherwise."""
    for path in (Path(name), root / name):
        if path.is_dir() and is_run_folder(path):
            return path
    known = [p.name for p in sorted(root.iterdir()) if p.is_dir() and is_run_folder(p)] \
        if root.is_dir() else []  # fmt: skip
    listed = f" Runs in {root}: {', '.join(known)}." if known else ""
    raise UserError(f"{name} is not a run folder (no run.json, or config.yaml with metrics.csv), "
                    f"neither as a path nor in {root}.{listed}")  # fmt: skip


def read_summary(run_dir: Path) -> RunSummary:
    record = read_run_record(run_dir)
    config = _read_quietly(lambda: read_run_config(run_dir), {}) \
        if (run_dir / "config.yaml").is_file() else {}  # fmt: skip
    rows = _read_quietly(lambda: read_metrics(run_dir / "metrics.csv"), []) \
        if (run_dir / "metrics.csv").is_file() else []  # fmt: skip
    best = best_of_run(record, config, rows)
    status = run_status(run_dir, record, config, rows)
    wall, wall_from = _wall_seconds(record, rows, live=status == "running")
    return RunSummary(
        name=run_dir.name, path=str(run_dir), status=status,
        arch=config.get("arch"), data=config.get("data"), epochs_done=len(rows), epochs=config.get("epochs"),
        best_val_acc=best["val_acc"] if best else None, best_epoch=best["epoch"] if best else None,
        best_val_balanced_acc=best.get(BALANCED) if best else None, wall_seconds=wall, wall_from=wall_from,
        created=(record or {}).get("created") or _modified(run_dir / "config.yaml"),
        last_epoch={k: v for k, v in _numbers(rows[-1]).items() if k != "epoch"} if rows else {},
        config=config, rows=rows,
    )  # fmt: skip


def _read_quietly(read: Any, empty: Any) -> Any:
    """A damaged file lists as missing rather than hiding the other runs."""
    try:
        return read()
    except (UserError, OSError, ValueError):
        return empty


def run_status(run_dir: Path, record: dict[str, Any] | None, config: dict[str, Any],
               rows: list[dict[str, str]]) -> str:  # fmt: skip
    """run.json's status, except that `running` with a stale or missing run.lock is `killed` (the
    process died without ending the run). Without run.json: finished when the epochs were all
    done or --patience stopped it, else `stopped` (interrupted, failed or killed: not recorded)."""
    if record is not None:
        status = str(record.get("status", "running"))
        if status == "running" and lock_state(run_dir / RUN_LOCK) != "held":
            return "killed"
        return status
    done = len(rows)
    planned, patience = config.get("epochs"), config.get("patience")
    best = best_row(rows, "val_acc")
    if isinstance(planned, int) and done >= planned > 0:
        return "finished"
    if best and isinstance(patience, int) and patience > 0 and int(rows[-1]["epoch"]) - int(best["epoch"]) >= patience:
        return "finished"
    return "stopped"


def _numbers(row: dict[str, str]) -> dict[str, float]:
    return {k: v for k, v in ((k, finite_number(t)) for k, t in row.items()) if v is not None}


def _wall_seconds(record: dict[str, Any] | None, rows: list[dict[str, str]],
                  live: bool) -> tuple[float | None, str]:  # fmt: skip
    """run.json's wall time (a session still running counts up to now; a killed one's time is
    lost with it); else the epochs' own."""
    if record is not None and record.get("wall_seconds") is not None:
        wall = float(record["wall_seconds"])
        if live and record.get("started"):
            wall += max(0.0, time.time() - _timestamp(record["started"]))
        return wall, "run.json"
    seconds = [s for s in (finite_number(r.get("seconds")) for r in rows) if s is not None]
    return (sum(seconds), "epochs") if seconds else (None, "epochs")


def _modified(path: Path) -> str | None:
    try:
        stamp = path.stat().st_mtime
    except OSError:
        return None
    return datetime.datetime.fromtimestamp(stamp).astimezone().isoformat(timespec="seconds")


# ---------------------------------------------------------------- sorting and comparing


def sort_runs(runs: list[RunSummary], key: str) -> list[RunSummary]:
    """date: oldest first; name (exp2 before exp10), status, arch: A-Z; acc, balanced: best first;
    time: longest first. Runs without the value go last."""
    if key == "name":
        return sorted(runs, key=lambda r: _natural(r.name))
    if key in ("status", "arch"):
        return sorted(runs, key=lambda r: (getattr(r, key) is None, str(getattr(r, key)), _natural(r.name)))
    if key == "date":
        return sorted(runs, key=lambda r: (r.created is None, _timestamp(r.created), _natural(r.name)))
    value = {"acc": "best_val_acc", "balanced": "best_val_balanced_acc", "time": "wall_seconds"}[key]
    return sorted(runs, key=lambda r: (getattr(r, value) is None, -(getattr(r, value) or 0.0),
                                       _natural(r.name)))  # fmt: skip


def _natural(name: str) -> list[Any]:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def _timestamp(when: str | None) -> float:
    """An ISO 8601 time as seconds since the epoch (0 where there is none)."""
    try:
        return datetime.datetime.fromisoformat(str(when)).timestamp()
    except ValueError:
        return 0.0


def config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, a's value, b's value) for each key whose values differ, in config order; a key one
    config lacks has `ABSENT` there."""
    keys = list(dict.fromkeys([*a, *b]))
    return [(k, a.get(k, ABSENT), b.get(k, ABSENT)) for k in keys if a.get(k, ABSENT) != b.get(k, ABSENT)]


def metric_columns(*runs: RunSummary) -> list[str]:
    """The numeric metrics.csv columns of these runs (whatever columns each has), in file order."""
    return list(dict.fromkeys(k for run in runs for k in run.last_epoch if k != "epoch"))


def config_text(value: Any) -> str:
    """A config value as config.yaml writes it (true/false/null); `(absent)` for ABSENT."""
    if value is ABSENT:
        return "(absent)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def duration(seconds: float, spaced: bool = False) -> str:
    """12s, 3m05s, 2h07m (a table's column); `spaced`: 12 s, 3 min 05 s, 2 h 07 min (prose)."""
    whole = round(seconds)
    s, m, h = (" s", " min ", " h ") if spaced else ("s", "m", "h")
    if whole < 60:
        return f"{whole}{s}"
    if whole < 3600:
        return f"{whole // 60}{m}{whole % 60:02d}{s}"
    return f"{whole // 3600}{h}{whole % 3600 // 60:02d}{m.rstrip()}"


# ---------------------------------------------------------------- as people read it


def side_by_side(a: RunSummary, b: RunSummary) -> list[tuple[str, list[str]]]:
    """(label, [a's cell, b's cell]): how each run ended and how good it was, then its last epoch's
    value of every metrics.csv column either run has."""
    rows: list[tuple[str, Any]] = [
        ("status", lambda r: r.status),
        ("arch", lambda r: r.arch or "?"),
        ("data", lambda r: r.data or "?"),
        ("epochs", epochs_text),
        ("best val acc", lambda r: percent(r.best_val_acc)
                                   + (f" (epoch {r.best_epoch})" if r.best_epoch else "")),  # fmt: skip
    ]
    if a.best_val_balanced_acc is not None or b.best_val_balanced_acc is not None:
        rows.append(("best balanced acc", lambda r: percent(r.best_val_balanced_acc)))
    rows += [("time", wall_text), ("created", lambda r: date_text(r.created))]
    for column in metric_columns(a, b):
        rows.append((f"last {column}", lambda r, c=column: metric_text(c, r.last_epoch.get(c))))
    return [(label, [cell(a), cell(b)]) for label, cell in rows]


def percent(value: float | None) -> str:
    return f"{value:.2%}" if value is not None else "-"


def epochs_text(run: RunSummary) -> str:
    """Done of planned: 3/10."""
    return f"{run.epochs_done}/{run.epochs if run.epochs is not None else '?'}"


def metric_text(column: str, value: float | None) -> str:
    """A metrics.csv value: accuracies and F1 as percentages, the learning rate as 1.00e-03."""
    if value is None:
        return "-"
    if column.endswith(("_acc", "_f1")):
        return f"{value:.2%}"
    if column == "lr":
        return f"{value:.2e}"
    return f"{value:.1f}" if column == "seconds" or abs(value) >= 1000 else f"{value:.4f}"


def wall_text(run: RunSummary) -> str:
    """The wall time; `~` marks one summed from the epochs (a run from before run.json), `+?` a
    killed run's (the time of the session that was killed is not known)."""
    if run.wall_seconds is None:
        return "-"
    estimated = "~" if run.wall_from == "epochs" else ""
    return estimated + duration(run.wall_seconds) + ("+?" if run.status == "killed" else "")


def date_text(created: str | None) -> str:
    try:
        return datetime.datetime.fromisoformat(str(created)).strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return "?"
