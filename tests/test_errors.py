"""Issue 24, items 10 and 16 and the new user's list: numbers that are not numbers, inputs that
used to end in "Unexpected failure ... bug in resnext", and what the CLI tells a newcomer.

Each test here failed on the code before the fix (checked by running it against that code)."""

from __future__ import annotations

import json
import math
import re
import shutil
import typing
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from resnext_cli import config
from resnext_cli.cli import app
from resnext_cli.commands.train import next_steps
from resnext_cli.errors import UserError
from tests.conftest import TINY_TRAIN, invoke, make_dataset, save_backbone

REPO = Path(__file__).resolve().parent.parent
CONFIGS = [config.TrainConfig, config.PredictConfig, config.BatchPredictConfig, config.EvaluateConfig,
           config.ReportConfig, config.CheckDataConfig, config.AuditConfig, config.CacheConfig,
           config.ExportConfig]  # fmt: skip
FLOAT_FIELDS = [
    (cls, name)
    for cls in CONFIGS
    for name, hint in typing.get_type_hints(cls).items()
    if hint is float or float in typing.get_args(hint)
]


def test_every_float_field_is_found():
    names = {name for _, name in FLOAT_FIELDS}
    assert {"lr", "val_split", "weight_decay", "similarity", "tolerance", "older_than"} <= names


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("cls,name", FLOAT_FIELDS, ids=[f"{c.__name__}.{n}" for c, n in FLOAT_FIELDS])
def test_non_finite_numbers_are_refused_in_every_config(cls, name: str, value: float):
    with pytest.raises(UserError, match=f"--{name.replace('_', '-')}: {value!r} is not a finite number"):
        config.build_config(cls, None, {name: value})


def test_non_finite_numbers_in_a_config_file_and_on_the_command_line(tmp_path: Path, dataset: Path):
    (tmp_path / "nan.yaml").write_text(f"data: {dataset}\nval_split: .nan\n")
    from_file = invoke(["train", "--config", tmp_path / "nan.yaml", "--out", tmp_path / "run"])
    assert from_file.exit_code == 2, from_file.stderr
    assert "Invalid 'val_split' in" in from_file.stderr and "not a finite number" in from_file.stderr
    for lr in ("inf", "nan"):
        flag = invoke(["train", dataset, *TINY_TRAIN, "--lr", lr, "--out", tmp_path / "run"])
        assert flag.exit_code == 2 and f"Invalid --lr: {lr}" in flag.stderr, flag.stderr
    assert not (tmp_path / "run").exists()


def test_a_23_digit_seed_and_a_negative_one_are_refused(tmp_path: Path, dataset: Path):
    huge = invoke(["train", dataset, *TINY_TRAIN, "--seed", "12345678901234567890123", "--out", tmp_path / "r"])
    assert huge.exit_code == 2 and "Invalid --seed: 12345678901234567890123 is too large" in huge.stderr
    negative = invoke(["train", dataset, *TINY_TRAIN, "--seed", "-1", "--out", tmp_path / "r"])
    assert negative.exit_code == 2 and "Invalid --seed -1: it must be at least 0" in negative.stderr
    assert "Unexpected" not in huge.stderr + negative.stderr


def test_img_size_has_an_upper_bound():
    config.build_config(config.TrainConfig, None, {"data": "x", "img_size": config.IMG_SIZE_MAX})
    for cls, extra in ((config.TrainConfig, {"data": "x"}), (config.PredictConfig, {"images": ["a"]}),
                       (config.AuditConfig, {"data": "x"})):  # fmt: skip
        with pytest.raises(UserError, match="between 16 and 1024"):
            config.build_config(cls, None, {**extra, "img_size": config.IMG_SIZE_MAX + 1})


def test_a_binary_config_file_is_an_error_paragraph(tmp_path: Path):
    binary = tmp_path / "model.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    result = invoke(["train", "--config", binary])
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("Error: Config file") and "not a text file" in result.stderr


def test_a_cache_limit_that_is_not_a_size_is_an_error(tmp_path: Path, dataset: Path, monkeypatch):
    for value in ("nan", "inf", "-1", "ten"):
        monkeypatch.setenv("RESNEXT_CACHE_MAX_GB", value)
        listed = invoke(["cache", "list"])
        assert listed.exit_code == 2, listed.stderr
        assert f"RESNEXT_CACHE_MAX_GB={value!r} is not a size in GB" in listed.stderr
    # training says so before computing anything, not after the work
    trained = invoke(["train", dataset, *TINY_TRAIN, "--weights", "none", "--freeze", "--epochs", "1",
                      "--out", tmp_path / "run"])  # fmt: skip
    assert trained.exit_code == 2 and "RESNEXT_CACHE_MAX_GB" in trained.stderr
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- checkpoints and predict


def tampered(trained_run: Path, tmp_path: Path, **changes) -> Path:
    checkpoint = torch.load(trained_run / "best.pt", weights_only=True)
    for key, value in changes.items():
        checkpoint[key] = value(checkpoint[key]) if callable(value) else value
    path = tmp_path / "tampered.pt"
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"classes": lambda c: [*c, "extra"]}, "its classifier has 3 outputs but `classes` names 4"),
        ({"img_size": 0}, "img_size 0 is not between 16 and 1024"),
        ({"img_size": 10**6}, "img_size 1000000 is not between 16 and 1024"),
        ({"std": [0.0, 0.0, 0.0]}, "std [0.0, 0.0, 0.0] is not positive"),
        ({"mean": [math.nan, 0.5, 0.5]}, "mean [nan, 0.5, 0.5] is not 3 finite numbers"),
        ({"classes": "alpha"}, "`classes` is not a list of class names"),
    ],
    ids=["more_classes_than_outputs", "img_size_0", "img_size_huge", "std_0", "mean_nan", "classes_not_a_list"],
)
def test_a_tampered_checkpoint_is_refused_at_load(tmp_path, trained_run, dataset, changes, message):
    path = tampered(trained_run, tmp_path, **changes)
    image = next((dataset / "val" / "alpha").iterdir())
    result = invoke(["predict", image, "--checkpoint", path, "--json"])
    assert result.exit_code == 2, result.stdout + result.stderr
    assert "is damaged or was edited" in result.stderr and message in result.stderr, result.stderr
    assert result.stdout == ""


def test_predict_never_prints_nan(tmp_path, trained_run, dataset):
    """Weights that are not numbers (a run that diverged before this fix) give NaN
    probabilities: an error (exit 1), never `"prob": NaN`, which is not JSON."""
    path = tampered(trained_run, tmp_path, model=lambda m: {**m, "fc.weight": m["fc.weight"] * math.nan})
    image = next((dataset / "val" / "alpha").iterdir())
    single = invoke(["predict", image, "--checkpoint", path, "--json"])
    assert single.exit_code == 1, single.stdout
    assert "NaN" not in single.stdout and "probabilities that are not numbers" in single.stderr
    folder = invoke(["batch-predict", dataset / "val" / "alpha", "--checkpoint", path, "--workers", "0",
                     "--output", tmp_path / "preds.jsonl"])  # fmt: skip
    assert folder.exit_code == 1 and "probabilities that are not numbers" in folder.stderr
    assert not (tmp_path / "preds.jsonl").exists()


def test_weights_of_another_arch_are_named_in_one_paragraph(tmp_path: Path, dataset: Path):
    weights = save_backbone(tmp_path / "r18.pth", seed=0)
    result = invoke(["train", dataset, *TINY_TRAIN, "--arch", "resnet34", "--weights", weights,
                     "--out", tmp_path / "run"])  # fmt: skip
    assert result.exit_code == 2, result.stderr
    assert result.stderr.count("\n") == 1 and len(result.stderr) < 400, result.stderr
    assert "are for resnet18" in result.stderr and "the architecture in use is resnet34" in result.stderr
    assert "Pass --arch resnet18" in result.stderr
    # same names as resnet50, other shapes: only the shapes tell resnext50_32x4d apart
    from resnext_cli.model.networks import build_model, guess_arch

    with torch.device("meta"):
        state = build_model("resnext50_32x4d", 5).state_dict()
    assert guess_arch(state)[0] == "resnext50_32x4d"


# ---------------------------------------------------------------- non-finite losses


def test_a_diverging_run_stops_with_a_clear_error(tmp_path: Path, dataset: Path):
    run = tmp_path / "run"
    result = invoke(["train", dataset, *TINY_TRAIN, "--weights", "none", "--optimizer", "sgd",
                     "--lr", "1e30", "--epochs", "3", "--seed", "0", "--out", run])  # fmt: skip
    assert result.exit_code == 1, result.stdout + result.stderr
    assert "training diverged" in result.stderr and "lower --lr" in result.stderr
    assert "Unexpected" not in result.stderr and "Traceback" not in result.stderr
    assert json.loads((run / "run.json").read_text())["status"] == "failed"


def test_a_non_finite_loss_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch):
    """The loss turns NaN at the second step of epoch 2 (the head on cached features: 3 steps
    and one validation pass per epoch): epoch 1's files stay, epoch 2 is never saved."""
    real_forward = torch.nn.CrossEntropyLoss.forward
    calls = {"n": 0}

    def nan_from_the_sixth_call(self, logits, target):
        calls["n"] += 1
        loss = real_forward(self, logits, target)
        return loss * math.nan if calls["n"] >= 6 else loss

    data = make_dataset(tmp_path / "ds", train_per_class=8, val_per_class=2)  # 24 images: 3 steps
    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", nan_from_the_sixth_call)
    run = tmp_path / "run"
    result = invoke(["train", data, *TINY_TRAIN, "--weights", "none", "--freeze", "--epochs", "3",
                     "--seed", "0", "--out", run])  # fmt: skip
    assert result.exit_code == 1, result.stdout + result.stderr
    assert "The training loss became nan at step 2 of epoch 2" in result.stderr, result.stderr
    assert "last.pt: epoch 1" in result.stderr
    for name in ("best.pt", "last.pt"):
        saved = torch.load(run / name, weights_only=True)
        assert saved["epoch"] == 1 and all(torch.isfinite(t).all() for t in saved["model"].values())
    assert len((run / "metrics.csv").read_text().splitlines()) == 2  # header + epoch 1


# ---------------------------------------------------------------- what a newcomer reads


def help_text(*command: str) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return result.output


COMMANDS = [["train"], ["predict"], ["batch-predict"], ["evaluate"], ["report"], ["check-data"],
            ["export"], ["audit"], ["cache", "list"], ["cache", "clear"], ["archs"]]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_shows_metavars_not_python_types(command: list[str]):
    text = help_text(*command)
    assert not re.findall(r"<(?:str|int|float|bool|list\[[^>]*\])>", text), text


def test_help_points_only_to_readme_sections_that_exist():
    headings = {line.lstrip("#").strip() for line in (REPO / "README.md").read_text().splitlines()
                if line.startswith("#")}  # fmt: skip
    pointers = {m for command in COMMANDS for m in re.findall(r"README: ([^)]+)\)", help_text(*command))}
    assert "Speed defaults" in pointers
    assert pointers <= headings, pointers - headings


def test_report_without_a_run_suggests_what_report_takes(tmp_path: Path):
    result = invoke(["report"], cwd=tmp_path)
    assert result.exit_code == 2, result.stderr
    assert "--checkpoint" not in result.stderr and "resnext report runs/exp" in result.stderr


def test_the_report_times_the_whole_run_from_run_json(tmp_path: Path, trained_run: Path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)  # eval/ stays newer than best.pt: no new evaluation
    record = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**record, "wall_seconds": 1234.4, "sessions": 2}))
    assert invoke(["report", run]).exit_code == 0
    page = (run / "report.html").read_text()
    assert "<b>20 min 34 s</b>" in page and "20 min 34 s of wall clock over 2 sessions" in page
    (run / "run.json").unlink()  # a run from before run.json: the epochs' seconds, said so
    assert invoke(["report", run]).exit_code == 0
    assert "the epochs alone (this run has no run.json" in (run / "report.html").read_text()


def test_the_end_of_training_says_what_to_do_next(tmp_path: Path, monkeypatch):
    run = tmp_path / "elsewhere" / "run"
    run.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    told = next_steps(run)  # not the run commands find on their own: named with --checkpoint
    assert f"resnext predict IMAGE --checkpoint {run / 'best.pt'}" in told
    assert f"resnext evaluate DIR --checkpoint {run / 'best.pt'}" in told
    (tmp_path / "runs" / "exp").mkdir(parents=True)
    (tmp_path / "runs" / "exp" / "best.pt").write_bytes(b"")
    (tmp_path / "runs" / "latest").write_text("exp\n")
    short = next_steps(Path("runs/exp"))  # the latest run here: the plain commands find it
    assert "resnext predict IMAGE    " in short and "--checkpoint" not in short


def test_a_finished_run_prints_its_next_steps(tmp_path: Path):
    data = make_dataset(tmp_path / "ds", train_per_class=3, val_per_class=1)
    result = invoke(["train", data, *TINY_TRAIN, "--weights", "none", "--epochs", "1",
                     "--out", tmp_path / "runs" / "exp"], cwd=tmp_path)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert result.stdout.rstrip().endswith("accuracy on labelled images it never saw")
    assert "Next:\n  resnext predict IMAGE" in result.stdout
