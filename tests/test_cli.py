"""What a newcomer meets first: help with defaults, one vocabulary, visible default choices."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from resnext_cli import __version__
from resnext_cli.cli import app
from tests.conftest import TINY_TRAIN, invoke, make_dataset, run_subprocess
from tests.test_predict import image_folder

# (flag, the default its help must show), per command
HELP_DEFAULTS = {
    "train": [("--arch", "resnext50_32x4d"), ("--weights", "imagenet"), ("--epochs", "10"),
              ("--batch-size", "16"), ("--img-size", "224"), ("--lr", "0.001"),
              ("--weight-decay", "0.0"), ("--label-smoothing", "0.0"), ("--optimizer", "adam"),
              ("--scheduler", "cosine"), ("--val-split", "0.1"), ("--precision", "auto"),
              ("--device", "auto"), ("--freeze", "freeze, except with --weights none"),
              ("--augment", "on"), ("--report", "on"), ("--workers", "chosen for this machine"),
              ("--balance", "auto"), ("--select-by", "auto")],
    "predict": [("--topk", "5"), ("--img-size", "the checkpoint's"), ("--precision", "auto"),
                ("--checkpoint", "the latest finished run"), ("--prior", "the checkpoint's")],
    "batch-predict": [("--batch-size", "8"), ("--topk", "1"), ("--workers", "chosen for this "
                      "machine"), ("--recursive", "off"), ("--checkpoint", "the latest finished run"),
                      ("--prior", "the checkpoint's")],
    "evaluate": [("--batch-size", "16"), ("--data", "the data the checkpoint was trained on"),
                 ("--out", "eval/ beside the checkpoint"), ("--prior", "the checkpoint's")],
    "report": [("--gallery", "24"), ("--data", "the run's data"), ("--batch-size", "16")],
    "check-data": [("--min-size", "32"), ("--imbalance-ratio", "5.0"), ("--workers", "every core")],
    "export": [("--format", "onnx"), ("--opset", "18"), ("--tolerance", "0.001"),
               ("--dynamic-batch", "batch 1")],
    "explain": [("--method", "gradcam-fine"), ("--class", "the predicted class"), ("--out", "runs/explain"),
                ("--batch-size", "8"), ("--recursive", "off"), ("--checkpoint", "the latest finished run")],
}  # fmt: skip


def help_rows(command: str) -> list[str]:
    """One line per option (a wide terminal), box drawing removed."""
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return [re.sub(r"[│╭╮╰╯─]", " ", line) for line in result.output.splitlines()]


@pytest.mark.parametrize("command", sorted(HELP_DEFAULTS))
def test_help_shows_the_defaults_a_user_needs(command: str):
    rows = help_rows(command)
    for flag, default in HELP_DEFAULTS[command]:
        row = next((r for r in rows if re.match(rf"\s*{re.escape(flag)}\b", r)), None)
        assert row is not None, f"{command} --help lists no {flag}"
        assert f"[default: {default}" in row, f"{command} {flag}: {row.strip()}"


def test_flags_that_take_no_value_show_no_placeholder():
    for command in HELP_DEFAULTS:
        for row in help_rows(command):
            assert "<bool>" not in row or "--help" in row, f"{command}: {row.strip()}"
            assert not re.search(r"\{\w+\}", row), f"{command}: {row.strip()}"


def test_version():
    result = run_subprocess(["--version"], cwd=Path.cwd())
    assert result.returncode == 0 and result.stdout.strip() == f"resnext {__version__}"


def test_the_data_folder_is_positional_or_data_everywhere(tmp_path: Path, dataset: Path, trained_run: Path):
    result = invoke(["train", dataset, *TINY_TRAIN, "--weights", "none", "--epochs", "1",
                     "--out", tmp_path / "run"])
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "run" / "best.pt").exists()
    checked = invoke(["check-data", "--data", dataset])
    assert checked.exit_code == 0 and "OK to train" in checked.stdout
    folder = image_folder(tmp_path / "imgs", ["a.png", "b.png"])
    predicted = invoke(["batch-predict", "--data", folder, "--checkpoint", trained_run / "best.pt",
                        "--workers", "0"])
    assert predicted.exit_code == 0 and "Predicted 2 image(s)" in predicted.stdout
    both = invoke(["check-data", dataset, "--data", tmp_path])
    assert both.exit_code == 2 and "give one" in both.stderr


def test_batch_predict_on_class_folders_names_the_recursive_command(tmp_path: Path, trained_run: Path):
    root = make_dataset(tmp_path / "ds", 2, 1)
    result = invoke(["batch-predict", root / "val", "--checkpoint", trained_run / "best.pt"])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error:") and "sub-folders hold 3" in result.stderr
    assert f"resnext batch-predict {root / 'val'} --recursive" in result.stderr


def test_output_folder_is_created(tmp_path: Path, trained_run: Path):
    folder = image_folder(tmp_path / "imgs", ["a.png"])
    out = tmp_path / "new" / "deeper" / "preds.csv"
    result = invoke(["batch-predict", folder, "--checkpoint", trained_run / "best.pt", "--output", out,
                     "--workers", "0"])
    assert result.exit_code == 0, result.stderr
    assert out.read_text().startswith("path,class,prob,error")


@pytest.mark.parametrize("name,magic", [("p.jpg", b"\xff\xd8"), ("p.png", b"\x89PNG"),
                                        ("p.pdf", b"%PDF"), ("sub/p.svg", b"<?xml")])
def test_predict_plot_honours_the_extension(tmp_path: Path, trained_run: Path, name: str, magic: bytes):
    folder = image_folder(tmp_path / "imgs", ["a.png"])
    result = invoke(["predict", folder / "a.png", "--checkpoint", trained_run / "best.pt", "--plot",
                     tmp_path / name])
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / name).read_bytes().startswith(magic)


def test_predict_plot_refuses_an_unknown_extension_before_any_work(tmp_path: Path, trained_run: Path):
    folder = image_folder(tmp_path / "imgs", ["a.png"])
    result = invoke(["predict", folder / "a.png", "--checkpoint", tmp_path / "missing.pt", "--plot",
                     tmp_path / "p.xyz"])
    assert result.exit_code == 2 and ".png" in result.stderr and "p.xyz" in result.stderr
    assert not (tmp_path / "p.xyz").exists()


def test_train_checks_the_run_folder_before_loading_weights(tmp_path: Path, dataset: Path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("in the way")
    result = invoke(["train", dataset, "--arch", "resnet18", "--weights", tmp_path / "w.pth",
                     "--out", blocker / "run"], cwd=tmp_path)
    assert result.exit_code == 2 and "run folder" in result.stderr and "is a file" in result.stderr
    assert "w.pth" not in result.stderr  # the weights were never reached


def test_default_run_is_the_latest_finished_one_and_said(tmp_path: Path, trained_run: Path, dataset: Path):
    runs = tmp_path / "runs"
    result = invoke(["train", dataset, *TINY_TRAIN, "--weights", "none", "--epochs", "1", "--seed", "0"],
                    cwd=tmp_path)
    assert result.exit_code == 0, result.stderr
    assert json.loads((runs / "latest").read_text())["run"] == "exp"
    # an interrupted (never finished) run, newer than exp: not the default
    shutil.copytree(trained_run, runs / "exp2")
    (runs / "exp2" / "best.pt").touch()
    folder = image_folder(tmp_path / "imgs", ["a.png"])
    predicted = invoke(["predict", folder / "a.png"], cwd=tmp_path)
    assert predicted.exit_code == 0, predicted.stderr
    assert "runs/exp/best.pt: the latest finished run" in predicted.stderr
    assert "1 of 1 epochs" in predicted.stderr and "exp2" not in predicted.stderr
    reported = invoke(["report"], cwd=tmp_path)
    assert reported.exit_code == 0, reported.stderr
    assert "Reporting on runs/exp" in reported.stderr and (runs / "exp" / "report.html").is_file()
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    nothing = invoke(["report"], cwd=empty)
    assert nothing.exit_code == 2 and str(empty / "runs") in nothing.stderr


def test_evaluate_defaults_to_the_data_the_checkpoint_trained_on(tmp_path: Path, trained_run: Path, dataset: Path):
    result = invoke(["evaluate", "--checkpoint", trained_run / "best.pt", "--out", tmp_path / "eval",
                     "--workers", "0"])
    assert result.exit_code == 0, result.stderr
    assert f"Data: {dataset}, which" in result.stderr and "was trained on" in result.stderr
    assert (tmp_path / "eval" / "metrics.json").is_file()
    weights = tmp_path / "plain.pth"
    torch.save(torch.load(trained_run / "best.pt", weights_only=True)["model"], weights)
    unknown = invoke(["evaluate", "--weights", weights, "--arch", "resnet18", "--class-indices",
                      trained_run / "class_indices.json"])
    assert unknown.exit_code == 2 and "resnext evaluate DATA" in unknown.stderr


def test_report_config_has_one_style(trained_run: Path):
    page = (trained_run / "report.html").read_text()
    config = page[page.index('id="config"'):]
    assert "<td>true</td>" in config and "<td>null</td>" in config
    assert "<td>True</td>" not in config and "<td>None</td>" not in config


def test_plot_is_an_image_of_the_predictions(tmp_path: Path, trained_run: Path):
    folder = image_folder(tmp_path / "imgs", ["a.png", "b.png"])
    invoke(["predict", folder / "a.png", folder / "b.png", "--checkpoint", trained_run / "best.pt",
            "--plot", tmp_path / "p.png"])
    with Image.open(tmp_path / "p.png") as plot:
        assert plot.width > plot.height  # side by side
