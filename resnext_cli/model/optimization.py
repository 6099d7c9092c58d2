"""The optimiser and its schedule for a training run: parameter groups for the head and the
backbone, and a per-step learning-rate multiplier that resumes exactly (and, when a resume
extends the run, is re-planned over the new length from the step where the run stopped)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from resnext_cli.config import TrainConfig
from resnext_cli.model.device import make_grad_scaler


def backbone_frozen_at(cfg: TrainConfig, epoch: int) -> bool:
    """Frozen while --freeze holds and the --unfreeze-after epochs have not yet passed."""
    return bool(cfg.freeze) and (cfg.unfreeze_after is None or epoch <= cfg.unfreeze_after)


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


def restore_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict[str, Any]) -> None:
    """A resumed run's position in the schedule (its step count), not the schedule's shape: this
    run's plan (`--epochs` may have extended it) gives every group its learning rate from that
    step on. The optimizer's saved rates are the old plan's (0 at the end of a finished cosine
    run), so they are recomputed here; for a run resumed with its own length they come out equal
    to the saved ones, bit for bit (the same product LambdaLR computes)."""
    groups = scheduler.optimizer.param_groups
    scheduler.load_state_dict(dict(state, lr_lambdas=[None] * len(groups)))
    for group, base, multiplier in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * multiplier(scheduler.last_epoch)


def rates_per_group(optimizer: torch.optim.Optimizer, head_rate: float) -> dict[str, float]:
    """Each parameter group's learning rate at the moment the head's was `head_rate`: one schedule
    multiplies every group's initial rate (`LrSchedule`), so the ratios stay as built."""
    groups = optimizer.param_groups
    head = next(g for g in groups if g.get("name") == "head")
    return {str(g.get("name", i)): head_rate * g["initial_lr"] / head["initial_lr"]
            for i, g in enumerate(groups)}  # fmt: skip
