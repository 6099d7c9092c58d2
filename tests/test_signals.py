"""Issue 24, items 16 and 17: SIGTERM (kill, schedulers, containers) and a closed stdout
(`| head`) stop a command as cleanly as Ctrl-C does. Real processes and real signals.

Before the fix SIGTERM killed train with -15, no message, and its decoding worker outlived it
for up to 10 s; a closed stdout was an "Unexpected failure ... bug in resnext"."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import invoke, make_dataset
from tests.test_predict import image_folder
from tests.test_reliability import TRAIN_ARGS, metrics_rows, wait_for_epochs

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc")


def resnext(args: list, cwd: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "resnext_cli", *map(str, args)], cwd=cwd, text=True,
                            **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kwargs})  # fmt: skip


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (its decoding workers), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("whole_group", [False, True], ids=["kill PID", "kill the process group"])
def test_sigterm_stops_training_resumably_with_143_and_no_worker_left(tmp_path: Path, whole_group: bool):
    """`kill PID` (a container stopping) and SIGTERM to the whole process group (a scheduler's
    job step: the decoding workers get it too) both end as Ctrl-C does, with 143."""
    data = make_dataset(tmp_path / "ds", train_per_class=10, val_per_class=4)
    run = tmp_path / "run"
    process = resnext(["train", data, *TRAIN_ARGS, "--workers", "1", "--epochs", "6", "--out", run],
                      tmp_path, start_new_session=whole_group)  # fmt: skip
    wait_for_epochs(run, process, 1)
    workers = children(process.pid)
    assert workers, "no decoding worker to check"
    if whole_group:
        os.killpg(process.pid, signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "Error: Terminated (SIGTERM) during epoch" in stderr and f"--resume {run}" in stderr
    assert "Traceback" not in stderr and "Unexpected" not in stderr and stderr.count("\n") == 1, stderr
    assert not [pid for pid in workers if running(pid)], "a decoding worker outlived the run"
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    done = torch.load(run / "last.pt", weights_only=True)["epoch"]
    assert 1 <= done < 6 and len(metrics_rows(run)) == done
    resumed = invoke(["train", "--resume", run, "--workers", "0", "--epochs", done + 1])
    assert resumed.exit_code == 0, resumed.stderr
    assert len(metrics_rows(run)) == done + 1


@pytest.mark.skipif(not hasattr(fcntl, "F_SETPIPE_SZ"), reason="sizes a pipe (Linux)")
def test_sigterm_keeps_batch_predict_resumable(tmp_path: Path, trained_run: Path):
    """batch-predict is stopped part-way at a point the test controls: its stdout is a 4 KB pipe
    nobody reads, so once that (and Python's buffer) is full it blocks printing a line. SIGTERM
    then ends it with 143, and its .partial file continues with --resume-output."""
    names = [f"{'long_name_' * 20}{i:03d}.png" for i in range(120)]  # ~300-byte lines: 40 fill 12 KB
    folder = image_folder(tmp_path / "imgs", names)
    out, partial = tmp_path / "preds.csv", tmp_path / "preds.csv.partial"
    args = ["batch-predict", folder, "--checkpoint", trained_run / "best.pt", "--workers", "0",
            "--batch-size", "4", "--output", out]  # fmt: skip
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    process = resnext(args, tmp_path, stdout=write_end)
    os.close(write_end)
    while not (partial.is_file() and len(partial.read_text().splitlines()) > 1):
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    with os.fdopen(read_end) as printed:
        printed.read()  # unblocks it; ends when the process does
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == 143, stderr
    assert "Error: Terminated (SIGTERM)." in stderr and "--resume-output continues it" in stderr
    assert "Traceback" not in stderr and not out.exists()
    done = len(partial.read_text().splitlines()) - 1
    assert 0 < done < len(names)
    resumed = invoke([*args, "--resume-output"])
    assert resumed.exit_code == 0, resumed.stderr
    assert f"{done} image(s) already there, {len(names) - done} to go" in resumed.stderr
    rows = list(csv.DictReader(out.open()))
    assert sorted(Path(r["path"]).name for r in rows) == names and all(r["class"] for r in rows)


@pytest.mark.parametrize("command", ["predict", "batch-predict", "train"])
def test_a_closed_stdout_ends_quietly(tmp_path: Path, trained_run: Path, dataset: Path, command: str):
    """`resnext ... | head`: when the reader goes, the command ends with 141 and no error, as
    other Unix tools do; train, after an epoch, first says how to resume."""
    run = tmp_path / "run"
    args = {
        "predict": ["predict", *sorted((dataset / "val" / "alpha").iterdir())[:2],
                    "--checkpoint", trained_run / "best.pt"],
        "batch-predict": ["batch-predict", dataset / "val" / "beta", "--checkpoint",
                          trained_run / "best.pt", "--workers", "0", "--batch-size", "2"],
        "train": ["train", dataset, *TRAIN_ARGS, "--epochs", "4", "--out", run],
    }[command]  # fmt: skip
    process = resnext(args, tmp_path)
    if command == "train":  # the reader takes the first epoch's row, then goes (`| head -5`)
        while not process.stdout.readline().lstrip().startswith("1 "):
            assert process.poll() is None
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 141, stderr
    assert "Traceback" not in stderr and "Unexpected" not in stderr and "Exception ignored" not in stderr
    if command == "train":
        assert "stdout was closed" in stderr and f"--resume {run}" in stderr
        assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    else:
        assert "Error" not in stderr, stderr


def _sleep_in_child() -> None:
    time.sleep(60)


def test_a_pool_terminated_as_soon_as_it_starts_does_not_hang():
    """A process forked while a command runs (cleanlab's and check-data's worker pools) ends on
    SIGTERM at once, however early it comes. Before, the child inherited the command's handler
    and Python dropped a SIGTERM that arrived before its after-fork work was done: `with
    Pool(...)` on small data terminated its workers right after starting them, one lived on and
    the command (a whole test suite once) waited for it forever. Many tries, because the gap is
    short: each child must end by the signal itself (-15), not by the handler's exception (1)."""
    import multiprocessing

    from resnext_cli.cli import sigterm_as_interrupt

    fork = multiprocessing.get_context("fork")
    with sigterm_as_interrupt():
        for _ in range(30):
            child = fork.Process(target=_sleep_in_child)
            child.start()
            child.terminate()
            child.join(10)
            if child.exitcode is None:
                child.kill()
            assert child.exitcode == -signal.SIGTERM
        with fork.Pool(2) as pool:  # what cleanlab does, on a task that is done at once
            assert pool.map(abs, [-1, 2]) == [1, 2]
