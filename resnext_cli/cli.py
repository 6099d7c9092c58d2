"""The `resnext` command line: parse flags, build a config, call one function, report errors.

torch is imported only inside the commands, so `resnext --help` answers at once. Every option
defaults to None here, so that only the flags actually given override a --config file; the
defaults shown in --help come from the config dataclasses.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import select
import signal
import sys
import threading
from typing import Any, Callable, Iterator, List, Optional, Tuple, TypeVar

import typer
import typer.core
from rich.table import Table

from resnext_cli import __version__, ui
from resnext_cli.config import (
    BALANCE_AUTO,
    BALANCE_AUTO_RATIO,
    BALANCES,
    DECODERS,
    EXPLAIN_METHODS,
    OPTIMIZERS,
    PRECISIONS,
    PRIORS,
    RUN_SORTS,
    SCHEDULERS,
    SELECT_AUTO_RATIO,
    SELECT_BY,
    UNKNOWN_SCORE,
    AuditConfig,
    BatchPredictConfig,
    CacheConfig,
    CalibrateConfig,
    CheckDataConfig,
    EvaluateConfig,
    ExplainConfig,
    ExportConfig,
    PredictConfig,
    ReportConfig,
    RunsConfig,
    TrainConfig,
    build_config,
)
from resnext_cli.errors import EXIT_CLOSED_PIPE, EXIT_FAILED, Terminated, UserError, interruption
from resnext_cli.model.archs import ARCHS, check_arch

app = typer.Typer(
    name="resnext",
    help="Transfer learning for image classification with ResNet / ResNeXt.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_T, _B, _E = TrainConfig(), BatchPredictConfig(), EvaluateConfig()
C = TypeVar("C")


def option(help: str, *decls: str, default: Any = None, metavar: str | None = None) -> Any:
    """A flag whose help ends with its default. Rich markup would swallow a plain
    `[default: x]` as an unknown tag, hence the escaped bracket."""
    shown = {True: "on", False: "off"}.get(default, default) if isinstance(default, bool) else default
    text = f"{help} \\[default: {shown}]" if default is not None else help
    is_flag = any(d.startswith("--") and ("/" in d or d in FLAGS) for d in decls)
    return typer.Option(None, *decls, help=text, metavar="" if is_flag else metavar,
                        show_default=False)  # fmt: skip


FLAGS = {"--cache-features", "--compile", "--sync-bn", "--json", "--recursive", "--quiet",
         "--resume-output", "--dynamic-batch", "--tta", "--overwrite", "--track-checkpoints",
         "--explain", "--save-probs",
         "--reject-unknown"}  # fmt: skip


def data_argument(help: str) -> Any:
    return typer.Argument(None, help=help, metavar="DATA", show_default=False)


def pick_data(positional: str | None, flag: str | None) -> str | None:
    """The data folder may be given as DATA or as --data (one spelling for every command)."""
    if positional and flag and positional != flag:
        raise UserError(f"Two data folders given ({positional} and --data {flag}); give one.")
    return positional or flag


DATA_HELP = "Dataset folder: DATA/train/<class>/* + DATA/val/<class>/*, or DATA/<class>/*."
WORKERS_HELP = "Worker processes that read and decode images; 0 decodes in this process."
WORKERS_DEFAULT = "chosen for this machine (README: Speed defaults)"
DEVICE_HELP = "auto | cpu | cuda | cuda:N | mps. auto: CUDA, then MPS, then the CPU."
PRECISION_HELP = (
    f"{' | '.join(PRECISIONS)}. auto: bf16 on CPUs with native bf16 and on recent GPUs, fp16 on "
    "older GPUs, else fp32."
)
LAYOUT_HELP = "Channels-last memory layout (faster convolutions)."
DECODE_HELP = (
    f"{' | '.join(DECODERS)}: where JPEGs are decoded. auto: on the GPU when the device is CUDA "
    "(workers only read files), else with Pillow in the workers."
)
CONFIG_HELP = "YAML file of option: value (snake_case); flags given here override it."
MODEL_HELP = "A checkpoint (best.pt of a run)."
MODEL_DEFAULT = "the latest finished run: runs/latest, else the newest runs/*/best.pt"


# options that several commands share, declared once
CHECKPOINT = option(MODEL_HELP, default=MODEL_DEFAULT, metavar="PATH")
RUN = option("A run by name: runs/NAME/best.pt (`--name NAME` of train).", metavar="NAME")
WEIGHTS = option("A plain state dict (with --arch and --class-indices).", metavar="PATH")
WEIGHTS_ARCH = option("Architecture of --weights.", metavar="ARCH")
CLASS_INDICES = option("class_indices.json for --weights.", metavar="FILE")
INFER_IMG_SIZE = option("Crop size.", default="the checkpoint's", metavar="S")
DEVICE = option(DEVICE_HELP, default="auto", metavar="DEV")
PRECISION = option(PRECISION_HELP, default="auto", metavar="P")
CHANNELS_LAST = option(LAYOUT_HELP, "--channels-last/--no-channels-last", default=True)
DECODE = option(DECODE_HELP, default="auto", metavar="WHERE")
COMPILE = option("torch.compile the model (pays off on long runs; slow to start).", "--compile",
                 default=False)
WORKERS = option(WORKERS_HELP, default=WORKERS_DEFAULT, metavar="N")
JSON = option("Print JSON instead of tables.", "--json", default=False)
TTA = option("Test-time augmentation: average the predictions for each image and its mirror "
             "image (2x the model's work).", "--tta", default=False)
CONFIG = option(CONFIG_HELP, "--config", "-c", metavar="FILE")
PRIOR = option(f"{' | '.join(PRIORS)}: the class prior predictions assume; uniform: every class equally "
               "likely (README: Class imbalance).", default="the checkpoint's: uniform if trained "
               "with a --balance strategy, else train", metavar="P")  # fmt: skip
CALIBRATION = option("Calibrated probabilities and unknown verdicts (the checkpoint's temperature and "
                     "unknown score); off: the raw softmax, as before calibration existed.",
                     "--calibration/--no-calibration", default=True)  # fmt: skip
UNKNOWN_THRESHOLD = option("Share of new photos like the val ones accepted as known: sets the unknown "
                           "score's threshold (0-1).", default="the checkpoint's (0.95)", metavar="Q")  # fmt: skip


def configure(cls: type[C], config_file: str | None, overrides: dict[str, Any]) -> C:
    """The command's config (defaults, file, flags), checked before torch loads; the architecture
    against the model registry, which the config layer below it does not import."""
    config = build_config(cls, config_file, overrides)
    arch = getattr(config, "arch", None)
    if arch is not None:
        check_arch(arch)
    return config


def run_command(action: Callable[[], Any]) -> Any:
    """Turn a UserError into one `Error:` paragraph and its exit code; no traceback unless
    RESNEXT_DEBUG=1. SIGTERM stops a command as Ctrl-C does (exit 143 instead of 130); a closed
    stdout (`| head`) ends it quietly with 141, as it ends other Unix tools."""
    debug = os.environ.get("RESNEXT_DEBUG") == "1"
    escape_undecodable_names()
    try:
        with sigterm_as_interrupt():
            return action()
    except UserError as exc:
        if debug:
            raise
        _print_error(str(exc))
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated)
        if debug:
            raise
        what, code = interruption(exc)
        _print_error(f"{what}.")
        raise typer.Exit(code) from None
    except Exception as exc:
        if isinstance(exc, BrokenPipeError) and stdout_closed():
            discard_stdout()
            raise typer.Exit(EXIT_CLOSED_PIPE) from None
        if debug:
            raise
        _print_error(
            f"Unexpected failure: {type(exc).__name__}: {exc}. This is a bug in resnext or an "
            "environment problem; re-run with RESNEXT_DEBUG=1 to see the traceback."
        )
        raise typer.Exit(EXIT_FAILED) from None


def escape_undecodable_names() -> None:
    """Printed text shows a file name's undecodable bytes as `\\udcXX`, as the files resnext
    writes do (files.atomic_write_text), instead of failing on them: a non-UTF-8 class folder in
    a table, a path in --json (where the escape reads back as the same name)."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(ValueError, OSError):
                reconfigure(errors="backslashreplace")
@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While a command runs, SIGTERM (kill, schedulers, containers) raises `Terminated` in the
    main thread, a KeyboardInterrupt, so that it is cleaned up exactly as Ctrl-C is. Once: a
    second SIGTERM during that cleanup ends the process at once, as the default would. A process
    forked meanwhile (a worker pool's) gets the default back (`_fork_hooks`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    _fork_hooks.active += 1
    try:
        yield
    finally:
        _fork_hooks.active -= 1
        signal.signal(signal.SIGTERM, previous)


class _fork_hooks:
    """SIGTERM in a forked child while `sigterm_as_interrupt` is on. The child inherits the
    Python-level handler, and Python drops a signal that arrives between fork() and the end of
    its after-fork work (it clears the flags the C handler set). A pool terminated right after
    it started (cleanlab's and check-data's `with Pool(...)` on small data) then sent its
    SIGTERM into that gap: the worker lived on, waiting for a task, and the parent waited for it
    forever. So SIGTERM is blocked across fork() and, in the child, set back to the default
    before it is unblocked: a SIGTERM sent meanwhile stays pending and then ends the child."""

    active = 0  # sigterm_as_interrupt's handlers in force (registered with os at import, below)

    @staticmethod
    def before() -> None:
        if _fork_hooks.active:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    @staticmethod
    def in_parent() -> None:
        if _fork_hooks.active:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})

    @staticmethod
    def in_child() -> None:
        if _fork_hooks.active:
            _fork_hooks.active = 0
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(before=_fork_hooks.before, after_in_parent=_fork_hooks.in_parent,
                        after_in_child=_fork_hooks.in_child)  # fmt: skip


def stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (`| head` exited): poll reports an error on
    it. Any other broken pipe is a real failure and is reported as one."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or stdout is not a file
        return False


def discard_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush of what is still buffered
    for the closed pipe fails no more (Python's documented recipe for SIGPIPE)."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _print_error(message: str) -> None:
    with contextlib.suppress(OSError):  # stderr closed too: there is nobody left to tell
        sys.stderr.write(f"Error: {message}\n")
        sys.stderr.flush()


def _metavars_only() -> None:
    """--help names each value by its metavar (DATA, IMAGE..., N), never by typer's Python type
    (`<list[str]>`, `<str>`, `<bool>` for --help): an argument's metavar is already its name."""
    typer.core.TyperArgument.display_type_rich = lambda self, ctx: None  # type: ignore[method-assign]
    typer.core.TyperOption.display_type_rich = lambda self, ctx: self.metavar or None  # type: ignore[method-assign]


_metavars_only()


def _version(value: bool) -> None:
    if value:
        print(f"resnext {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Optional[bool] = typer.Option(
        None, "--version", help="Show the version and exit.", callback=_version, is_eager=True,
        metavar="",
    ),
) -> None:
    """Transfer learning for image classification with ResNet / ResNeXt."""


TRAIN_HELP = {  # train's own options: help text, and the default shown when not the config's
    "arch": "Architecture (`resnext archs`).",
    "weights": "imagenet | none | PATH (state dict or resnext checkpoint).",
    "freeze": ("Train only the head; backbone weights and BN statistics stay fixed.",
               "freeze, except with --weights none"),
    "unfreeze_after": ("Fine-tune the whole network after N head-only epochs.", None),
    "backbone_lr_mult": "Backbone lr = lr x this after --unfreeze-after.",
    "freeze_bn": ("While the backbone fine-tunes, keep its BatchNorm statistics as loaded; its "
                  "weights still train.", "on after --unfreeze-after's head-only epochs, else off"),
    "img_size": "Crop size S (pixels).",
    "augment": "RandomResizedCrop + flip in training.",
    "cache_features": "Frozen phase: run the backbone once per view of each image, cache the "
                      "features on disk (`resnext cache`), train the head on them.",
    "feature_views": "With --cache-features: 1 plain + K-1 augmented views, cycled over epochs.",
    "val_split": "Val share when DATA has no val folder.",
    "epochs": "Training epochs.",
    "batch_size": "Images per step (per process under torchrun).",
    "lr": "Head learning rate (not rescaled under torchrun).",
    "weight_decay": "Weight decay.",
    "optimizer": " | ".join(OPTIMIZERS) + ".",
    "scheduler": " | ".join(SCHEDULERS) + ", per step.",
    "warmup_epochs": "Linear lr warmup.",
    "label_smoothing": "Cross-entropy label smoothing.",
    "balance": (" | ".join(BALANCES) + f": rare classes (README: Class imbalance). auto: {BALANCE_AUTO} "
                f"from a largest / smallest class ratio of {BALANCE_AUTO_RATIO:g}, else none.", "auto"),
    "seed": ("Seed; on the CPU the same seed repeats a run exactly.", "random, saved in config.yaml"),
    "out": ("Run folder, new or empty (a folder of other files is refused).", "runs/exp, runs/exp2, ..."),
    "name": ("Run folder runs/NAME; predict, evaluate, export... choose it with --run NAME.", None),
    "patience": ("Stop after N epochs without val improvement.", "off"),
    "select_by": (" | ".join(SELECT_BY) + ": the val metric that picks best.pt. auto: balanced_acc when "
                  f"the val classes are {SELECT_AUTO_RATIO:g}x apart or more, else acc.", "auto"),
    "sync_bn": "Under torchrun: batch norm statistics over all processes.",
    "resume": ("Continue an interrupted run: its folder or last.pt (--epochs may extend it).", None),
    "report": "Evaluate best.pt on the val split and write report.html at the end.",
    "track": ("Log to experiment trackers, comma-separated: tensorboard (RUN/tb/), mlflow "
              "(./mlruns, or $MLFLOW_TRACKING_URI). Each needs its extra.", "none"),
    "track_checkpoints": "With --track mlflow: best.pt among the run's artifacts too.",
    "unknown_score": "How unknowns are told: components joined with '+', optionally weighted as in 2*style "
                     "(README: When not to trust a prediction).",
    "unknown_threshold": "Share of new photos like the val ones accepted as known: sets the unknown threshold.",
}  # fmt: skip


def train_option(name: str, metavar: str | None = None, *decls: str) -> Any:
    """An option of `train`, with its help from TRAIN_HELP and its default from TrainConfig."""
    entry = TRAIN_HELP[name]
    help, default = entry if isinstance(entry, tuple) else (entry, getattr(_T, name))
    return option(help, *decls, default=default, metavar=metavar)


@app.command()
def train(
    folder: Optional[str] = data_argument(DATA_HELP + " Same as --data."),
    data: Optional[str] = option(DATA_HELP, metavar="DIR"),
    arch: Optional[str] = train_option("arch", "ARCH"),
    weights: Optional[str] = train_option("weights", "W"),
    freeze: Optional[bool] = train_option("freeze", None, "--freeze/--no-freeze"),
    unfreeze_after: Optional[int] = train_option("unfreeze_after", "N"),
    backbone_lr_mult: Optional[float] = train_option("backbone_lr_mult", "X"),
    freeze_bn: Optional[bool] = train_option("freeze_bn", None, "--freeze-bn/--no-freeze-bn"),
    img_size: Optional[int] = train_option("img_size", "S"),
    augment: Optional[bool] = train_option("augment", None, "--augment/--no-augment"),
    cache_features: Optional[bool] = train_option("cache_features", None,
                                                  "--cache-features/--no-cache-features"),
    feature_views: Optional[int] = train_option("feature_views", "K"),
    val_split: Optional[float] = train_option("val_split", "F"),
    epochs: Optional[int] = train_option("epochs", "N"),
    batch_size: Optional[int] = train_option("batch_size", "N"),
    lr: Optional[float] = train_option("lr", "LR"),
    weight_decay: Optional[float] = train_option("weight_decay", "WD"),
    optimizer: Optional[str] = train_option("optimizer", "NAME"),
    scheduler: Optional[str] = train_option("scheduler", "NAME"),
    warmup_epochs: Optional[int] = train_option("warmup_epochs", "N"),
    label_smoothing: Optional[float] = train_option("label_smoothing", "F"),
    balance: Optional[str] = train_option("balance", "HOW"),
    seed: Optional[int] = train_option("seed", "N"),
    device: Optional[str] = DEVICE,
    precision: Optional[str] = PRECISION,
    channels_last: Optional[bool] = CHANNELS_LAST,
    decode: Optional[str] = DECODE,
    compile: Optional[bool] = COMPILE,
    workers: Optional[int] = WORKERS,
    out: Optional[str] = train_option("out", "DIR"),
    name: Optional[str] = train_option("name", "NAME"),
    patience: Optional[int] = train_option("patience", "N"),
    select_by: Optional[str] = train_option("select_by", "METRIC"),
    sync_bn: Optional[bool] = train_option("sync_bn", None, "--sync-bn"),
    resume: Optional[str] = train_option("resume", "RUN"),
    report: Optional[bool] = train_option("report", None, "--report/--no-report"),
    track: Optional[str] = train_option("track", "NAMES"),
    track_checkpoints: Optional[bool] = train_option("track_checkpoints", None, "--track-checkpoints"),
    unknown_score: Optional[str] = train_option("unknown_score", "NAME"),
    unknown_threshold: Optional[float] = train_option("unknown_threshold", "Q"),
    config: Optional[str] = CONFIG,
) -> None:
    """Train a classifier on a folder of class folders: pretrained backbone, new head."""
    overrides = {k: v for k, v in locals().items() if k not in ("config", "resume", "folder")}

    def action() -> None:
        from resnext_cli.commands.train import resume_config
        from resnext_cli.commands.train import train as run_train

        overrides["data"] = pick_data(folder, data)
        if resume and config:
            raise UserError("--resume uses the run's own config.yaml; leave out --config.")
        run_train(
            resume_config(resume, overrides) if resume else configure(TrainConfig, config, overrides)
        )

    run_command(action)


@app.command()
def predict(
    images: List[str] = typer.Argument(..., help="Image files.", metavar="IMAGE...", show_default=False),
    checkpoint: Optional[str] = CHECKPOINT,
    run: Optional[str] = RUN,
    weights: Optional[str] = WEIGHTS,
    arch: Optional[str] = WEIGHTS_ARCH,
    class_indices: Optional[str] = CLASS_INDICES,
    topk: Optional[int] = option("Classes to show per image.", default=PredictConfig().topk, metavar="K"),
    img_size: Optional[int] = INFER_IMG_SIZE,
    device: Optional[str] = DEVICE,
    precision: Optional[str] = PRECISION,
    channels_last: Optional[bool] = CHANNELS_LAST,
    decode: Optional[str] = DECODE,
    compile: Optional[bool] = COMPILE,
    json: Optional[bool] = JSON,
    plot: Optional[str] = option("Save the image(s) titled with the prediction; the extension picks "
                                 "the format (.png, .jpg, .pdf, .svg ...).", metavar="FILE"),
    tta: Optional[bool] = TTA,
    prior: Optional[str] = PRIOR,
    explain: Optional[bool] = option("Also a heatmap of the predicted class (needs the "
                                     "[explain] extra), drawn beside the probabilities in --plot "
                                     "FILE; without --plot, into explain.png (explain2.png, ... if "
                                     "taken).", "--explain", default=False),
    calibration: Optional[bool] = CALIBRATION,
    unknown_threshold: Optional[float] = UNKNOWN_THRESHOLD,
    config: Optional[str] = CONFIG,
) -> None:  # fmt: skip
    """Classify one or more images (and say when one looks like none of the classes)."""
    overrides = {k: v for k, v in locals().items() if k != "config"}

    def action() -> None:
        from resnext_cli.commands.predict import predict as run_predict

        run_predict(configure(PredictConfig, config, overrides))

    run_command(action)


@app.command("batch-predict")
def batch_predict(
    folder: Optional[str] = data_argument("Folder of images. Same as --data."),
    data: Optional[str] = option("Folder of images.", metavar="DIR"),
    batch_size: Optional[int] = option("Images per batch.", default=_B.batch_size, metavar="N"),
    checkpoint: Optional[str] = CHECKPOINT,
    run: Optional[str] = RUN,
    weights: Optional[str] = WEIGHTS,
    arch: Optional[str] = WEIGHTS_ARCH,
    class_indices: Optional[str] = CLASS_INDICES,
    recursive: Optional[bool] = option("Include sub-folders.", "--recursive", default=False),
    topk: Optional[int] = option("Classes per image in the output.", default=_B.topk, metavar="K"),
    output: Optional[str] = option("Results file, .csv, .jsonl or .parquet (its folder is created).",
                                   metavar="FILE"),
    workers: Optional[int] = WORKERS,
    img_size: Optional[int] = INFER_IMG_SIZE,
    device: Optional[str] = DEVICE,
    precision: Optional[str] = PRECISION,
    channels_last: Optional[bool] = CHANNELS_LAST,
    decode: Optional[str] = DECODE,
    compile: Optional[bool] = COMPILE,
    quiet: Optional[bool] = option("No line per image.", "--quiet", default=False),
    resume_output: Optional[bool] = option("Skip images already in --output (after an "
                                           "interruption).", "--resume-output", default=False),
    overwrite: Optional[bool] = option("Replace an existing --output (kept until the new one is "
                                       "complete).", "--overwrite", default=False),
    save_probs: Optional[bool] = option("Every class's probability in each row (--output .jsonl "
                                        "or .parquet).", "--save-probs", default=False),
    onnx: Optional[str] = option("Run an exported model.onnx on onnxruntime instead of a checkpoint.",
                                 metavar="FILE"),
    tta: Optional[bool] = TTA,
    prior: Optional[str] = PRIOR,
    calibration: Optional[bool] = CALIBRATION,
    unknown_threshold: Optional[float] = UNKNOWN_THRESHOLD,
    reject_unknown: Optional[bool] = option("Leave `class` empty for images whose `known` is false.",
                                            "--reject-unknown", default=False),
    config: Optional[str] = CONFIG,
) -> None:  # fmt: skip
    """Classify every image in a folder, streaming results as batches finish."""
    overrides = {k: v for k, v in locals().items() if k not in ("config", "folder")}

    def action() -> int:
        from resnext_cli.commands.predict import batch_predict as run_batch_predict

        overrides["data"] = pick_data(folder, data)
        return run_batch_predict(configure(BatchPredictConfig, config, overrides))

    _exit_with(run_command(action))


@app.command()
def evaluate(
    folder: Optional[str] = data_argument("Labelled images: DIR/<class>/*, or a dataset root (its "
                                          "val split). Same as --data."),
    data: Optional[str] = option("Labelled images, as DATA.", default="the data the checkpoint "
                                 "was trained on", metavar="DIR"),
    checkpoint: Optional[str] = CHECKPOINT,
    run: Optional[str] = RUN,
    weights: Optional[str] = WEIGHTS,
    arch: Optional[str] = WEIGHTS_ARCH,
    class_indices: Optional[str] = CLASS_INDICES,
    batch_size: Optional[int] = option("Images per batch.", default=_E.batch_size, metavar="N"),
    workers: Optional[int] = WORKERS,
    out: Optional[str] = option("Output folder.", default="eval/ beside the checkpoint", metavar="DIR"),
    heatmaps: Optional[int] = option("Heatmaps (predicted and true class) of the N most confident "
                                     "mistakes, in OUT/heatmaps/; 0: none. Needs the [explain] extra.",
                                     default=_E.heatmaps, metavar="N"),
    json: Optional[bool] = JSON,
    img_size: Optional[int] = INFER_IMG_SIZE,
    device: Optional[str] = DEVICE,
    precision: Optional[str] = PRECISION,
    channels_last: Optional[bool] = CHANNELS_LAST,
    decode: Optional[str] = DECODE,
    compile: Optional[bool] = COMPILE,
    tta: Optional[bool] = TTA,
    prior: Optional[str] = PRIOR,
    calibration: Optional[bool] = CALIBRATION,
    unknown_threshold: Optional[float] = UNKNOWN_THRESHOLD,
    unknown: Optional[str] = option("A folder of photos of none of the classes: how well the unknown "
                                    "score tells them apart (AUROC, FPR at 95% TPR, share rejected).",
                                    metavar="DIR"),
    config: Optional[str] = CONFIG,
) -> None:  # fmt: skip
    """Accuracy, per-class metrics, confusion matrix and mistakes on a labelled folder; calibration
    (ECE, NLL, reliability) and, with --unknown, how well unknowns are told apart."""
    overrides = {k: v for k, v in locals().items() if k not in ("config", "folder")}

    def action() -> None:
        from resnext_cli.commands.evaluate import evaluate as run_evaluate

        overrides["data"] = pick_data(folder, data)
        run_evaluate(configure(EvaluateConfig, config, overrides))

    run_command(action)


_X = ExplainConfig()


@app.command()
def explain(
    images: List[str] = typer.Argument(..., help="Image files, or folders of images.", metavar="IMAGE...",
                                       show_default=False),
    class_: Optional[List[str]] = option("Explain this class (repeat for several).", "--class",
                                         default="the predicted class", metavar="NAME"),
    method: Optional[str] = option(f"{' | '.join(EXPLAIN_METHODS)}: Grad-CAM of the last stage x the "
                                   "one before (16-px cells); of the last only; hiding squares; "
                                   "per pixel.",
                                   default=_X.method, metavar="M"),
    out: Optional[str] = option("Output folder (an earlier explain's may be added to).",
                                default="runs/explain, runs/explain2, ...", metavar="DIR"),
    recursive: Optional[bool] = option("Include the sub-folders of a folder.", "--recursive",
                                       default=False),
    checkpoint: Optional[str] = CHECKPOINT,
    weights: Optional[str] = WEIGHTS,
    arch: Optional[str] = WEIGHTS_ARCH,
    class_indices: Optional[str] = CLASS_INDICES,
    batch_size: Optional[int] = option("Images per batch.", default=_X.batch_size, metavar="N"),
    workers: Optional[int] = WORKERS,
    img_size: Optional[int] = INFER_IMG_SIZE,
    device: Optional[str] = DEVICE,
    precision: Optional[str] = option(PRECISION_HELP + " For the probabilities; heatmaps are "
                                      "computed in fp32.", default="auto", metavar="P"),
    channels_last: Optional[bool] = CHANNELS_LAST,
    decode: Optional[str] = DECODE,
    json: Optional[bool] = option("Print explain.json's entries on stdout.", "--json", default=False),
    config: Optional[str] = CONFIG,
) -> None:  # fmt: skip
    """Heatmaps of where the model looked: an overlay PNG per image and class (<stem>_<class>.png)
    and explain.json (class, probability, method, peak in the photo's pixels)."""
    overrides = {k: v for k, v in locals().items() if k not in ("config", "class_")}
    overrides["classes"] = list(class_) if class_ else None

    def action() -> int:
        from resnext_cli.commands.explain import explain as run_explain

        return run_explain(configure(ExplainConfig, config, overrides))

    _exit_with(run_command(action))


@app.command()
def report(
    run_dir: Optional[str] = typer.Argument(None, help="A run folder written by `resnext train`.",
                                            metavar="RUN", show_default=False),
    run: Optional[str] = option("A run by name: runs/NAME (instead of RUN).", metavar="NAME"),
    data: Optional[str] = option("Evaluate on this folder.", default="the run's data", metavar="DIR"),
    batch_size: Optional[int] = option("Images per batch.", default=ReportConfig().batch_size, metavar="N"),
    workers: Optional[int] = WORKERS,
    device: Optional[str] = DEVICE,
    decode: Optional[str] = DECODE,
    gallery: Optional[int] = option("Mistakes shown as thumbnails.", default=ReportConfig().gallery,
                                    metavar="N"),
    compare: Optional[str] = option("Another run folder (or a run's name beside RUN): its curves "
                                    "overlaid, its config and metrics beside this run's.", metavar="OTHER"),
    unknown: Optional[str] = option("A folder of photos of none of the classes: the report shows how "
                                    "well the unknown score tells them apart.", metavar="DIR"),
    config: Optional[str] = CONFIG,
) -> None:  # fmt: skip
    """Write RUN/report.html (default: the latest finished run): config, curves, confusion
    matrix, per-class metrics, mistakes."""
    overrides = {k: v for k, v in locals().items() if k != "config"}

    def action() -> None:
        from resnext_cli.commands.report import report as run_report

        run_report(configure(ReportConfig, config, overrides))

    run_command(action)


@app.command()
def runs(
    root: Optional[str] = typer.Argument(None, help="The folder holding run folders. \\[default: runs]",
                                         metavar="ROOT", show_default=False),
    sort: Optional[str] = option(f"{' | '.join(RUN_SORTS)}: date oldest first; acc, balanced "
                                 "(accuracy) best first; time longest first.", default=RunsConfig().sort,
                                 metavar="KEY"),
    json: Optional[bool] = JSON,
    compare: Optional[Tuple[str, str]] = option("Two runs (names in ROOT or folders): their config "
                                                "differences and metrics side by side.", metavar="A B"),
) -> None:  # fmt: skip
    """List the runs in ROOT: status, arch, data, epochs, best accuracy, wall time, date."""
    overrides = {k: (list(v) if k == "compare" and v else v) for k, v in locals().items()}

    def action() -> None:
        from resnext_cli.commands.runs import runs as run_runs

        run_runs(configure(RunsConfig, None, overrides))

    run_command(action)


@app.command()
def calibrate(
    run_dir: Optional[str] = typer.Argument(None, help="A run folder (its best.pt) or a checkpoint.",
                                            metavar="RUN", show_default=False),
    data: Optional[str] = option("Labelled photos the run did not train on: DIR/<class>/*, or a dataset "
                                 "root (its val split).", default="the run's val split", metavar="DIR"),
    unknown_score: Optional[str] = option("How unknowns are told: components joined with '+', optionally "
                                          "weighted as in 2*style.",
                                          default=f"the checkpoint's, else {UNKNOWN_SCORE}", metavar="NAME"),
    unknown_threshold: Optional[float] = option("Share of these photos accepted as known: sets the "
                                                "unknown threshold.", default="the checkpoint's (0.95)",
                                                metavar="Q"),
    batch_size: Optional[int] = option("Images per batch.", default=CalibrateConfig().batch_size, metavar="N"),
    workers: Optional[int] = WORKERS,
    device: Optional[str] = DEVICE,
    precision: Optional[str] = PRECISION,
    channels_last: Optional[bool] = CHANNELS_LAST,
    decode: Optional[str] = DECODE,
    config: Optional[str] = CONFIG,
) -> None:  # fmt: skip
    """Refit a checkpoint's temperature and unknown threshold on labelled photos (default: the latest
    finished run, on its val split) and write them into it."""
    overrides = {k: v for k, v in locals().items() if k != "config"}

    def action() -> None:
        from resnext_cli.commands.calibrate import calibrate as run_calibrate

        run_calibrate(configure(CalibrateConfig, config, overrides))

    run_command(action)


@app.command("check-data")
def check_data(
    folder: Optional[str] = data_argument("Dataset folder, as given to `resnext train`. Same as --data."),
    data: Optional[str] = option("Dataset folder, as DATA.", metavar="DIR"),
    workers: Optional[int] = option("Reading processes.", default="every core", metavar="N"),
    json: Optional[bool] = option("Print the findings as JSON on stdout (the summary goes to "
                                  "stderr).", "--json", default=False),
    min_size: Optional[int] = option("Shorter side below this is tiny.", default=CheckDataConfig().min_size,
                                     metavar="PX"),
    imbalance_ratio: Optional[float] = option("Largest / smallest class at or above this is reported.",
                                              default=CheckDataConfig().imbalance_ratio, metavar="X"),
    config: Optional[str] = CONFIG,
) -> None:  # fmt: skip
    """Inspect a dataset before training: every file read once; exit 1 if training would fail."""
    overrides = {k: v for k, v in locals().items() if k not in ("config", "folder")}

    def action() -> int:
        from resnext_cli.commands.check_data import check_data as run_check_data

        overrides["data"] = pick_data(folder, data)
        return run_check_data(configure(CheckDataConfig, config, overrides))

    _exit_with(run_command(action))


@app.command()
def export(
    checkpoint: Optional[str] = CHECKPOINT,
    run: Optional[str] = RUN,
    format: Optional[str] = option("onnx | torchscript.", "--format", default=ExportConfig().format,
                                   metavar="FMT"),
    dynamic_batch: Optional[bool] = option("Any batch size.", "--dynamic-batch", default="batch 1"),
    opset: Optional[int] = option("ONNX opset, 18 or newer.", default=ExportConfig().opset, metavar="N"),
    out: Optional[str] = option("Output folder.", default="export/ beside the checkpoint", metavar="DIR"),
    tolerance: Optional[float] = option("Largest logit difference to PyTorch accepted.",
                                        default=ExportConfig().tolerance, metavar="X"),
    overwrite: Optional[bool] = option("Replace the model file, class_indices.json and "
                                       "preprocess.json if --out already holds them.", "--overwrite",
                                       default=False),
    config: Optional[str] = CONFIG,
) -> None:  # fmt: skip
    """Export a checkpoint to ONNX or TorchScript, verified against PyTorch."""
    overrides = {k: v for k, v in locals().items() if k != "config"}

    def action() -> None:
        from resnext_cli.commands.export import export as run_export

        run_export(configure(ExportConfig, config, overrides))

    run_command(action)


@app.command()
def audit(
    folder: Optional[str] = data_argument(DATA_HELP + " Same as --data."),
    data: Optional[str] = option(DATA_HELP, metavar="DIR"),
    weights: Optional[str] = option("Backbone: imagenet | none | PATH (state dict or checkpoint).",
                                    default="imagenet", metavar="W"),
    checkpoint: Optional[str] = option("A trained run's best.pt as the backbone (with its "
                                       "preprocessing), instead of --weights.", metavar="PATH"),
    arch: Optional[str] = option("Architecture (`resnext archs`).",
                                 default="resnext50_32x4d, or the checkpoint's", metavar="ARCH"),
    img_size: Optional[int] = option("Crop size.", default="224, or the checkpoint's", metavar="S"),
    folds: Optional[int] = option("Cross-validation folds for the out-of-fold probabilities.",
                                  default=AuditConfig().folds, metavar="K"),
    similarity: Optional[float] = option("Centred cosine similarity at or above which two images "
                                         "count as near-copies.", default=AuditConfig().similarity,
                                         metavar="X"),
    out: Optional[str] = option("Output folder.", default="runs/audit", metavar="DIR"),
    json: Optional[bool] = JSON,
    gallery: Optional[int] = option("Findings per section shown with thumbnails in audit.html.",
                                    default=AuditConfig().gallery, metavar="N"),
    batch_size: Optional[int] = option("Images per batch.", default=AuditConfig().batch_size, metavar="N"),
    workers: Optional[int] = WORKERS,
    device: Optional[str] = DEVICE,
    precision: Optional[str] = PRECISION,
    decode: Optional[str] = DECODE,
    seed: Optional[int] = option("Seed of the folds (and of the split of a single folder).",
                                 default=AuditConfig().seed, metavar="N"),
    config: Optional[str] = CONFIG,
) -> None:  # fmt: skip
    """Find likely label errors, near-duplicates and train/val leaks in a dataset (never changes
    a file): audit.csv, audit.json and audit.html in --out."""
    overrides = {k: v for k, v in locals().items() if k not in ("config", "folder")}

    def action() -> int:
        from resnext_cli.commands.audit import audit as run_audit

        overrides["data"] = pick_data(folder, data)
        return run_audit(configure(AuditConfig, config, overrides))

    _exit_with(run_command(action))


cache_app = typer.Typer(
    help="The backbone-feature cache (--cache-features, audit): list or clear it.",
    no_args_is_help=True,
)
app.add_typer(cache_app, name="cache")


@cache_app.command("list")
def cache_list(json: Optional[bool] = JSON) -> None:
    """Entries of the cache, most recently used first, with their size and the folder's limit."""
    overrides = {"json": json}

    def action() -> None:
        from resnext_cli.commands.cache import list_cache

        list_cache(configure(CacheConfig, None, overrides))

    run_command(action)


@cache_app.command("clear")
def cache_clear(
    older_than: Optional[float] = option("Only entries unused for this many days.", default="all",
                                         metavar="DAYS"),
) -> None:
    """Remove cached features (they are recomputed when needed)."""
    overrides = {"older_than": older_than}

    def action() -> None:
        from resnext_cli.commands.cache import clear_cache

        clear_cache(configure(CacheConfig, None, overrides))

    run_command(action)


@app.command()
def archs() -> None:
    """List the architectures with their parameter counts (ImageNet head)."""

    def action() -> None:
        from resnext_cli.model.networks import arch_parameter_counts

        counts = arch_parameter_counts()
        table = Table("arch", "family", "parameters", "blocks", box=None)
        for name, spec in ARCHS.items():
            table.add_row(name, spec.family, f"{counts[name]:,}", spec.description)
        ui.console().print(table)

    run_command(action)


def _exit_with(code: Any) -> None:
    if code:
        raise typer.Exit(code)


def main(argv: list[str] | None = None) -> None:
    """The console script: usage errors, too, become one `Error:` paragraph with exit code 2."""
    from typer.main import get_command

    command = get_command(app)
    try:
        code = command.main(args=argv, prog_name="resnext", standalone_mode=False)
    except Exception as exc:
        # click's UsageError family (typer may vendor its own click, so match by shape)
        if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
            raise
        if type(exc).__name__ == "NoArgsIsHelpError":
            exc.show()  # type: ignore[attr-defined]
            sys.exit(0)
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "resnext"
        message = exc.format_message().rstrip()
        _print_error(f"{message}{'' if message.endswith('.') else '.'} See `{where} --help`.")
        sys.exit(exc.exit_code)
    _exit(code if isinstance(code, int) else 0)


def _exit(code: int) -> None:
    """Exit with `code`. If data-loader helper threads are still alive (after Ctrl-C or an error
    mid-epoch), skip interpreter teardown, where they would print tracebacks after our one
    paragraph; every file was already written atomically and closed."""
    try:
        sys.stdout.flush()  # what is still buffered for a pipe goes now, or the pipe is closed
    except BrokenPipeError:
        discard_stdout()
        code = EXIT_CLOSED_PIPE
    stop_children()
    if threading.active_count() > 1:
        with contextlib.suppress(OSError):
            sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def stop_children() -> None:
    """Decoding workers still alive at exit (persistent ones, or after an interruption) are
    stopped and reaped now, instead of noticing seconds later that this process is gone."""
    children = multiprocessing.active_children()
    if not children:
        return
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would call their end a crash
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=5)
