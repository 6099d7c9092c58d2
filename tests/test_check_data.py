"""`resnext check-data` on folders with every kind of problem, and train's cheap share of it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from PIL import Image

from tests.conftest import TINY_TRAIN, invoke, make_dataset


def findings(result) -> dict[str, dict]:
    report = json.loads(result.stdout)
    return {f["check"]: f for f in report["findings"]}


def messy_dataset(root: Path) -> Path:
    make_dataset(root, train_per_class=6, val_per_class=3)
    alpha, beta, val_beta = root / "train" / "alpha", root / "train" / "beta", root / "val" / "beta"
    (alpha / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    Image.new("RGBA", (40, 40), (200, 30, 30, 128)).save(alpha / "transparent.png")
    Image.new("L", (40, 40), 120).save(alpha / "grey.png")
    Image.new("CMYK", (40, 40), (0, 200, 200, 0)).save(beta / "print.jpg")
    rotated = Image.new("RGB", (48, 32), (40, 200, 60))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rotated.save(beta / "phone.jpg", exif=exif)
    Image.new("RGB", (12, 9), (40, 200, 60)).save(beta / "icon.png")
    shutil.copy(alpha / "alpha_00.png", alpha / "alpha_00 copy.png")  # duplicate within train
    shutil.copy(beta / "beta_01.png", val_beta / "leaked.png")  # the same picture in val
    (root / "train" / ".thumbnails").mkdir()
    (root / "train" / "notes.txt").write_text("not a class")
    return root


def test_check_data_reports_each_kind_of_problem(tmp_path: Path):
    root = messy_dataset(tmp_path / "ds")
    result = invoke(["check-data", root, "--json", "--workers", "0"])
    assert result.exit_code == 0, result.stderr  # nothing here stops training
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["splits"]["train"]["classes"] == {"alpha": 10, "beta": 9, "gamma": 6}
    assert report["splits"]["train"]["readable"] == 24
    assert report["splits"]["val"]["images"] == 10
    found = findings(result)
    assert [i.split(":")[0] for i in found["unreadable_files"]["items"]] == [str(root / "train/alpha/broken.jpg")]
    modes = " ".join(found["non_rgb_modes"]["items"])
    assert "transparent.png: RGBA" in modes and "grey.png: L" in modes and "print.jpg: CMYK" in modes
    assert found["exif_rotated"]["items"] == [str(root / "train/beta/phone.jpg")]
    assert found["tiny_images"]["items"] == [f"{root / 'train/beta/icon.png'}: 12x9"]
    assert found["duplicates_in_train"]["items"] == [
        f"{root / 'train/alpha/alpha_00 copy.png'} = {root / 'train/alpha/alpha_00.png'}"
    ]
    assert found["train_val_leak"]["items"] == [
        f"{root / 'val/beta/leaked.png'} = {root / 'train/beta/beta_01.png'}"
    ]
    assert found["hidden_folders"]["items"] == [".thumbnails"]
    assert found["stray_files"]["items"] == ["notes.txt"]
    assert all(f["severity"] != "error" for f in found.values())
    # the human summary went to stderr, the JSON alone to stdout
    assert "OK to train" in result.stderr and "train_val_leak" not in result.stderr


def test_parallel_workers_find_the_same_as_one_process(tmp_path: Path):
    root = messy_dataset(tmp_path / "ds")
    make_dataset(root, train_per_class=25, val_per_class=3, seed=1)  # > 64 files: the pool runs
    serial = json.loads(invoke(["check-data", root, "--json", "--workers", "0"]).stdout)
    parallel = json.loads(invoke(["check-data", root, "--json", "--workers", "2"]).stdout)
    assert parallel["files"] == serial["files"] > 64
    assert parallel["findings"] == serial["findings"]


def test_blocking_problems_exit_1(tmp_path: Path):
    root = make_dataset(tmp_path / "ds", train_per_class=4, val_per_class=2)
    shutil.copytree(root / "val" / "beta", root / "val" / "delta")  # unknown to train
    for picture in (root / "train" / "gamma").iterdir():  # no decodable gamma image
        picture.write_bytes(b"garbage")
    result = invoke(["check-data", root, "--json", "--workers", "0"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False
    found = findings(result)
    assert found["val_classes_missing_from_train"]["items"] == ["delta"]
    assert found["classes_without_readable_images"]["items"] == ["gamma"]
    assert found["classes_without_readable_images"]["severity"] == "error"
    assert "Training would fail" in result.stderr


def test_missing_folder_is_a_usage_error(tmp_path: Path):
    result = invoke(["check-data", tmp_path / "nope"])
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_train_runs_the_cheap_layout_checks(tmp_path: Path):
    root = make_dataset(tmp_path / "ds", train_per_class=12, val_per_class=2)
    for picture in sorted((root / "train" / "gamma").iterdir())[2:]:
        picture.unlink()  # 12 / 12 / 2 training images
    result = invoke(["train", "--data", root, *TINY_TRAIN, "--weights", "none", "--epochs", "1",
                     "--out", tmp_path / "run"])
    assert result.exit_code == 0, result.stderr
    assert "Class imbalance" in result.stderr and "'gamma' only 2" in result.stderr
