"""Class balance: how many training images each class has, what `--balance auto` and
`--select-by auto` make of it, and the three ways to give rare classes their due: loss weights,
a class-balanced sampler keyed by (seed, epoch), and post-hoc logit adjustment by the log class
priors (Menon et al., ICLR 2021), which changes no training step, only the predictions.

The thresholds and the strategy `auto` picks were measured (docs/benchmarks.md, class
imbalance); the reasoning is in docs/design.md.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch

from resnext_cli.config import BALANCE_AUTO, BALANCE_AUTO_RATIO, SELECT_AUTO_RATIO
from resnext_cli.data.loaders import mix_seed

# candidates the benchmark measures beside the chosen ones (see benchmarks/bench_imbalance.py)
EFFECTIVE_NUMBER_BETA: float | None = None  # None: inverse frequency; else Cui et al.'s beta
SAMPLER_POWER = 0.0  # an image drawn with probability ~ n_class^(power - 1): 0 balanced, 0.5 sqrt
# on cached features: distinct augmentations per image and view for the sampler's repeated draws
# (a draw past it reuses them in turn); 0: every draw of an epoch gets the view's one feature
SAMPLER_FEATURE_REPEATS = 16

SELECTION_COLUMNS = {"acc": "val_acc", "balanced_acc": "val_balanced_acc", "macro_f1": "val_macro_f1"}
SELECTION_NAMES = {"acc": "accuracy", "balanced_acc": "balanced accuracy", "macro_f1": "macro-F1"}


def class_counts(samples: Sequence[tuple[str, int]], n_classes: int) -> list[int]:
    """Images per class (by label), in class-index order."""
    counts = [0] * n_classes
    for _, label in samples:
        counts[label] += 1
    return counts


def imbalance_ratio(counts: Sequence[int]) -> float:
    """Largest / smallest class among those that have images (1.0 for fewer than 2)."""
    present = [c for c in counts if c > 0]
    return max(present) / min(present) if len(present) >= 2 else 1.0


def resolve_balance(requested: str, counts: Sequence[int]) -> str:
    """`auto`: the measured best strategy from `BALANCE_AUTO_RATIO` up, nothing below (balanced data is
    trained exactly as before); any other choice as given."""
    if requested != "auto":
        return requested
    return BALANCE_AUTO if imbalance_ratio(counts) >= BALANCE_AUTO_RATIO else "none"


def resolve_select_by(requested: str, val_counts: Sequence[int]) -> str:
    """`auto`: balanced accuracy when val is imbalanced (`SELECT_AUTO_RATIO`), else accuracy (on
    balanced val the two are the same number)."""
    if requested != "auto":
        return requested
    return "balanced_acc" if imbalance_ratio(val_counts) >= SELECT_AUTO_RATIO else "acc"


def describe_decision(counts: Sequence[int], classes: Sequence[str], requested: str, balance: str) -> str:
    """One line for the start of train: what imbalance there is and what is done about it."""
    ratio = imbalance_ratio(counts)
    largest = max(range(len(counts)), key=lambda i: counts[i])
    smallest = min(range(len(counts)), key=lambda i: counts[i])
    found = (f"{classes[largest]!r} {counts[largest]} training images, {classes[smallest]!r} "
             f"{counts[smallest]} ({ratio:.1f}x)")  # fmt: skip
    if requested == "auto":
        why = f"at least {BALANCE_AUTO_RATIO:g}x" if balance != "none" else f"under {BALANCE_AUTO_RATIO:g}x"
        return f"Class balance: {found}; --balance auto -> {balance} ({why})."
    return f"Class balance: {found}; --balance {balance}."


# ---------------------------------------------------------------- training


def loss_weights(counts: Sequence[int]) -> torch.Tensor:
    """Per-class cross-entropy weights, inversely proportional to the class size (or to Cui et
    al.'s effective number (1 - beta^n) / (1 - beta)), scaled to average 1 over the training
    images (scikit-learn's "balanced" N / (K n_c)), so the loss keeps its usual scale."""
    beta = EFFECTIVE_NUMBER_BETA
    sizes = [float(max(c, 1)) for c in counts]
    effective = sizes if beta is None else [(1 - beta**n) / (1 - beta) for n in sizes]
    weights = torch.tensor([1.0 / e for e in effective], dtype=torch.float64)
    per_image = sum(n * float(w) for n, w in zip(sizes, weights))
    return (weights * sum(sizes) / per_image).float()


class WeightedCrossEntropy(torch.nn.Module):
    """Cross-entropy with class weights, averaged over the batch's images rather than over
    their weights (PyTorch's `weight=` divides by the batch's weight sum): so a torchrun
    process's mean is the same share of the global batch's whatever classes it drew, and the
    processes' averaged gradient is the single-process one."""

    def __init__(self, weights: torch.Tensor, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("weights", weights)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses = torch.nn.functional.cross_entropy(logits, targets, weight=self.weights, reduction="none",
                                                   label_smoothing=self.label_smoothing)  # fmt: skip
        return losses.mean()


class ClassBalancedSampler:
    """Each epoch draws as many images as the training set holds, with replacement, every class
    equally likely (`SAMPLER_POWER` 0; 0.5 is square-root sampling). Keyed by (seed, epoch)
    alone, like `EpochSampler`, so an exact resume rebuilds epoch k without replaying 1..k-1;
    under torchrun every process draws the same order and takes every world_size-th image.

    Yields (epoch, position, repeat): `repeat` counts earlier draws of the same image in the
    epoch, so that a rare image drawn several times gets a different augmentation each time.
    """

    def __init__(self, labels: Sequence[int], seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.labels, self.seed, self.epoch = list(labels), seed, 0
        self.rank, self.world_size = rank, world_size
        counts = class_counts([("", label) for label in self.labels], max(self.labels, default=-1) + 1)
        self.weights = torch.tensor([counts[label] ** (SAMPLER_POWER - 1.0) for label in self.labels],
                                    dtype=torch.float64)  # fmt: skip

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.labels) // self.world_size)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        return iter(self.draws(self.epoch)[self.rank :: self.world_size])

    def draws(self, epoch: int) -> list[tuple[int, int, int]]:
        """Epoch `epoch`'s (epoch, position, repeat) keys, of all processes together."""
        if not self.labels:
            return []
        generator = torch.Generator()
        generator.manual_seed(mix_seed(self.seed, epoch, -2))
        draws = torch.multinomial(self.weights, len(self) * self.world_size, replacement=True,
                                  generator=generator).tolist()  # fmt: skip
        seen: dict[int, int] = {}
        keyed = []
        for index in draws:
            keyed.append((epoch, index, seen.get(index, 0)))
            seen[index] = seen.get(index, 0) + 1
        return keyed

    def repeated_draws(self, epochs: Sequence[int], views: int) -> list[tuple[int, int, int]]:
        """The (view, position, repeat) features a cached-feature run needs beyond its views, so
        that an image drawn several times an epoch gets a different augmentation each time, as
        on the image path: epoch e trains on view (e - 1) % views, and its draw of an image
        with `repeat` r >= 1 on that image's repeat `feature_repeat(r)` of the view. At most
        `SAMPLER_FEATURE_REPEATS` per image and view, so the extra forward passes stay
        proportional to the oversampling, not to the epochs."""
        needed = {(int(e - 1) % views, index, feature_repeat(repeat))
                  for e in epochs for _, index, repeat in self.draws(e) if repeat > 0}  # fmt: skip
        return sorted(key for key in needed if key[2] > 0)


def feature_repeat(repeat: int) -> int:
    """Which of an image's stored repeat features a draw with this `repeat` uses: 0 (the view's
    own feature) for the first draw, else 1..SAMPLER_FEATURE_REPEATS in turn."""
    cap = SAMPLER_FEATURE_REPEATS
    return 0 if repeat == 0 or cap <= 0 else 1 + (repeat - 1) % cap


# ---------------------------------------------------------------- predictions


def fitted_prior(balance: str) -> str:
    """The class prior a model's raw logits were fitted to: weighted loss and balanced sampling
    fit a uniform one; plain training (`none`, `logit-adjust`) fits the training frequencies."""
    return "uniform" if balance in ("weights", "sampler") else "train"


def default_prior(balance: str) -> str:
    """The prior predictions assume unless `--prior` says otherwise: uniform (every class
    equally likely) for any balancing strategy, the training frequencies for `none`."""
    return "train" if balance == "none" else "uniform"


def prior_offsets(counts: Sequence[int], balance: str, prior: str) -> torch.Tensor | None:
    """What to add to the logits so that they answer for `prior` ("uniform" or "train"): the log
    class priors, subtracted (logit adjustment) or added back; None when nothing changes."""
    fitted = fitted_prior(balance)
    if prior == fitted:
        return None
    total = float(sum(counts))
    log_prior = torch.tensor([math.log(max(c, 1) / total) for c in counts], dtype=torch.float32)
    return log_prior if prior == "train" else -log_prior
