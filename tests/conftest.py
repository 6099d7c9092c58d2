"""Shared fixtures: tiny generated datasets (32-48 px) and one short training run."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from resnext_cli.cli import app

# Under pytest-xdist (the README runs `pytest -n 2`) every worker is a whole torch process. With
# torch's default of one thread per core each, they would contend for the same cores, where
# OpenMP's barriers make both several times slower (measured on 2 cores: an epoch of the quick
# start took 61 s with 2 threads beside one other busy process, 17.5 s with 1). So the cores are
# shared out before torch is imported; subprocesses (train, torchrun) inherit it.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))

# colour per class: a trivially learnable signal, so a couple of epochs give a usable model
CLASS_COLOURS = {"alpha": (220, 40, 40), "beta": (40, 200, 60), "gamma": (40, 60, 220)}


def draw_image(colour: tuple[int, int, int], rng: random.Random, size: int = 40) -> Image.Image:
    img = Image.new("RGB", (size, size), tuple(rng.randint(90, 140) for _ in range(3)))
    x0, y0 = rng.randint(0, size // 3), rng.randint(0, size // 3)
    shade = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in colour)
    img.paste(shade, (x0, y0, x0 + size // 2 + 4, y0 + size // 2 + 4))
    return img


def make_dataset(
    root: Path,
    train_per_class: int = 8,
    val_per_class: int = 4,
    classes: dict[str, tuple[int, int, int]] = CLASS_COLOURS,
    seed: int = 0,
    split_folders: bool = True,
) -> Path:
    rng = random.Random(seed)
    splits = {"train": train_per_class, "val": val_per_class} if split_folders else {"": train_per_class}
    for split, count in splits.items():
        for name, colour in classes.items():
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                draw_image(colour, rng).save(folder / f"{name}_{i:02d}.png")
    return root


def save_backbone(path: Path, seed: int) -> Path:
    """A resnet18 state dict with non-trivial BatchNorm statistics, so that drift would show."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    reference = torchvision.models.resnet18()
    for module in reference.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    torch.save(reference.state_dict(), path)
    return path


@pytest.fixture(scope="session", autouse=True)
def feature_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tests never write into the user's ~/.cache: cached features (on by default for frozen
    training) go to a session folder; subprocesses inherit it."""
    path = tmp_path_factory.mktemp("feature_cache")
    os.environ["RESNEXT_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "ds", train_per_class=12, val_per_class=6)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(args: list[str], cwd: Path | None = None):
    """Run the CLI in-process (torch stays imported between tests)."""
    previous = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        os.chdir(previous)


def run_subprocess(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    """The real console entry point, for what only a fresh process shows (usage errors, exit codes)."""
    return subprocess.run(
        [sys.executable, "-m", "resnext_cli", *[str(a) for a in args]],
        cwd=cwd, capture_output=True, text=True, timeout=300, **kwargs,
    )


# --no-report: the end-of-run evaluation and report.html are tested once, on `trained_run`
# --device cpu: what these tests check (exact repeats, tolerances) is the CPU's behaviour
TINY_TRAIN = ["--device", "cpu", "--no-report", "--arch", "resnet18", "--img-size", "32", "--batch-size", "8",
              "--workers", "0"]  # fmt: skip


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> Path:
    """A 3-class resnet18: a fixed random backbone (colour survives it) and a trained head; with
    the end-of-run evaluation (eval/) and report.html."""
    work = tmp_path_factory.mktemp("trained")
    result = invoke(
        ["train", "--data", dataset, *TINY_TRAIN, "--weights", "none", "--freeze", "--epochs", "6",
         "--seed", "0", "--lr", "0.02", "--out", work / "run", "--report"]
    )
    assert result.exit_code == 0, result.stdout + result.stderr
    return work / "run"


def same_predictions(csv_a: str, csv_b: str, score_tolerance: float = 1e-3) -> bool:
    """Two batch-predict CSVs hold the same rows: every column equal, except `unknown_score`
    to within `score_tolerance`. The score's `style` component whitens the second stage's
    channel spread, which magnifies the last-bit differences between convolution kernels that
    oneDNN picks per batch size (measured: up to 4e-5, fp32 and bf16 alike, while the
    probabilities agree to every printed digit), so a resumed run, whose batches are cut
    differently, can differ there and only there."""
    rows_a, rows_b = _prediction_rows(csv_a), _prediction_rows(csv_b)
    if len(rows_a) != len(rows_b) or (rows_a and rows_a[0].keys() != rows_b[0].keys()):
        return False
    for a, b in zip(rows_a, rows_b):
        score_a, score_b = a.pop("unknown_score", ""), b.pop("unknown_score", "")
        if a != b or (score_a != score_b and abs(float(score_a) - float(score_b)) > score_tolerance):
            return False
    return True


def _prediction_rows(text: str) -> list[dict]:
    """A CSV's rows, or a JSON-lines file's (its text begins with a brace)."""
    if text.startswith("{"):
        return [json.loads(line) for line in text.splitlines()]
    return list(csv.DictReader(io.StringIO(text)))
