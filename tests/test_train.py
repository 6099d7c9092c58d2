from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from resnext_cli.config import TrainConfig, build_config
from resnext_cli.model.optimization import LrSchedule
from tests.conftest import TINY_TRAIN, invoke, make_dataset, run_subprocess

REPO = Path(__file__).resolve().parent.parent


def test_end_to_end_run_folder(trained_run: Path):
    for name in ("best.pt", "last.pt", "class_indices.json", "config.yaml", "metrics.csv"):
        assert (trained_run / name).is_file(), name
    best = torch.load(trained_run / "best.pt", map_location="cpu", weights_only=True)
    assert best["format"] == "resnext-cli/1" and best["arch"] == "resnet18"
    assert best["classes"] == ["alpha", "beta", "gamma"] and best["img_size"] == 32
    assert best["mean"] == [0.485, 0.456, 0.406] and 0.0 <= best["val_acc"] <= 1.0
    assert set(best["versions"]) == {"resnext_cli", "torch", "torchvision"}
    assert best["config"]["seed"] == 0 and best["config"]["freeze"] is True
    last = torch.load(trained_run / "last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 6 and "optimizer" in last and "scheduler" in last
    assert json.loads((trained_run / "class_indices.json").read_text()) == {
        "0": "alpha", "1": "beta", "2": "gamma"
    }
    rows = list(csv.DictReader((trained_run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    assert list(rows[0]) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds",
                             "val_balanced_acc", "val_macro_f1"]
    assert max(float(r["val_acc"]) for r in rows) == pytest.approx(best["val_acc"])
    assert best["val_acc"] >= 0.9  # colour is enough to separate the classes


def test_run_json_marks_the_run_and_times_all_of_it(trained_run: Path):
    record = json.loads((trained_run / "run.json").read_text())
    assert record["format"] == "resnext-run/1" and record["status"] == "finished"
    assert record["sessions"] == 1 and record["ended"] >= record["started"]
    epochs = sum(float(row["seconds"]) for row in csv.DictReader((trained_run / "metrics.csv").open()))
    assert record["wall_seconds"] > epochs  # setup and the end of the run count too
    assert not (trained_run / "run.lock").exists()


def test_frozen_backbone_changes_only_the_head(tmp_path: Path, dataset: Path):
    reference = torchvision.models.resnet18()
    # non-trivial BN statistics so that drift would show
    for module in reference.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    weights = tmp_path / "r18.pth"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in reference.state_dict().items()}, weights)
    result = invoke(["train", "--data", dataset, *TINY_TRAIN, "--weights", weights, "--epochs", "1",
                     "--seed", "0", "--out", tmp_path / "run"])
    assert result.exit_code == 0, result.stderr
    assert "Replaced the classifier" in result.stdout and "1000 outputs -> 3" in result.stdout
    assert "Trainable parameters: 1,539 of" in result.stdout
    trained = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["model"]
    original = reference.state_dict()
    for key, value in trained.items():
        if key.startswith("fc."):
            continue
        expected = original[key].half().to(value.dtype) if original[key].is_floating_point() else original[key]
        assert torch.equal(value, expected), f"{key} changed under --freeze"
    assert trained["fc.weight"].shape == (3, 512)


def test_unfreeze_after_trains_the_backbone_at_lower_lr(tmp_path: Path, dataset: Path):
    weights = tmp_path / "r18.pth"
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), weights)
    result = invoke(["train", "--data", dataset, *TINY_TRAIN, "--weights", weights, "--epochs", "2",
                     "--unfreeze-after", "1", "--scheduler", "none", "--seed", "0", "--out", tmp_path / "run"])
    assert result.exit_code == 0, result.stderr
    assert "unfreezing the backbone" in result.stdout
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert not torch.equal(last["model"]["conv1.weight"], reference.conv1.weight)
    lrs = sorted(g["lr"] for g in last["optimizer"]["param_groups"])
    assert lrs == pytest.approx([1e-4, 1e-3])


def test_seeded_runs_repeat_exactly(tmp_path: Path, dataset: Path):
    def run(name: str) -> list[dict]:
        result = invoke(["train", "--data", dataset, *TINY_TRAIN[:-2], "--workers", "1", "--weights", "none",
                         "--epochs", "2", "--seed", "7", "--out", tmp_path / name])
        assert result.exit_code == 0, result.stderr
        rows = list(csv.DictReader((tmp_path / name / "metrics.csv").open()))
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert run("a") == run("b")


def test_corrupt_files_are_skipped_with_a_warning(tmp_path: Path):
    root = make_dataset(tmp_path / "ds", train_per_class=6, val_per_class=3)
    (root / "train" / "alpha" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (root / "val" / "beta" / "empty.png").write_bytes(b"")
    result = invoke(["train", "--data", root, *TINY_TRAIN, "--weights", "none", "--epochs", "2",
                     "--seed", "0", "--out", tmp_path / "run"])
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    # listed once each although two epochs meet them
    assert sum("broken.jpg" in line for line in lines) == 1
    assert sum("empty.png" in line for line in lines) == 1
    assert (tmp_path / "run" / "best.pt").exists()


def test_single_folder_split_is_recorded(tmp_path: Path):
    root = make_dataset(tmp_path / "flat", train_per_class=10, split_folders=False)
    result = invoke(["train", "--data", root, *TINY_TRAIN, "--weights", "none", "--epochs", "1",
                     "--val-split", "0.2", "--seed", "3", "--out", tmp_path / "run"])
    assert result.exit_code == 0, result.stderr
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["seed"] == 3 and len(split["val"]) == 6 and len(split["train"]) == 24


def test_config_file_and_flag_override(tmp_path: Path, dataset: Path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": str(dataset), "arch": "resnet18", "weights": "none",
                                      "epochs": 1, "img_size": 32, "lr": 0.01, "workers": 0,
                                      "optimizer": "sgd", "batch_size": 8}))
    result = invoke(["train", "--config", config, "--lr", "0.002", "--out", tmp_path / "run"])
    assert result.exit_code == 0, result.stderr
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["lr"] == 0.002 and saved["optimizer"] == "sgd" and saved["epochs"] == 1
    assert isinstance(saved["seed"], int)  # drawn and recorded
    # the saved config reproduces the run's settings when fed back
    again = build_config(TrainConfig, str(tmp_path / "run" / "config.yaml"), {})
    assert again.lr == 0.002 and again.seed == saved["seed"]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path):
    config = build_config(TrainConfig, str(path), {"data": "x"})
    assert config.arch and config.epochs >= 1


def test_tutorial_config_is_the_tutorial_recipe():
    config = build_config(TrainConfig, str(REPO / "configs" / "flowers.yaml"), {"data": "x"})
    assert (config.arch, config.freeze, config.optimizer, config.lr, config.batch_size) == (
        "resnext50_32x4d", True, "adam", 1e-3, 16)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--data", "{missing}"], "does not exist"),
        (["--data", "{one_class}"], "at least 2 class folders"),
        (["--data", "{empty_class}"], "no images"),
        (["--data", "{ok}", "--arch", "resnet19"], "Invalid arch 'resnet19'. Did you mean 'resnet18'"),
        (["--data", "{ok}", "--arch", "resnext50"], "Did you mean 'resnext50_32x4d'"),
        (["--data", "{ok}", "--epochs", "0"], "--epochs 0"),
        (["--data", "{ok}", "--optimizer", "adamm"], "Did you mean 'adam'"),
        (["--data", "{ok}", "--lr", "-1"], "--lr -1"),
        (["--data", "{ok}", "--val-split", "1.5"], "--val-split"),
        (["--data", "{ok}", "--device", "gpu"], "Invalid --device"),
        (["--data", "{ok}", "--device", "cuda:7"], "cuda"),
        (["--data", "{ok}", "--weights", "{missing}"], "does not exist"),
        (["--config", "{bad_key}"], "Did you mean 'epochs'"),
        (["--config", "{bad_type}"], "'lr'"),
        (["--data", "{ok}", "--epochs", "many"], "Invalid value for '--epochs'"),
        (["--data", "{ok}", "--bogus"], "No such option"),
    ],
)
def test_bad_input_gives_one_error_paragraph(tmp_path: Path, args: list[str], message: str):
    """Usage errors (click's) go through the console script, so they run in a real process; the
    rest run in-process (each process start imports torch and torchvision again: ~7 s)."""
    ok = make_dataset(tmp_path / "ok", 2, 1)
    one = make_dataset(tmp_path / "one", 2, 1, classes={"solo": (1, 1, 1)})
    empty = make_dataset(tmp_path / "empty", 2, 1)
    (empty / "train" / "nothing").mkdir()
    (tmp_path / "bad_key.yaml").write_text("data: x\nepoch: 3\n")
    (tmp_path / "bad_type.yaml").write_text("data: x\nlr: fast\n")
    places = {"missing": tmp_path / "nope", "one_class": one, "empty_class": empty, "ok": ok,
              "bad_key": tmp_path / "bad_key.yaml", "bad_type": tmp_path / "bad_type.yaml"}
    argv = ["train", *[a.format(**places) for a in args], "--arch", "resnet18"] if "--arch" not in args \
        else ["train", *[a.format(**places) for a in args]]
    if message.startswith(("Invalid value", "No such option")):
        result = run_subprocess([*argv, "--out", tmp_path / "run"], cwd=tmp_path)
        exit_code = result.returncode
    else:
        result = invoke([*argv, "--out", tmp_path / "run"], cwd=tmp_path)
        exit_code = result.exit_code
    assert exit_code == 2, result.stderr
    assert result.stderr.startswith("Error:"), result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "run" / "best.pt").exists()


def test_existing_run_is_never_overwritten(tmp_path: Path, trained_run: Path, dataset: Path):
    before = (trained_run / "best.pt").read_bytes()
    result = invoke(["train", "--data", dataset, *TINY_TRAIN, "--weights", "none", "--out", trained_run])
    assert result.exit_code == 2 and "already holds" in result.stderr
    assert (trained_run / "best.pt").read_bytes() == before


def test_runs_auto_increment(tmp_path: Path, dataset: Path):
    for _ in range(2):
        result = invoke(["train", "--data", dataset, *TINY_TRAIN, "--weights", "none", "--epochs", "1",
                         "--seed", "0"], cwd=tmp_path)
        assert result.exit_code == 0, result.stderr
    assert (tmp_path / "runs" / "exp" / "best.pt").exists()
    assert (tmp_path / "runs" / "exp2" / "best.pt").exists()


def test_weights_none_with_explicit_freeze_warns_and_trains(tmp_path: Path, dataset: Path):
    result = invoke(["train", "--data", dataset, *TINY_TRAIN, "--weights", "none", "--freeze",
                     "--epochs", "1", "--out", tmp_path / "run"])
    assert result.exit_code == 0 and "learn little" in result.stderr


def test_patience_stops_early(tmp_path: Path, dataset: Path):
    result = invoke(["train", "--data", dataset, *TINY_TRAIN, "--weights", "none", "--epochs", "6",
                     "--lr", "1e-9", "--patience", "1", "--seed", "0", "--out", tmp_path / "run"])
    assert result.exit_code == 0 and "Early stopping" in result.stdout
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert len(rows) < 6


def test_lr_schedule_shapes():
    cosine = LrSchedule("cosine", total_steps=100, warmup_steps=10, steps_per_epoch=10)
    assert cosine(0) == pytest.approx(1 / 11) and cosine(9) == pytest.approx(10 / 11)
    assert cosine(10) == pytest.approx(1.0) and cosine(55) == pytest.approx(0.5)
    assert cosine(100) == pytest.approx(0.0, abs=1e-9)
    step = LrSchedule("step", total_steps=90, warmup_steps=0, steps_per_epoch=10)
    assert [step(s) for s in (0, 29, 30, 60)] == pytest.approx([1, 1, 0.1, 0.01])
    assert LrSchedule("none", 50, 0, 10)(49) == 1.0
    assert all(0 <= cosine(s) <= 1 for s in range(100)) and not math.isnan(cosine(99))


def test_default_config_file_is_the_dataclass_defaults():
    import dataclasses

    written = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    per_run = {"data", "out", "name", "resume"}
    assert set(written) == set(defaults) - per_run
    assert written == {k: v for k, v in defaults.items() if k not in per_run}
