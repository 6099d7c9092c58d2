"""Nothing a user has is lost (issue 24): run folders, runs/latest and the feature cache only ever
replace what resnext wrote; commands that write into a run folder hold its lock; export replaces
files only with --overwrite; non-UTF-8 file names are written escaped, not crashed on."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

from resnext_cli.model.checkpoint import is_run_folder
from tests.conftest import TINY_TRAIN, invoke, make_dataset
from tests.test_predict import image_folder

QUICK = [*TINY_TRAIN, "--weights", "none", "--epochs", "1", "--seed", "0"]
CACHED = [*TINY_TRAIN, "--weights", "none", "--freeze", "--cache-features", "--epochs", "1", "--seed", "0"]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file and folder under `folder` with its bytes (None for a folder)."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in folder.rglob("*")}


# ---------------------------------------------------------------- run folders (item 1)


def test_train_refuses_a_folder_that_is_not_a_run_of_resnext(tmp_path: Path, dataset: Path):
    mine = tmp_path / "mine"
    (mine / "photos").mkdir(parents=True)
    for name, text in {"config.yaml": "my settings\n", "metrics.csv": "a,b\n1,2\n",
                       "class_indices.json": "{}\n", "report.html": "<p>mine</p>"}.items():
        (mine / name).write_text(text)
    before = snapshot(mine)
    result = invoke(["train", dataset, *QUICK, "--out", mine])
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("Error:") and str(mine) in result.stderr
    for name in ("config.yaml", "metrics.csv", "report.html", "photos/"):
        assert name in result.stderr
    assert snapshot(mine) == before  # not a byte changed, no run.json or run.lock added
    named = tmp_path / "runs" / "mine"
    named.mkdir(parents=True)
    (named / "notes.txt").write_text("x")
    by_name = invoke(["train", dataset, *QUICK, "--name", "mine"], cwd=tmp_path)
    assert by_name.exit_code == 2 and "notes.txt" in by_name.stderr
    assert os.listdir(named) == ["notes.txt"]


def test_train_takes_an_empty_folder_and_restarts_a_run_that_never_completed_an_epoch(
    tmp_path: Path, dataset: Path
):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"\0")  # what a file browser leaves: still empty
    assert invoke(["train", dataset, *QUICK, "--out", empty]).exit_code == 0
    assert (empty / "best.pt").is_file()
    abandoned = tmp_path / "abandoned"  # what a run leaves when killed before its first epoch ended
    abandoned.mkdir()
    record = {"format": "resnext-run/1", "status": "running", "created": "2020-01-01T00:00:00+00:00",
              "started": "2020-01-01T00:00:00+00:00", "ended": None, "wall_seconds": 999.0, "sessions": 1}
    (abandoned / "run.json").write_text(json.dumps(record))
    (abandoned / "config.yaml").write_text("arch: resnet50\n")
    (abandoned / "class_indices.json").write_text('{"0": "x"}\n')
    (abandoned / "split.json").write_text('{"train": [], "val": []}\n')
    result = invoke(["train", dataset, *QUICK, "--out", abandoned])
    assert result.exit_code == 0, result.stderr
    run = json.loads((abandoned / "run.json").read_text())
    assert run["sessions"] == 1 and run["wall_seconds"] < 999 and run["status"] == "finished"
    assert not (abandoned / "split.json").exists()  # the abandoned run's, not this one's (val/ given)
    assert "arch: resnet18" in (abandoned / "config.yaml").read_text()


def test_a_run_from_before_run_json_counts_as_a_run(tmp_path: Path, trained_run: Path, dataset: Path):
    legacy = tmp_path / "legacy"
    shutil.copytree(trained_run, legacy)
    (legacy / "run.json").unlink()
    assert is_run_folder(legacy)
    result = invoke(["train", dataset, *QUICK, "--out", legacy])
    assert result.exit_code == 2 and "already holds a run of resnext" in result.stderr
    assert "--resume" in result.stderr
    foreign = tmp_path / "foreign"  # a best.pt that is not resnext's: not a run, not replaced
    foreign.mkdir()
    torch.save({"weights": torch.zeros(3)}, foreign / "best.pt")
    assert not is_run_folder(foreign)
    refused = invoke(["train", dataset, *QUICK, "--out", foreign])
    assert refused.exit_code == 2 and "not a run of resnext" in refused.stderr and "best.pt" in refused.stderr


# ---------------------------------------------------------------- runs/latest and --run (item 2)


def test_the_pointer_lives_in_the_runs_root_and_never_replaces_a_users_file(tmp_path: Path, dataset: Path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "latest").write_text("my own file\n")
    result = invoke(["train", dataset, *QUICK, "--out", data / "run1"], cwd=tmp_path)
    assert result.exit_code == 0, result.stderr
    assert (data / "latest").read_text() == "my own file\n"  # beside --out: not touched
    pointer = json.loads((tmp_path / "runs" / "latest").read_text())
    assert Path(pointer["run"]) == (data / "run1").resolve()
    image = image_folder(tmp_path / "imgs", ["a.png"]) / "a.png"
    predicted = invoke(["predict", image], cwd=tmp_path)
    assert predicted.exit_code == 0, predicted.stderr
    assert f"Using {(data / 'run1').resolve() / 'best.pt'}: the latest finished run" in predicted.stderr


def test_a_finished_run_never_fails_over_its_pointer(tmp_path: Path, dataset: Path):
    runs = tmp_path / "runs"
    (runs / "latest").mkdir(parents=True)  # a folder of the user's where the pointer would go
    (runs / "latest" / "keep.txt").write_text("x")
    result = invoke(["train", dataset, *QUICK, "--name", "a", "--report", "--workers", "0"], cwd=tmp_path)
    assert result.exit_code == 0, result.stderr
    assert "Not marked as the latest run" in result.stderr and "--run a" in result.stderr
    assert (runs / "a" / "report.html").is_file() and (runs / "latest" / "keep.txt").read_text() == "x"
    shutil.rmtree(runs / "latest")
    (runs / "latest").write_text("a note of mine\n")  # a file resnext did not write
    assert invoke(["train", dataset, *QUICK, "--name", "b"], cwd=tmp_path).exit_code == 0
    assert (runs / "latest").read_text() == "a note of mine\n"
    (runs / "latest").write_text("a\n")  # the one-line pointer of earlier versions: read, and replaced
    image = image_folder(tmp_path / "imgs", ["a.png"]) / "a.png"
    predicted = invoke(["predict", image], cwd=tmp_path)
    assert "runs/a/best.pt: the latest finished run" in predicted.stderr
    assert invoke(["train", dataset, *QUICK, "--name", "c"], cwd=tmp_path).exit_code == 0
    assert json.loads((runs / "latest").read_text())["run"] == "c"


def test_run_name_chooses_a_named_run_in_every_command(tmp_path: Path, trained_run: Path, dataset: Path):
    runs = tmp_path / "runs"
    shutil.copytree(trained_run, runs / "flowers")
    shutil.copytree(trained_run, runs / "throwaway")
    (runs / "latest").write_text(json.dumps({"format": "resnext-latest/1", "run": "throwaway"}))
    images = image_folder(tmp_path / "imgs", ["a.png", "b.png"])
    default = invoke(["predict", images / "a.png"], cwd=tmp_path)
    assert "runs/throwaway/best.pt: the latest finished run" in default.stderr
    chosen = invoke(["predict", images / "a.png", "--run", "flowers"], cwd=tmp_path)
    assert chosen.exit_code == 0 and "Using runs/flowers/best.pt: the run named flowers" in chosen.stderr
    batch = invoke(["batch-predict", images, "--run", "flowers", "--output", tmp_path / "p.csv"], cwd=tmp_path)
    assert batch.exit_code == 0 and "runs/flowers/best.pt" in batch.stderr
    evaluated = invoke(["evaluate", dataset, "--run", "flowers", "--workers", "0"], cwd=tmp_path)
    assert evaluated.exit_code == 0, evaluated.stderr
    assert json.loads((runs / "flowers" / "eval" / "metrics.json").read_text())["checkpoint"] == \
        "runs/flowers/best.pt"
    exported = invoke(["export", "--run", "flowers", "--format", "torchscript"], cwd=tmp_path)
    assert exported.exit_code == 0 and (runs / "flowers" / "export" / "model.torchscript.pt").is_file()
    reported = invoke(["report", "--run", "flowers", "--workers", "0"], cwd=tmp_path)
    assert reported.exit_code == 0 and "Reporting on runs/flowers" in reported.stderr
    unknown = invoke(["predict", images / "a.png", "--run", "nope"], cwd=tmp_path)
    assert unknown.exit_code == 2 and "No run named 'nope'" in unknown.stderr
    assert "flowers, throwaway" in unknown.stderr
    both = invoke(["predict", images / "a.png", "--run", "flowers", "--checkpoint", runs / "a.pt"], cwd=tmp_path)
    assert both.exit_code == 2 and "--run" in both.stderr and "not both" in both.stderr


# ---------------------------------------------------------------- writers of a run folder (item 4)


@contextlib.contextmanager
def held_by_another_process(lock: Path) -> Iterator[int]:
    """The run folder's lock held by a live process (as `train` holds it), for the duration."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom filelock import SoftFileLock\n"
         f"lock = SoftFileLock({str(lock)!r}, timeout=0)\nlock.acquire()\nprint('held', flush=True)\n"
         "time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_commands_that_write_into_a_run_folder_refuse_while_it_is_written(tmp_path: Path, trained_run: Path):
    assert (trained_run / "report.html").is_file() and not (trained_run / "run.lock").exists()  # train's own
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = snapshot(run)
    with held_by_another_process(run / "run.lock") as pid:
        attempts = {
            "report": invoke(["report", run, "--workers", "0"]),
            "evaluate": invoke(["evaluate", "--checkpoint", run / "best.pt", "--workers", "0"]),
            "export": invoke(["export", "--checkpoint", run / "best.pt", "--format", "torchscript"]),
        }
        elsewhere = invoke(["evaluate", "--checkpoint", run / "best.pt", "--workers", "0",
                            "--out", tmp_path / "eval"])  # fmt: skip
    for command, result in attempts.items():
        assert result.exit_code == 2, (command, result.stderr)
        assert "being written by another resnext process" in result.stderr and f"pid {pid}" in result.stderr
    assert elsewhere.exit_code == 0 and (tmp_path / "eval" / "metrics.json").is_file()
    after = snapshot(run)
    after.pop("run.lock", None)  # the killed holder's, left stale
    assert after == before


# ---------------------------------------------------------------- export --overwrite (item 5)


def test_export_replaces_existing_files_only_with_overwrite(tmp_path: Path, trained_run: Path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "class_indices.json").write_text("mine\n")
    args = ["export", "--checkpoint", trained_run / "best.pt", "--format", "torchscript", "--out", out]
    refused = invoke(args)
    assert refused.exit_code == 2 and "class_indices.json" in refused.stderr and "--overwrite" in refused.stderr
    assert os.listdir(out) == ["class_indices.json"] and (out / "class_indices.json").read_text() == "mine\n"
    assert invoke([*args, "--overwrite"]).exit_code == 0
    assert json.loads((out / "class_indices.json").read_text()) == {"0": "alpha", "1": "beta", "2": "gamma"}
    model = out / "model.torchscript.pt"
    inode = model.stat().st_ino
    again = invoke(args)
    assert again.exit_code == 2 and "model.torchscript.pt, class_indices.json, preprocess.json" in again.stderr
    assert model.stat().st_ino == inode
    assert invoke([*args, "--overwrite"]).exit_code == 0 and model.stat().st_ino != inode


# ---------------------------------------------------------------- the feature cache (item 3)


@pytest.fixture
def user_folder_as_cache(tmp_path: Path, monkeypatch) -> Path:
    """RESNEXT_CACHE pointed at a folder of the user's, with .pt files of every kind."""
    root = tmp_path / "my_models"
    (root / "sub").mkdir(parents=True)
    (root / "model.pt").write_bytes(b"my weights")
    (root / "0123456789abcdef0123456789abcdef.pt").write_bytes(b"named like an entry")
    forged = root / "fedcba9876543210fedcba9876543210.pt"  # a sidecar that does not match the file
    forged.write_bytes(b"mine too")
    forged.with_suffix(".json").write_text(json.dumps({"cache": "resnext-feature-cache/1",
                                                       "entry": forged.name, "bytes": 1}))
    (root / "sub" / "x.pt").write_bytes(b"x")
    monkeypatch.setenv("RESNEXT_CACHE", str(root))
    return root


def test_cache_clear_and_the_size_limit_delete_only_what_resnext_wrote(
    tmp_path: Path, dataset: Path, user_folder_as_cache: Path, monkeypatch
):
    root = user_folder_as_cache
    before = snapshot(root)
    result = invoke(["train", dataset, *CACHED, "--feature-views", "2", "--out", tmp_path / "a"])
    assert result.exit_code == 0 and result.stdout.count("Features: cached in") == 2, result.stderr
    listed = json.loads(invoke(["cache", "list", "--json"]).stdout)
    assert len(listed["entries"]) == 2
    assert {Path(p).name for p in listed["foreign"]} == {"model.pt", "0123456789abcdef0123456789abcdef.pt",
                                                         "fedcba9876543210fedcba9876543210.pt",
                                                         "fedcba9876543210fedcba9876543210.json", "sub"}
    monkeypatch.setenv("RESNEXT_CACHE_MAX_GB", "0")  # every older entry must go: only resnext's do
    bounded = invoke(["train", dataset, *CACHED, "--feature-views", "2", "--seed", "1", "--out", tmp_path / "b"])
    assert bounded.exit_code == 0 and "least recently used" in bounded.stdout, bounded.stderr
    cleared = invoke(["cache", "clear"])
    assert cleared.exit_code == 0 and "Removed" in cleared.stdout
    assert "left alone" in cleared.stderr and "model.pt" in cleared.stderr
    left = snapshot(root)
    assert left.pop("resnext-cache.json") is not None  # the marker stays; nothing else of resnext's
    assert left == before


def test_cache_list_tells_each_entrys_view_and_images(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("RESNEXT_CACHE", str(tmp_path / "cache"))
    data = make_dataset(tmp_path / "ds", train_per_class=4, val_per_class=2)  # 12 train, 6 val
    assert invoke(["train", data, *CACHED, "--feature-views", "3", "--out", tmp_path / "run"]).exit_code == 0
    entries = json.loads(invoke(["cache", "list", "--json"]).stdout)["entries"]
    assert sorted((e["view"], e["images"]) for e in entries) == [(0, 18), (1, 12), (2, 12)]
    table = invoke(["cache", "list"]).stdout
    assert "plain+val" in table and "aug 1" in table and "aug 2" in table


def test_an_earlier_versions_entry_is_left_alone_until_a_run_reuses_it(tmp_path: Path, dataset: Path,
                                                                       monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("RESNEXT_CACHE", str(root))
    args = ["train", dataset, *CACHED, "--feature-views", "1"]
    assert invoke([*args, "--out", tmp_path / "a"]).exit_code == 0
    (entry,) = root.glob("*.pt")
    sidecar = json.loads(entry.with_suffix(".json").read_text())
    earlier = {k: v for k, v in sidecar.items() if k not in ("cache", "entry", "bytes")}
    entry.with_suffix(".json").write_text(json.dumps(earlier))  # as resnext wrote it before the marker
    (root / "resnext-cache.json").unlink(missing_ok=True)  # no marker: as before it existed
    invoke(["cache", "clear"])
    assert entry.is_file()  # not provably resnext's: left alone
    reused = invoke([*args, "--out", tmp_path / "b"])
    assert reused.exit_code == 0 and "reusing the cache" in reused.stdout
    assert [Path(e["file"]) for e in json.loads(invoke(["cache", "list", "--json"]).stdout)["entries"]] == [entry]
    invoke(["cache", "clear"])
    assert not entry.exists()


# ---------------------------------------------------------------- non-UTF-8 names (item 14)


def test_non_utf8_file_and_folder_names_are_written_escaped(tmp_path: Path):
    data = make_dataset(tmp_path / "flat", train_per_class=8, split_folders=False)
    raw = os.fsencode(data)
    try:
        os.rename(raw + b"/beta", raw + b"/b\xe9ta")  # latin-1 bytes: not UTF-8
        os.rename(raw + b"/alpha/alpha_00.png", raw + b"/alpha/al\xffpha.png")
        (Path(os.fsdecode(raw + b"/gamma/\xfe.jpg"))).write_bytes(b"not an image")
    except (OSError, UnicodeError):
        pytest.skip("this file system only takes UTF-8 names")
    beta = os.fsdecode(b"b\xe9ta")  # how Python names it: 'b\udce9ta'
    run = tmp_path / "run"
    result = invoke(["train", data, *CACHED, "--epochs", "2", "--val-split", "0.25", "--report",
                     "--workers", "0", "--out", run])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    for name in ("best.pt", "last.pt", "metrics.csv", "split.json", "report.html", "eval/metrics.json"):
        assert (run / name).is_file(), name
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    classes = json.loads((run / "class_indices.json").read_bytes().decode("utf-8"))  # strict UTF-8
    assert classes == {"0": "alpha", "1": beta, "2": "gamma"}  # read back as the same name
    assert torch.load(run / "best.pt", weights_only=True)["classes"] == ["alpha", beta, "gamma"]
    split = json.loads((run / "split.json").read_bytes().decode("utf-8"))
    on_disk = {os.fsdecode(os.path.join(d, f)) for d, _, files in os.walk(raw) for f in files}
    assert set(split["train"]) | set(split["val"]) == on_disk  # lossless: every name as it is
    assert "b\\udce9ta" in (run / "report.html").read_bytes().decode("utf-8")
    evaluated = invoke(["evaluate", "--checkpoint", run / "best.pt", "--workers", "0", "--out", tmp_path / "e"])
    assert evaluated.exit_code == 0, evaluated.stderr
    assert "split.json" in json.loads((tmp_path / "e" / "metrics.json").read_text())["images"]
