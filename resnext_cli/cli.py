"""The `resnext` command line: parse flags, build a config, call one function, report errors.

torch is imported only inside the commands, so `resnext --help` answers at once.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, List, Optional

import typer
from rich.table import Table

from resnext_cli import ui
from resnext_cli.archs import ARCHS
from resnext_cli.config import (
    OPTIMIZERS,
    SCHEDULERS,
    BatchPredictConfig,
    CheckDataConfig,
    EvaluateConfig,
    ExportConfig,
    PredictConfig,
    ReportConfig,
    TrainConfig,
    build_config,
)
from resnext_cli.errors import EXIT_FAILED, EXIT_INTERRUPTED, UserError

app = typer.Typer(
    name="resnext",
    help="Transfer learning for image classification with ResNet / ResNeXt.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_T = TrainConfig()
PRECISION_HELP = (
    "auto | fp32 | bf16 | fp16. auto: bf16 on CPUs with native bf16 and on recent GPUs, fp16 on "
    "older GPUs, else fp32. [default: auto]"
)
LAYOUT_HELP = "Channels-last memory layout (faster convolutions). [default: on]"
INFERENCE_WORKERS_HELP = (
    "Decoding processes. [default: half the cores, 1 to 8; none for small images on a CPU "
    "machine of at most 3 cores]"
)
CONFIG_HELP = "YAML file of option: value (snake_case); flags given here override it."


def run_command(action: Callable[[], Any]) -> Any:
    """Turn a UserError into one `Error:` paragraph and its exit code; no traceback unless
    RESNEXT_DEBUG=1."""
    debug = os.environ.get("RESNEXT_DEBUG") == "1"
    try:
        return action()
    except UserError as exc:
        if debug:
            raise
        _print_error(str(exc))
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        if debug:
            raise
        _print_error("Interrupted.")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as exc:
        if debug:
            raise
        _print_error(
            f"Unexpected failure: {type(exc).__name__}: {exc}. This is a bug in resnext or an "
            "environment problem; re-run with RESNEXT_DEBUG=1 to see the traceback."
        )
        raise typer.Exit(EXIT_FAILED) from None


def _print_error(message: str) -> None:
    sys.stderr.write(f"Error: {message}\n")
    sys.stderr.flush()


@app.command()
def train(
    data: Optional[str] = typer.Option(
        None, help="Dataset folder: DATA/train/<class>/* + DATA/val/<class>/*, or DATA/<class>/*."
    ),
    arch: Optional[str] = typer.Option(None, help=f"Architecture (`resnext archs`). [default: {_T.arch}]"),
    weights: Optional[str] = typer.Option(
        None, help="imagenet | none | PATH (state dict or resnext checkpoint). [default: imagenet]"
    ),
    freeze: Optional[bool] = typer.Option(
        None, "--freeze/--no-freeze",
        help="Train only the head; backbone weights and BN statistics stay fixed. "
        "[default: freeze, except with --weights none]",
    ),
    unfreeze_after: Optional[int] = typer.Option(
        None, help="Fine-tune the whole network after N head-only epochs."
    ),
    backbone_lr_mult: Optional[float] = typer.Option(
        None, help=f"Backbone lr = lr x this after --unfreeze-after. [default: {_T.backbone_lr_mult}]"
    ),
    img_size: Optional[int] = typer.Option(None, help=f"Crop size S. [default: {_T.img_size}]"),
    augment: Optional[bool] = typer.Option(
        None, "--augment/--no-augment", help="RandomResizedCrop + flip in training. [default: on]"
    ),
    cache_features: Optional[bool] = typer.Option(
        None, "--cache-features",
        help="Frozen phase: run the backbone once per image, cache the features on disk, train "
        "the head on them.",
    ),
    feature_views: Optional[int] = typer.Option(
        None, help="With --cache-features: 1 plain + K-1 augmented views, cycled over epochs. [default: 1]"
    ),
    val_split: Optional[float] = typer.Option(
        None, help=f"Val share when DATA has no val folder. [default: {_T.val_split}]"
    ),
    epochs: Optional[int] = typer.Option(None, help=f"[default: {_T.epochs}]"),
    batch_size: Optional[int] = typer.Option(
        None, help=f"Per process under torchrun (global = this x processes). [default: {_T.batch_size}]"
    ),
    lr: Optional[float] = typer.Option(
        None, help=f"Head learning rate, used as given under torchrun (not scaled). [default: {_T.lr}]"
    ),
    weight_decay: Optional[float] = typer.Option(None, help=f"[default: {_T.weight_decay}]"),
    optimizer: Optional[str] = typer.Option(
        None, help=f"{' | '.join(OPTIMIZERS)} [default: {_T.optimizer}]"
    ),
    scheduler: Optional[str] = typer.Option(
        None, help=f"{' | '.join(SCHEDULERS)}, per step. [default: {_T.scheduler}]"
    ),
    warmup_epochs: Optional[int] = typer.Option(None, help="Linear lr warmup. [default: 0]"),
    label_smoothing: Optional[float] = typer.Option(None, help="[default: 0.0]"),
    seed: Optional[int] = typer.Option(
        None, help="Seed; on the CPU the same seed repeats a run exactly. [default: random, saved]"
    ),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N | mps [default: auto]"),
    precision: Optional[str] = typer.Option(None, help=PRECISION_HELP),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last", help=LAYOUT_HELP),
    compile: Optional[bool] = typer.Option(
        None, "--compile", help="torch.compile the training forward (opt-in; compiling takes a while)."
    ),
    workers: Optional[int] = typer.Option(
        None, help="Decoding worker processes. [default: half the cores, 1 to 8]"
    ),
    out: Optional[str] = typer.Option(None, help="Run folder. [default: runs/exp, runs/exp2, ...]"),
    name: Optional[str] = typer.Option(None, help="Run folder runs/NAME."),
    patience: Optional[int] = typer.Option(
        None, help="Stop after N epochs without val improvement. [default: off]"
    ),
    sync_bn: Optional[bool] = typer.Option(
        None, "--sync-bn", help="Under torchrun: batch norm statistics over all processes."
    ),
    resume: Optional[str] = typer.Option(
        None, help="Continue an interrupted run: its folder or last.pt (--epochs may extend it)."
    ),
    report: Optional[bool] = typer.Option(
        None, "--report/--no-report",
        help="Evaluate best.pt on the val split and write report.html at the end. [default: on]",
    ),
    config: Optional[str] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
) -> None:
    """Train a classifier on a folder of class folders: pretrained backbone, new head."""
    overrides = {k: v for k, v in locals().items() if k not in ("config", "resume")}

    def action() -> None:
        from resnext_cli.train import resume_config
        from resnext_cli.train import train as run_train

        if resume and config:
            raise UserError("--resume uses the run's own config.yaml; leave out --config.")
        run_train(
            resume_config(resume, overrides) if resume else build_config(TrainConfig, config, overrides)
        )

    run_command(action)


_MODEL_OPTIONS_HELP = "Without --checkpoint: the newest runs/*/best.pt."


@app.command()
def predict(
    images: List[str] = typer.Argument(..., help="Image files."),
    checkpoint: Optional[str] = typer.Option(None, help=_MODEL_OPTIONS_HELP),
    weights: Optional[str] = typer.Option(None, help="A plain state dict (with --arch, --class-indices)."),
    arch: Optional[str] = typer.Option(None, help="Architecture of --weights."),
    class_indices: Optional[str] = typer.Option(None, help="class_indices.json for --weights."),
    topk: Optional[int] = typer.Option(None, help="Classes to show per image. [default: 5]"),
    img_size: Optional[int] = typer.Option(None, help="[default: the checkpoint's, else 224]"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N | mps"),
    precision: Optional[str] = typer.Option(None, help=PRECISION_HELP),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last", help=LAYOUT_HELP),
    compile: Optional[bool] = typer.Option(None, "--compile", help="torch.compile the model (opt-in)."),
    json: Optional[bool] = typer.Option(None, "--json", help="Print JSON instead of tables."),
    plot: Optional[str] = typer.Option(None, help="Save the image titled with its prediction (PNG)."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
) -> None:
    """Classify one or more images."""
    overrides = {k: v for k, v in locals().items() if k != "config"}

    def action() -> None:
        from resnext_cli.predict import predict as run_predict

        run_predict(build_config(PredictConfig, config, overrides))

    run_command(action)


@app.command("batch-predict")
def batch_predict(
    dir: str = typer.Argument(..., help="Folder of images."),
    batch_size: Optional[int] = typer.Option(None, help="[default: 8]"),
    checkpoint: Optional[str] = typer.Option(None, help=_MODEL_OPTIONS_HELP),
    weights: Optional[str] = typer.Option(None, help="A plain state dict (with --arch, --class-indices)."),
    arch: Optional[str] = typer.Option(None, help="Architecture of --weights."),
    class_indices: Optional[str] = typer.Option(None, help="class_indices.json for --weights."),
    recursive: Optional[bool] = typer.Option(None, "--recursive", "-r", help="Include sub-folders."),
    topk: Optional[int] = typer.Option(None, help="Classes per image in the output. [default: 1]"),
    output: Optional[str] = typer.Option(None, help="Results file: .csv or .jsonl."),
    workers: Optional[int] = typer.Option(None, help=INFERENCE_WORKERS_HELP),
    img_size: Optional[int] = typer.Option(None, help="[default: the checkpoint's, else 224]"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N | mps"),
    precision: Optional[str] = typer.Option(None, help=PRECISION_HELP),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last", help=LAYOUT_HELP),
    compile: Optional[bool] = typer.Option(None, "--compile", help="torch.compile the model (opt-in)."),
    quiet: Optional[bool] = typer.Option(None, "--quiet", "-q", help="No line per image."),
    resume_output: Optional[bool] = typer.Option(
        None, "--resume-output", help="Skip images already in --output (after an interruption)."
    ),
    onnx: Optional[str] = typer.Option(
        None, help="Run an exported model.onnx on onnxruntime instead of a checkpoint."
    ),
    config: Optional[str] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
) -> None:
    """Classify every image in a folder, streaming results as batches finish."""
    overrides = {k: v for k, v in locals().items() if k != "config"}

    def action() -> int:
        from resnext_cli.predict import batch_predict as run_batch_predict

        return run_batch_predict(build_config(BatchPredictConfig, config, overrides))

    code = run_command(action)
    if code:
        raise typer.Exit(code)


@app.command()
def evaluate(
    data: Optional[str] = typer.Option(
        None, help="DIR/<class>/*, or a dataset root (then its val split)."
    ),
    checkpoint: Optional[str] = typer.Option(None, help=_MODEL_OPTIONS_HELP),
    weights: Optional[str] = typer.Option(None, help="A plain state dict (with --arch, --class-indices)."),
    arch: Optional[str] = typer.Option(None, help="Architecture of --weights."),
    class_indices: Optional[str] = typer.Option(None, help="class_indices.json for --weights."),
    batch_size: Optional[int] = typer.Option(None, help="[default: 16]"),
    workers: Optional[int] = typer.Option(None, help=INFERENCE_WORKERS_HELP),
    out: Optional[str] = typer.Option(None, help="Output folder. [default: beside the checkpoint, eval/]"),
    json: Optional[bool] = typer.Option(None, "--json", help="Print JSON instead of tables."),
    img_size: Optional[int] = typer.Option(None, help="[default: the checkpoint's, else 224]"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N | mps"),
    precision: Optional[str] = typer.Option(None, help=PRECISION_HELP),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last", help=LAYOUT_HELP),
    compile: Optional[bool] = typer.Option(None, "--compile", help="torch.compile the model (opt-in)."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
) -> None:
    """Accuracy, per-class metrics, confusion matrix and mistakes on a labelled folder."""
    overrides = {k: v for k, v in locals().items() if k != "config"}

    def action() -> None:
        from resnext_cli.evaluate import evaluate as run_evaluate

        run_evaluate(build_config(EvaluateConfig, config, overrides))

    run_command(action)


@app.command()
def report(
    run_dir: str = typer.Argument(..., help="A run folder written by `resnext train`."),
    data: Optional[str] = typer.Option(None, help="Evaluate on this folder. [default: the run's data]"),
    batch_size: Optional[int] = typer.Option(None, help="[default: 16]"),
    workers: Optional[int] = typer.Option(None, help=INFERENCE_WORKERS_HELP),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N | mps"),
    gallery: Optional[int] = typer.Option(None, help="Mistakes shown as thumbnails. [default: 24]"),
    config: Optional[str] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
) -> None:
    """Write RUN_DIR/report.html: config, curves, confusion matrix, per-class metrics, mistakes."""
    overrides = {k: v for k, v in locals().items() if k != "config"}

    def action() -> None:
        from resnext_cli.run_report import write_report

        write_report(build_config(ReportConfig, config, overrides))

    run_command(action)


@app.command("check-data")
def check_data(
    data: str = typer.Argument(..., help="Dataset folder, as given to `resnext train --data`."),
    workers: Optional[int] = typer.Option(None, help="Reading processes. [default: every core]"),
    json: Optional[bool] = typer.Option(
        None, "--json", help="Print the findings as JSON on stdout (the summary goes to stderr)."
    ),
    min_size: Optional[int] = typer.Option(None, help="Shorter side below this is tiny. [default: 32]"),
    imbalance_ratio: Optional[float] = typer.Option(
        None, help="Largest / smallest class at or above this is reported. [default: 5]"
    ),
    config: Optional[str] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
) -> None:
    """Inspect a dataset before training: every file read once; exit 1 if training would fail."""
    overrides = {k: v for k, v in locals().items() if k != "config"}

    def action() -> int:
        from resnext_cli.check_data import check_data as run_check_data

        return run_check_data(build_config(CheckDataConfig, config, overrides))

    code = run_command(action)
    if code:
        raise typer.Exit(code)


@app.command()
def export(
    checkpoint: Optional[str] = typer.Option(None, help=_MODEL_OPTIONS_HELP),
    format: Optional[str] = typer.Option(None, "--format", help="onnx | torchscript [default: onnx]"),
    dynamic_batch: Optional[bool] = typer.Option(
        None, "--dynamic-batch", help="Any batch size (default: batch 1)."
    ),
    opset: Optional[int] = typer.Option(None, help="ONNX opset, 18 or newer. [default: 18]"),
    out: Optional[str] = typer.Option(None, help="Output folder. [default: beside the checkpoint, export/]"),
    tolerance: Optional[float] = typer.Option(
        None, help="Largest logit difference to PyTorch accepted. [default: 1e-3]"
    ),
    config: Optional[str] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
) -> None:
    """Export a checkpoint to ONNX or TorchScript, verified against PyTorch."""
    overrides = {k: v for k, v in locals().items() if k != "config"}

    def action() -> None:
        from resnext_cli.export import export as run_export

        run_export(build_config(ExportConfig, config, overrides))

    run_command(action)


@app.command()
def archs() -> None:
    """List the architectures with their parameter counts (ImageNet head)."""

    def action() -> None:
        from resnext_cli.models import arch_parameter_counts

        counts = arch_parameter_counts()
        table = Table("arch", "family", "parameters", "blocks", box=None)
        for name, spec in ARCHS.items():
            table.add_row(name, spec.family, f"{counts[name]:,}", spec.description)
        ui.console().print(table)

    run_command(action)


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
    import threading

    if threading.active_count() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
