"""Batches -> a trained model: the training and validation steps, their tallies (reduced over
torchrun's processes), and one epoch of each over an image loader. The feature cache trains the
head with the same `Step` and tallies."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, NamedTuple

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from resnext_cli import ui
from resnext_cli.data.batches import DeviceBatch, InputSpec, get_batch
from resnext_cli.errors import EXIT_FAILED, UserError
from resnext_cli.model.device import autocast
from resnext_cli.model.distributed import DistContext, all_reduce_sums, average_gradients
from resnext_cli.model.networks import backbone_features, set_train_mode


@dataclass
class Step:
    """How a batch is placed and computed: the same for training and validation."""

    spec: InputSpec
    precision: str
    criterion: torch.nn.Module
    dist: DistContext
    features: Callable[[torch.Tensor], torch.Tensor] | None = None  # None: backbone_features
    freeze_bn: bool = False  # while the backbone fine-tunes: BN statistics stay as loaded
    val_criterion: torch.nn.Module | None = None  # validation's loss; None: `criterion`
    logit_offsets: torch.Tensor | None = None  # on the device; added before validation scores

    @property
    def device(self) -> torch.device:
        return self.spec.device

    def scored(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation's (loss, logits) as predict will see them: with the prior adjustment the
        run predicts with by default (--balance logit-adjust), and without loss weights."""
        if self.logit_offsets is not None:
            logits = logits + self.logit_offsets
        return (self.val_criterion or self.criterion)(logits, labels), logits

    def get(self, loaded: Any) -> DeviceBatch:
        return get_batch(loaded, self.spec)

    def autocast(self) -> Any:
        return autocast(self.device, self.precision)

    def update(
        self, loss: torch.Tensor, optimizer: Any, scheduler: Any, scaler: Any,
        average: list[torch.nn.Parameter] | None = None,
    ) -> None:  # fmt: skip
        """One optimiser step through the grad scaler; `average`: parameters whose gradients are
        averaged over processes by hand (the frozen phase's head, which DDP does not wrap)."""
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if average is not None:
            average_gradients(self.dist, average)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()


def wrap_for_training(
    model: torch.nn.Module, ctx: DistContext, device: torch.device, compile: bool = False
) -> torch.nn.Module:
    """What the whole network trains through: compiled if asked, and DistributedDataParallel
    under torchrun. The checkpoint is always taken from the plain `model`."""
    trainer = torch.compile(model) if compile else model
    if not ctx.enabled:
        return trainer
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(trainer, device_ids=device_ids)


def compiled_features(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return torch.compile(partial(backbone_features, model))


def report_failures(
    batch_failures: list[tuple[int, str]], samples: list[tuple[str, int]], seen: dict[str, str]
) -> None:
    """Each unreadable file is reported once, however many epochs meet it."""
    for index, reason in batch_failures:
        path = samples[index][0]
        if path not in seen:
            seen[path] = reason
            ui.warn(f"skipped unreadable file {path}: {reason}")


def train_one_epoch(
    model: torch.nn.Module,
    trainer: torch.nn.Module | None,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    step: Step,
    failures: dict[str, str],
    label: str,
) -> tuple[float, float]:
    """One pass over this process's shard. `trainer` is None while the backbone is frozen: the
    backbone then runs without autograd and only the head's gradients are averaged."""
    frozen = trainer is None
    set_train_mode(model, backbone_frozen=frozen, freeze_bn=step.freeze_bn)
    tally = TrainTally()
    started = time.perf_counter()
    bar = ui.progress(loader, desc=label, unit="batch")
    for loaded in bar:
        batch = step.get(loaded)
        report_failures(batch.failures, loader.dataset.samples, failures)
        if batch.inputs is None or (not frozen and len(batch.indices) < 2):
            continue  # nothing decodable, or a single image batch norm cannot train on
        images, labels = batch.inputs, batch.labels
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
        if tally.stop_now(step):
            break
        bar.set_postfix(tally.progress(time.perf_counter() - started))
    report_failures(left_out_failures(loader), loader.dataset.samples, failures)
    return tally.result(step)


def left_out_failures(loader: DataLoader) -> list[tuple[int, str]]:
    """The unreadable files among the images `drop_last` left out of this epoch (a lone last
    image, which batch norm cannot train on): read here so that they are reported like every
    other unreadable file, even in a one-epoch run. Keyed draws: no RNG is disturbed."""
    if not loader.drop_last or loader.batch_size is None:
        return []
    keys = list(loader.sampler)
    left_out = keys[len(keys) - len(keys) % loader.batch_size :]
    samples = [loader.dataset[key] for key in left_out]
    return [(s.index, s.failure) for s in samples if s.failure is not None]


class Diverged(UserError):
    """A loss that is no longer a finite number: the weights are lost to nan/inf from there on.
    `train` adds what is kept on disk and what to do."""

    def __init__(self, what: str, value: float, step: int | None) -> None:
        self.what, self.value, self.step = what, value, step
        super().__init__(f"The {what} became {value} {self.where('the epoch')}", EXIT_FAILED)

    def where(self, epoch: str) -> str:
        return f"at step {self.step} of {epoch}" if self.step else f"in {epoch}"


class TrainTally:
    """Loss and accuracy sums over an epoch, reduced over torchrun's processes at the end.

    Each step's loss is read with `.item()` anyway (the one device sync of a step), so checking
    that it is finite costs nothing: the first non-finite one is kept and stops the epoch."""

    def __init__(self) -> None:
        self.loss_sum, self.correct, self.seen = 0.0, 0, 0
        self.steps = 0
        self.diverged: tuple[float, int] | None = None  # the first non-finite loss and its step

    def add(self, mean_loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        loss = mean_loss.item()
        self.steps += 1
        if self.diverged is None and not math.isfinite(loss):
            self.diverged = (loss, self.steps)
        self.loss_sum += loss * labels.numel()
        self.correct += int((logits.argmax(1) == labels).sum().item())
        self.seen += labels.numel()

    def stop_now(self, step: Step) -> bool:
        """A single process stops at the first non-finite loss. Under torchrun every process must
        take the same steps (gradients are averaged in collectives), so they all finish the epoch
        and stop together at `result`, whose reduced loss is then non-finite on every one."""
        return self.diverged is not None and not step.dist.enabled

    def progress(self, elapsed: float) -> dict[str, str]:
        return {"loss": f"{self.loss_sum / self.seen:.4f}", "acc": f"{self.correct / self.seen:.2%}",
                "img_s": f"{self.seen / max(elapsed, 1e-9):.1f}"}  # fmt: skip

    def result(self, step: Step) -> tuple[float, float]:
        loss_sum, correct, seen = all_reduce_sums(
            step.dist, [self.loss_sum, self.correct, self.seen], step.device
        )
        if not math.isfinite(loss_sum):
            value, at = self.diverged or (loss_sum, None)
            raise Diverged("training loss", value, at)
        if seen == 0:
            raise UserError(
                "No training step could be taken in this epoch: no training image could be read, or "
                "only one per batch (batch norm needs two to train on; see the warnings above). Add "
                "readable training images.",
                EXIT_FAILED,
            )
        return loss_sum / seen, correct / seen


class Validation(NamedTuple):
    loss: float
    accuracy: float  # 0-1
    confusion: list[list[int]]  # row = true class, column = predicted, over all processes


def run_validation(
    model: torch.nn.Module, loader: DataLoader, step: Step, failures: dict[str, str]
) -> Validation:
    """Loss, accuracy and confusion matrix over the val split, in eval mode."""
    model.eval()
    tally = ValidationTally(model.fc.out_features)
    with torch.inference_mode():
        for loaded in ui.progress(loader, desc="val", unit="batch"):
            batch = step.get(loaded)
            report_failures(batch.failures, loader.dataset.samples, failures)
            if batch.inputs is None:
                continue
            with step.autocast():
                logits = model(batch.inputs).float()
            tally.add(*step.scored(logits, batch.labels), batch.labels)
    return tally.result(step)


class ValidationTally:
    """Sums that validation accumulates, reduced over torchrun's processes at the end."""

    def __init__(self, n_classes: int) -> None:
        self.n_classes = n_classes
        self.loss_sum = 0.0
        self.counts = torch.zeros(n_classes * n_classes, dtype=torch.long)

    def add(self, mean_loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum += mean_loss.item() * labels.numel()
        cells = (labels * self.n_classes + logits.argmax(1)).cpu()
        self.counts += torch.bincount(cells, minlength=self.n_classes**2)

    def result(self, step: Step) -> Validation:
        loss_sum, *counts = all_reduce_sums(
            step.dist, [self.loss_sum, *self.counts.tolist()], step.device
        )
        if not math.isfinite(loss_sum):
            raise Diverged("validation loss", loss_sum, None)
        n = self.n_classes
        confusion = [[int(counts[i * n + j]) for j in range(n)] for i in range(n)]
        seen = sum(map(sum, confusion))
        if seen == 0:
            raise UserError("No validation image could be read (see the warnings above).", EXIT_FAILED)
        correct = sum(confusion[i][i] for i in range(n))
        return Validation(loss_sum / seen, correct / seen, confusion)
