"""What run reports and check-data cost: measured side by side in one process.

(1) Plots during training. The same `resnext train` run (same seed, data, settings) with the
    per-epoch plots on and with them switched off (the plot writer replaced by a no-op), for a
    plain frozen run and a --cache-features run (epochs of a fraction of a second: the worst
    case). Prints mean epoch seconds (metrics.csv) and the ratio on/off; the goal is that
    plotting never slows an epoch noticeably (ratio ~1.0). The runs alternate off/on/off/on so
    that drift on a shared machine hits both sides.
(2) What drawing takes by itself: results.png, confusion_matrix.png at 5/30/100 classes.
(3) check-data: files/s with one reading process vs the default pool (every core), on the
    photos as given and upscaled to 3000x2000 JPEGs.

    python benchmarks/bench_reports.py ../shared/data/flowers5
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from resnext_cli.commands.train import train
from resnext_cli.config import TrainConfig
from resnext_cli.data.folders import find_splits
from resnext_cli.outputs import plots


def epoch_seconds(data: str, out: Path, plotting: bool, **options) -> tuple[float, float]:
    """Mean seconds of epochs 2-5 (epoch 1 warms up) and of the whole run."""
    original = plots.BackgroundWriter.submit
    if not plotting:
        plots.BackgroundWriter.submit = lambda self, path, render: None  # type: ignore[method-assign]
    try:
        config = TrainConfig(data=data, arch="resnet18", weights="none", freeze=True, epochs=5,
                             seed=0, out=str(out), report=False, **options)  # fmt: skip
        started = time.perf_counter()
        train(config)
        total = time.perf_counter() - started
    finally:
        plots.BackgroundWriter.submit = original  # type: ignore[method-assign]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert (out / "results.png").exists() == plotting
    return statistics.mean(float(r["seconds"]) for r in rows[1:]), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="a DATA/train + DATA/val folder, e.g. ../shared/data/flowers5")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["RESNEXT_CACHE"] = str(Path(tmp) / "cache")
        print("\n(1) seconds per epoch (mean of epochs 2-5) and per run, resnet18 frozen, 5 epochs")
        print(f"{'setting':<20}{'epoch: off':>11}{'on':>8}{'on/off':>8}{'run: off':>10}{'on':>8}"
              f"{'on/off':>8}")
        for name, options in (("plain frozen", {"cache_features": False}),
                              ("--cache-features", {"cache_features": True, "feature_views": 1})):
            epoch_seconds(args.data, Path(tmp, f"{name}-warm"), False, **options)  # fills caches
            off, on = [], []
            for r in range(args.repeats):
                off.append(epoch_seconds(args.data, Path(tmp, f"{name}-off{r}"), False, **options))
                on.append(epoch_seconds(args.data, Path(tmp, f"{name}-on{r}"), True, **options))
            e_off, e_on = (statistics.mean(x[0] for x in side) for side in (off, on))
            r_off, r_on = (statistics.mean(x[1] for x in side) for side in (off, on))
            print(f"{name:<20}{e_off:>11.3f}{e_on:>8.3f}{e_on / e_off:>8.2f}{r_off:>10.1f}"
                  f"{r_on:>8.1f}{r_on / r_off:>8.2f}")

    print("\n(2) drawing alone (seconds, mean of 3)")
    rows = [dict(epoch=i, train_loss=1 / i, train_acc=1 - 1 / (i + 1), val_loss=1.2 / i,
                 val_acc=0.9 - 0.5 / i, lr=1e-3, seconds=1.0) for i in range(1, 31)]  # fmt: skip
    print(f"  results.png, 30 epochs: {timed(lambda: plots.training_curves_png(rows)):.3f}")
    for n in (5, 30, 100):
        rng = random.Random(0)
        matrix = [[rng.randint(0, 3) + (25 if i == j else 0) for j in range(n)] for i in range(n)]
        names = [f"class_{i:03d}" for i in range(n)]
        seconds = timed(lambda: plots.confusion_matrix_png(matrix, names))
        print(f"  confusion_matrix.png, {n} classes: {seconds:.3f}")

    print("\n(3) `resnext check-data` (subprocess, as a user runs it): one worker vs the default")
    with tempfile.TemporaryDirectory() as tmp:
        large = Path(tmp, "large")
        for split in find_splits(args.data).values():
            for name, paths in split.classes.items():
                for p in paths[:20]:  # 20 per class and split: 200 photos at 3000x2000
                    target = large / split.folder.name / name / Path(p).name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    Image.open(p).convert("RGB").resize((3000, 2000)).save(target, quality=90)
        for label, folder in (("224 px photos", args.data), ("3000x2000 JPEGs", str(large))):
            one = cli_seconds(["check-data", folder, "--workers", "1"])
            pooled = cli_seconds(["check-data", folder])
            files = sum(1 for f in Path(folder).rglob("*") if f.is_file())
            print(f"  {label:<16} {files} files: --workers 1 {files / one:6.0f} files/s, "
                  f"default {files / pooled:6.0f} files/s ({one / pooled:.2f}x)")


def cli_seconds(args: list[str], repeats: int = 2) -> float:
    command = [sys.executable, "-m", "resnext_cli", *args]
    subprocess.run(command, capture_output=True, check=True)  # warm the page cache
    started = time.perf_counter()
    for _ in range(repeats):
        subprocess.run(command, capture_output=True, check=True)
    return (time.perf_counter() - started) / repeats


def timed(action, repeats: int = 3) -> float:
    action()  # warm (imports, page cache)
    started = time.perf_counter()
    for _ in range(repeats):
        action()
    return (time.perf_counter() - started) / repeats


if __name__ == "__main__":
    main()
