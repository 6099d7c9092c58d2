"""`resnext runs [ROOT]`: the run folders side by side (status, what, how good, how long), and
`--compare A B`: two runs' config differences and metrics. Reads files only; needs no tracker."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from resnext_cli import ui
from resnext_cli.config import RunsConfig
from resnext_cli.outputs.run_index import (
    ABSENT,
    RunSummary,
    config_differences,
    config_text,
    date_text,
    epochs_text,
    find_runs,
    percent,
    read_summary,
    resolve_run,
    side_by_side,
    sort_runs,
    wall_text,
)


def runs(cfg: RunsConfig) -> None:
    root = Path(cfg.root)
    if cfg.compare:
        a, b = (read_summary(resolve_run(name, root)) for name in cfg.compare)
        compare(a, b, cfg.json)
        return
    found = sort_runs(find_runs(root), cfg.sort)
    if cfg.json:
        print(json.dumps([run.as_json() for run in found], indent=2))
        return
    if not found:
        ui.info(f"No run folders in {root} (a run folder holds run.json, or config.yaml and metrics.csv).")
        return
    ui.show(runs_table(found))
    ui.info(f"{len(found)} run(s) in {root}, sorted by {cfg.sort}.")
    if any(run.status == "killed" for run in found):
        ui.info("killed: the process died without ending its run (SIGKILL, a crash, the machine "
                "went down), and the time of that session is not known (+?); `resnext train --resume "
                "RUN` continues it from its last completed epoch, if it had one.")  # fmt: skip
    if any(run.wall_from == "epochs" and run.wall_seconds is not None for run in found):
        ui.info("~: a run from before run.json, its time summed from its epochs (setup not counted).")


def runs_table(found: list[RunSummary]) -> Table:
    balanced = any(run.best_val_balanced_acc is not None for run in found)
    table = Table(box=None, pad_edge=False)
    for name in ("run", "status", "arch", "data", "epochs", "best acc", *(["balanced"] if balanced else []),
                 "time", "created"):  # fmt: skip
        numeric = name in ("epochs", "best acc", "balanced", "time")
        table.add_column(name, justify="right" if numeric else "left")
    for run in found:
        best = percent(run.best_val_acc) + (f" @{run.best_epoch}" if run.best_epoch else "")
        cells = [run.name, run.status, run.arch or "?", Path(run.data).name if run.data else "?",
                 epochs_text(run), best]  # fmt: skip
        if balanced:
            cells.append(percent(run.best_val_balanced_acc))
        cells += [wall_text(run), date_text(run.created)]
        table.add_row(*cells)
    return table


def compare(a: RunSummary, b: RunSummary, as_json: bool) -> None:
    """Metrics side by side, then every config key whose value differs."""
    differences = config_differences(a.config, b.config)
    if as_json:
        print(json.dumps({"runs": [a.as_json(), b.as_json()], "config_differences": {
            key: {side: value for side, value in (("a", va), ("b", vb)) if value is not ABSENT}
            for key, va, vb in differences}}, indent=2))  # fmt: skip
        return
    metrics = Table("", a.path, b.path, box=None, pad_edge=False)
    for label, cells in side_by_side(a, b):
        metrics.add_row(label, *cells)
    ui.show(metrics)
    if not differences:
        ui.info(f"\nSame config ({len(a.config)} keys).")
        return
    table = Table("config", a.name, b.name, box=None, pad_edge=False)
    for key, va, vb in differences:
        table.add_row(key, config_text(va), config_text(vb))
    ui.info(f"\n{len(differences)} config difference(s):")
    ui.show(table)
