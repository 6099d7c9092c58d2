"""`resnext train`: the tutorial's transfer-learning recipe without its silent failures."""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from resnext_cli import ui
from resnext_cli.config import ReportConfig, TrainConfig, to_plain_dict
from resnext_cli.errors import EXIT_FAILED, EXIT_INTERRUPTED, UserError

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader


@dataclass
class TrainResult:
    run_dir: Path
    best_val_acc: float
    best_epoch: int
    epochs_completed: int


class LrSchedule:
    """Per-step multiplier: linear warmup, then cosine to zero, step decay or constant.

    A plain object (not a closure) so the scheduler's state dict holds only plain types.
    """

    def __init__(self, kind: str, total_steps: int, warmup_steps: int, steps_per_epoch: int):
        self.kind = kind
        self.total_steps = max(1, total_steps)
        self.warmup_steps = warmup_steps
        # step decay: x0.1 at one third and two thirds of training
        self.step_every = max(1, math.ceil(total_steps / 3 / steps_per_epoch)) * steps_per_epoch

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "cosine":
            progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if self.kind == "step":
            return 0.1 ** (step // self.step_every)
        return 1.0


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(
    model: torch.nn.Module, config: TrainConfig, backbone_will_train: bool, frozen_now: bool
) -> torch.optim.Optimizer:
    """Head and backbone in separate groups; the backbone gets `backbone_lr_mult` when it is
    fine-tuned after a frozen phase (`--unfreeze-after`), the full rate with `--no-freeze`."""
    import torch

    head = list(model.fc.parameters())
    groups = [{"params": head, "lr": config.lr, "name": "head"}]
    if backbone_will_train:
        head_ids = {id(p) for p in head}
        backbone = [p for p in model.parameters() if id(p) not in head_ids]
        mult = config.backbone_lr_mult if frozen_now else 1.0
        groups.insert(0, {"params": backbone, "lr": config.lr * mult, "name": "backbone"})
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=config.lr, weight_decay=config.weight_decay)


def train(config: TrainConfig) -> TrainResult:
    """Single process, or one of torchrun's processes (DistributedDataParallel)."""
    from resnext_cli.distributed import init_distributed, shutdown

    ctx = init_distributed(config.device)
    if not ctx.is_main:
        ui.silence()
    try:
        return _train(config, ctx)
    finally:
        shutdown(ctx)


def _train(config: TrainConfig, ctx: Any) -> TrainResult:
    import torch

    from resnext_cli import checkpoint as ckpt
    from resnext_cli import data, features, models
    from resnext_cli.device import (
        make_grad_scaler,
        pin_memory_for,
        precision_for,
        prepare_model,
        select_device,
    )
    from resnext_cli.distributed import broadcast_object, process_device
    from resnext_cli.plots import (
        BackgroundWriter,
        confusion_matrix_png,
        training_curves_png,
    )

    explicit_freeze = config.freeze
    cfg = config.resolved()
    assert cfg.seed is not None and cfg.workers is not None and cfg.freeze is not None
    resume = load_resume_state(cfg.resume) if cfg.resume else None
    if resume is not None and _finished(cfg, resume):
        ui.info(
            f"The run in {cfg.resume} already finished (epoch {resume['epoch']} of {cfg.epochs}, "
            f"best val accuracy {resume['best_val_acc']:.2%}); nothing to do. Pass --epochs N "
            "with --resume to train it further."
        )
        run_dir = Path(cfg.resume)
        return TrainResult(run_dir, resume["best_val_acc"], resume["best_epoch"], resume["epoch"])
    if ctx.enabled:
        # one seed for all processes, so they start from the same weights and order
        cfg = dataclasses.replace(cfg, seed=broadcast_object(ctx, cfg.seed))
    seed_everything(cfg.seed)
    device = select_device(process_device(ctx, cfg.device))
    cfg = dataclasses.replace(cfg, precision=precision_for(cfg.precision, device))
    if cfg.sync_bn and not ctx.enabled:
        ui.warn("--sync-bn has no effect in a single process (it is for torchrun jobs).")
    elif cfg.sync_bn and device.type != "cuda":
        raise UserError(
            "--sync-bn needs CUDA devices: PyTorch's SyncBatchNorm does not run on the CPU. "
            "Leave it out; each process then normalises over its own batch."
        )

    layout = data.discover_dataset(cfg.data, cfg.val_split, cfg.seed)
    for message in layout.warnings:
        ui.warn(message)
    if cfg.weights == "none" and explicit_freeze:
        ui.warn(
            "--freeze with --weights none keeps a random backbone fixed; only the head trains "
            "and it will learn little. Going on as asked."
        )
    if resume is not None and resume["classes"] != layout.classes:
        raise UserError(
            f"The classes in {cfg.data} changed since the run started "
            f"({', '.join(resume['classes'])} -> {', '.join(layout.classes)}); cannot resume."
        )

    model = models.build_model(cfg.arch, len(layout.classes))
    if resume is None:
        models.load_weights(model, cfg.arch, cfg.weights, ui.info)
    else:
        model.load_state_dict(resume["model"])
    start_epoch = resume["epoch"] + 1 if resume else 1
    frozen = backbone_frozen_at(cfg, start_epoch)
    models.set_backbone_trainable(model, not frozen)
    if cfg.sync_bn and ctx.enabled:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    prepare_model(model, device, cfg.channels_last)

    resolved = to_plain_dict(dataclasses.replace(cfg, resume=None))
    if ctx.is_main:
        run_dir = Path(cfg.resume) if cfg.resume else ckpt.make_run_dir(cfg.out, cfg.name)
        _write_run_files(run_dir, resolved, layout)
    run_dir = Path(broadcast_object(ctx, str(run_dir) if ctx.is_main else None))
    layout_name = ", channels-last" if cfg.channels_last else ""
    ui.info(
        f"Run folder: {run_dir}  |  {cfg.arch} on {device} ({cfg.precision}{layout_name})  |  "
        f"{len(layout.classes)} classes, {len(layout.train)} train / {len(layout.val)} val images"
    )
    if ctx.enabled:
        ui.info(
            f"Distributed: {ctx.world_size} processes, batch {cfg.batch_size} per process "
            f"({cfg.batch_size * ctx.world_size} global)."
        )
    if resume is not None:
        ui.info(f"Resuming after epoch {resume['epoch']} of {cfg.epochs}.")
    ui.info(
        f"Trainable parameters: {models.count_parameters(model, trainable_only=True):,} of "
        f"{models.count_parameters(model):,} ({'backbone frozen' if frozen else 'all layers'})"
    )

    mean, std = models.IMAGENET_MEAN, models.IMAGENET_STD
    decode_size = data.resize_size(cfg.img_size)
    pin = pin_memory_for(device)
    train_sampler = data.EpochSampler(
        len(layout.train), cfg.seed, rank=ctx.rank, world_size=ctx.world_size
    )
    train_transform = data.train_transform if cfg.augment else data.eval_transform
    train_loader = data.make_loader(
        data.ImageListDataset(
            layout.train, train_transform(cfg.img_size), decode_size, augment_seed=cfg.seed
        ),
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        sampler=train_sampler,
        pin_memory=pin,
        # a lone last image cannot be batch-normalised in train mode
        drop_last=len(train_sampler) % cfg.batch_size == 1,
    )
    val_loader = data.make_loader(
        data.ImageListDataset(layout.val, data.eval_transform(cfg.img_size), decode_size),
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        sampler=data.EpochSampler(
            len(layout.val), cfg.seed, shuffle=False, rank=ctx.rank, world_size=ctx.world_size,
            pad=False,
        ),
        pin_memory=pin,
    )
    backbone_will_train = not backbone_frozen_at(cfg, 1) or cfg.unfreeze_after is not None
    optimizer = build_optimizer(model, cfg, backbone_will_train, backbone_frozen_at(cfg, 1))
    steps_per_epoch = max(1, len(train_loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        LrSchedule(
            cfg.scheduler,
            cfg.epochs * steps_per_epoch,
            cfg.warmup_epochs * steps_per_epoch,
            steps_per_epoch,
        ),
    )
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    scaler = make_grad_scaler(device, cfg.precision)
    step = StepContext(device, cfg.precision, cfg.channels_last, criterion, mean, std, ctx)
    if cfg.compile:
        step.features = compiled_features(model)
    failures: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    best_acc, best_epoch = -1.0, 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        # the position in the schedule, not its shape: --epochs may have extended the run
        position = dict(resume["scheduler"], lr_lambdas=[None] * len(optimizer.param_groups))
        scheduler.load_state_dict(position)
        scaler.load_state_dict(resume["scaler"])
        torch.set_rng_state(resume["torch_rng_state"])
        rows = [dict(row) for row in resume["metrics"]]
        best_acc, best_epoch = resume["best_val_acc"], resume["best_epoch"]
    meta = dict(arch=cfg.arch, classes=layout.classes, img_size=cfg.img_size, mean=mean, std=std)
    completed = start_epoch - 1
    trainer = None if frozen else wrap_for_training(model, ctx, device, cfg.compile)
    cache = None
    if cfg.cache_features and frozen:
        cache = features.prepare_cache(
            model, layout, cfg, step, ctx, pin,
            lambda found, samples: _report_failures(found, samples, failures),
        )  # fmt: skip
    train_labels = torch.tensor([label for _, label in layout.train])
    val_labels = torch.tensor([label for _, label in layout.val])
    plots = BackgroundWriter()  # results.png and confusion_matrix.png, off the epoch's path

    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            if frozen and not backbone_frozen_at(cfg, epoch):
                frozen = False
                models.set_backbone_trainable(model, True)
                trainer = wrap_for_training(model, ctx, device, cfg.compile)
                ui.info(
                    f"Epoch {epoch}: unfreezing the backbone (lr x{cfg.backbone_lr_mult}); "
                    f"{models.count_parameters(model, trainable_only=True):,} parameters train."
                )
            train_sampler.set_epoch(epoch)
            started, epoch_lr = time.perf_counter(), optimizer.param_groups[-1]["lr"]
            if cache is not None and frozen:
                view = (epoch - 1) % cache.views
                train_loss, train_acc = features.train_head_epoch(
                    model, cache, view, train_labels, train_loader, optimizer, scheduler, scaler, step
                )
                validation = features.validate_head(model, cache, val_labels, step)
            else:
                train_loss, train_acc = _train_one_epoch(
                    model, trainer, train_loader, optimizer, scheduler, scaler, step,
                    failures, f"epoch {epoch}/{cfg.epochs}",
                )  # fmt: skip
                validation = run_validation(model, val_loader, step, failures)
            val_acc = validation.accuracy
            rows.append(
                {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "train_acc": train_acc,
                    "val_loss": validation.loss,
                    "val_acc": val_acc,
                    "lr": epoch_lr,  # the head's rate as the epoch began
                    "seconds": time.perf_counter() - started,
                }
            )
            # order matters for a kill at any point: best.pt, then last.pt (the resume point),
            # then metrics.csv, which a resume rewrites from last.pt
            improved = val_acc > best_acc
            if improved:
                best_acc, best_epoch = val_acc, epoch
            if improved and ctx.is_main:
                ckpt.save_torch(
                    ckpt.build_checkpoint(model, epoch=epoch, val_acc=val_acc, config=resolved, **meta),
                    run_dir / "best.pt",
                )
            if ctx.is_main:
                last = ckpt.build_checkpoint(
                    model, epoch=epoch, val_acc=val_acc, config=resolved, **meta
                )
                last.update(
                    optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(),
                    scaler=scaler.state_dict(),
                    best_val_acc=best_acc,
                    best_epoch=best_epoch,
                    metrics=rows,
                    torch_rng_state=torch.get_rng_state(),
                )
                ckpt.save_torch(last, run_dir / "last.pt")
                ckpt.write_metrics(run_dir / "metrics.csv", rows)
                plots.submit(run_dir / "results.png", partial(training_curves_png, list(rows)))
                if improved:
                    title = f"val split, epoch {epoch}: accuracy {val_acc:.2%}"
                    render = partial(confusion_matrix_png, validation.confusion, layout.classes, title)
                    plots.submit(run_dir / "confusion_matrix.png", render)
            completed = epoch
            _print_epoch_row(rows[-1], improved, first=epoch == start_epoch)
            if cfg.patience and epoch - best_epoch >= cfg.patience:
                ui.info(f"Early stopping: no val improvement for {cfg.patience} epochs.")
                break
    except KeyboardInterrupt:
        saved = (
            f"{run_dir / 'last.pt'} holds epoch {completed}; continue with "
            f"`resnext train --resume {run_dir}`."
            if completed
            else "No epoch had completed, so nothing was saved."
        )
        raise UserError(f"Interrupted during epoch {completed + 1}. {saved}", EXIT_INTERRUPTED) from None

    plots.close()
    for problem in plots.errors:
        ui.warn(f"could not draw a plot ({problem}); training itself is unaffected.")
    if failures:
        ui.warn(f"{len(failures)} unreadable file(s) were skipped (listed above).")
    ui.info(f"Best val accuracy {best_acc:.2%} at epoch {best_epoch} -> {run_dir / 'best.pt'}")
    if cfg.report and ctx.is_main:
        from resnext_cli.report import write_report

        try:
            write_report(ReportConfig(str(run_dir), workers=config.workers, device=cfg.device))
        except UserError as exc:  # the run itself is complete and saved
            ui.warn(f"report.html was not written: {exc} Try `resnext report {run_dir}` later.")
    return TrainResult(run_dir, best_acc, best_epoch, len(rows))


def backbone_frozen_at(cfg: TrainConfig, epoch: int) -> bool:
    """Frozen while --freeze holds and the --unfreeze-after epochs have not yet passed."""
    return bool(cfg.freeze) and (cfg.unfreeze_after is None or epoch <= cfg.unfreeze_after)


def _finished(cfg: TrainConfig, state: dict[str, Any]) -> bool:
    stopped_early = bool(cfg.patience) and state["epoch"] - state["best_epoch"] >= cfg.patience
    return state["epoch"] >= cfg.epochs or stopped_early


def resume_config(resume: str, overrides: dict[str, Any]) -> TrainConfig:
    """The run's saved config, with only the flags that cannot change its result so far."""
    from resnext_cli.config import check_fields, read_yaml_config

    run_dir = _resume_dir(resume)
    given = {k: v for k, v in overrides.items() if v is not None}
    fixed = sorted(set(given) - RESUME_OVERRIDABLE)
    if fixed:
        flags = ", ".join("--" + k.replace("_", "-") for k in fixed)
        raise UserError(
            f"--resume continues {run_dir} exactly as it was configured, so {flags} cannot be "
            f"changed; only {', '.join('--' + k for k in sorted(RESUME_OVERRIDABLE))} can. "
            "Start a new run to change the others."
        )
    values = read_yaml_config(str(run_dir / "config.yaml"))
    values.update(given, resume=str(run_dir))
    check_fields(TrainConfig, values, source=str(run_dir / "config.yaml"))
    config = TrainConfig(**values)
    config.validate()
    return config


RESUME_OVERRIDABLE = {"epochs", "workers", "device", "report"}


def _resume_dir(resume: str) -> Path:
    path = Path(resume)
    run_dir = path.parent if path.name == "last.pt" else path
    if not (run_dir / "last.pt").is_file() or not (run_dir / "config.yaml").is_file():
        raise UserError(
            f"Cannot resume from {resume}: expected a run folder holding last.pt and config.yaml "
            "(or the path of such a last.pt). A run interrupted before its first epoch ended "
            "has nothing to resume; start it again."
        )
    return run_dir


def load_resume_state(run_dir: str) -> dict[str, Any]:
    from resnext_cli.checkpoint import load_checkpoint

    state = load_checkpoint(Path(run_dir) / "last.pt")
    missing = [k for k in RESUME_KEYS if k not in state]
    if missing:
        raise UserError(f"{run_dir}/last.pt lacks what a resume needs: {', '.join(missing)}.")
    return state


RESUME_KEYS = ("optimizer", "scheduler", "scaler", "best_val_acc", "best_epoch", "metrics",
               "torch_rng_state")  # fmt: skip


def _write_run_files(run_dir: Path, resolved: dict[str, Any], layout: Any) -> None:
    import json

    import yaml

    from resnext_cli import checkpoint as ckpt

    ckpt.atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    ckpt.write_class_indices(run_dir / "class_indices.json", layout.classes)
    if layout.split is not None:
        ckpt.atomic_write_text(run_dir / "split.json", json.dumps(layout.split, indent=1) + "\n")


def _report_failures(
    batch_failures: list[tuple[int, str]], samples: list[tuple[str, int]], seen: dict[str, str]
) -> None:
    """Each unreadable file is reported once, however many epochs meet it."""
    for index, reason in batch_failures:
        path = samples[index][0]
        if path not in seen:
            seen[path] = reason
            ui.warn(f"skipped unreadable file {path}: {reason}")


@dataclass
class StepContext:
    """How a batch is placed and computed: the same for training and validation."""

    device: torch.device
    precision: str
    channels_last: bool
    criterion: torch.nn.Module
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dist: Any = None  # DistContext: sums over processes
    features: Any = None  # images -> pooled backbone features; None: models.backbone_features

    def inputs(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        from resnext_cli.device import model_inputs

        images = model_inputs(batch.images, self.device, self.channels_last, self.mean, self.std)
        return images, batch.labels.to(self.device, non_blocking=True)

    def autocast(self) -> Any:
        from resnext_cli.device import autocast

        return autocast(self.device, self.precision)

    def update(
        self, loss: torch.Tensor, optimizer: Any, scheduler: Any, scaler: Any,
        average: list[torch.nn.Parameter] | None = None,
    ) -> None:  # fmt: skip
        """One optimiser step through the grad scaler; `average`: parameters whose gradients are
        averaged over processes by hand (the frozen phase's head, which DDP does not wrap)."""
        from resnext_cli.distributed import average_gradients

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if average is not None:
            average_gradients(self.dist, average)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()


def wrap_for_training(
    model: torch.nn.Module, ctx: Any, device: torch.device, compile: bool = False
) -> torch.nn.Module:
    """What the whole network trains through: compiled if asked, and DistributedDataParallel
    under torchrun. The checkpoint is always taken from the plain `model`."""
    import torch

    trainer = torch.compile(model) if compile else model
    if not ctx.enabled:
        return trainer
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(trainer, device_ids=device_ids)


def compiled_features(model: torch.nn.Module) -> Any:
    import torch

    from resnext_cli.models import backbone_features

    return torch.compile(partial(backbone_features, model))


def _train_one_epoch(
    model: torch.nn.Module,
    trainer: torch.nn.Module | None,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    step: StepContext,
    failures: dict[str, str],
    label: str,
) -> tuple[float, float]:
    """One pass over this process's shard. `trainer` is None while the backbone is frozen: the
    backbone then runs without autograd and only the head's gradients are averaged."""
    import torch

    from resnext_cli.models import backbone_features, set_train_mode

    frozen = trainer is None
    set_train_mode(model, backbone_frozen=frozen)
    tally = TrainTally()
    started = time.perf_counter()
    bar = ui.progress(loader, desc=label, unit="batch")
    for batch in bar:
        _report_failures(batch.failures, loader.dataset.samples, failures)
        if batch.images is None or (not frozen and len(batch.indices) < 2):
            continue  # nothing decodable, or a single image batch norm cannot train on
        images, labels = step.inputs(batch)
        with step.autocast():
            if frozen:
                with torch.no_grad():  # only the head builds a graph
                    features = (step.features or partial(backbone_features, model))(images)
                logits = model.fc(features)
            else:
                logits = trainer(images)
            loss = step.criterion(logits.float(), labels)
        head = list(model.fc.parameters()) if frozen else None
        step.update(loss, optimizer, scheduler, scaler, average=head)
        tally.add(loss, logits, labels)
        bar.set_postfix(tally.progress(time.perf_counter() - started))
    return tally.result(step)


class TrainTally:
    """Loss and accuracy sums over an epoch, reduced over torchrun's processes at the end."""

    def __init__(self) -> None:
        self.loss_sum, self.correct, self.seen = 0.0, 0, 0

    def add(self, mean_loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum += mean_loss.item() * labels.numel()
        self.correct += int((logits.argmax(1) == labels).sum().item())
        self.seen += labels.numel()

    def progress(self, elapsed: float) -> dict[str, str]:
        return {"loss": f"{self.loss_sum / self.seen:.4f}", "acc": f"{self.correct / self.seen:.2%}",
                "img_s": f"{self.seen / max(elapsed, 1e-9):.1f}"}  # fmt: skip

    def result(self, step: StepContext) -> tuple[float, float]:
        from resnext_cli.distributed import all_reduce_sums

        loss_sum, correct, seen = all_reduce_sums(
            step.dist, [self.loss_sum, self.correct, self.seen], step.device
        )
        if seen == 0:
            raise UserError(
                "No training image could be read in this epoch (see the warnings above).",
                EXIT_FAILED,
            )
        return loss_sum / seen, correct / seen


class Validation(NamedTuple):
    loss: float
    accuracy: float  # 0-1
    confusion: list[list[int]]  # row = true class, column = predicted, over all processes


def run_validation(
    model: torch.nn.Module, loader: DataLoader, step: StepContext, failures: dict[str, str]
) -> Validation:
    """Loss, accuracy and confusion matrix over the val split, in eval mode."""
    import torch

    model.eval()
    tally = ValidationTally(model.fc.out_features)
    with torch.inference_mode():
        for batch in ui.progress(loader, desc="val", unit="batch"):
            _report_failures(batch.failures, loader.dataset.samples, failures)
            if batch.images is None:
                continue
            images, labels = step.inputs(batch)
            with step.autocast():
                logits = model(images).float()
            tally.add(step.criterion(logits, labels), logits, labels)
    return tally.result(step)


class ValidationTally:
    """Sums that validation accumulates, reduced over torchrun's processes at the end."""

    def __init__(self, n_classes: int) -> None:
        import torch

        self.n_classes = n_classes
        self.loss_sum = 0.0
        self.counts = torch.zeros(n_classes * n_classes, dtype=torch.long)

    def add(self, mean_loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        import torch

        self.loss_sum += mean_loss.item() * labels.numel()
        cells = (labels * self.n_classes + logits.argmax(1)).cpu()
        self.counts += torch.bincount(cells, minlength=self.n_classes**2)

    def result(self, step: StepContext) -> Validation:
        from resnext_cli.distributed import all_reduce_sums

        loss_sum, *counts = all_reduce_sums(
            step.dist, [self.loss_sum, *self.counts.tolist()], step.device
        )
        n = self.n_classes
        confusion = [[int(counts[i * n + j]) for j in range(n)] for i in range(n)]
        seen = sum(map(sum, confusion))
        if seen == 0:
            raise UserError("No validation image could be read (see the warnings above).", EXIT_FAILED)
        correct = sum(confusion[i][i] for i in range(n))
        return Validation(loss_sum / seen, correct / seen, confusion)


def _print_epoch_row(row: dict[str, Any], improved: bool, first: bool) -> None:
    from rich.table import Table

    table = Table(show_header=first, box=None, pad_edge=False)
    widths = {"epoch": 5, "train_loss": 10, "train_acc": 9, "val_loss": 8, "val_acc": 8,
              "lr": 9, "seconds": 7}  # fmt: skip
    for name, width in widths.items():
        table.add_column(name, justify="right", min_width=width, max_width=width)
    table.add_column("", min_width=4)
    table.add_row(
        str(row["epoch"]),
        f"{row['train_loss']:.4f}",
        f"{row['train_acc']:.2%}",
        f"{row['val_loss']:.4f}",
        f"{row['val_acc']:.2%}",
        f"{row['lr']:.2e}",
        f"{row['seconds']:.1f}",
        "best" if improved else "",
    )
    ui.show(table)
