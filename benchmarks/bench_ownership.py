"""What the ownership checks of issue 24 cost: each check timed alone, in milliseconds, on the
sizes where it is slowest (a resnext50 checkpoint for the legacy-run check, a feature cache of
many entries for the cache listing that the size limit runs after every store).

    python benchmarks/bench_ownership.py
    python benchmarks/bench_ownership.py --entries 5000

Each is run once per `train` (run folder checks, the latest pointer, the lock), once per
predict/evaluate/export/report (choosing the run, the lock), or once per stored feature-cache
part (the cache listing); compare with seconds for a run. For whole-command times, run
`resnext train`/`batch-predict` with PYTHONPATH pointing at each version (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torchvision

from resnext_cli.model import checkpoint as ckpt
from resnext_cli.model import features


def timed(action: Callable[[], object], repeats: int) -> float:
    """Median wall time of `action`, in milliseconds."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append((time.perf_counter() - started) * 1000)
    return sorted(times)[len(times) // 2]


def legacy_run(folder: Path) -> Path:
    """A run folder from before run.json: a resnext50_32x4d best.pt (about 100 MB) only."""
    run = folder / "runs" / "legacy"
    run.mkdir(parents=True)
    model = torchvision.models.resnext50_32x4d(num_classes=5)
    torch.save({"format": ckpt.CHECKPOINT_FORMAT, "model": model.state_dict(), "arch": "resnext50_32x4d"},
               run / "best.pt")  # fmt: skip
    return run


def cache_of(folder: Path, entries: int) -> Path:
    """A feature cache of `entries` small entries with their sidecars, and a few foreign files."""
    root = folder / "cache"
    root.mkdir()
    (root / features.CACHE_MARKER).write_text(json.dumps({"format": features.CACHE_FORMAT}))
    for i in range(entries):
        path = root / f"{i:032x}.pt"
        path.write_bytes(b"x" * 64)
        about = {"cache": features.CACHE_FORMAT, "entry": path.name, "bytes": 64, "view": 0}
        path.with_suffix(".json").write_text(json.dumps(about))
    for name in ("model.pt", "notes.txt"):
        (root / name).write_bytes(b"mine")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1000, help="feature-cache entries")
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ownership-") as tmp:
        work = Path(tmp)
        os.chdir(work)
        legacy = legacy_run(work)
        ckpt.mark_latest(legacy)
        (work / "mine").mkdir()
        for i in range(200):
            (work / "mine" / f"photo_{i}.jpg").write_bytes(b"")
        os.environ["RESNEXT_CACHE"] = str(cache_of(work, args.entries))
        rows = [
            ("train: check an existing folder of 200 files (refused)",
             lambda: _refused(lambda: ckpt.check_run_dir(str(work / "mine"), None))),
            ("train: check a legacy run folder (resnext50 best.pt read as a zip)",
             lambda: _refused(lambda: ckpt.check_run_dir(str(legacy), None))),
            ("train: write runs/latest (ownership checked first)", lambda: ckpt.mark_latest(legacy)),
            ("predict/evaluate: choose the run (read runs/latest)", lambda: ckpt.choose_run()),
            ("report/evaluate/export: take and release the run lock",
             lambda: _lock_cycle(legacy)),
            (f"feature cache: list {args.entries} entries (after each store)", features.cache_contents),
        ]  # fmt: skip
        print(f"| check | ms (median of {args.repeats}) |\n|---|---|")
        for name, action in rows:
            print(f"| {name} | {timed(action, args.repeats):.2f} |")


def _refused(check: Callable[[], None]) -> None:
    try:
        check()
    except Exception:  # noqa: BLE001 - the refusal is the expected outcome
        return
    raise AssertionError("the folder was not refused")


def _lock_cycle(run: Path) -> None:
    with ckpt.run_folder_lock(run):
        pass


if __name__ == "__main__":
    main()
