"""Interruption, faults and hostile input: what the README's Reliability section promises."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from resnext_cli.data import images
from tests.conftest import TINY_TRAIN, invoke, make_dataset, run_subprocess, same_predictions
from tests.test_predict import image_folder

TRAIN_ARGS = [*TINY_TRAIN, "--weights", "none", "--seed", "5", "--lr", "0.003"]


def metrics_rows(run: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader((run / "metrics.csv").open())]


def start_training(args: list, cwd: Path) -> subprocess.Popen:
    """The training process, with Ctrl-C's default: a suite run in the background (`cmd &` in a
    script) hands its children SIGINT ignored, and Python then never raises KeyboardInterrupt."""
    return subprocess.Popen([sys.executable, "-m", "resnext_cli", "train", *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip


def wait_for_epochs(run: Path, process: subprocess.Popen, epochs: int) -> None:
    """Until `epochs` are in metrics.csv. Bounded by the work (the process trains a few epochs,
    then ends, which fails the wait), not by a wall clock that a loaded machine overruns."""
    while not ((run / "metrics.csv").exists() and len(metrics_rows(run)) >= epochs):
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)


@pytest.fixture(scope="module")
def resume_data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("resume") / "ds", train_per_class=10, val_per_class=4)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, resume_data) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    result = invoke(["train", "--data", resume_data, *TRAIN_ARGS, "--epochs", "6", "--out", out])
    assert result.exit_code == 0, result.stderr
    return out


def test_sigkill_then_resume_matches_a_straight_run(tmp_path, resume_data, straight_run):
    run = tmp_path / "run"
    process = start_training(["--data", resume_data, *TRAIN_ARGS, "--epochs", "6", "--out", run], tmp_path)
    wait_for_epochs(run, process, 2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = torch.load(run / "last.pt", weights_only=True)["epoch"]
    assert 2 <= killed_at < 6
    assert (run / "run.lock").exists() and run_record(run)["status"] == "running"  # left by the kill
    # the resume runs in this process: what needs a real process is the kill, not the resume
    result = invoke(["train", "--resume", run], cwd=tmp_path)
    assert result.exit_code == 0, result.stderr
    assert not (run / "run.lock").exists()  # the dead process's lock was taken over, then released
    assert run_record(run)["status"] == "finished" and run_record(run)["sessions"] == 2
    assert f"Resuming after epoch {killed_at}" in result.stdout
    assert metrics_rows(run) == metrics_rows(straight_run)
    resumed = torch.load(run / "best.pt", weights_only=True)
    straight = torch.load(straight_run / "best.pt", weights_only=True)
    assert resumed["epoch"] == straight["epoch"]
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    again = invoke(["train", "--resume", run / "last.pt"], cwd=tmp_path)
    assert again.exit_code == 0 and "already finished" in again.stdout


def test_sigint_stops_with_130_and_the_run_resumes(tmp_path, resume_data, straight_run):
    run = tmp_path / "run"
    process = start_training(["--data", resume_data, *TRAIN_ARGS, "--workers", "1", "--epochs", "6",
                              "--out", run], tmp_path)
    wait_for_epochs(run, process, 1)
    process.send_signal(signal.SIGINT)
    started = time.time()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert time.time() - started < 30
    assert "Interrupted" in stderr and "--resume" in stderr and "Traceback" not in stderr
    assert run_record(run)["status"] == "interrupted"
    state = torch.load(run / "last.pt", weights_only=True)
    assert 1 <= state["epoch"] < 6
    assert len(metrics_rows(run)) == state["epoch"]
    # in this process: no second interpreter start, and no wall-clock limit on the epochs left
    result = invoke(["train", "--resume", run, "--workers", "0"])
    assert result.exit_code == 0, result.stderr
    assert metrics_rows(run) == metrics_rows(straight_run)


def run_record(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


def test_a_second_writer_of_a_run_folder_is_refused(tmp_path, straight_run):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom filelock import SoftFileLock\n"
         f"lock = SoftFileLock({str(run / 'run.lock')!r}, timeout=0)\nlock.acquire()\n"
         "print('held', flush=True)\n"
         "time.sleep(120)"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        result = invoke(["train", "--resume", run, "--epochs", "7"])
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 2, result.stderr
    assert "being written by another resnext process" in result.stderr
    assert f"pid {holder.pid}" in result.stderr
    assert len(metrics_rows(run)) == 6 and run_record(run)["status"] == "finished"  # untouched


def test_resume_refuses_changed_settings(tmp_path, straight_run):
    result = invoke(["train", "--resume", straight_run, "--lr", "0.1"], cwd=tmp_path)
    assert result.exit_code == 2 and "--lr cannot be changed" in result.stderr
    nothing = invoke(["train", "--resume", tmp_path], cwd=tmp_path)
    assert nothing.exit_code == 2 and "Cannot resume" in nothing.stderr


def test_resume_with_more_epochs_extends_the_run(tmp_path, straight_run):
    """A finished 6-epoch cosine run extended to 8: the schedule is re-planned over 8 epochs from
    where the run stopped, so epochs 7 and 8 train at the rates a run planned for 8 epochs has
    there (before the fix: epoch 7 began at lr 0, the old plan's end)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    result = invoke(["train", "--resume", run, "--epochs", "8"])
    assert result.exit_code == 0, result.stderr
    rows = metrics_rows(run)
    assert [r["epoch"] for r in rows] == [str(e) for e in range(1, 9)]

    def cosine(epoch: int, epochs: int) -> float:  # --lr 0.003, as each epoch begins
        return 0.003 * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs))

    planned = [cosine(e, 6) for e in range(1, 7)] + [cosine(e, 8) for e in (7, 8)]
    assert [float(r["lr"]) for r in rows] == pytest.approx(planned, abs=1e-6)  # 6 decimals in the file
    assert float(rows[6]["lr"]) > 4e-4 and float(rows[7]["lr"]) > 1e-4


class FillingDisk:
    """A file on a disk with `room` bytes left: writes past it fail as a full disk does."""

    def __init__(self, handle, room: int):
        self.handle, self.room = handle, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(28, "No space left on device")
        self.room -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names open files through /proc")
def test_disk_full_during_a_checkpoint_write(tmp_path, resume_data, monkeypatch):
    """The disk fills half-way through a checkpoint in epoch 2, under the real torch.save (which
    turns the failed write into a bare RuntimeError): the error names the full disk, and epoch
    1's files still load."""
    real_fdopen = os.fdopen
    checkpoints = {"n": 0}

    def fdopen_on_a_filling_disk(fd, *args, **kwargs):
        handle = real_fdopen(fd, *args, **kwargs)
        if ".pt." not in os.readlink(f"/proc/self/fd/{fd}"):
            return handle
        checkpoints["n"] += 1
        return handle if checkpoints["n"] <= 2 else FillingDisk(handle, room=1_000_000)  # epoch 1: best, last

    monkeypatch.setattr(os, "fdopen", fdopen_on_a_filling_disk)
    run = tmp_path / "run"
    result = invoke(["train", "--data", resume_data, *TRAIN_ARGS, "--epochs", "3", "--out", run])
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    assert result.exit_code == 1, result.stderr
    assert "No space left on device" in result.stderr and "MB free there" in result.stderr
    assert "Unexpected failure" not in result.stderr and "Traceback" not in result.stderr
    assert "epoch 3" not in result.stdout  # training did not go on without saving
    for name in ("best.pt", "last.pt"):
        assert torch.load(run / name, weights_only=True)["epoch"] == 1
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def hostile_files(folder: Path) -> list[str]:
    """Files that must be reported as unreadable, never crash anything."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("1", (12000, 12000)).save(folder / "bomb.png")  # 144 Mpx: over Pillow's limit
    good = folder / "_tmp.jpg"
    Image.new("RGB", (300, 300), (9, 9, 9)).save(good)
    (folder / "truncated.jpg").write_bytes(good.read_bytes()[:400])
    good.unlink()
    (folder / "zero.png").write_bytes(b"")
    (folder / "random.jpeg").write_bytes(os.urandom(2048))
    (folder / "folder.jpg").mkdir()
    return ["bomb.png", "truncated.jpg", "zero.png", "random.jpeg", "folder.jpg"]


def test_hostile_images_are_unreadable_not_crashes(tmp_path, trained_run):
    names = hostile_files(tmp_path / "bad")
    for name in names:
        with pytest.raises(Exception):
            images.load_rgb(tmp_path / "bad" / name)
    image_folder(tmp_path / "bad", ["ok.png"])
    out = tmp_path / "preds.csv"
    result = run_subprocess(["batch-predict", tmp_path / "bad", "--checkpoint", trained_run / "best.pt",
                             "--output", out, "--workers", "1"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open())}
    assert set(rows) == {*names, "ok.png"}
    assert all(rows[n]["error"] for n in names) and rows["ok.png"]["class"]
    assert "DecompressionBomb" in rows["bomb.png"]["error"]
    for name in names:
        single = invoke(["predict", tmp_path / "bad" / name, "--checkpoint", trained_run / "best.pt"], cwd=tmp_path)
        assert single.exit_code == 2 and single.stderr.startswith("Error:"), single.stderr
        assert "Traceback" not in single.stderr


def test_hostile_images_in_training_data(tmp_path):
    root = make_dataset(tmp_path / "ds", train_per_class=4, val_per_class=2)
    names = hostile_files(root / "train" / "alpha")
    result = invoke(["train", "--data", root, *TRAIN_ARGS, "--epochs", "1", "--out", tmp_path / "run"])
    assert result.exit_code == 0, result.stderr
    assert "12 train" not in result.stdout and "17 train" in result.stdout  # listed, then reported
    for name in names:
        assert sum(name in line for line in result.stderr.splitlines()) >= 1, name
    # check-data names every one of them (bomb included) and still finds the data trainable
    checked = invoke(["check-data", root, "--json", "--workers", "0"])
    assert checked.exit_code == 0, checked.stderr
    findings = {f["check"]: f for f in json.loads(checked.stdout)["findings"]}
    unreadable = findings["unreadable_files"]["items"]
    assert {Path(item.split(": ")[0]).name for item in unreadable} == set(names)
    assert any("bomb" in item and "DecompressionBomb" in item for item in unreadable)


def test_batch_predict_resume_output(tmp_path, trained_run):
    folder = image_folder(tmp_path / "imgs", [f"{i:02d}.png" for i in range(10)])
    out = tmp_path / "preds.csv"
    base = ["batch-predict", folder, "--checkpoint", trained_run / "best.pt", "--workers", "0",
            "--batch-size", "3", "--topk", "2", "--output", out]
    assert invoke(base).exit_code == 0
    complete = out.read_text()
    # an interrupted run: a .partial with 4 rows and a torn fifth line
    lines = complete.splitlines(keepends=True)
    partial = tmp_path / "preds.csv.partial"
    partial.write_text("".join(lines[:5]) + lines[5][:7])
    out.unlink()
    result = invoke([*base, "--resume-output"])
    assert result.exit_code == 0, result.stderr
    assert "4 image(s) already there, 6 to go" in result.stderr
    assert result.stdout.count("image: ") == 6
    assert same_predictions(out.read_text(), complete) and not partial.exists()
    mismatch = invoke([*base[:-4], "--topk", "3", "--output", out, "--resume-output"])
    assert mismatch.exit_code == 2 and "other columns" in mismatch.stderr
