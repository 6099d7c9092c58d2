"""`resnext train`: the tutorial's transfer-learning recipe without its silent failures.

Read top to bottom: `TrainRecipe.setup` builds each part in its own phase (config, device, data,
model, run folder, loaders, optimizer, restore), `train` runs the epochs, `finish` reports.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from resnext_cli import checkpoint as ckpt
from resnext_cli import features, models, run_report, ui
from resnext_cli.batches import InputSpec
from resnext_cli.config import (
    ReportConfig,
    TrainConfig,
    check_fields,
    read_yaml_config,
    to_plain_dict,
)
from resnext_cli.device import (
    decode_on_device,
    make_grad_scaler,
    pin_memory_for,
    precision_for,
    prepare_model,
    select_device,
)
from resnext_cli.distributed import (
    DistContext,
    broadcast_object,
    init_distributed,
    process_device,
    shutdown,
)
from resnext_cli.errors import EXIT_INTERRUPTED, UserError
from resnext_cli.folders import DatasetLayout, discover_dataset, write_split
from resnext_cli.loaders import EpochSampler, default_workers, image_dataset, make_loader
from resnext_cli.plots import BackgroundWriter, confusion_matrix_png, training_curves_png
from resnext_cli.steps import (
    Step,
    Validation,
    compiled_features,
    report_failures,
    run_validation,
    train_one_epoch,
    wrap_for_training,
)
from resnext_cli.transforms import Preprocessing

RESUME_OVERRIDABLE = {"epochs", "workers", "device", "decode", "report"}


@dataclass
class TrainResult:
    run_dir: Path
    best_val_acc: float
    best_epoch: int
    epochs_completed: int


def train(config: TrainConfig) -> TrainResult:
    """Single process, or one of torchrun's processes (DistributedDataParallel)."""
    ctx = init_distributed(config.device)
    if not ctx.is_main:
        ui.silence()
    try:
        recipe = TrainRecipe(config, ctx)
        finished = recipe.already_finished()
        return finished if finished is not None else recipe.run()
    finally:
        shutdown(ctx)


# ---------------------------------------------------------------- configuration


def resolve_config(config: TrainConfig, ctx: DistContext) -> TrainConfig:
    """Fill the choices left to the tool, so the saved config reproduces the run; under
    torchrun every process takes rank 0's seed (same initial weights and order). What depends
    on the device (precision, decode, workers) is filled once it is chosen (`setup_device`)."""
    freeze = config.freeze if config.freeze is not None else config.weights != "none"
    freeze_bn = config.freeze_bn
    if freeze_bn is None:  # measured (README: fine-tuning): helps after a head-only phase only
        freeze_bn = freeze and config.unfreeze_after is not None and config.weights != "none"
    seed = config.seed if config.seed is not None else random.SystemRandom().randrange(2**31)
    return dataclasses.replace(config, freeze=freeze, freeze_bn=freeze_bn,
                               seed=broadcast_object(ctx, seed))  # fmt: skip


def resume_config(resume: str, overrides: dict[str, Any]) -> TrainConfig:
    """The run's saved config, with only the flags that cannot change its result so far."""
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


def backbone_frozen_at(cfg: TrainConfig, epoch: int) -> bool:
    """Frozen while --freeze holds and the --unfreeze-after epochs have not yet passed."""
    return bool(cfg.freeze) and (cfg.unfreeze_after is None or epoch <= cfg.unfreeze_after)


# ---------------------------------------------------------------- optimisation


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


def build_optimizer(
    model: torch.nn.Module, config: TrainConfig, backbone_will_train: bool, frozen_now: bool
) -> torch.optim.Optimizer:
    """Head and backbone in separate groups; the backbone gets `backbone_lr_mult` when it is
    fine-tuned after a frozen phase (`--unfreeze-after`), the full rate with `--no-freeze`."""
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


@dataclass
class Optimization:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: Any  # torch.amp.GradScaler, disabled unless fp16 on CUDA


def setup_optimization(
    model: torch.nn.Module, cfg: TrainConfig, steps_per_epoch: int, device: torch.device
) -> Optimization:
    backbone_will_train = not backbone_frozen_at(cfg, 1) or cfg.unfreeze_after is not None
    optimizer = build_optimizer(model, cfg, backbone_will_train, backbone_frozen_at(cfg, 1))
    schedule = LrSchedule(cfg.scheduler, cfg.epochs * steps_per_epoch,
                          cfg.warmup_epochs * steps_per_epoch, steps_per_epoch)  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return Optimization(optimizer, scheduler, make_grad_scaler(device, cfg.precision))


# ---------------------------------------------------------------- data


@dataclass
class Loaders:
    train: Any  # DataLoader over layout.train, with `sampler` an EpochSampler
    val: Any
    train_labels: torch.Tensor
    val_labels: torch.Tensor


def setup_loaders(layout: DatasetLayout, cfg: TrainConfig, ctx: DistContext, spec: InputSpec) -> Loaders:
    """Seeded, epoch-keyed sampling and augmentation; validation sharded without padding."""
    assert cfg.seed is not None and cfg.workers is not None
    prep, on_device, pin = spec.preprocessing, spec.decode_on_device, pin_memory_for(spec.device)
    sampler = EpochSampler(len(layout.train), cfg.seed, rank=ctx.rank, world_size=ctx.world_size)
    train = make_loader(
        image_dataset(layout.train, prep, train=cfg.augment, augment_seed=cfg.seed,
                      on_device=on_device),
        batch_size=cfg.batch_size, workers=cfg.workers, sampler=sampler, pin_memory=pin,
        # a lone last image cannot be batch-normalised in train mode
        drop_last=len(sampler) % cfg.batch_size == 1,
    )  # fmt: skip
    val_sampler = EpochSampler(len(layout.val), cfg.seed, shuffle=False, rank=ctx.rank,
                               world_size=ctx.world_size, pad=False)  # fmt: skip
    val = make_loader(
        image_dataset(layout.val, prep, on_device=on_device),
        batch_size=cfg.batch_size, workers=cfg.workers, sampler=val_sampler, pin_memory=pin,
    )  # fmt: skip
    return Loaders(train, val, torch.tensor([label for _, label in layout.train]),
                   torch.tensor([label for _, label in layout.val]))  # fmt: skip


# ---------------------------------------------------------------- the recipe


class TrainRecipe:
    """One training run: each `setup_*` phase builds one part; `run` trains and finishes."""

    def __init__(self, config: TrainConfig, ctx: DistContext) -> None:
        self.explicit_freeze = config.freeze
        self.explicit_workers = config.workers  # the end-of-run report picks its own otherwise
        self.ctx = ctx
        self.cfg = resolve_config(config, ctx)
        self.resume = ckpt.load_resume_state(self.cfg.resume) if self.cfg.resume else None

    def already_finished(self) -> TrainResult | None:
        """A resume of a run that already reached its last epoch (or stopped early)."""
        state, cfg = self.resume, self.cfg
        if state is None:
            return None
        stopped_early = bool(cfg.patience) and state["epoch"] - state["best_epoch"] >= cfg.patience
        if state["epoch"] < cfg.epochs and not stopped_early:
            return None
        ui.info(
            f"The run in {cfg.resume} already finished (epoch {state['epoch']} of {cfg.epochs}, "
            f"best val accuracy {state['best_val_acc']:.2%}); nothing to do. Pass --epochs N "
            "with --resume to train it further."
        )
        return TrainResult(Path(str(cfg.resume)), state["best_val_acc"], state["best_epoch"],
                           state["epoch"])  # fmt: skip

    def run(self) -> TrainResult:
        self.setup()
        try:
            for epoch in range(self.start_epoch, self.cfg.epochs + 1):
                row, validation = self.run_epoch(epoch)
                self.record(row, validation)
                if self.should_stop(epoch):
                    break
        except KeyboardInterrupt:
            raise self.interrupted() from None
        return self.finish()

    # ------------------------------------------------------------ setup phases

    def setup(self) -> None:
        if self.ctx.is_main and self.resume is None:  # before anything slow: fail fast
            ckpt.check_run_dir(self.cfg.out, self.cfg.name)
        torch.manual_seed(self.cfg.seed)
        random.seed(self.cfg.seed)
        self.device = self.setup_device()
        self.layout = self.setup_data()
        self.preprocessing = self.setup_preprocessing()
        self.model = self.setup_model()
        self.run_dir = self.setup_run_folder()
        self.step = self.setup_step()
        self.loaders = setup_loaders(self.layout, self.cfg, self.ctx, self.step.spec)
        self.opt = setup_optimization(self.model, self.cfg, max(1, len(self.loaders.train)), self.device)
        self.restore()
        self.failures: dict[str, str] = {}
        self.trainer = None if self.frozen else wrap_for_training(self.model, self.ctx, self.device,
                                                                  self.cfg.compile)  # fmt: skip
        self.cache = self.setup_cache() if self.cfg.cache_features and self.frozen else None
        self.plots = BackgroundWriter()  # results.png and confusion_matrix.png, off the epoch's path

    def setup_device(self) -> torch.device:
        """The device, and what follows from it: precision, where JPEGs decode, workers."""
        cfg, ctx = self.cfg, self.ctx
        device = select_device(process_device(ctx, cfg.device))
        workers = cfg.workers if cfg.workers is not None else default_workers(device.type)
        decode = "gpu" if decode_on_device(cfg.decode, device) else "cpu"
        self.cfg = dataclasses.replace(cfg, precision=precision_for(cfg.precision, device),
                                       decode=decode, workers=workers)  # fmt: skip
        if cfg.sync_bn and not ctx.enabled:
            ui.warn("--sync-bn has no effect in a single process (it is for torchrun jobs).")
        elif cfg.sync_bn and device.type != "cuda":
            raise UserError(
                "--sync-bn needs CUDA devices: PyTorch's SyncBatchNorm does not run on the CPU. "
                "Leave it out; each process then normalises over its own batch."
            )
        return device

    def setup_data(self) -> DatasetLayout:
        cfg = self.cfg
        assert cfg.data is not None and cfg.seed is not None
        layout = discover_dataset(cfg.data, cfg.val_split, cfg.seed)
        for message in layout.warnings:
            ui.warn(message)
        if cfg.weights == "none" and self.explicit_freeze:
            ui.warn(
                "--freeze with --weights none keeps a random backbone fixed; only the head trains "
                "and it will learn little. Going on as asked."
            )
        if cfg.weights == "none" and cfg.freeze_bn:
            ui.warn("--freeze-bn with --weights none keeps BatchNorm statistics of random weights; "
                    "going on as asked.")  # fmt: skip
        if self.resume is not None and self.resume["classes"] != layout.classes:
            raise UserError(
                f"The classes in {cfg.data} changed since the run started "
                f"({', '.join(self.resume['classes'])} -> {', '.join(layout.classes)}); cannot resume."
            )
        return layout

    def setup_preprocessing(self) -> Preprocessing:
        """From the weights (torchvision's own resize for --weights imagenet), or as resumed."""
        if self.resume is not None:
            return ckpt.checkpoint_preprocessing(self.resume)
        return models.weights_preprocessing(self.cfg.arch, self.cfg.weights, self.cfg.img_size)

    def setup_model(self) -> torch.nn.Module:
        cfg = self.cfg
        model = models.build_model(cfg.arch, len(self.layout.classes))
        if self.resume is None:
            models.load_weights(model, cfg.arch, cfg.weights, ui.info)
        else:
            model.load_state_dict(self.resume["model"])
        self.start_epoch = self.resume["epoch"] + 1 if self.resume else 1
        self.frozen = backbone_frozen_at(cfg, self.start_epoch)
        models.set_backbone_trainable(model, not self.frozen)
        if cfg.sync_bn and self.ctx.enabled:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        prepare_model(model, self.device, cfg.channels_last)
        return model

    def setup_run_folder(self) -> Path:
        cfg, ctx, layout = self.cfg, self.ctx, self.layout
        self.resolved = to_plain_dict(dataclasses.replace(cfg, resume=None))
        if ctx.is_main:
            run_dir = Path(cfg.resume) if cfg.resume else ckpt.make_run_dir(cfg.out, cfg.name)
            ckpt.write_run_config(run_dir, self.resolved)
            ckpt.write_class_indices(run_dir / "class_indices.json", layout.classes)
            if layout.split is not None:
                write_split(run_dir / "split.json", layout.split)
        run_dir = Path(broadcast_object(ctx, str(run_dir) if ctx.is_main else None))
        self._announce(run_dir)
        return run_dir

    def _announce(self, run_dir: Path) -> None:
        cfg, layout = self.cfg, self.layout
        layout_name = ", channels-last" if cfg.channels_last else ""
        ui.info(
            f"Run folder: {run_dir}  |  {cfg.arch} on {self.device} ({cfg.precision}{layout_name})"
            f"  |  {len(layout.classes)} classes, {len(layout.train)} train / {len(layout.val)} "
            "val images"
        )
        if self.ctx.enabled:
            ui.info(
                f"Distributed: {self.ctx.world_size} processes, batch {cfg.batch_size} per process "
                f"({cfg.batch_size * self.ctx.world_size} global)."
            )
        if self.resume is not None:
            ui.info(f"Resuming after epoch {self.resume['epoch']} of {cfg.epochs}.")
        ui.info(
            f"Trainable parameters: {models.count_parameters(self.model, trainable_only=True):,} "
            f"of {models.count_parameters(self.model):,} "
            f"({'backbone frozen' if self.frozen else 'all layers'})"
        )

    def setup_step(self) -> Step:
        cfg = self.cfg
        criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        spec = InputSpec(self.device, cfg.channels_last, self.preprocessing, cfg.decode == "gpu")
        step = Step(spec, cfg.precision, criterion, self.ctx, freeze_bn=bool(cfg.freeze_bn))
        if cfg.compile:
            step.features = compiled_features(self.model)
        return step

    def restore(self) -> None:
        """The optimiser, schedule position, scaler, RNG and history of a resumed run."""
        self.rows: list[dict[str, Any]] = []
        self.best_acc, self.best_epoch = -1.0, 0
        state = self.resume
        if state is None:
            return
        self.opt.optimizer.load_state_dict(state["optimizer"])
        # the position in the schedule, not its shape: --epochs may have extended the run
        groups = len(self.opt.optimizer.param_groups)
        self.opt.scheduler.load_state_dict(dict(state["scheduler"], lr_lambdas=[None] * groups))
        self.opt.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng_state"])
        self.rows = [dict(row) for row in state["metrics"]]
        self.best_acc, self.best_epoch = state["best_val_acc"], state["best_epoch"]

    def setup_cache(self) -> features.FeatureCache:
        report = partial(report_failures, seen=self.failures)
        return features.prepare_cache(self.model, self.layout, self.cfg, self.step, self.ctx,
                                      pin_memory_for(self.device), report)  # fmt: skip

    # ------------------------------------------------------------ epochs

    def run_epoch(self, epoch: int) -> tuple[dict[str, Any], Validation]:
        """Train one epoch (on cached features while they serve), then validate."""
        cfg, opt = self.cfg, self.opt
        if self.frozen and not backbone_frozen_at(cfg, epoch):
            self.unfreeze(epoch)
        self.loaders.train.sampler.set_epoch(epoch)
        started, epoch_lr = time.perf_counter(), opt.optimizer.param_groups[-1]["lr"]
        if self.cache is not None and self.frozen:
            view = (epoch - 1) % self.cache.views
            train_loss, train_acc = features.train_head_epoch(
                self.model, self.cache, view, self.loaders.train_labels, self.loaders.train,
                opt.optimizer, opt.scheduler, opt.scaler, self.step,
            )  # fmt: skip
            validation = features.validate_head(self.model, self.cache, self.loaders.val_labels,
                                                self.step)  # fmt: skip
        else:
            train_loss, train_acc = train_one_epoch(
                self.model, self.trainer, self.loaders.train, opt.optimizer, opt.scheduler,
                opt.scaler, self.step, self.failures, f"epoch {epoch}/{cfg.epochs}",
            )  # fmt: skip
            validation = run_validation(self.model, self.loaders.val, self.step, self.failures)
        row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
               "val_loss": validation.loss, "val_acc": validation.accuracy,
               "lr": epoch_lr,  # the head's rate as the epoch began
               "seconds": time.perf_counter() - started}  # fmt: skip
        return row, validation

    def unfreeze(self, epoch: int) -> None:
        self.frozen = False
        models.set_backbone_trainable(self.model, True)
        self.trainer = wrap_for_training(self.model, self.ctx, self.device, self.cfg.compile)
        ui.info(
            f"Epoch {epoch}: unfreezing the backbone (lr x{self.cfg.backbone_lr_mult}); "
            f"{models.count_parameters(self.model, trainable_only=True):,} parameters train."
        )

    def record(self, row: dict[str, Any], validation: Validation) -> None:
        """Keep the epoch's row, save its files (rank 0), queue its plots, print its line."""
        epoch = row["epoch"]
        self.rows.append(row)
        improved = row["val_acc"] > self.best_acc
        if improved:
            self.best_acc, self.best_epoch = row["val_acc"], epoch
        if self.ctx.is_main:
            self.save(row, improved)
            self.draw(validation, improved, epoch)
        _print_epoch_row(row, improved, first=epoch == self.start_epoch)

    def save(self, row: dict[str, Any], improved: bool) -> None:
        checkpoint = ckpt.build_checkpoint(
            self.model, arch=self.cfg.arch, classes=self.layout.classes,
            preprocessing=self.preprocessing, epoch=row["epoch"], val_acc=row["val_acc"],
            config=self.resolved,
        )  # fmt: skip
        opt = self.opt
        last = ckpt.with_training_state(
            checkpoint, optimizer=opt.optimizer, scheduler=opt.scheduler, scaler=opt.scaler,
            best_val_acc=self.best_acc, best_epoch=self.best_epoch, metrics=self.rows,
        )  # fmt: skip
        ckpt.save_epoch(self.run_dir, checkpoint if improved else None, last, self.rows)

    def draw(self, validation: Validation, improved: bool, epoch: int) -> None:
        self.plots.submit(self.run_dir / "results.png", partial(training_curves_png, list(self.rows)))
        if improved:
            title = f"val split, epoch {epoch}: accuracy {validation.accuracy:.2%}"
            render = partial(confusion_matrix_png, validation.confusion, self.layout.classes, title)
            self.plots.submit(self.run_dir / "confusion_matrix.png", render)

    def should_stop(self, epoch: int) -> bool:
        patience = self.cfg.patience
        if patience and epoch - self.best_epoch >= patience:
            ui.info(f"Early stopping: no val improvement for {patience} epochs.")
            return True
        return False

    def interrupted(self) -> UserError:
        """Told from what is on disk, the epoch last.pt holds, so that it is right whatever
        moment Ctrl-C came at (even between writing last.pt and the next line)."""
        run_dir, last = self.run_dir, self.run_dir / "last.pt"
        try:
            done = int(torch.load(last, map_location="cpu", weights_only=True)["epoch"])
        except Exception:  # noqa: BLE001 - nothing saved yet (or unreadable): no epoch to resume
            done = 0
        saved = (
            f"{run_dir / 'last.pt'} holds epoch {done}; continue with "
            f"`resnext train --resume {run_dir}`."
            if done
            else "No epoch had completed, so nothing was saved."
        )
        return UserError(f"Interrupted during epoch {done + 1}. {saved}", EXIT_INTERRUPTED)

    # ------------------------------------------------------------ the end

    def finish(self) -> TrainResult:
        self.plots.close()
        for problem in self.plots.errors:
            ui.warn(f"could not draw a plot ({problem}); training itself is unaffected.")
        if self.failures:
            ui.warn(f"{len(self.failures)} unreadable file(s) were skipped (listed above).")
        best = self.run_dir / "best.pt"
        ui.info(f"Best val accuracy {self.best_acc:.2%} at epoch {self.best_epoch} -> {best}")
        if self.ctx.is_main:
            ckpt.mark_latest(self.run_dir)
        if self.cfg.report and self.ctx.is_main:
            request = ReportConfig(str(self.run_dir), workers=self.explicit_workers,
                                   device=self.cfg.device, decode=self.cfg.decode)  # fmt: skip
            try:
                run_report.write_report(request)
            except UserError as exc:  # the run itself is complete and saved
                ui.warn(f"report.html was not written: {exc} Try `resnext report {self.run_dir}` later.")
        return TrainResult(self.run_dir, self.best_acc, self.best_epoch, len(self.rows))


def _print_epoch_row(row: dict[str, Any], improved: bool, first: bool) -> None:
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
