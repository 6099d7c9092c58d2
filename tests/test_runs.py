"""`resnext runs` (finished, failed, interrupted, killed, running and older runs told apart),
`runs --compare A B`, and `report RUN --compare OTHER`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from resnext_cli.commands.train import TrainRecipe
from resnext_cli.files import lock_state
from resnext_cli.model.checkpoint import best_of_run
from tests.conftest import TINY_TRAIN, invoke

TRAIN = [*TINY_TRAIN, "--weights", "none", "--freeze", "--seed", "0", "--lr", "0.02", "--epochs", "3"]
SMALL_FILES = ("run.json", "config.yaml", "metrics.csv", "class_indices.json")


def copy_run(source: Path, target: Path) -> Path:
    """A run folder's small files (enough to list and compare it), modification times kept."""
    target.mkdir(parents=True)
    for name in SMALL_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    return target


def set_record(run: Path, **values) -> None:
    record = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**record, **values}))


def lock_of(run: Path, alive: bool) -> subprocess.Popen | None:
    """run.lock as filelock leaves it: held by a live process, or by one killed holding it."""
    code = (f"from filelock import SoftFileLock\nimport os, sys, time\n"
            f"lock = SoftFileLock({str(run / 'run.lock')!r}, timeout=0)\nlock.acquire()\n"
            "print('held', flush=True)\n"
            + ("time.sleep(300)\n" if alive else "os._exit(0)\n"))  # fmt: skip
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    if alive:
        return process
    process.wait()
    return None


def stopping_at_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int, error: BaseException) -> None:
    real = TrainRecipe.run_epoch

    def run_epoch(self, number):
        if number == epoch:
            raise error
        return real(self, number)

    monkeypatch.setattr(TrainRecipe, "run_epoch", run_epoch)


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory, dataset: Path, trained_run: Path) -> Path:
    """runs/ with one run of each kind: finished, failed and interrupted (trained here), killed
    and running (a copy with its lock), and two from before run.json (finished, stopped)."""
    root = tmp_path_factory.mktemp("listing") / "runs"
    assert invoke(["train", dataset, *TRAIN, "--out", root / "done"]).exit_code == 0
    with pytest.MonkeyPatch.context() as patch:
        stopping_at_epoch(patch, 2, RuntimeError("a bug"))
        assert invoke(["train", dataset, *TRAIN, "--out", root / "broken"]).exit_code == 1
    with pytest.MonkeyPatch.context() as patch:
        stopping_at_epoch(patch, 3, KeyboardInterrupt())
        assert invoke(["train", dataset, *TRAIN, "--out", root / "stopped_by_user"]).exit_code == 130
    copy_run(trained_run, root / "killed")
    set_record(root / "killed", status="running", ended=None)
    lock_of(root / "killed", alive=False)
    copy_run(trained_run, root / "old")
    (root / "old" / "run.json").unlink()
    copy_run(trained_run, root / "old_unfinished")
    (root / "old_unfinished" / "run.json").unlink()
    lines = (root / "old_unfinished" / "metrics.csv").read_text().splitlines()
    (root / "old_unfinished" / "metrics.csv").write_text("\n".join(lines[:3]) + "\n")  # 2 of 6 epochs
    (root / "audit").mkdir()  # not a run: not listed
    (root / "latest").write_text("done\n")
    return root


def test_runs_tells_finished_failed_interrupted_killed_running_and_old_runs_apart(runs_root: Path):
    running = copy_run(runs_root / "done", runs_root / "live")
    set_record(running, status="running", ended=None)
    holder = lock_of(running, alive=True)
    try:
        result = invoke(["runs", runs_root, "--json"])
    finally:
        holder.kill()
        holder.wait()
        shutil.rmtree(running)
    assert result.exit_code == 0, result.stderr
    listed = {run["name"]: run for run in json.loads(result.stdout)}
    assert {name: run["status"] for name, run in listed.items()} == {
        "done": "finished", "broken": "failed", "stopped_by_user": "interrupted", "killed": "killed",
        "live": "running", "old": "finished", "old_unfinished": "stopped"}  # fmt: skip
    assert listed["live"]["wall_seconds"] > listed["done"]["wall_seconds"]  # counting up to now
    done_epochs = [listed[n]["epochs_done"] for n in ("done", "broken", "stopped_by_user", "old_unfinished")]
    assert done_epochs == [3, 1, 2, 2]
    done = listed["done"]
    assert done["arch"] == "resnet18" and done["epochs"] == 3 and done["wall_from"] == "run.json"
    rows = [line.split(",") for line in (runs_root / "done" / "metrics.csv").read_text().splitlines()[1:]]
    best = max(rows, key=lambda r: float(r[4]))
    # best.pt's, as run.json records it (unrounded), at the epoch metrics.csv shows best
    assert done["best_val_acc"] == pytest.approx(float(best[4]), abs=1e-6) and done["best_epoch"] == int(best[0])
    assert done["best_val_acc"] == json.loads((runs_root / "done" / "run.json").read_text())["best"]["val_acc"]
    assert done["wall_seconds"] == json.loads((runs_root / "done" / "run.json").read_text())["wall_seconds"]
    assert listed["old"]["wall_from"] == "epochs" and listed["old"]["wall_seconds"] > 0

    table = invoke(["runs", runs_root])
    assert table.exit_code == 0
    lines = {line.split()[0]: line for line in table.stdout.splitlines() if line.strip()}
    assert "resnet18" in lines["done"] and "3/3" in lines["done"] and "finished" in lines["done"]
    assert "killed" in lines["killed"] and "`resnext train --resume RUN` continues it" in table.stdout
    assert re.search(r" ~\d", lines["old"]) and "audit" not in lines


def test_runs_sort_by_accuracy_best_first(runs_root: Path):
    result = invoke(["runs", runs_root, "--sort", "acc", "--json"])
    assert result.exit_code == 0
    accuracies = [run["best_val_acc"] for run in json.loads(result.stdout)]
    assert accuracies == sorted(accuracies, reverse=True)
    by_name = json.loads(invoke(["runs", runs_root, "--sort", "name", "--json"]).stdout)
    names = [run["name"] for run in by_name]
    assert names == sorted(names)
    assert invoke(["runs", runs_root, "--sort", "accuracy"]).exit_code == 2


def test_runs_compare_shows_config_differences_and_metrics_side_by_side(tmp_path: Path, trained_run: Path):
    a = copy_run(trained_run, tmp_path / "runs" / "a")
    b = copy_run(trained_run, tmp_path / "runs" / "b")
    config = (b / "config.yaml").read_text()
    (b / "config.yaml").write_text(config.replace("lr: 0.02", "lr: 0.05") + "notes: second try\n")
    metrics = (b / "metrics.csv").read_text().splitlines()
    (b / "metrics.csv").write_text("\n".join(metrics[:3]) + "\n")
    result = invoke(["runs", "--compare", "a", "b"], cwd=tmp_path)
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert re.search(r"^lr\s+0\.02\s+0\.05\s*$", out, re.M)
    assert re.search(r"^notes\s+\(absent\)\s+second try", out, re.M)
    assert "2 config difference(s)" in out and re.search(r"^epochs\s+6/6\s+2/6", out, re.M)
    as_json = json.loads(invoke(["runs", "--compare", a, b, "--json"]).stdout)
    assert as_json["config_differences"] == {"lr": {"a": 0.02, "b": 0.05},
                                             "notes": {"b": "second try"}}
    assert [r["epochs_done"] for r in as_json["runs"]] == [6, 2]
    missing = invoke(["runs", "--compare", "a", "nope"], cwd=tmp_path)
    assert missing.exit_code == 2 and "nope is not a run folder" in missing.stderr
    assert "Runs in runs: a, b" in missing.stderr


def test_runs_on_an_empty_or_missing_folder(tmp_path: Path):
    (tmp_path / "runs").mkdir()
    empty = invoke(["runs"], cwd=tmp_path)
    assert empty.exit_code == 0 and "No run folders in runs" in empty.stdout
    assert invoke(["runs", "--json"], cwd=tmp_path).stdout.strip() == "[]"
    missing = invoke(["runs", tmp_path / "nowhere"])
    assert missing.exit_code == 2 and "is not a folder" in missing.stderr


def test_report_compare_overlays_the_other_run(tmp_path: Path, trained_run: Path):
    run = tmp_path / "runs" / "exp"
    shutil.copytree(trained_run, run)  # copy2: eval/ stays newer than best.pt, no re-evaluation
    other = copy_run(trained_run, tmp_path / "runs" / "exp2")
    (other / "config.yaml").write_text((other / "config.yaml").read_text().replace("lr: 0.02", "lr: 0.05"))
    result = invoke(["report", run, "--compare", "exp2"])
    assert result.exit_code == 0, result.stderr
    page = (run / "report.html").read_text()
    section = page[page.index('<h2 id="compare">Compared with exp2</h2>'):page.index('<h2 id="confusion">')]
    assert section.count("<img") == 1 and "data:image/png;base64," in section
    assert re.search(r"<td>lr</td><td>0\.02</td><td>0\.05</td>", section)
    assert "<td>best val acc</td>" in section
    plain = invoke(["report", run])
    assert plain.exit_code == 0 and 'id="compare"' not in (run / "report.html").read_text()
    wrong = invoke(["report", run, "--compare", "nope"])
    assert wrong.exit_code == 2 and "nope is not a run folder" in wrong.stderr


def test_lock_state_tells_a_dead_holder_from_a_live_one(tmp_path: Path):
    assert lock_state(tmp_path / "run.lock") == "none"
    lock_of(tmp_path, alive=False)
    assert lock_state(tmp_path / "run.lock") == "stale"
    (tmp_path / "run.lock").unlink()
    holder = lock_of(tmp_path, alive=True)
    try:
        assert lock_state(tmp_path / "run.lock") == "held"
    finally:
        holder.kill()
        holder.wait()
    other_host = tmp_path / "other.lock"
    other_host.write_text("1\nsome-other-host\n123\n")
    assert lock_state(other_host) == "held"  # cannot be checked from here


def test_help_shows_the_new_options_and_their_defaults():
    from tests.test_cli import help_rows

    train = help_rows("train")
    assert any(re.match(r"\s*--track\s+NAMES\s.*\[default: none\]", row) for row in train)
    assert any(re.match(r"\s*--track-checkpoints\s.*\[default: off\]", row) for row in train)
    runs = help_rows("runs")
    assert any(re.match(r"\s*--sort\s+KEY\s.*\[default: date\]", row) for row in runs)
    assert any(re.match(r"\s*ROOT\s.*\[default: runs\]", row) for row in runs)
    assert any(re.match(r"\s*--compare\s+A B\s", row) for row in runs)
    assert any(re.match(r"\s*--compare\s+OTHER\s", row) for row in help_rows("report"))


def test_best_numbers_are_best_pt_s_run_json_first_then_the_select_by_epoch():
    """`resnext runs`, the "Using" line and the report show best.pt's numbers: run.json's `best`
    where a finished run recorded it (its head may differ from its epoch's row), else the row
    of the epoch --select-by chose (the first of a tie; an unreadable value never wins)."""
    rows = [{"epoch": "1", "val_acc": "0.5", "val_balanced_acc": "0.4"},
            {"epoch": "2", "val_acc": "0.9", "val_balanced_acc": "nan"},
            {"epoch": "3", "val_acc": "0.7", "val_balanced_acc": "0.6"},
            {"epoch": "4", "val_acc": "0.6", "val_balanced_acc": "0.6"}]  # fmt: skip
    by_accuracy = best_of_run(None, {}, rows)
    assert (by_accuracy["epoch"], by_accuracy["val_acc"]) == (2, 0.9)
    assert best_of_run(None, {"select_by": "balanced_acc"}, rows) == \
        {"epoch": 3, "val_acc": 0.7, "val_balanced_acc": 0.6}  # fmt: skip
    recorded = {"best": {"epoch": 3, "val_acc": 0.55, "val_balanced_acc": 0.61}}
    assert best_of_run(recorded, {"select_by": "balanced_acc"}, rows) == recorded["best"]
    assert best_of_run({"best": "damaged"}, {}, rows)["epoch"] == 2
    assert best_of_run(None, {}, []) is None
