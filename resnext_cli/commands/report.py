"""`resnext report [RUN]`: write a run's report.html (default: the latest finished run)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from resnext_cli import ui
from resnext_cli.config import ReportConfig
from resnext_cli.model.checkpoint import choose_run, describe_run
from resnext_cli.outputs.run_report import write_report


def report(cfg: ReportConfig) -> Path:
    """`resnext report [RUN]`: the given run, `--run NAME`, or the latest finished one (said on
    stderr)."""
    if cfg.run_dir is None:
        run_dir, how = choose_run(
            cfg.run, choose="give the run folder (`resnext report runs/exp`) or --run NAME"
        )
        ui.note(f"Reporting on {describe_run(run_dir)}: {how} (pass RUN or --run NAME to choose "
                "another).")  # fmt: skip
        cfg = dataclasses.replace(cfg, run_dir=str(run_dir))
    return write_report(cfg)
