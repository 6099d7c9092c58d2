"""`train --track tensorboard,mlflow`, read back with the trackers' own readers: TensorBoard's
EventAccumulator and MLflow's MlflowClient on a file store in the test's folder."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from resnext_cli.outputs import tracking
from tests.conftest import TINY_TRAIN, invoke, make_dataset
from tests.test_reliability import start_training, wait_for_epochs

TRACKED = [*TINY_TRAIN, "--weights", "none", "--freeze", "--seed", "0", "--lr", "0.02"]


@pytest.fixture(autouse=True)
def local_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's default store (./mlruns in the folder train runs from), whatever the machine says."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for the reading client, as train sets it


def metrics_csv(run: Path) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in row.items()} for row in csv.DictReader((run / "metrics.csv").open())]


def tensorboard(run: Path) -> EventAccumulator:
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def mlflow_run(run: Path) -> tuple[MlflowClient, str]:
    record = json.loads((run / "tracking.json").read_text())["mlflow"]
    return MlflowClient(tracking_uri=record["tracking_uri"]), record["run_id"]


def steps(series: list) -> list[tuple[int, float]]:
    return [(int(point.step), float(point.value)) for point in series]


def test_every_epoch_of_metrics_csv_is_in_tensorboard_and_mlflow(tmp_path: Path, dataset: Path):
    """--unfreeze-after 1: two parameter groups, whose rates are logged apart."""
    result = invoke(["train", dataset, *TRACKED, "--epochs", "3", "--unfreeze-after", "1", "--report",
                     "--track", "tensorboard,mlflow", "--out", "runs/tracked"], cwd=tmp_path)  # fmt: skip
    assert result.exit_code == 0, result.stdout + result.stderr
    run = tmp_path / "runs" / "tracked"
    rows = metrics_csv(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert "Tracking: TensorBoard in runs/tracked/tb, MLflow in " + str(tmp_path / "mlruns") in result.stdout

    events = tensorboard(run)
    client, run_id = mlflow_run(run)
    for column, name in [("train_loss", "train/loss"), ("train_acc", "train/acc"), ("val_loss", "val/loss"),
                         ("val_acc", "val/acc"), ("lr", "lr/head")]:  # fmt: skip
        expected = [(int(r["epoch"]), r[column]) for r in rows]
        for logged in (steps(events.Scalars(name)), steps(client.get_metric_history(run_id, name))):
            assert [e for e, _ in logged] == [1, 2, 3], name
            assert all(abs(v - x) < 1e-6 for (_, v), (_, x) in zip(logged, expected)), (name, logged)
    backbone = steps(client.get_metric_history(run_id, "lr/backbone"))
    assert [(e, pytest.approx(0.1 * r["lr"], rel=1e-5)) for e, r in zip([1, 2, 3], rows)] == backbone
    assert steps(events.Scalars("lr/backbone")) == [(e, pytest.approx(v, rel=1e-5)) for e, v in backbone]

    curves = events.Images("curves")
    assert [c.step for c in curves] == [3]
    assert curves[0].encoded_image_string == (run / "results.png").read_bytes()
    matrix = events.Images("confusion_matrix")[0]
    assert matrix.encoded_image_string == (run / "confusion_matrix.png").read_bytes()
    hparams = events.PluginTagToContent("hparams")
    assert b"resnet18" in hparams["_hparams_/session_start_info"]
    assert b"val/acc" in hparams["_hparams_/experiment"]

    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED" and logged.info.run_name == "tracked"
    assert client.get_experiment(logged.info.experiment_id).name == "resnext"
    assert logged.data.params["arch"] == "resnet18" and logged.data.params["epochs"] == "3"
    assert logged.data.params["track"] == "tensorboard,mlflow"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "metrics.csv", "results.png", "confusion_matrix.png", "report.html", "run.json",
            "class_indices.json", "eval"} <= artifacts  # fmt: skip
    assert not {"best.pt", "last.pt", "run.lock", "tracking.json", "tb"} & artifacts
    assert "eval/metrics.json" in {a.path for a in client.list_artifacts(run_id, "eval")}


def test_a_killed_run_resumed_continues_the_same_tracker_runs(tmp_path: Path):
    """SIGKILL after two epochs, then --resume: one MLflow run and one TensorBoard run, each
    holding every epoch once, equal to metrics.csv; with --track-checkpoints best.pt goes too.
    The run is planned far longer than the kill needs (the trackers open in their own thread,
    which a slow machine can hold back for many tiny epochs) and resumed to 2 epochs past the
    kill, so the test does not depend on the machine's speed."""
    data = make_dataset(tmp_path / "ds", train_per_class=10, val_per_class=4)
    run = tmp_path / "runs" / "killed"
    process = start_training([data, *TRACKED, "--epochs", "500", "--track", "tensorboard,mlflow",
                              "--out", run], tmp_path)  # fmt: skip
    wait_for_epochs(run, process, 2)
    while not (run / "tracking.json").exists():
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = torch.load(run / "last.pt", weights_only=True)["epoch"]
    assert 2 <= killed_at < 500
    epochs = list(range(1, killed_at + 3))
    first = json.loads((run / "tracking.json").read_text())["mlflow"]["run_id"]
    listed = invoke(["runs", tmp_path / "runs", "--json"])
    assert [r["status"] for r in json.loads(listed.stdout)] == ["killed"]  # not "running": its pid is dead

    # resumed in this process (the autouse fixture sets MLFLOW_ALLOW_FILE_STORE): only the kill needs a real one
    resumed = invoke(["train", "--resume", run, "--epochs", len(epochs), "--track-checkpoints"], cwd=tmp_path)
    assert resumed.exit_code == 0, resumed.stderr
    assert "logging stopped" not in resumed.stderr
    client, run_id = mlflow_run(run)
    assert run_id == first
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
    assert client.get_run(run_id).info.status == "FINISHED"
    expected = [(int(r["epoch"]), r["val_acc"]) for r in metrics_csv(run)]
    assert [e for e, _ in expected] == epochs
    for logged in (steps(client.get_metric_history(run_id, "val/acc")),
                   steps(tensorboard(run).Scalars("val/acc"))):
        assert [e for e, _ in logged] == epochs  # every epoch once, none twice
        assert all(abs(v - x) < 1e-6 for (_, v), (_, x) in zip(logged, expected))
    assert "best.pt" in {a.path for a in client.list_artifacts(run_id)}


def test_a_failing_tracker_warns_once_and_training_goes_on(tmp_path: Path, dataset: Path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")

    def broken(self, epoch, metrics):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tracking.TensorBoardLog, "log", broken)
    result = invoke(["train", dataset, *TRACKED, "--epochs", "3", "--track", "mlflow,tensorboard",
                     "--out", tmp_path / "run"])  # fmt: skip
    assert result.exit_code == 0, result.stdout + result.stderr
    assert result.stderr.count("TensorBoard logging stopped (OSError: [Errno 28] No space left") == 1
    assert result.stderr.count("MLflow logging stopped (") == 1
    assert "Training goes on" in result.stderr
    assert [r["epoch"] for r in metrics_csv(tmp_path / "run")] == [1, 2, 3]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "finished"


def test_a_tracker_not_installed_says_what_to_install_before_any_work(tmp_path, dataset, monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name: None if name == "mlflow" else real(name))
    result = invoke(["train", dataset, *TRACKED, "--track", "tensorboard,mlflow", "--out", tmp_path / "run"])
    assert result.exit_code == 2
    assert "--track mlflow needs mlflow" in result.stderr
    assert "pip install 'resnext-cli[mlflow]'" in result.stderr
    assert not (tmp_path / "run").exists()
    unknown = invoke(["train", dataset, *TRACKED, "--track", "tensorboard,wandb", "--out", tmp_path / "run"])
    assert unknown.exit_code == 2 and "Invalid track 'wandb'" in unknown.stderr
    assert "tensorboard, mlflow" in unknown.stderr


def test_every_numeric_column_of_a_row_is_logged_whatever_columns_it_has():
    """Columns other branches append to metrics.csv (e.g. val_balanced_acc) need no tracker change."""
    row = {"epoch": 4, "train_loss": 0.5, "train_acc": 0.8, "val_loss": 0.6, "val_acc": 0.75, "lr": 1e-3,
           "seconds": 2.0, "val_balanced_acc": 0.7, "val_macro_f1": 0.69, "note": "text", "flag": True}
    metrics = tracking.epoch_metrics(row, lambda head: {"backbone": head / 10, "head": head})
    assert metrics == {"train/loss": 0.5, "train/acc": 0.8, "val/loss": 0.6, "val/acc": 0.75, "seconds": 2.0,
                       "val/balanced_acc": 0.7, "val/macro_f1": 0.69, "lr/backbone": 1e-4, "lr/head": 1e-3}


def test_trackers_work_off_the_training_thread_and_the_end_waits_for_them(monkeypatch, capsys):
    """A slow tracker costs the epoch nothing; it gets the epochs it lacks, in order, then the end."""

    class Slow:
        name = "Slow"

        def __init__(self) -> None:
            self.calls: list = []

        def open(self, config):
            self.calls.append(("open", config))
            return 1  # it already holds epoch 1

        def log(self, epoch, metrics):
            time.sleep(0.3)
            self.calls.append((epoch, metrics["val/acc"], metrics["lr/head"]))

        def close(self, status):
            self.calls.append(status)

    def row(epoch: int) -> dict:
        return {"epoch": epoch, "train_loss": 1.0, "val_acc": epoch / 10, "lr": 0.5 / epoch}

    monkeypatch.setattr(tracking, "WAIT_NOTE_SECONDS", 0.1)
    slow = Slow()
    tracked = tracking.Tracking([slow], lambda head: {"head": head})
    tracked.open({"arch": "resnet18"}, [row(1), row(2)])
    started = time.perf_counter()
    tracked.log_epoch(row(3))
    assert time.perf_counter() - started < 0.1
    tracked.end("interrupted")
    assert slow.calls == [("open", {"arch": "resnet18"}), (2, 0.2, 0.25), (3, 0.3, 0.5 / 3), "interrupted"]
    assert "Waiting for Slow to take the last of the run" in capsys.readouterr().out


def test_only_rank_0_tracks_under_torchrun(tmp_path: Path):
    data = make_dataset(tmp_path / "ds", train_per_class=6, val_per_class=3)
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "resnext_cli", "train", str(data), *TRACKED, "--epochs", "2", "--batch-size", "4",
         "--track", "tensorboard,mlflow", "--out", "ddp"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true"},
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert len(list((tmp_path / "ddp" / "tb").glob("events.out.tfevents.*"))) == 1
    client, run_id = mlflow_run(tmp_path / "ddp")
    experiment = client.get_run(run_id).info.experiment_id
    assert [r.info.run_id for r in client.search_runs([experiment])] == [run_id]
    assert [s for s, _ in steps(client.get_metric_history(run_id, "val/acc"))] == [1, 2]
    assert ddp.stdout.count("Tracking: ") == 1
