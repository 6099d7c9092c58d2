"""Class balance: how many training images each class has, what `--balance auto` and
`--select-by auto` make of it, and the three ways to give rare classes their due: loss weights,
a class-balanced sampler keyed by (seed, epoch) (whose best.pt's head rows of the rare classes
are then blended towards their class means, `blend_head`), and post-hoc logit adjustment by the
log class priors (Menon et al., ICLR 2021), which changes no training step, only the predictions.

The thresholds and the strategy `auto` picks were measured (docs/benchmarks.md, class
imbalance); the reasoning is in docs/design.md.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Sequence

import torch

from resnext_cli.config import BALANCE_AUTO, BALANCE_AUTO_RATIO, SELECT_AUTO_RATIO
from resnext_cli.data.loaders import mix_seed

# candidates the benchmark measures beside the chosen ones (see benchmarks/bench_imbalance.py)
EFFECTIVE_NUMBER_BETA: float | None = None  # None: inverse frequency; else Cui et al.'s beta
SAMPLER_POWER = 0.0  # an image drawn with probability ~ n_class^(power - 1): 0 balanced, 0.5 sqrt
# on cached features: distinct augmentations per image and view for the sampler's repeated draws
# (a draw past it reuses them in turn); 0: every draw of an epoch gets the view's one feature
SAMPLER_FEATURE_REPEATS = 16
# on cached features: a repeated draw's feature plus this many times the within-class deviation of
# an image of another class (`BorrowedSpread`); 0: off. Measured, not the default: +3.5 points of
# tail recall with resnext50 at 50x, none with resnet18, a point less balanced accuracy at 10x
# (docs/benchmarks.md, class imbalance, second follow-up). SPREAD_NEIGHBOURS: borrow from the k
# classes whose mean is nearest (None: from every other class with 2 images or more)
BORROWED_SPREAD = 0.0
SPREAD_NEIGHBOURS: int | None = None
SPREAD_PREDICTIVE = False  # True: scale a class of n images' deviations by sqrt(2 / n) (see BorrowedSpread)
# on cached features with the balanced sampler: the head's rows start at the class means' directions
# (weight imprinting, `imprint_head`) instead of at random, at IMPRINT times the random rows' mean
# norm; 0: off. Measured, not the default: at 3x, +4.4 / +9.4 points of balanced accuracy with
# resnet18 at 50x (seeds 0-4 / 5-9), but none of tail recall and -1.8 balanced with resnext50 on
# the fresh seeds (docs/benchmarks.md, class imbalance, third follow-up). IMPRINT_CENTRED: centred
# on the mean of the class means, bias -w.mu (SimpleShot); False: Qi et al.'s raw normalised means
IMPRINT = 0.0
IMPRINT_CENTRED = True
# with the balanced sampler, on best.pt's head as it is written (the run's own head trains on as
# it was): a class of n images' row and bias mixed with its centred class-mean row (`mean_rows`, at
# the trained rows' mean norm) by HEAD_BLEND / (HEAD_BLEND + n), so a one-photo class leans on its
# mean and a 40-photo class keeps its trained row (`blend_head`; the class means of the cached
# views, or of one pass over train where the backbone is not the cached one); 0: off. The
# default (k 3, chosen on seeds 0-4): at 50x on flowers5, fresh seeds 5-9, tail recall +15.5 /
# +12.0 points and balanced accuracy +7.4 / +1.6 (resnet18 / resnext50); at 10x +2.0 / 0.0
# (docs/benchmarks.md, class imbalance, fourth follow-up)
HEAD_BLEND = 3.0
# with the balanced sampler, on best.pt's head as it is written: each class's score divided by
# its row's norm^TAU_NORM (Kang et al., ICLR 2020, `tau_normalise`); 0: off. TAU_KEEP_BIAS: the
# bias divided with its row (the class's whole logit scaled); False: the bias dropped. Measured,
# not the default: after the balanced sampler the rows' norms hardly differ; tau 0.5 and 0.75
# changed no prediction with resnet18 (with the bias; without it -1.2 balanced accuracy) and a
# test image with resnext50 (fourth follow-up)
TAU_NORM = 0.0
TAU_KEEP_BIAS = True
# with the balanced sampler: each optimiser step's change to a class of n images' head row (and
# bias) scaled by n / (n + RARE_STEP), so a one-photo class's row moves less per step than a
# 40-photo class's (`damp_rare_rows`); 0: off. Measured, not the default: at k 1 -8.0 points of
# tail recall with resnet18 at 50x, +2.0 with resnext50; k 3 worse on both (fourth follow-up)
RARE_STEP = 0.0

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


class BorrowedSpread:
    """A rare class's few photos say where the class is, not how far it reaches: a head trained
    on them (however often the sampler repeats them) draws a tight region around those points.
    Here each repeated draw of an image (`repeat` >= 1, i.e. only of the classes the sampler
    oversamples) is moved by the within-class deviation (feature minus its class mean) of an
    image of another class: the rare class borrows the spread of classes that have enough images
    to show one, its samples stay centred on its own photos. The feature-space form of
    "distribution calibration" (Yang et al., ICLR 2021) and of feature transfer (Yin et al., CVPR
    2019), on the cached features of a frozen backbone; donors drawn per (seed, epoch, image,
    repeat), so a resumed epoch is the same epoch."""

    def __init__(self, train: torch.Tensor, ok: torch.Tensor, labels: torch.Tensor, seed: int,
                 scale: float, neighbours: int | None = None, predictive: bool = False) -> None:  # fmt: skip
        self.train, self.seed, self.labels = train, seed, labels.long()
        n_classes = int(self.labels.max()) + 1 if len(self.labels) else 0
        sizes = [int((ok & (self.labels == c)).sum()) for c in range(n_classes)]
        # predictive: a test image lies around the mean of n photos with (1 + 1/n) times the class's
        # variance, a photo with (1 - 1/n); a deviation scaled by sqrt(2 / n) makes up the difference
        self.scales = [scale * (math.sqrt(2 / max(n, 1)) if predictive else 1.0) for n in sizes]
        # Bessel's factor: the deviations' spread is the class's, unbiased (classes of 1 image lend none)
        self.bessel = [math.sqrt(n / (n - 1)) if n >= 2 else 0.0 for n in sizes]
        self.means = torch.zeros(train.shape[0], n_classes, train.shape[-1], dtype=train.dtype)  # per view
        for c in range(n_classes):
            if sizes[c]:
                self.means[:, c] = train[:, ok & (self.labels == c)].mean(dim=1)
        self.donors = [self._donors(c, sizes, self.means.mean(dim=0), ok, neighbours) for c in range(n_classes)]

    def deviation(self, view: int, image: int) -> torch.Tensor:
        """The image's feature in `view` minus its class's mean there, Bessel-scaled."""
        label = int(self.labels[image])
        return (self.train[view, image] - self.means[view, label]) * self.bessel[label]

    def _donors(self, c: int, sizes: list[int], means: torch.Tensor, ok: torch.Tensor,
                neighbours: int | None) -> torch.Tensor:  # fmt: skip
        """The images whose deviations class `c` borrows: of every other class with at least 2
        images, or of the `neighbours` such classes whose mean feature is nearest to c's."""
        others = [d for d in range(len(sizes)) if d != c and sizes[d] >= 2]
        if neighbours is not None:
            others = sorted(others, key=lambda d: float(torch.dist(means[d], means[c])))[:neighbours]
        rows = ok & torch.isin(self.labels, torch.tensor(others, dtype=torch.long))
        return torch.nonzero(rows).flatten()

    def add(self, features: torch.Tensor, view: int, keys: list[tuple[int, ...]]) -> torch.Tensor:
        """`features` of the draws `keys` ((epoch, image, repeat)), each repeated draw moved by
        its borrowed deviation; first draws (and EpochSampler's (epoch, image) keys) as they are."""
        for k, key in enumerate(keys):
            if len(key) < 3 or key[2] < 1:
                continue
            label = int(self.labels[key[1]])
            donors = self.donors[label]
            if len(donors):
                pick = mix_seed(mix_seed(self.seed, key[0], key[1]), key[2], -3) % len(donors)
                features[k] = features[k] + self.scales[label] * self.deviation(view, int(donors[pick]))
        return features


def borrowed_spread_for(sampler: Any, train: torch.Tensor, ok: torch.Tensor,
                        labels: torch.Tensor) -> BorrowedSpread | None:  # fmt: skip
    """The cached features' `BorrowedSpread` for a run with this sampler: only the balanced one
    repeats draws, and only with `BORROWED_SPREAD` on (a measured candidate, off by default)."""
    if not isinstance(sampler, ClassBalancedSampler) or BORROWED_SPREAD <= 0:
        return None
    return BorrowedSpread(train, ok, labels, sampler.seed, BORROWED_SPREAD, SPREAD_NEIGHBOURS, SPREAD_PREDICTIVE)


def mean_rows(train: torch.Tensor, ok: torch.Tensor, labels: torch.Tensor, n_classes: int, norm: torch.Tensor,
              centred: bool = True) -> tuple[list[int], torch.Tensor, torch.Tensor]:  # fmt: skip
    """The classes that have images, and for each a head row at norm `norm` pointing where its
    mean feature (over the views given) lies from the mean of the class means (SimpleShot's
    centring, Wang et al. 2019: of the class means, not of the images, so that the head class
    does not set the origin), with bias -w.mu: the row scores x - mu, a nearest-class-mean
    classifier that is still a Linear layer. Not centred: the raw normalised means, bias 0."""
    labels = labels.long()
    present = [c for c in range(n_classes) if bool((ok & (labels == c)).any())]
    if not present:
        return [], torch.empty(0, train.shape[-1], dtype=torch.float64), torch.empty(0, dtype=torch.float64)
    means = torch.stack([train[:, ok & (labels == c)].double().mean(dim=(0, 1)) for c in present])
    centre = means.mean(dim=0) if centred else torch.zeros_like(means[0])
    rows = torch.nn.functional.normalize(means - centre, dim=1) * norm.double()
    return present, rows, -(rows @ centre)


def imprint_head(fc: torch.nn.Linear, train: torch.Tensor, ok: torch.Tensor, labels: torch.Tensor,
                 scale: float, centred: bool = True) -> None:  # fmt: skip
    """Weight imprinting (Qi et al., CVPR 2018): a class of one or two photos gets only a few dozen
    optimiser steps from a random row, so each row starts at its class's `mean_rows` instead, at
    `scale` times the random rows' mean norm (the step sizes keep their meaning). Classes without
    images keep theirs."""
    norm = scale * fc.weight.detach().double().norm(dim=1).mean()
    present, rows, biases = mean_rows(train, ok, labels, fc.out_features, norm, centred)
    if not present:
        return
    with torch.no_grad():
        index = torch.tensor(present, dtype=torch.long, device=fc.weight.device)
        fc.weight[index] = rows.to(fc.weight)
        fc.bias[index] = biases.to(fc.bias)


def imprint_for(sampler: Any, fc: torch.nn.Linear, train: torch.Tensor, ok: torch.Tensor,
                labels: torch.Tensor) -> None:  # fmt: skip
    """Imprint a new run's head from its cached features: only with the balanced sampler (data
    with a tail; balanced data trains as before) and `IMPRINT` on (a measured candidate)."""
    if isinstance(sampler, ClassBalancedSampler) and IMPRINT > 0:
        imprint_head(fc, train, ok, labels, IMPRINT, IMPRINT_CENTRED)


def blend_head(weight: torch.Tensor, bias: torch.Tensor, counts: Sequence[int], train: torch.Tensor,
               ok: torch.Tensor, labels: torch.Tensor, k: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """A trained head's rows mixed with the class-mean rows (`mean_rows` at the trained rows'
    mean norm), class c by k / (k + n_c): the row of a class of one or two photos is fitted to
    those photos alone (the sampler repeats them every epoch), its class mean is the few-shot
    estimate that holds up better (SimpleShot); a class with many images keeps its trained row.
    Returns new tensors; classes without images keep their rows."""
    present, rows, biases = mean_rows(train, ok, labels, weight.shape[0], weight.double().norm(dim=1).mean())
    weight, bias = weight.clone(), bias.clone()
    for row, c in enumerate(present):
        alpha = k / (k + max(int(counts[c]), 1))
        weight[c] = ((1 - alpha) * weight[c].double() + alpha * rows[row]).to(weight)
        bias[c] = ((1 - alpha) * bias[c].double() + alpha * biases[row]).to(bias)
    return weight, bias


def tau_normalise(weight: torch.Tensor, bias: torch.Tensor, tau: float,
                  keep_bias: bool = True) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Kang et al.'s tau-normalisation (ICLR 2020): a class that trained on more images grows a
    longer row, and the longer row wins close calls; dividing each row by its norm^tau (tau 1: all
    rows at norm 1) takes that advantage away. The bias is divided with its row (`keep_bias`) or
    dropped. Returns new tensors."""
    scale = weight.norm(dim=1).clamp_min(1e-12) ** tau
    return weight / scale[:, None], bias / scale if keep_bias else torch.zeros_like(bias)


def finishes_head(sampler: Any) -> bool:
    """Whether best.pt's head is finished after training (`finished_head`): only after the
    balanced sampler, with `HEAD_BLEND` or `TAU_NORM` on."""
    return isinstance(sampler, ClassBalancedSampler) and (HEAD_BLEND > 0 or TAU_NORM > 0)


def finished_head(sampler: Any, weight: torch.Tensor, bias: torch.Tensor, counts: Sequence[int],
                  features: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
    """best.pt's head as `HEAD_BLEND` and `TAU_NORM` finish it, or None when neither applies:
    only after the balanced sampler (balanced data trains and saves as before). `features`: the
    training images' ([views, N, D], ok, labels) for the blend's class means, asked only for it."""
    if not finishes_head(sampler):
        return None
    if HEAD_BLEND > 0:
        weight, bias = blend_head(weight, bias, counts, *features(), HEAD_BLEND)
    if TAU_NORM > 0:
        weight, bias = tau_normalise(weight, bias, TAU_NORM, TAU_KEEP_BIAS)
    return weight, bias


def damp_rare_rows(sampler: Any, optimizer: torch.optim.Optimizer, fc: torch.nn.Linear,
                   counts: Sequence[int]) -> None:  # fmt: skip
    """With the balanced sampler and `RARE_STEP` on (a measured candidate, off): each optimiser
    step's change to class c's head row and bias scaled by n_c / (n_c + RARE_STEP). The sampler
    shows a one-photo class's photo a dozen times an epoch, and every step on it pulls its row
    towards that photo alone; smaller steps keep the row from fitting it wildly. Adam normalises
    a gradient's scale away, hence the change itself, scaled after each step (hooks)."""
    if not isinstance(sampler, ClassBalancedSampler) or RARE_STEP <= 0:
        return
    factors = torch.tensor([c / (c + RARE_STEP) for c in counts], dtype=fc.weight.dtype, device=fc.weight.device)
    before: list[torch.Tensor] = []

    def keep(*_: Any) -> None:
        before[:] = [fc.weight.detach().clone(), fc.bias.detach().clone()]

    def damp(*_: Any) -> None:
        with torch.no_grad():
            fc.weight.copy_(before[0] + factors[:, None] * (fc.weight - before[0]))
            fc.bias.copy_(before[1] + factors * (fc.bias - before[1]))

    optimizer.register_step_pre_hook(keep)
    optimizer.register_step_post_hook(damp)


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
