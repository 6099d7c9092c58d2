"""`resnext train`: the tutorial's transfer-learning recipe without its silent failures.

Read top to bottom: `TrainRecipe.setup` builds each part in its own phase (config, device, data,
model, run folder, loaders, optimizer, restore), `train` runs the epochs, `finish` reports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import shlex
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from resnext_cli import ui
from resnext_cli.config import (
    ReportConfig,
    TrainConfig,
    check_fields,
    read_yaml_config,
    to_plain_dict,
)
from resnext_cli.data import balance
from resnext_cli.data.batches import InputSpec
from resnext_cli.data.folders import DatasetLayout, discover_dataset, path_digests, write_split
from resnext_cli.data.loaders import EpochSampler, default_workers, image_dataset, make_loader
from resnext_cli.data.transforms import Preprocessing
from resnext_cli.errors import EXIT_CLOSED_PIPE, EXIT_FAILED, UserError, interruption
from resnext_cli.files import exclusive_lock
from resnext_cli.model import checkpoint as ckpt
from resnext_cli.model import features, networks
from resnext_cli.model.calibration import (
    FitInputs,
    Outputs,
    collect_outputs,
    fit_calibration,
    stored_size,
    train_subsample,
    write_calibration,
)
from resnext_cli.model.device import (
    decode_on_device,
    pin_memory_for,
    precision_for,
    prepare_model,
    select_device,
)
from resnext_cli.model.distributed import (
    DistContext,
    broadcast_object,
    init_distributed,
    process_device,
    shutdown,
)
from resnext_cli.model.engines import InferenceModel, Prior, adjust_for_prior, resolve_prior
from resnext_cli.model.optimization import (
    backbone_frozen_at,
    rates_per_group,
    restore_schedule,
    setup_optimization,
)
from resnext_cli.model.steps import (
    Diverged,
    Step,
    Validation,
    compiled_features,
    report_failures,
    run_validation,
    train_one_epoch,
    wrap_for_training,
)
from resnext_cli.model.trust import Calibration, threshold_text
from resnext_cli.outputs import run_report, tracking
from resnext_cli.outputs.evaluation import calibration_summary
from resnext_cli.outputs.metrics import classification_report, confusion_matrix
from resnext_cli.outputs.plots import BackgroundWriter, confusion_matrix_png, training_curves_png

RESUME_OVERRIDABLE = {"epochs", "workers", "device", "decode", "report", "track", "track_checkpoints"}


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
                               seed=broadcast_object(ctx, seed), **absolute_paths(config))  # fmt: skip


def absolute_paths(config: TrainConfig) -> dict[str, str]:
    """The data folder and a weights file as absolute, resolved paths: config.yaml, split.json
    and the checkpoints then name the same files from any working folder."""
    paths = {"data": config.data}
    if config.weights not in ("imagenet", "none"):
        paths["weights"] = config.weights
    return {key: os.path.realpath(value) for key, value in paths.items() if value}


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
    values.setdefault("balance", "none")  # runs from before --balance trained without it
    values.setdefault("select_by", "acc")  # and kept the epoch of the best accuracy
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


# ---------------------------------------------------------------- data


@dataclass
class Loaders:
    train: Any  # DataLoader over layout.train, with `sampler` an EpochSampler
    val: Any
    train_labels: torch.Tensor
    val_labels: torch.Tensor


def setup_loaders(layout: DatasetLayout, cfg: TrainConfig, ctx: DistContext, spec: InputSpec) -> Loaders:
    """Seeded, epoch-keyed sampling and augmentation (classes drawn equally often with --balance
    sampler); validation sharded without padding."""
    assert cfg.seed is not None and cfg.workers is not None
    prep, on_device, pin = spec.preprocessing, spec.decode_on_device, pin_memory_for(spec.device)
    train_labels = [label for _, label in layout.train]
    sampler: EpochSampler | balance.ClassBalancedSampler = (
        balance.ClassBalancedSampler(train_labels, cfg.seed, rank=ctx.rank, world_size=ctx.world_size)
        if cfg.balance == "sampler"
        else EpochSampler(len(layout.train), cfg.seed, rank=ctx.rank, world_size=ctx.world_size)
    )
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
    return Loaders(train, val, torch.tensor(train_labels),
                   torch.tensor([label for _, label in layout.val]))  # fmt: skip


# ---------------------------------------------------------------- the run's history


@dataclass
class RunHistory:
    """The epochs completed so far (metrics.csv's rows) and the best of them by `column`, the
    --select-by metric's column (the first epoch of a tie)."""

    column: str = "val_acc"
    rows: list[dict[str, Any]] = field(default_factory=list)
    best_value: float = -1.0
    best_epoch: int = 0
    finished: dict[str, float] = field(default_factory=dict)  # best.pt's own val numbers, where they differ

    @classmethod
    def resumed(cls, state: dict[str, Any] | None, column: str) -> RunHistory:
        """As last.pt recorded it, or empty for a new run."""
        history = cls(column)
        if state is not None:
            history.rows = [dict(row) for row in state["metrics"]]
            history.best_epoch = state["best_epoch"]
            history.best_value = history.best_row()[column]
        return history

    def best_row(self) -> dict[str, Any]:
        return next(row for row in self.rows if row["epoch"] == self.best_epoch)

    @property
    def best_acc(self) -> float:
        """best.pt's val accuracy (-1 before the first epoch)."""
        return self.best_numbers()["val_acc"] if self.best_epoch else -1.0

    def best_numbers(self) -> dict[str, float]:
        """best.pt's epoch and val numbers: the best epoch's row, with the numbers of best.pt's
        finished head (blended towards the class means, data/balance.py) where it has them."""
        row = self.best_row()
        numbers = {"epoch": row["epoch"], **{k: v for k, v in row.items() if k in ckpt.VAL_NUMBERS}}
        return {**numbers, **self.finished}

    def add(self, row: dict[str, Any]) -> bool:
        """Keep the epoch's row; True when it is the best so far."""
        self.rows.append(row)
        improved = row[self.column] > self.best_value
        if improved:
            self.best_value, self.best_epoch = row[self.column], row["epoch"]
        return improved

    def stalled(self, patience: int | None) -> bool:
        """--patience: that many epochs since the best one."""
        return bool(patience) and self.rows[-1]["epoch"] - self.best_epoch >= patience  # type: ignore[operator]


# ---------------------------------------------------------------- the recipe


class TrainRecipe:
    """One training run: each `setup_*` phase builds one part; `run` trains and finishes."""

    def __init__(self, config: TrainConfig, ctx: DistContext) -> None:
        self.explicit_freeze = config.freeze
        self.explicit_workers = config.workers  # the end-of-run report picks its own otherwise
        self.ctx = ctx
        self.cfg = resolve_config(config, ctx)
        self.resume = ckpt.load_resume_state(self.cfg.resume) if self.cfg.resume else None
        self.held = contextlib.ExitStack()  # the run folder's lock, from its creation to the end
        self.frozen_features: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # training_features
        self.run_dir: Path | None = None
        self.record_since: float | None = None  # rank 0, once run.json says `running`
        self.record_dir: Path | None = None  # ... in this folder (set before self.run_dir is)
        self.tracking = tracking.Tracking.off()  # --track, from setup on

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
        """Set up, train the epochs, finish; the run folder is locked throughout and run.json
        says how the session ended (finished, interrupted or failed)."""
        with self.held:
            try:
                self.setup()
                self.train_epochs()
                self.calibrate()
            except (KeyboardInterrupt, BrokenPipeError) as exc:  # Ctrl-C, SIGTERM, `| head` ended
                self.end_record("interrupted")
                if self.run_dir is None:  # nothing of this run is on disk yet
                    raise
                raise interrupted(self.run_dir, exc) from None
            except BaseException:
                self.end_record("failed")
                raise
            self.end_record("finished")
            return self.finish()

    def train_epochs(self) -> None:
        for epoch in range(self.start_epoch, self.cfg.epochs + 1):
            try:
                row, validation = self.run_epoch(epoch)
            except Diverged as exc:
                raise diverged(exc, epoch, self.run_dir, self.opt.optimizer.param_groups[-1]["lr"]) from None
            improved = self.history.add(row)
            if self.ctx.is_main:
                self.save(row, improved)
                self.draw(validation, improved, epoch)
                self.tracking.log_epoch(row)
            print_epoch_row(row, improved, first=epoch == self.start_epoch)
            if self.history.stalled(self.cfg.patience):
                ui.info(f"Early stopping: no val improvement for {self.cfg.patience} epochs.")
                break

    def end_record(self, status: str) -> None:
        """run.json's status for this session; a failure to write it only warns."""
        if self.record_since is None:
            return
        try:
            best = self.history.best_numbers() if status == "finished" and self.history.best_epoch else None
            ckpt.end_run_record(self.record_dir, status, self.record_since, best)
        except UserError as exc:
            ui.warn(f"run.json was not updated: {exc}")
        self.record_since = None
        if status != "finished":  # a finished run's trackers close after its report (finish)
            self.tracking.end(status)

    # ------------------------------------------------------------ setup phases

    def setup(self) -> None:
        if self.ctx.is_main and self.resume is None:  # before anything slow: fail fast
            ckpt.check_run_dir(self.cfg.out, self.cfg.name)
        if self.cfg.cache_features:  # a bad $RESNEXT_CACHE_MAX_GB is said before anything is made
            features.cache_limit_bytes()
        tracking.check_installed(self.cfg.track)
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
        balance.damp_rare_rows(self.loaders.train.sampler, self.opt.optimizer, self.model.fc, self.class_counts)
        self.history = self.restore()
        self.tracking = self.setup_tracking()
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
        for message in layout.warnings + odd_choices(cfg, self.explicit_freeze):
            ui.warn(message)
        self.train_digests = ckpt.digests_tensor(path_digests(p for p, _ in layout.train))
        self.class_counts = balance.class_counts(layout.train, len(layout.classes))
        self.requested_balance = cfg.balance
        val_counts = balance.class_counts(layout.val, len(layout.classes))
        self.cfg = dataclasses.replace(  # the choices of `auto`, as config.yaml records them
            cfg, balance=balance.resolve_balance(cfg.balance, self.class_counts),
            select_by=balance.resolve_select_by(cfg.select_by, val_counts),
        )  # fmt: skip
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
        return networks.weights_preprocessing(self.cfg.arch, self.cfg.weights, self.cfg.img_size)

    def setup_model(self) -> torch.nn.Module:
        cfg = self.cfg
        model = networks.build_model(cfg.arch, len(self.layout.classes))
        if self.resume is None:
            networks.load_weights(model, cfg.arch, cfg.weights, ui.info)
        else:
            model.load_state_dict(self.resume["model"])
        self.start_epoch = self.resume["epoch"] + 1 if self.resume else 1
        self.frozen = backbone_frozen_at(cfg, self.start_epoch)
        networks.set_backbone_trainable(model, not self.frozen)
        if cfg.sync_bn and self.ctx.enabled:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        prepare_model(model, self.device, cfg.channels_last)
        return model

    def setup_run_folder(self) -> Path:
        cfg, ctx, layout = self.cfg, self.ctx, self.layout
        out = os.path.realpath(cfg.out) if cfg.out else None  # recorded resolved, used as given
        self.resolved = to_plain_dict(dataclasses.replace(cfg, resume=None, out=out))
        if ctx.is_main:
            run_dir = Path(cfg.resume) if cfg.resume else ckpt.make_run_dir(cfg.out, cfg.name)
            self.held.enter_context(exclusive_lock(run_dir / ckpt.RUN_LOCK, f"The run folder {run_dir}"))
            if not cfg.resume:
                ckpt.claim_run_dir(run_dir)
            self.record_since, self.record_dir = ckpt.start_run_record(run_dir), run_dir
            ckpt.write_run_config(run_dir, self.resolved)
            ckpt.write_class_indices(run_dir / "class_indices.json", layout.classes)
            if layout.split is not None:
                write_split(run_dir / "split.json", layout.split)
        run_dir = Path(broadcast_object(ctx, str(run_dir) if ctx.is_main else None))
        announce(run_dir, cfg, self.device, layout, ctx, self.resume, self.model, self.frozen)
        announce_balance(cfg, layout, self.class_counts, self.requested_balance)
        return run_dir

    def setup_step(self) -> Step:
        """The loss (weighted with --balance weights) and how validation scores: as predict
        will, with the run's default prior adjustment (--balance logit-adjust)."""
        cfg = self.cfg
        plain = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        criterion = plain
        if cfg.balance == "weights":
            weights = balance.loss_weights(self.class_counts).to(self.device)
            criterion = balance.WeightedCrossEntropy(weights, cfg.label_smoothing)
        offsets = balance.prior_offsets(self.class_counts, cfg.balance, balance.default_prior(cfg.balance))
        spec = InputSpec(self.device, cfg.channels_last, self.preprocessing, cfg.decode == "gpu")
        step = Step(spec, cfg.precision, criterion, self.ctx, freeze_bn=bool(cfg.freeze_bn),
                    val_criterion=plain,
                    logit_offsets=None if offsets is None else offsets.to(self.device))  # fmt: skip
        if cfg.compile:
            step.features = compiled_features(self.model)
        return step

    def restore(self) -> RunHistory:
        """The optimiser, schedule position, scaler, RNG and history of a resumed run."""
        state = self.resume
        if state is not None:
            self.opt.optimizer.load_state_dict(state["optimizer"])
            restore_schedule(self.opt.scheduler, state["scheduler"])  # --epochs may extend the run
            self.opt.scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["torch_rng_state"])
        return RunHistory.resumed(state, balance.SELECTION_COLUMNS[self.cfg.select_by])

    def setup_tracking(self) -> tracking.Tracking:
        """--track: rank 0 logs every epoch to the trackers (those of a resumed run first)."""
        if not self.ctx.is_main:
            return tracking.Tracking.off()
        rates = partial(rates_per_group, self.opt.optimizer)
        return tracking.start_tracking(self.cfg, self.run_dir, self.resolved, self.history.rows, rates)

    def setup_cache(self) -> features.FeatureCache:
        report = partial(report_failures, seen=self.failures)
        cache = features.prepare_cache(self.model, self.layout, self.cfg, self.step, self.ctx,
                                       pin_memory_for(self.device), report,
                                       self.repeated_draws())  # fmt: skip
        cache.borrowed = balance.borrowed_spread_for(self.loaders.train.sampler, cache.train, cache.train_ok,
                                                     self.loaders.train_labels)  # fmt: skip
        if self.resume is None:  # a resumed head is the one last.pt saved
            balance.imprint_for(self.loaders.train.sampler, self.model.fc, cache.train, cache.train_ok,
                                self.loaders.train_labels)  # fmt: skip
        return cache

    def repeated_draws(self) -> list[features.Draw] | None:
        """With the balanced sampler (and augmentation): the draws of an image beyond its first in
        an epoch, over every epoch the cache serves, each to get its own augmented feature."""
        sampler, cfg = self.loaders.train.sampler, self.cfg
        if not isinstance(sampler, balance.ClassBalancedSampler) or not cfg.augment:
            return None
        epochs = [e for e in range(1, cfg.epochs + 1) if backbone_frozen_at(cfg, e)]
        return sampler.repeated_draws(epochs, cfg.feature_views)

    # ------------------------------------------------------------ epochs

    def run_epoch(self, epoch: int) -> tuple[dict[str, Any], Validation]:
        """Train one epoch (on cached features while they serve), then validate."""
        cfg, opt = self.cfg, self.opt
        if self.frozen and not backbone_frozen_at(cfg, epoch):
            self.frozen = False
            self.trainer = unfreeze_backbone(self.model, cfg, self.ctx, self.device, epoch)
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
        scores = classification_report(validation.confusion, self.layout.classes)
        row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
               "val_loss": validation.loss, "val_acc": validation.accuracy,
               "lr": epoch_lr,  # the head's rate as the epoch began
               "seconds": time.perf_counter() - started,
               "val_balanced_acc": scores.balanced_accuracy, "val_macro_f1": scores.macro.f1}  # fmt: skip
        return row, validation

    def save(self, row: dict[str, Any], improved: bool) -> None:
        """best.pt (if improved), last.pt with the state a resume needs, metrics.csv."""
        checkpoint = ckpt.build_checkpoint(
            self.model, arch=self.cfg.arch, classes=self.layout.classes,
            preprocessing=self.preprocessing, epoch=row["epoch"], val_acc=row["val_acc"],
            config=self.resolved, train_digests=self.train_digests, class_counts=self.class_counts,
        )  # fmt: skip
        opt, history = self.opt, self.history
        last = ckpt.with_training_state(
            checkpoint, optimizer=opt.optimizer, scheduler=opt.scheduler, scaler=opt.scaler,
            best_val_acc=history.best_acc, best_epoch=history.best_epoch, metrics=history.rows,
        )  # fmt: skip
        ckpt.save_epoch(self.run_dir, self.finished_best(checkpoint) if improved else None, last, history.rows)

    def finished_best(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """best.pt's head as data/balance.py's post-training steps finish it (with the balanced
        sampler); last.pt, and the run's own head, train on unchanged."""
        model = checkpoint["model"]
        head = balance.finished_head(self.loaders.train.sampler, model["fc.weight"], model["fc.bias"],
                                     self.class_counts, self.training_features)  # fmt: skip
        if head is None:
            return checkpoint
        return {**checkpoint, "model": {**model, "fc.weight": head[0], "fc.bias": head[1]}}

    def training_features(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The training images' features under the epoch's weights, [views, N, D] with the ok
        mask and labels: the cached views while the backbone is the one they came from, else one
        pass (after validation: eval mode) over a bounded class-balanced sample of train, on
        forked random state, so that the run trains and resumes as without it. A frozen
        backbone's pass is made once: its features do not change from epoch to epoch."""
        if self.cache is not None and self.frozen:
            return self.cache.train, self.cache.train_ok, self.loaders.train_labels
        if self.frozen and self.frozen_features is not None:
            return self.frozen_features
        cfg, engine = self.cfg, self.engine("train")
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            outputs = collect_outputs(engine, train_subsample(self.layout.train), cfg.batch_size, cfg.workers,
                                      "class means: train")  # fmt: skip
        pooled = outputs.features[:, : self.model.fc.in_features].float()
        found = pooled[None], torch.ones(len(pooled), dtype=torch.bool), outputs.labels
        self.frozen_features = found if self.frozen else None
        return found

    def draw(self, validation: Validation, improved: bool, epoch: int) -> None:
        curves = partial(training_curves_png, list(self.history.rows), self.history.column)
        self.plots.submit(self.run_dir / "results.png", curves)
        if improved:
            title = f"val split, epoch {epoch}: accuracy {validation.accuracy:.2%}"
            render = partial(confusion_matrix_png, validation.confusion, self.layout.classes, title)
            self.plots.submit(self.run_dir / "confusion_matrix.png", render)

    # ------------------------------------------------------------ the end

    def calibrate(self) -> None:
        """best.pt gains its temperature and unknown score, fitted on the val split (rank 0; the
        other processes are done). last.pt, the resume point, stays as it is. A failure warns:
        the trained run is complete, and `resnext calibrate` can fit them later."""
        if not self.ctx.is_main:
            return
        path = self.run_dir / "best.pt"
        try:
            best = ckpt.load_checkpoint(path)
            self.model.load_state_dict(best["model"])
            inputs = self.calibration_inputs(int(best["epoch"]), str(path))
            if balance.finishes_head(self.loaders.train.sampler):
                self.history.finished = self.finished_val_numbers(inputs.val)
                best = {**best, "val_acc": self.history.finished["val_acc"]}
            fitted_on = f"the val split ({len(inputs.val.labels)} images), at the end of training"
            calibration = fit_calibration(inputs, self.cfg.unknown_score, self.cfg.unknown_threshold, fitted_on)
            write_calibration(path, calibration, best)
        except UserError as exc:
            ui.warn(f"best.pt was not calibrated: {exc} Try `resnext calibrate {self.run_dir}` later.")
            return
        ui.info(describe_calibration(calibration, inputs.val, path))

    def engine(self, source: str, prior: Prior | None = None) -> InferenceModel:
        """The run's model as prediction runs it (its precision, layout and decoder), for the
        passes over train and val that the end of an epoch or of training makes."""
        cfg = self.cfg
        return InferenceModel(self.model, cfg.arch, self.layout.classes, self.preprocessing, source,
                              self.device, str(cfg.precision), cfg.channels_last,
                              decode_on_device=cfg.decode == "gpu", prior=prior)  # fmt: skip

    def finished_val_numbers(self, val: Outputs) -> dict[str, float]:
        """best.pt's own val numbers once its head is finished (blended towards the class
        means): its `val_acc` (INTERFACE.md: the accuracy of these weights), the end of train's
        lines, run.json's `best` (what `resnext runs` and the report show) and a line beside the
        epoch table, whose numbers are the trained head's."""
        predicted = val.logits.argmax(1).tolist()
        matrix = confusion_matrix(val.labels.tolist(), predicted, len(self.layout.classes))
        scores = classification_report(matrix, self.layout.classes)
        ui.info(f"best.pt's head rows blended towards the class means (--balance {self.cfg.balance}): val "
                f"accuracy {scores.accuracy:.2%}, balanced accuracy {scores.balanced_accuracy:.2%} (the table "
                "shows the trained head's).")  # fmt: skip
        return {"val_acc": scores.accuracy, "val_balanced_acc": scores.balanced_accuracy,
                "val_macro_f1": scores.macro.f1}  # fmt: skip

    def calibration_inputs(self, best_epoch: int, source: str) -> FitInputs:
        """The val split's logits and features, and the training images' features: from the
        feature cache's plain view (which keeps the second stage's channel spread too) when the
        backbone was frozen up to the best epoch, else one pass of the best weights over val and
        a bounded, class-balanced sample of train."""
        cfg = self.cfg
        prior = resolve_prior(self.class_counts, str(cfg.balance), None, source)  # predict's default
        if self.cache is not None and backbone_frozen_at(cfg, best_epoch):
            cache, ok = self.cache, self.cache.val_ok
            with torch.inference_mode(), self.step.autocast():
                logits = adjust_for_prior(self.model.fc(cache.val[ok].to(self.device)).float(), prior).cpu()
            pooled = self.model.fc.in_features  # the leading columns of cache.plain(...)
            val = Outputs(logits, cache.plain("val")[ok], self.loaders.val_labels[ok], [], pooled)
            train_ok = cache.train_ok
            return FitInputs(val, cache.plain("train")[train_ok], self.loaders.train_labels[train_ok])
        self.model.eval()  # BatchNorm on its running statistics, as prediction runs it (training is over)
        engine = self.engine(source, prior)
        val = collect_outputs(engine, self.layout.val, cfg.batch_size, cfg.workers, "calibrate: val")
        train = collect_outputs(engine, train_subsample(self.layout.train), cfg.batch_size, cfg.workers,
                                "calibrate: train features")  # fmt: skip
        return FitInputs(val, train.features, train.labels)

    def finish(self) -> TrainResult:
        self.plots.close()
        for problem in self.plots.errors:
            ui.warn(f"could not draw a plot ({problem}); training itself is unaffected.")
        if self.failures:
            ui.warn(f"{len(self.failures)} unreadable file(s) were skipped (listed above).")
        history = self.history
        ui.info(f"{best_epoch_text(history, self.cfg.select_by)} -> {self.run_dir / 'best.pt'}")
        if self.ctx.is_main:
            mark_latest(self.run_dir)
            if self.cfg.report:
                write_end_report(self.run_dir, self.explicit_workers, self.cfg)
        self.tracking.end("finished")
        if self.ctx.is_main:
            ui.info(next_steps(self.run_dir))
        return TrainResult(self.run_dir, history.best_acc, history.best_epoch, len(history.rows))


# ---------------------------------------------------------------- the recipe's helpers


def odd_choices(cfg: TrainConfig, explicit_freeze: bool | None) -> list[str]:
    """Combinations that are allowed but rarely meant, said before training starts."""
    warnings = []
    if cfg.weights == "none" and explicit_freeze:
        warnings.append("--freeze with --weights none keeps a random backbone fixed; only the head "
                        "trains and it will learn little. Going on as asked.")  # fmt: skip
    if cfg.weights == "none" and cfg.freeze_bn:
        warnings.append("--freeze-bn with --weights none keeps BatchNorm statistics of random "
                        "weights; going on as asked.")  # fmt: skip
    return warnings


def announce(
    run_dir: Path, cfg: TrainConfig, device: torch.device, layout: DatasetLayout, ctx: DistContext,
    resume: dict[str, Any] | None, model: torch.nn.Module, frozen: bool,
) -> None:  # fmt: skip
    """What is about to train, where, on what."""
    layout_name = ", channels-last" if cfg.channels_last else ""
    ui.info(
        f"Run folder: {run_dir}  |  {cfg.arch} on {device} ({cfg.precision}{layout_name})"
        f"  |  {len(layout.classes)} classes, {len(layout.train)} train / {len(layout.val)} "
        "val images"
    )
    if ctx.enabled:
        ui.info(
            f"Distributed: {ctx.world_size} processes, batch {cfg.batch_size} per process "
            f"({cfg.batch_size * ctx.world_size} global)."
        )
    if resume is not None:
        ui.info(f"Resuming after epoch {resume['epoch']} of {cfg.epochs}.")
    ui.info(
        f"Trainable parameters: {networks.count_parameters(model, trainable_only=True):,} "
        f"of {networks.count_parameters(model):,} "
        f"({'backbone frozen' if frozen else 'all layers'})"
    )


def announce_balance(cfg: TrainConfig, layout: DatasetLayout, counts: list[int], requested: str) -> None:
    """What imbalance there is and what is done about it: in training (--balance) and in the
    choice of the best epoch (--select-by); silent on balanced data left as it is."""
    if balance.imbalance_ratio(counts) >= balance.SELECT_AUTO_RATIO or cfg.balance != "none":
        ui.info(balance.describe_decision(counts, layout.classes, requested, cfg.balance))
    if cfg.select_by != "acc":
        val_counts = [c for c in balance.class_counts(layout.val, len(layout.classes)) if c]
        spread = f" (val classes {min(val_counts)} to {max(val_counts)} images)"
        ui.info(f"Best epoch by val {balance.SELECTION_NAMES[cfg.select_by]}"
                f"{spread if cfg.select_by == 'balanced_acc' else ''}.")  # fmt: skip


def best_epoch_text(history: RunHistory, select_by: str) -> str:
    """The end-of-run line: the best epoch, by the metric that chose it."""
    best = history.best_numbers()
    if select_by == "acc":
        return f"Best val accuracy {best['val_acc']:.2%} at epoch {history.best_epoch}"
    return (f"Best val {balance.SELECTION_NAMES[select_by]} {best[history.column]:.2%} (accuracy "
            f"{best['val_acc']:.2%}) at epoch {history.best_epoch}")  # fmt: skip


def unfreeze_backbone(
    model: torch.nn.Module, cfg: TrainConfig, ctx: DistContext, device: torch.device, epoch: int
) -> torch.nn.Module:
    """--unfreeze-after: from this epoch the whole network trains; returns what it trains through."""
    networks.set_backbone_trainable(model, True)
    trainer = wrap_for_training(model, ctx, device, cfg.compile)
    ui.info(
        f"Epoch {epoch}: unfreezing the backbone (lr x{cfg.backbone_lr_mult}); "
        f"{networks.count_parameters(model, trainable_only=True):,} parameters train."
    )
    return trainer


def saved_epoch(run_dir: Path | None) -> int:
    """The epoch last.pt holds (0: none yet), read from disk, so that what is said is right
    whatever moment the run stopped at (even between writing last.pt and the next line)."""
    try:
        return int(torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["epoch"])  # type: ignore[operator]
    except Exception:  # noqa: BLE001 - nothing saved yet (or unreadable): no epoch to resume
        return 0


def interrupted(run_dir: Path, cause: BaseException) -> UserError:
    """Ctrl-C (exit 130), SIGTERM (143) or a closed stdout (141): where the run can go on from."""
    what, code = interruption(cause)
    if isinstance(cause, BrokenPipeError):
        what, code = "Stopped: stdout was closed (its reader, e.g. `| head`, ended)", EXIT_CLOSED_PIPE
    done = saved_epoch(run_dir)
    saved = (
        f"{run_dir / 'last.pt'} holds epoch {done}; continue with "
        f"`resnext train --resume {run_dir}`."
        if done
        else "No epoch had completed, so nothing was saved."
    )
    return UserError(f"{what} during epoch {done + 1}. {saved}", code)


def diverged(exc: Diverged, epoch: int, run_dir: Path | None, lr: float) -> UserError:
    """A non-finite loss stops the run (exit 1); best.pt and last.pt keep the last good epoch,
    since the epoch that diverged is never saved."""
    done = saved_epoch(run_dir)
    kept = (f"{run_dir / 'best.pt'} and last.pt keep the last good epochs (last.pt: epoch {done})"
            if done else "nothing was saved, as no epoch had completed")  # fmt: skip
    return UserError(
        f"The {exc.what} became {exc.value} {exc.where(f'epoch {epoch}')} (learning rate {lr:.3g}): "
        f"training diverged, the weights are no longer finite numbers. Stopped; {kept}. Start a "
        "new run with a lower --lr (or with --warmup-epochs); resuming would diverge again the same "
        "way.",
        EXIT_FAILED,
    )


def mark_latest(run_dir: Path) -> None:
    """runs/latest names the finished run; where it cannot, a warning says how to choose it."""
    try:
        ckpt.mark_latest(run_dir)
    except UserError as exc:
        ui.warn(f"Not marked as the latest run: {exc}")


def write_end_report(run_dir: Path, explicit_workers: int | None, cfg: TrainConfig) -> None:
    """report.html for the finished run; a failure warns, the run itself is complete and saved."""
    request = ReportConfig(str(run_dir), workers=explicit_workers, device=cfg.device, decode=cfg.decode)
    try:
        run_report.write_report(request)
    except UserError as exc:
        ui.warn(f"report.html was not written: {exc} Try `resnext report {run_dir}` later.")


def next_steps(run_dir: Path) -> str:
    """What to do with the model just trained, as commands to copy; `--checkpoint` only where
    they would not find this run on their own (it is not the latest run from here)."""
    try:
        found = ckpt.latest_run().resolve() == run_dir.resolve()
    except UserError:
        found = False
    model = "" if found else f" --checkpoint {shlex.quote(str(run_dir / 'best.pt'))}"
    return (
        "Next:\n"
        f"  resnext predict IMAGE{model}    label an image\n"
        f"  resnext batch-predict DIR{model} --output preds.csv    label a folder of images\n"
        f"  resnext evaluate DIR{model}    accuracy on labelled images it never saw"
    )


def describe_calibration(calibration: Calibration, val: Outputs, path: Path) -> str:
    """One paragraph on what calibration did, measured on the images it was fitted on."""
    t = calibration.temperature
    before, after = calibration_summary(val.logits, val.labels, 1.0), calibration_summary(val.logits, val.labels, t)
    text = (f"Calibrated on {len(val.labels)} val images: temperature {t:.3g}, ECE {before['ece']:.3f} -> "
            f"{after['ece']:.3f}, NLL {before['nll']:.3f} -> {after['nll']:.3f}.")  # fmt: skip
    detector = calibration.unknown
    if detector is not None:
        text += (f" Unknown score {detector.name}: above {detector.threshold:.3g} an image is "
                 f"`unknown` ({threshold_text(detector, 'val images')}). Stored in {path} "
                 f"(+{stored_size(detector) / 1e3:,.0f} KB).")  # fmt: skip
    if len(val.labels) < 30:
        text += (f" Only {len(val.labels)} val images: the temperature and the threshold are rough; "
                 "`resnext calibrate RUN --data DIR` refits them on more labelled photos.")  # fmt: skip
    return text


def print_epoch_row(row: dict[str, Any], improved: bool, first: bool) -> None:
    table = Table(show_header=first, box=None, pad_edge=False)
    widths = {"epoch": 5, "train_loss": 10, "train_acc": 9, "val_loss": 8, "val_acc": 8,
              "val_bal_acc": 11, "val_f1": 7, "lr": 9, "seconds": 7}  # fmt: skip
    for name, width in widths.items():
        table.add_column(name, justify="right", min_width=width, max_width=width)
    table.add_column("", min_width=4)
    table.add_row(
        str(row["epoch"]),
        f"{row['train_loss']:.4f}",
        f"{row['train_acc']:.2%}",
        f"{row['val_loss']:.4f}",
        f"{row['val_acc']:.2%}",
        f"{row['val_balanced_acc']:.2%}",
        f"{row['val_macro_f1']:.2%}",
        f"{row['lr']:.2e}",
        f"{row['seconds']:.1f}",
        "best" if improved else "",
    )
    ui.show(table)
