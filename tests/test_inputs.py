"""Hostile and mixed-up inputs (issue 24, items 6-8, 11-13): FIFOs, devices and links that lead
out of the data; paths recorded absolute; train/val mix-ups said; one brightness rule for deep
images; thumbnails of any shape. What the README's Reliability section promises for inputs."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import resource
import shutil
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from resnext_cli.data import folders, images
from resnext_cli.model.checkpoint import TRAIN_DIGESTS
from resnext_cli.outputs import html_parts
from resnext_cli.outputs.audit_page import render_audit_html
from tests.conftest import TINY_TRAIN, invoke, make_dataset, run_subprocess
from tests.test_audit import AUDIT, photos

TRAIN = [*TINY_TRAIN, "--weights", "none", "--epochs", "1", "--seed", "0"]
NOT_REGULAR = "not a regular file"


# ---------------------------------------------------------------- 6. FIFOs, devices, huge files


@contextlib.contextmanager
def unblocking(fifo: Path, after: float = 20.0) -> Iterator[list[float]]:
    """Once `after` seconds have passed, frees any reader stuck opening `fifo` (a writer opens and
    closes it) and records that one was stuck: a build that waits on FIFOs fails the test
    instead of hanging the suite."""
    stuck: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + after
        while not stop.wait(0.2):
            if time.monotonic() < deadline:
                continue
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO unless a reader waits
            except OSError:
                continue
            stuck.append(time.monotonic())
            os.close(fd)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield stuck
    finally:
        stop.set()
        thread.join()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are a POSIX thing")
def test_a_fifo_named_like_an_image_is_reported_by_every_command(tmp_path, trained_run):
    data = make_dataset(tmp_path / "data", train_per_class=4, val_per_class=2)
    fifo = data / "train" / "alpha" / "pipe.jpg"
    os.mkfifo(fifo)
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(data / "val" / "beta" / "beta_00.png", loose)
    os.mkfifo(loose / "pipe.jpg")
    checkpoint = ["--checkpoint", trained_run / "best.pt", "--device", "cpu"]
    commands = {
        "check-data": ["check-data", data, "--workers", "1"],
        "train": ["train", "--data", data, *TRAIN, "--out", tmp_path / "run"],
        "predict": ["predict", loose / "pipe.jpg", *checkpoint],
        "batch-predict": ["batch-predict", loose, *checkpoint, "--workers", "0",
                          "--output", tmp_path / "preds.csv"],
    }  # fmt: skip
    codes = {}
    for name, args in commands.items():
        with unblocking(fifo) as stuck, unblocking(loose / "pipe.jpg") as stuck_loose:
            result = invoke(args)
        assert not stuck and not stuck_loose, f"{name} waited on the FIFO"
        assert result.exception is None or isinstance(result.exception, SystemExit), name
        assert f"{NOT_REGULAR} (a named pipe)" in result.stdout + result.stderr, (name, result.stderr)
        codes[name] = result.exit_code
    assert codes == {"check-data": 0, "train": 0, "predict": 2, "batch-predict": 0}
    assert (tmp_path / "run" / "best.pt").is_file()
    rows = list(csv.DictReader((tmp_path / "preds.csv").open()))
    assert [r["error"] for r in rows] == ["", "not a regular file (a named pipe)"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are a POSIX thing")
def test_audit_reports_a_fifo_instead_of_waiting(tmp_path):
    pytest.importorskip("cleanlab")
    data = photos(tmp_path / "photos", per_class=8, val=3)
    fifo = data / "train" / "red" / "pipe.jpg"
    os.mkfifo(fifo)
    with unblocking(fifo) as stuck:
        result = invoke(["audit", data, *AUDIT, "--folds", "3", "--out", tmp_path / "audit"])
    assert not stuck and result.exit_code == 0, result.stderr
    summary = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert NOT_REGULAR in json.dumps(summary["unreadable"])


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_a_link_to_dev_zero_is_not_read(tmp_path, trained_run):
    """check-data read every file whole: /dev/zero never ends. The process runs with a 2 GiB
    address-space limit, so a build that reads it fails quickly instead of eating the machine."""
    data = make_dataset(tmp_path / "data", train_per_class=4, val_per_class=2)
    (data / "train" / "alpha" / "zero.jpg").symlink_to("/dev/zero")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    result = run_subprocess(["check-data", data, "--json"], cwd=tmp_path, preexec_fn=limit)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)["findings"]
    unreadable = next(f for f in found if f["check"] == "unreadable_files")["items"]
    assert unreadable == [f"{data}/train/alpha/zero.jpg: {NOT_REGULAR} (a character device)"]
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "zero.png").symlink_to("/dev/zero")
    out = tmp_path / "preds.csv"
    invoke(["batch-predict", loose, "--checkpoint", trained_run / "best.pt", "--workers", "0",
            "--device", "cpu", "--output", out])  # fmt: skip
    assert list(csv.DictReader(out.open()))[0]["error"] == f"{NOT_REGULAR} (a character device)"


def test_files_larger_than_any_image_are_not_read(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_FILE_BYTES", 1000)
    path = tmp_path / "huge.png"
    Image.effect_noise((64, 64), 50).save(path)  # > 1000 bytes
    for read in (images.read_image_bytes, images.load_rgb, images.read_header):
        with pytest.raises(images.RefusedFile, match="larger than any image"):
            read(path)
    assert images.describe_failure(images.RefusedFile("not a regular file (a socket)")) == (
        "not a regular file (a socket)"
    )


# ---------------------------------------------------------------- 7. links to folders


def test_links_to_folders_are_followed_only_inside_the_data_folder(tmp_path):
    data = make_dataset(tmp_path / "data", train_per_class=4, val_per_class=2)
    outside = make_dataset(tmp_path / "elsewhere", train_per_class=3, split_folders=False)
    (data / "train" / "delta").symlink_to(outside / "alpha")  # a class folder leading out: skipped
    (data / "train" / "beta" / "system").symlink_to(outside / "beta")  # a sub-folder leading out
    extra = data / "extra_gamma"
    shutil.copytree(data / "val" / "gamma", extra)
    (data / "train" / "gamma" / "more").symlink_to(Path("..") / ".." / "extra_gamma")  # inside: followed
    (data / "train" / "alpha" / "loop").symlink_to(".")  # a loop: entered once
    splits = folders.find_splits(data)
    train = splits["train"]
    assert sorted(train.classes) == ["alpha", "beta", "gamma"]
    assert len(train.classes["alpha"]) == 4 and len(train.classes["beta"]) == 4
    assert len(train.classes["gamma"]) == 6  # 4 + the 2 behind the inside link
    assert sorted(train.outside) == sorted([
        f"{data}/train/beta/system -> {outside / 'beta'}",
        f"{data}/train/delta -> {outside / 'alpha'}",
    ])  # fmt: skip
    result = invoke(["check-data", data, "--workers", "1"])
    assert result.exit_code == 0
    assert "Links to folders outside the data folder were not followed" in result.stdout
    assert "delta" in result.stdout and "elsewhere" in result.stdout
    layout = folders.discover_dataset(data, 0.2, 0)
    assert layout.classes == ["alpha", "beta", "gamma"]
    assert any("not followed" in w and "delta" in w for w in layout.warnings)


def test_a_split_folder_linking_out_of_the_data_is_refused(tmp_path):
    real = make_dataset(tmp_path / "real", train_per_class=3, val_per_class=2)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train").symlink_to(real / "train")
    (data / "val").symlink_to(real / "val")
    result = invoke(["check-data", data])
    assert result.exit_code == 2 and "outside" in result.stderr and str(real / "train") in result.stderr
    linked = tmp_path / "linked"
    linked.symlink_to(real)  # DATA itself may be a link: everything in it is inside
    assert invoke(["check-data", linked, "--workers", "1"]).exit_code == 0


# ---------------------------------------------------------------- 8 and 11. paths and records


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory) -> tuple[Path, Path]:
    """A run trained from its own working folder on `flat` (given relative), which it split."""
    work = tmp_path_factory.mktemp("flat_run")
    make_dataset(work / "flat", train_per_class=10, split_folders=False)
    result = invoke(["train", "--data", "flat", *TRAIN, "--out", "run", "--val-split", "0.2"], cwd=work)
    assert result.exit_code == 0, result.stderr
    return work / "flat", work / "run"


def test_recorded_paths_are_absolute_and_resolved(flat_run):
    flat, run = flat_run
    real = os.path.realpath(flat)
    assert yaml.safe_load((run / "config.yaml").read_text())["data"] == real
    assert yaml.safe_load((run / "config.yaml").read_text())["out"] == os.path.realpath(run)
    split = json.loads((run / "split.json").read_text())
    assert split["root"] == real
    assert all(p.startswith(real + os.sep) for p in split["train"] + split["val"])
    checkpoint = torch.load(run / "best.pt", weights_only=True)
    assert checkpoint["config"]["data"] == real
    digests = checkpoint[TRAIN_DIGESTS]
    assert digests.dtype == torch.int64 and digests.tolist() == folders.path_digests(split["train"])
    assert len(digests) == len(split["train"]) == 24


def test_evaluate_from_another_folder_applies_the_recorded_split(tmp_path, flat_run):
    flat, run = flat_run
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    held_out = len(json.loads((run / "split.json").read_text())["val"])
    spelled = os.path.relpath(flat, elsewhere)  # ../../flat_run0/flat: the same folder
    for data in ([], [spelled]):
        out = tmp_path / f"eval{len(data)}"
        result = invoke(["evaluate", *data, "--checkpoint", run / "best.pt", "--out", out,
                         "--workers", "0"], cwd=elsewhere)  # fmt: skip
        assert result.exit_code == 0, result.stderr
        assert json.loads((out / "metrics.json").read_text())["n"] == held_out == 6
        assert "split.json" in result.stderr and "used to train" not in result.stderr


def test_old_relative_records_are_read_sensibly(tmp_path, flat_run):
    """Runs from before absolute paths: the split root `flat` matches /.../flat from another
    working folder; evaluate without DATA says the recorded path is relative to elsewhere."""
    flat, trained = flat_run
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    split = json.loads((run / "split.json").read_text())
    relative = {key: [os.path.relpath(p, flat.parent) for p in split[key]] for key in ("train", "val")}
    (run / "split.json").write_text(json.dumps({**split, **relative, "root": "flat"}))
    checkpoint = torch.load(run / "best.pt", weights_only=True)
    checkpoint["config"]["data"] = "flat"
    checkpoint.pop(TRAIN_DIGESTS, None)
    torch.save(checkpoint, run / "best.pt")
    result = invoke(["evaluate", flat, "--checkpoint", run / "best.pt", "--workers", "0"], cwd=tmp_path)
    assert result.exit_code == 0, result.stderr
    assert json.loads((run / "eval" / "metrics.json").read_text())["n"] == 6
    result = invoke(["evaluate", "--checkpoint", run / "best.pt"], cwd=tmp_path)
    assert result.exit_code == 2 and "relative to the folder it was trained from" in result.stderr


def test_a_split_that_cannot_be_applied_never_widens_the_evaluation(tmp_path, flat_run):
    flat, trained = flat_run
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "split.json").unlink()
    result = invoke(["evaluate", flat, "--checkpoint", run / "best.pt", "--workers", "0"])
    assert result.exit_code == 0, result.stderr
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 6 and "did not train on" in metrics["images"]  # not all 30
    checkpoint = torch.load(run / "best.pt", weights_only=True)
    checkpoint.pop(TRAIN_DIGESTS, None)  # a checkpoint that cannot tell either: refused, said why
    torch.save(checkpoint, run / "best.pt")
    result = invoke(["evaluate", flat, "--checkpoint", run / "best.pt", "--workers", "0"])
    assert result.exit_code == 2, result.stderr
    assert "split.json" in result.stderr and "its own training images" in result.stderr


def test_evaluating_the_training_images_says_so(tmp_path, trained_run, dataset):
    out = tmp_path / "eval"
    result = invoke(["evaluate", dataset / "train", "--checkpoint", trained_run / "best.pt",
                     "--out", out, "--workers", "0"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "36 of these 36 images were used to train this model" in result.stderr
    result = invoke(["evaluate", dataset, "--checkpoint", trained_run / "best.pt", "--out", out,
                     "--workers", "0"])  # fmt: skip
    assert result.exit_code == 0 and "used to train" not in result.stderr  # its val split


def test_train_val_mixups_are_warned_about(tmp_path):
    data = make_dataset(tmp_path / "flowers", train_per_class=4, val_per_class=2)
    layout = folders.discover_dataset(data / "train", 0.2, 0)
    sibling = next(w for w in layout.warnings if "is ignored" in w)
    assert str(data / "val") in sibling and f"pass {data}" in sibling
    result = invoke(["check-data", data / "val", "--workers", "1"])
    assert "is the validation folder of" in result.stdout
    swapped = make_dataset(tmp_path / "swapped", train_per_class=2, val_per_class=6)
    result = invoke(["check-data", swapped, "--workers", "1"])
    assert "holds more images (18) than" in result.stdout and "swapped" in result.stdout
    assert result.exit_code == 0  # warnings: training may still be meant
    clean = invoke(["check-data", data, "--workers", "1"])
    assert "swapped" not in clean.stdout and "ignored" not in clean.stdout


# ---------------------------------------------------------------- 12. deep images


def deep_containers(folder: Path) -> dict[str, Path]:
    """The same 16-bit gradient at each container's full scale: 16-bit PNG, TIFF I;16 and I;16B
    (raw and compressed), 16-bit PGM (opens as Pillow's 32-bit I), int32 and float TIFF."""
    folder.mkdir(parents=True, exist_ok=True)
    values = (np.arange(48 * 48).reshape(48, 48) * 29 % 65536).astype(np.uint16)
    made = {
        "png16.png": (Image.fromarray(values), {}),
        "tiff16.tif": (Image.fromarray(values), {}),
        "tiff16_lzw.tif": (Image.fromarray(values), {"compression": "tiff_lzw"}),
        "tiff16b.tif": (Image.frombytes("I;16B", (48, 48), values.astype(">u2").tobytes()), {}),
        "pgm16.pgm": (Image.fromarray(values), {}),
        "int32.tif": (Image.fromarray(np.round(values / 65535 * (2**31 - 1)).astype(np.int32)), {}),
        "float.tif": (Image.fromarray((values / 65535).astype(np.float32)), {}),
        "float_zip.tif": (Image.fromarray((values / 65535).astype(np.float32)),
                          {"compression": "tiff_adobe_deflate"}),
    }  # fmt: skip
    for name, (img, options) in made.items():
        img.save(folder / name, **options)
    return {name: folder / name for name in made}


def test_one_brightness_for_every_deep_container(tmp_path):
    files = deep_containers(tmp_path / "deep")
    with Image.open(files["tiff16b.tif"]) as img, Image.open(files["pgm16.pgm"]) as pgm:
        assert img.mode == "I;16B" and pgm.mode == "I"  # what the rule must see through
    values = (np.arange(48 * 48).reshape(48, 48) * 29 % 65536).astype(np.float64)
    expected = np.round(values / 257)
    for name, path in files.items():
        decoded = np.asarray(images.load_rgb(path), dtype=np.float64)
        assert decoded.shape == (48, 48, 3), name
        assert np.abs(decoded[..., 0] - expected).max() <= 1, name
    dim = tmp_path / "dim.tif"  # a dark picture stays dark: scaled by the type, not the content
    Image.fromarray(np.full((8, 8), 1000, dtype=np.int32)).save(dim)
    assert images.load_rgb(dim).getpixel((0, 0)) == (0, 0, 0)


def test_what_check_data_calls_readable_train_and_predict_read(tmp_path, trained_run):
    data = tmp_path / "data"
    for name in ("alpha", "beta"):
        deep_containers(data / name)
    result = invoke(["check-data", data, "--json", "--workers", "1"])
    found = json.loads(result.stdout)["findings"]
    assert not [f for f in found if f["check"] == "unreadable_files"]
    out = tmp_path / "preds.csv"
    result = invoke(["batch-predict", data / "alpha", "--checkpoint", trained_run / "best.pt",
                     "--workers", "0", "--device", "cpu", "--output", out])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 8 and [r["error"] for r in rows] == [""] * 8
    result = invoke(["train", "--data", data, *TRAIN, "--val-split", "0.25", "--out", tmp_path / "run"])
    assert result.exit_code == 0 and "unreadable" not in result.stderr, result.stderr


# ---------------------------------------------------------------- 13. thumbnails


def test_thumbnails_of_any_aspect_ratio(tmp_path):
    shapes = {"wide.png": (10000, 3), "tall.png": (3, 10000), "dot.png": (1, 1), "photo.jpg": (400, 300)}
    for name, size in shapes.items():
        Image.new("RGB", size, (200, 30, 30)).save(tmp_path / name)
        data = html_parts.thumbnail(str(tmp_path / name))
        with Image.open(io.BytesIO(data)) as thumb:
            assert max(thumb.size) == html_parts.THUMBNAIL_PX and min(thumb.size) >= 1, name


def test_a_thumbnail_that_fails_costs_only_itself(tmp_path, monkeypatch):
    path = tmp_path / "fine.png"
    Image.new("RGB", (40, 40)).save(path)

    def broken_save(*args, **kwargs):
        raise OSError("encoder exploded")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    assert html_parts.thumbnail(str(path)) is None
    assert "no longer readable" in html_parts.thumbnail_tag(str(path), "x")


def test_report_and_audit_pages_show_a_10000x3_image(tmp_path, trained_run):
    wide, tall = tmp_path / "wide.png", tmp_path / "tall.png"
    Image.new("RGB", (10000, 3), (30, 30, 200)).save(wide)
    Image.new("RGB", (3, 10000), (30, 200, 30)).save(tall)
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    mistakes = run / "eval" / "misclassified.csv"
    rows = list(csv.reader(mistakes.open()))
    mistakes.write_text("\n".join(",".join(r) for r in [rows[0], [str(wide), "alpha", "beta", "0.99"]]) + "\n")
    os.utime(run / "eval" / "metrics.json")  # still newer than best.pt: the report reads eval/ as is
    result = invoke(["report", run])
    assert result.exit_code == 0, result.stderr
    page = (run / "report.html").read_text()
    assert page.count("data:image/jpeg;base64") == 1 and "wide.png" in page

    class Finding:
        path, given, suggested, confidence, issue, related_path = str(wide), "a", "b", 0.9, "label", ""

    summary = {"data": "d", "images": 2, "counts": {"label": 1, "leak": 0, "duplicate": 0},
               "out_of_fold_accuracy": 0.5, "unreadable": [], "per_class": {}}  # fmt: skip
    page = render_audit_html(summary, [Finding()], {"a": [str(tall)], "b": [str(tall)]}, gallery=5)
    assert page.count("data:image/jpeg;base64") == 3
