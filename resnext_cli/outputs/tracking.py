"""Experiment trackers for `train --track tensorboard,mlflow`: TensorBoard event files in RUN/tb/,
and a run in an MLflow store (./mlruns, MLflow's local file store, or MLFLOW_TRACKING_URI).

Training calls a `Tracking` at three points: `start_tracking` once the run folder and the
optimiser exist, `log_epoch` with each epoch's metrics.csv row, and `end` with the session's
status. Every call is handed to one background thread and returns at once, so a slow or
unreachable tracker never holds up an epoch; a tracker that raises is dropped with one warning
and training goes on. When a tracker opens, what it already holds is read back and the epochs it
lacks are logged (a resume, or a session killed before its queue drained): a resumed run
continues the same tracker run, every epoch in it once. Only torchrun's rank 0 tracks.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import queue
import threading
import time
import urllib.parse
from functools import partial
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from resnext_cli import ui
from resnext_cli.config import TrainConfig, tracker_names
from resnext_cli.errors import UserError
from resnext_cli.files import atomic_write_text
from resnext_cli.model.checkpoint import RUN_LOCK

TRACKING_FILE = "tracking.json"  # in the run folder: the MLflow run that a resume continues
TENSORBOARD_FOLDER = "tb"
MLFLOW_EXPERIMENT = "resnext"  # unless MLFLOW_EXPERIMENT_NAME or MLFLOW_EXPERIMENT_ID says otherwise
MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED"}  # any other end (Ctrl-C, SIGTERM): KILLED
INSTALL = {  # tracker -> (the module it needs, what to install)
    "tensorboard": ("tensorboard", "pip install 'resnext-cli[tensorboard]'  (tensorboard)"),
    "mlflow": ("mlflow", "pip install 'resnext-cli[mlflow]'  (mlflow-skinny)"),
}
WAIT_NOTE_SECONDS = 5.0  # at the end, say so when the trackers take longer than this
Rates = Callable[[float], dict[str, float]]  # the head's rate -> every parameter group's


def check_installed(track: str | list[str] | None) -> None:
    """Before any work: each tracker asked for can be imported, else what to install."""
    missing = [name for name in tracker_names(track) if importlib.util.find_spec(INSTALL[name][0]) is None]
    if missing:
        raise UserError(
            f"--track {','.join(missing)} needs {' and '.join(INSTALL[n][0] for n in missing)}, "
            f"which is not installed. Install it with: {'; '.join(INSTALL[n][1] for n in missing)}; "
            "or leave it out of --track."
        )


def metric_name(column: str) -> str:
    """A metrics.csv column as the trackers name it: train_loss -> train/loss, val_balanced_acc
    -> val/balanced_acc (grouped by split in both UIs); other columns keep their name."""
    split, _, rest = column.partition("_")
    return f"{split}/{rest}" if split in ("train", "val") and rest else column


def epoch_metrics(row: dict[str, Any], rates: Rates) -> dict[str, float]:
    """Every numeric column of an epoch's row, whichever columns it has, and the learning rate of
    each parameter group (`lr/head`, `lr/backbone`; the row's `lr` column is the head's)."""
    metrics = {metric_name(key): float(value) for key, value in row.items()
               if key not in ("epoch", "lr") and _is_number(value)}  # fmt: skip
    metrics.update({f"lr/{group}": rate for group, rate in rates(float(row["lr"])).items()})
    return metrics


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------- the background thread


class Tracking:
    """The trackers of one run, driven from one background thread in the order of the calls."""

    def __init__(self, trackers: list[Any], rates: Rates) -> None:
        self.trackers, self.rates = trackers, rates
        self.tasks: queue.Queue = queue.Queue()
        self.failed: dict[str, str] = {}  # tracker -> why it stopped (written by the thread)
        self.reported: set[str] = set()
        self.thread: threading.Thread | None = None
        if trackers:  # a daemon: a tracker that hangs never keeps the process alive
            self.thread = threading.Thread(target=self._work, name="resnext-tracking", daemon=True)
            self.thread.start()

    @classmethod
    def off(cls) -> Tracking:
        """No tracker (no --track, or not rank 0): every call does nothing."""
        return cls([], lambda rate: {})

    def open(self, config: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        """Open each tracker, then log the epochs of `rows` (a resumed run's) that it lacks."""
        done = [(int(row["epoch"]), epoch_metrics(row, self.rates)) for row in rows]
        for tracker in self.trackers:
            self.tasks.put((tracker, partial(_open_and_catch_up, tracker, config, done)))

    def log_epoch(self, row: dict[str, Any]) -> None:
        self._report()
        if self.trackers:
            metrics = epoch_metrics(row, self.rates)
            for tracker in self.trackers:
                self.tasks.put((tracker, partial(tracker.log, int(row["epoch"]), metrics)))

    def end(self, status: str) -> None:
        """Close every tracker with the session's status (finished: images, artifacts) and wait
        for the thread; Ctrl-C stops the wait (the run folder has everything anyway)."""
        if self.thread is None:
            return
        for tracker in self.trackers:
            self.tasks.put((tracker, partial(tracker.close, status)))
        self.tasks.put(None)
        names = " and ".join(t.name for t in self.trackers)
        try:
            self.thread.join(timeout=WAIT_NOTE_SECONDS)
            if self.thread.is_alive():
                ui.info(f"Waiting for {names} to take the last of the run (Ctrl-C skips this)...")
                self.thread.join()
        except KeyboardInterrupt:
            ui.warn(f"Stopped waiting for {names}: what was not sent yet is only in the run folder.")
        self.thread = None
        self._report()

    def _work(self) -> None:
        while (task := self.tasks.get()) is not None:
            tracker, call = task
            if tracker.name in self.failed:
                continue
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - a tracker is never worth a failed run
                reason = (str(exc).strip().splitlines() or [""])[0][:300]
                self.failed[tracker.name] = f"{type(exc).__name__}: {reason}"

    def _report(self) -> None:
        """The trackers that failed since the last call, once each, from the training thread."""
        for name, reason in list(self.failed.items()):
            if name not in self.reported:
                self.reported.add(name)
                ui.warn(f"{name} logging stopped ({reason}). Training goes on; the run folder has "
                        "every epoch (metrics.csv).")  # fmt: skip


def _open_and_catch_up(tracker: Any, config: dict[str, Any],
                       done: list[tuple[int, dict[str, float]]]) -> None:  # fmt: skip
    last = tracker.open(config)
    for epoch, metrics in done:
        if epoch > last:
            tracker.log(epoch, metrics)


def start_tracking(
    cfg: TrainConfig, run_dir: Path, config: dict[str, Any], rows: list[dict[str, Any]], rates: Rates
) -> Tracking:
    """The trackers `cfg.track` names, opened on the background thread; said on stdout."""
    trackers: list[Any] = []
    for name in tracker_names(cfg.track):
        trackers.append(TensorBoardLog(run_dir) if name == "tensorboard"
                        else MlflowLog(run_dir, cfg.track_checkpoints))  # fmt: skip
    if trackers:
        ui.info("Tracking: " + ", ".join(t.describe() for t in trackers))
    tracking = Tracking(trackers, rates)
    tracking.open(config, rows)
    return tracking


# ---------------------------------------------------------------- TensorBoard


class TensorBoardLog:
    """RUN/tb/: a scalar per metric and epoch, the resolved config as hparams (beside the val and
    train metrics), and at the end the curves and confusion-matrix PNGs as images."""

    name = "TensorBoard"

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.folder = run_dir, run_dir / TENSORBOARD_FOLDER
        self.writer: Any = None
        self.config: dict[str, Any] = {}
        self.hparams_due = False
        self.last_epoch = 0

    def describe(self) -> str:
        return f"TensorBoard in {self.folder}"

    def open(self, config: dict[str, Any]) -> int:
        from torch.utils.tensorboard import SummaryWriter  # an optional extra

        self.last_epoch = last_tensorboard_epoch(self.folder)
        self.writer = SummaryWriter(log_dir=str(self.folder))
        self.config, self.hparams_due = config, True
        return self.last_epoch

    def log(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.hparams_due:  # once a session, with the first metrics: the tags hparams are judged by
            self._write_hparams([tag for tag in metrics if tag.startswith(("val/", "train/"))])
            self.hparams_due = False
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, epoch)
        self.writer.flush()
        self.last_epoch = max(self.last_epoch, epoch)

    def _write_hparams(self, tags: list[str]) -> None:
        from torch.utils.tensorboard.summary import hparams

        values = {key: config_value(value) for key, value in self.config.items()}
        for summary in hparams(values, {tag: 0.0 for tag in tags}):
            self.writer.file_writer.add_summary(summary)

    def close(self, status: str) -> None:
        if status == "finished":
            for tag, name in (("curves", "results.png"), ("confusion_matrix", "confusion_matrix.png")):
                if (self.run_dir / name).is_file():
                    png = (self.run_dir / name).read_bytes()
                    self.writer.file_writer.add_summary(png_summary(tag, png), self.last_epoch)
        self.writer.close()


def config_value(value: Any) -> str | int | float:
    """A config value as the trackers take it: numbers and text as they are, anything else (true,
    false, null, lists) as config.yaml's JSON-compatible text."""
    return value if isinstance(value, (str, int, float)) and not isinstance(value, bool) else json.dumps(value)


def png_summary(tag: str, png: bytes) -> Any:
    """A TensorBoard image summary holding the PNG file as it is (no decoding, no re-encoding)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    with Image.open(io.BytesIO(png)) as picture:
        width, height = picture.size
        channels = len(picture.getbands())
    image = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=png)
    return Summary(value=[Summary.Value(tag=tag, image=image)])


def last_tensorboard_epoch(folder: Path) -> int:
    """The last epoch whose scalars the event files in `folder` all hold (0: none). An epoch cut
    short by a kill counts as missing, so it is logged again rather than left with a gap."""
    if not any(folder.glob("events.out.tfevents.*")):
        return 0
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={SCALARS: 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    return min((max(e.step for e in events.Scalars(tag)) for tag in tags), default=0)


# ---------------------------------------------------------------- MLflow


class MlflowLog:
    """A run in an MLflow store: params = the resolved config, a metric per column and epoch, and
    at the end the run folder's small files as artifacts (best.pt too with --track-checkpoints).
    Its id is kept in RUN/tracking.json, so that a resume continues it."""

    name = "MLflow"

    def __init__(self, run_dir: Path, checkpoints: bool) -> None:
        self.run_dir, self.checkpoints = run_dir, checkpoints
        self.recorded = read_tracking_record(run_dir).get("mlflow") or {}
        self.uri = self.recorded.get("tracking_uri") or tracking_uri()
        self.client: Any = None
        self.run_id = ""

    def describe(self) -> str:
        """Where the run goes (a password in the URI not shown); a resume keeps its run's store."""
        parsed = urllib.parse.urlparse(self.uri)
        shown = urllib.parse.unquote(parsed.path) if parsed.scheme == "file" else self.uri
        if "@" in parsed.netloc:
            shown = shown.replace(parsed.netloc, "***@" + parsed.netloc.rpartition("@")[2], 1)
        moved = self.recorded and os.environ.get("MLFLOW_TRACKING_URI") and tracking_uri() != self.uri
        return f"MLflow in {shown}" + (" (where this run began, as tracking.json says)" if moved else "")

    def open(self, config: dict[str, Any]) -> int:
        from mlflow.entities import Param  # an optional extra
        from mlflow.tracking import MlflowClient

        if self.uri.startswith("file:"):  # the local file store, which MLflow 3 keeps behind a flag
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=self.uri)
        run = self._continued() or self._created()
        self.run_id = run.info.run_id
        write_tracking_record(self.run_dir, "mlflow", {"tracking_uri": self.uri, "run_id": self.run_id,
                                                       "experiment_id": run.info.experiment_id})  # fmt: skip
        logged = run.data.params  # a resume keeps the first values (MLflow params never change)
        params = [Param(key, str(config_value(value))[:6000])  # MLflow's longest param value
                  for key, value in config.items() if key not in logged]  # fmt: skip
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params a call
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        return min((max(m.step for m in self.client.get_metric_history(self.run_id, key))
                    for key in run.data.metrics), default=0)  # fmt: skip

    def _continued(self) -> Any:
        """The run tracking.json names, set running again; None if there is none (any more)."""
        from mlflow.exceptions import MlflowException

        if not self.recorded.get("run_id"):
            return None
        try:
            run = self.client.get_run(self.recorded["run_id"])
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            return None
        if run.info.lifecycle_stage == "deleted":
            return None
        self.client.update_run(run.info.run_id, status="RUNNING")
        return run

    def _created(self) -> Any:
        from mlflow.tracking.context.registry import resolve_tags

        tags = resolve_tags({"mlflow.source.name": "resnext train",
                             "resnext.run_dir": str(self.run_dir.resolve())})  # fmt: skip
        return self.client.create_run(self._experiment_id(), run_name=self.run_dir.name, tags=tags)

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        if os.environ.get("MLFLOW_EXPERIMENT_ID"):
            return os.environ["MLFLOW_EXPERIMENT_ID"]
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or MLFLOW_EXPERIMENT
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # another run created it meanwhile
            return self.client.get_experiment_by_name(name).experiment_id

    def log(self, epoch: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, epoch) for k, v in metrics.items()])

    def close(self, status: str) -> None:
        if status == "finished":
            for path, folder in artifact_files(self.run_dir, self.checkpoints):
                self.client.log_artifact(self.run_id, str(path), artifact_path=folder)
        self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "KILLED"))


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else ./mlruns (MLflow's local file store: no server); local paths
    made absolute, so that a resume started from another folder finds the same store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or "mlruns"
    parsed = urllib.parse.urlparse(uri)
    if uri in ("databricks", "databricks-uc", "uc"):  # MLflow's names of hosted stores, not paths
        return uri
    if parsed.scheme in ("", "file") and not parsed.netloc:
        return Path(urllib.parse.unquote(parsed.path) if parsed.scheme else uri).resolve().as_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # relative to the cwd
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def artifact_files(run_dir: Path, checkpoints: bool) -> list[tuple[Path, str | None]]:
    """The run folder's small files (config.yaml, metrics.csv, plots, report.html, eval/, ...),
    each with the artifact folder it goes to; never last.pt, best.pt only when asked."""
    chosen: list[tuple[Path, str | None]] = []
    for path in sorted(run_dir.iterdir()):
        if path.is_file() and path.suffix != ".pt" and not path.name.startswith(".") and \
                path.name not in (RUN_LOCK, TRACKING_FILE):  # fmt: skip
            chosen.append((path, None))
        elif path.is_dir() and path.name == "eval":
            chosen += [(p, "eval") for p in sorted(path.iterdir()) if p.is_file()]
    if checkpoints and (run_dir / "best.pt").is_file():
        chosen.append((run_dir / "best.pt", None))
    return chosen


def read_tracking_record(run_dir: Path) -> dict[str, Any]:
    """RUN/tracking.json: per tracker, what a resume needs to continue its run ({} if none)."""
    try:
        record = json.loads((run_dir / TRACKING_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def write_tracking_record(run_dir: Path, tracker: str, entry: dict[str, Any]) -> None:
    record = {**read_tracking_record(run_dir), tracker: entry}
    atomic_write_text(run_dir / TRACKING_FILE, json.dumps(record, indent=1) + "\n")
