"""When to trust a prediction: temperature scaling (Guo et al. 2017) for probabilities that mean
what they say, and an unknown score for images unlike anything the model was trained on.

The unknown score is fitted from what training already has (the training images' pooled
backbone features, the val split's logits and features) and needs no training photo at
prediction time. It is built from components, each standardised on the val photos (0: a
typical val photo, 1: one standard deviation less like the training classes) and averaged:

- `msp`: 1 - the top calibrated probability (Hendrycks & Gimpel 2017);
- `energy`: -logsumexp of the calibrated logits (Liu et al. 2020); `maxlogit`: -the top logit;
- `knn`: 1 - the cosine similarity to the k-th nearest training feature, features L2-normalised
  (Sun et al. 2022), over a class-balanced subsample kept in fp16;
- `mahalanobis`: the smallest Mahalanobis distance to a class mean, one shared covariance
  shrunk towards a scaled identity (Lee et al. 2018; Ledoit & Wolf 2004), on L2-normalised
  features; `relmaha` subtracts the distance to one Gaussian of all training features (Ren et
  al. 2021);
- `style`: the same Mahalanobis distance on the L2-normalised standard deviation of each
  channel of the backbone's second stage over the image (`networks.channel_spread`): texture
  and style statistics that the pooled last stage has mostly pooled away (Gatys et al. 2016;
  the earlier-layer feature ensemble of Lee et al. 2018, Gram matrices of Sastry & Oore 2020).

A score is components joined with "+", each optionally weighted (`energy+2*style`: the style
distance counts twice in the mean). The model's features (`networks.logits_and_features`) are
the pooled last stage followed by the second stage's channel spread; the pooled components
read the leading columns, `style` the trailing ones, each as wide as its own statistics.

The checkpoint stores the detector as a plain dict of tensors and numbers (`to_state`), loaded
with `weights_only=True` like the rest; docs/benchmarks.md measures the candidates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from resnext_cli.config import (
    UNKNOWN_ACCEPT,
    UNKNOWN_COMPONENTS,
    UNKNOWN_SCORE,
    check_unknown_score,
    score_components,
)
from resnext_cli.errors import UserError

UNKNOWN_FORMAT = 1
DEFAULT_SCORE = UNKNOWN_SCORE  # chosen by benchmarks/bench_trust.py (docs/benchmarks.md)
DEFAULT_ACCEPT = UNKNOWN_ACCEPT  # share of new photos like the val ones accepted as known
BANK_LIMIT = 8192  # training features kept for `knn` at most, class-balanced
COMPONENTS = UNKNOWN_COMPONENTS
FEATURE_COMPONENTS = ("knn", "cknn", "mahalanobis", "rawmaha", "style")
BANKS = ("bank", "cbank")  # normalised training features, stored in fp16
QUANTILES = 1001  # val score quantiles stored, so that --unknown-threshold needs no refit
TEMPERATURE_RANGE = (0.05, 20.0)


# ---------------------------------------------------------------- temperature


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits divided by the temperature: the calibration step between the prior adjustment and
    the softmax (interface contract: logits -> prior -> temperature -> softmax)."""
    return logits if temperature == 1.0 else logits / temperature


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The one scalar T minimising the NLL of softmax(logits / T) on held-out labelled images
    (LBFGS on log T, so T stays positive), kept within TEMPERATURE_RANGE. When the model gets
    every one of them right the NLL has no minimum (it falls as T -> 0, making every prediction
    100% sure); then T is the lowest at which the mean top probability claims no more than
    Laplace's estimate of the accuracy, (n + 1) / (n + 2). With a single mistake the NLL has
    its minimum and it is kept: raising T there too made the probabilities of the bench's runs
    less calibrated (docs/benchmarks.md)."""
    logits, labels = logits.detach().double(), labels.detach().long()
    if len(labels) == 0:
        return 1.0
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")
    low, high = (math.log(v) for v in TEMPERATURE_RANGE)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.clamp(low, high).exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    value = float(log_t.detach().clamp(low, high).exp())
    if not math.isfinite(value):
        value = 1.0
    if int((logits.argmax(1) == labels).sum()) < len(labels):
        return value
    return max(value, _temperature_for_confidence(logits, (len(labels) + 1) / (len(labels) + 2)))


def _temperature_for_confidence(logits: torch.Tensor, confidence: float) -> float:
    """The smallest T in TEMPERATURE_RANGE whose mean top probability is at most `confidence`
    (the mean top probability falls as T grows; bisection on log T)."""

    def mean_top(t: float) -> float:
        return float(torch.softmax(logits / t, 1).max(1).values.mean())

    low, high = (math.log(v) for v in TEMPERATURE_RANGE)
    if mean_top(math.exp(low)) <= confidence:
        return math.exp(low)
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if mean_top(math.exp(middle)) > confidence else (low, middle)
    return math.exp(high)


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true classes."""
    return float(F.cross_entropy(apply_temperature(logits.double(), temperature), labels.long()))


# ---------------------------------------------------------------- the training set's statistics


def balanced_subsample(labels: torch.Tensor, limit: int, seed: int = 0) -> torch.Tensor:
    """Indices of at most `limit` items, as even over the classes as their sizes allow (small
    classes whole, the rest share what is left), drawn with a fixed seed: a bounded, repeatable
    sample of a training set of any size."""
    labels = labels.long()
    if len(labels) <= limit:
        return torch.arange(len(labels))
    generator = torch.Generator().manual_seed(seed)
    members = [torch.nonzero(labels == c).flatten() for c in labels.unique().tolist()]
    quota, left = {}, limit
    for rank, index in enumerate(sorted(range(len(members)), key=lambda i: len(members[i]))):
        quota[index] = min(len(members[index]), left // (len(members) - rank))
        left -= quota[index]
    chosen = [m[torch.randperm(len(m), generator=generator)[: quota[i]]] for i, m in enumerate(members)]
    return torch.cat(chosen).sort().values


def normalised(features: torch.Tensor) -> torch.Tensor:
    return F.normalize(features.float(), dim=1)


def shrunk_covariance(centred: torch.Tensor) -> torch.Tensor:
    """Ledoit-Wolf shrinkage towards a scaled identity of the covariance of rows already
    centred: well-conditioned with fewer images than feature dimensions (Ledoit & Wolf 2004,
    the estimator scikit-learn's LedoitWolf computes)."""
    x = centred.double()
    n, p = x.shape
    sample = x.T @ x / n
    mu = torch.trace(sample) / p
    delta = ((sample - mu * torch.eye(p, dtype=x.dtype)) ** 2).sum() / p
    beta = ((x.pow(2).sum(1) ** 2).sum() / n - (sample**2).sum()) / (n * p)
    shrinkage = float(min(beta, delta) / delta) if delta > 0 else 1.0
    return (1 - shrinkage) * sample + shrinkage * mu * torch.eye(p, dtype=x.dtype)


def whitening(covariance: torch.Tensor) -> torch.Tensor:
    """W with (x W)(x W)^T = x covariance^-1 x^T: the Cholesky factor of the precision. A ridge
    of 1e-6 of the mean variance keeps it invertible when the training images barely vary
    (identical photos, a constant channel, fewer images than dimensions with no shrinkage);
    with no variance at all the distance is the plain Euclidean one."""
    p = covariance.shape[0]
    mean_variance = float(torch.trace(covariance)) / p
    if not mean_variance > 0:
        return torch.eye(p, dtype=torch.float32)
    ridged = covariance + 1e-6 * mean_variance * torch.eye(p, dtype=covariance.dtype)
    precision = torch.linalg.inv(ridged)
    return torch.linalg.cholesky((precision + precision.T) / 2).float()


def fit_gaussians(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means and one shared, shrunk covariance of the features, as (whitening matrix W,
    whitened means): the squared Mahalanobis distance to class c is then ||x W - means[c]||^2,
    one matrix product per batch."""
    x, labels = features.float(), labels.long()
    classes = labels.unique()
    means = torch.stack([x[labels == c].mean(0) for c in classes])
    whiten = whitening(shrunk_covariance(x - means[torch.searchsorted(classes, labels)]))
    return whiten, means @ whiten


def knn_k(bank_size: int) -> int:
    """k grows with the bank, as Sun et al. scale it (k=10 for a 1% sample of ImageNet, 50 for
    CIFAR's 50,000 images): about one per thousand images, at least 1."""
    return max(1, round(bank_size / 1000))


# ---------------------------------------------------------------- the detector


@dataclass
class UnknownDetector:
    """An unknown score and its threshold: `score` > `threshold` means unknown."""

    components: tuple[str, ...]
    stats: dict[str, torch.Tensor]  # what the feature components need (bank, means, whitening)
    k: int = 1
    centre: dict[str, float] = field(default_factory=dict)  # component -> val mean
    scale: dict[str, float] = field(default_factory=dict)  # component -> val standard deviation
    accept: float = DEFAULT_ACCEPT  # the rule: this share of new photos like the val ones is known
    threshold: float = math.inf
    quantiles: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # of the val scores
    val_images: int = 0
    fitted_on: str = ""  # which labelled images the standardisation and threshold come from

    @property
    def name(self) -> str:
        """The score as written: `energy+2*style` for the components (energy, style, style)."""
        counts = {c: self.components.count(c) for c in self.components}
        return "+".join(c if n == 1 else f"{n}*{c}" for c, n in counts.items())

    @property
    def needs_features(self) -> bool:
        return any(c in FEATURE_COMPONENTS for c in self.components)

    def raw(self, logits: torch.Tensor, features: torch.Tensor | None,
            temperature: float) -> dict[str, torch.Tensor]:  # fmt: skip
        """Each component's unstandardised score (higher: less like the training classes)."""
        return {c: component_score(c, self, logits, features, temperature) for c in dict.fromkeys(self.components)}

    def score(self, logits: torch.Tensor, features: torch.Tensor | None, temperature: float) -> torch.Tensor:
        """The unknown score of each row: the mean of the standardised components (a weighted
        component appears that many times)."""
        parts = self.raw(logits, features, temperature)
        return torch.stack([(parts[c] - self.centre[c]) / self.scale[c] for c in self.components]).mean(0)

    def known(self, scores: torch.Tensor) -> torch.Tensor:
        return scores <= self.threshold

    def with_accept(self, accept: float) -> UnknownDetector:
        """The same score with the threshold that accepts `accept` of new photos like the val
        ones (`threshold_for`)."""
        return replace(self, accept=accept, threshold=threshold_for(self.quantiles, accept, self.val_images))

    def to(self, device: torch.device) -> UnknownDetector:
        return replace(self, stats={k: v.to(device) for k, v in self.stats.items()})

    def to_state(self) -> dict[str, Any]:
        """The checkpoint's `unknown` entry: tensors and plain types only."""
        return {"format": UNKNOWN_FORMAT, "score": self.name, "accept": self.accept,
                "threshold": self.threshold, "k": self.k, "centre": dict(self.centre),
                "scale": dict(self.scale), "quantiles": self.quantiles.float().contiguous(),
                "val_images": self.val_images, "fitted_on": self.fitted_on,
                "stats": {k: v.half() if k in BANKS else v.float() for k, v in self.stats.items()}}  # fmt: skip

    @classmethod
    def from_state(cls, state: dict[str, Any], source: str) -> UnknownDetector:
        if not isinstance(state, dict) or state.get("format") != UNKNOWN_FORMAT:
            raise UserError(f"{source} has an `unknown` entry this version cannot read; refit it "
                            "with `resnext calibrate`.")  # fmt: skip
        stats = {k: v.float() for k, v in state["stats"].items()}  # the bank is stored in fp16
        return cls(score_components(state["score"]), stats, int(state["k"]),
                   {k: float(v) for k, v in state["centre"].items()},
                   {k: float(v) for k, v in state["scale"].items()}, float(state["accept"]),
                   float(state["threshold"]), state["quantiles"].float(), int(state["val_images"]),
                   str(state.get("fitted_on", "")))  # fmt: skip


def component_score(
    name: str, detector: UnknownDetector, logits: torch.Tensor, features: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:  # fmt: skip
    """One component's raw score for a batch, in fp32 on the logits' device."""
    scaled = apply_temperature(logits.float(), temperature)
    if name == "msp":  # 1 - p_max, as the sum of the others' shares (no cancellation near 1)
        others = torch.exp(scaled - scaled.max(1, keepdim=True).values)
        return (others.sum(1) - 1) / others.sum(1)
    if name == "maxlogit":
        return -scaled.max(1).values
    if name == "energy":
        return -torch.logsumexp(scaled, 1)
    if features is None:
        raise UserError(f"The unknown score `{name}` needs the model's features, which this model "
                        "does not provide (an ONNX file exported before features were).")  # fmt: skip
    stats = detector.stats
    if name == "style":  # the trailing columns: the second stage's channel spread
        spread = features[:, features.shape[1] - len(stats["style_whiten"]):]
        return _nearest_mean(normalised(spread) @ stats["style_whiten"], stats["style_means"])
    features = features[:, : pooled_width(stats)]  # the leading columns: the pooled features
    x = normalised(features)
    if name in ("knn", "cknn"):
        bank = stats["bank"] if name == "knn" else stats["cbank"]
        if name == "cknn":
            x = normalised(features.float() - stats["centre"])
        k = min(detector.k, len(bank))
        return 1 - torch.topk(x @ bank.T, k, dim=1).values[:, -1]
    if name == "rawmaha":
        return _nearest_mean(features.float() @ stats["raw_whiten"], stats["raw_means"])
    if name == "mahalanobis":
        return _nearest_mean(x @ stats["whiten"], stats["means"])
    raise UserError(f"Unknown score component {name!r}; choose from {', '.join(COMPONENTS)}.")


def pooled_width(stats: dict[str, torch.Tensor]) -> int:
    """How many leading feature columns the pooled components were fitted on (the width of the
    pooled features, whatever follows them)."""
    for key, axis in (("bank", 1), ("cbank", 1), ("whiten", 0), ("raw_whiten", 0)):
        if key in stats:
            return stats[key].shape[axis]
    return 0


def _nearest_mean(projected: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Squared distance of each row to its nearest mean (all whitened)."""
    distances = (projected.pow(2).sum(1, keepdim=True) - 2 * projected @ means.T
                 + means.pow(2).sum(1)[None, :])  # fmt: skip
    return distances.min(1).values


def parse_score(name: str) -> tuple[str, ...]:
    """`msp+cknn` -> ("msp", "cknn"), `energy+2*style` -> ("energy", "style", "style"), checked."""
    check_unknown_score(name)
    return score_components(name)


STATISTICS = {  # what each feature component keeps from the training set
    "knn": ("bank",),
    "cknn": ("centre", "cbank"),
    "mahalanobis": ("whiten", "means"),
    "rawmaha": ("raw_whiten", "raw_means"),
    "style": ("style_whiten", "style_means"),
}


def fit_statistics(
    components: tuple[str, ...], train_features: torch.Tensor, train_labels: torch.Tensor,
    bank_limit: int = BANK_LIMIT, pooled: int | None = None,
) -> tuple[dict[str, torch.Tensor], int]:  # fmt: skip
    """What the feature components need from the training set, and the k of the kNN ones.
    `pooled`: how many leading columns are the pooled features (None: all of them, and no
    channel spread follows, as in the feature cache)."""
    stats: dict[str, torch.Tensor] = {}
    chosen = balanced_subsample(train_labels, bank_limit)
    pooled = train_features.shape[1] if pooled is None else pooled
    features, spread = train_features[:, :pooled].float(), train_features[:, pooled:].float()
    if "style" in components:
        if spread.shape[1] == 0:
            raise UserError("The unknown score `style` needs the backbone's second-stage features, "
                            "which these training features do not include.")  # fmt: skip
        stats["style_whiten"], stats["style_means"] = fit_gaussians(normalised(spread), train_labels)
    if "knn" in components:
        # stored in fp16 (half the bytes); rounded now, so val scores match the stored bank's
        stats["bank"] = normalised(features[chosen]).half().float()
    if "cknn" in components:
        stats["centre"] = features.mean(0, keepdim=True)
        stats["cbank"] = normalised(features[chosen] - stats["centre"]).half().float()
    if "mahalanobis" in components:
        stats["whiten"], stats["means"] = fit_gaussians(normalised(features), train_labels)
    if "rawmaha" in components:
        stats["raw_whiten"], stats["raw_means"] = fit_gaussians(features, train_labels)
    return stats, knn_k(len(chosen))


def select_statistics(stats: dict[str, torch.Tensor], components: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The part of `stats` that `components` use."""
    return {key: stats[key] for c in components for key in STATISTICS.get(c, ())}


def fit_detector(
    components: tuple[str, ...], stats: dict[str, torch.Tensor], k: int,
    val_logits: torch.Tensor, val_features: torch.Tensor | None, temperature: float,
    accept: float = DEFAULT_ACCEPT,
) -> UnknownDetector:  # fmt: skip
    """Standardise each component on the val photos, then set the threshold that accepts
    `accept` of new photos like them (`threshold_for`); the val quantiles are kept for other
    thresholds later."""
    detector = UnknownDetector(components, stats, k)
    parts = detector.raw(val_logits, val_features, temperature)
    for name, values in parts.items():
        detector.centre[name] = float(values.mean())
        detector.scale[name] = max(float(values.std(correction=0)), 1e-6 * max(1.0, abs(float(values.mean()))))
    scores = detector.score(val_logits, val_features, temperature)
    quantiles = torch.quantile(scores.double(), torch.linspace(0, 1, QUANTILES, dtype=torch.float64)).float()
    detector = replace(detector, quantiles=quantiles, val_images=len(scores))
    return detector.with_accept(accept)


def conformal_rank(accept: float, images: int) -> int:
    """How many of the n val photos the threshold accepts so that a new photo like them is known
    with probability at least `accept`: split conformal prediction's ceil((n + 1) * accept) (the
    plain `accept` quantile of n photos accepts fewer new ones: about 93% for 95% of 45); all n
    when there are too few for that rank (then new photos are known n / (n + 1) of the time)."""
    return min(max(math.ceil((images + 1) * accept - 1e-9), 1), images)


def threshold_for(quantiles: torch.Tensor, accept: float, images: int) -> float:
    """The score at or below which a new photo like the `images` val photos is known with
    probability at least `accept`: the `conformal_rank`-th smallest val score, read off the
    stored quantiles (linear between them; without a count of val photos, the plain quantile)."""
    if len(quantiles) == 0:
        return math.inf
    level = accept
    if images > 1:
        level = (conformal_rank(accept, images) - 1) / (images - 1)  # where torch.quantile puts it
    position = level * (len(quantiles) - 1)
    low = int(math.floor(position))
    high = min(low + 1, len(quantiles) - 1)
    weight = position - low
    return float(quantiles[low] * (1 - weight) + quantiles[high] * weight)


def threshold_text(detector: UnknownDetector, images: str) -> str:
    """What the threshold promises, for train's and calibrate's lines: `images` are the ones it
    was set on ("val images", "these images")."""
    n = detector.val_images
    if n <= 1:
        return f"{detector.accept:.0%} of the {images} are below"
    rank = conformal_rank(detector.accept, n)
    if rank == n and n / (n + 1) < detector.accept:
        return (f"all {n} {images} are below: too few to promise that {detector.accept:.0%} of new images "
                "like them are known")  # fmt: skip
    return f"{rank} of the {n} {images} are below: new images like them are known {detector.accept:.0%} of the time"


# ---------------------------------------------------------------- applied to predictions


@dataclass
class BatchOutput:
    """A batch's predictions: calibrated and raw probabilities, and the unknown verdicts."""

    probs: torch.Tensor  # softmax(logits / T), on the CPU
    raw_probs: torch.Tensor  # softmax(logits): what --no-calibration shows
    unknown_score: torch.Tensor | None = None  # None: the model has no unknown detector
    known: torch.Tensor | None = None


@dataclass
class Calibration:
    """What a model's outputs are read with: its temperature and its unknown detector (from
    the checkpoint's `temperature` and `unknown`; absent, 1.0 and none)."""

    temperature: float = 1.0
    unknown: UnknownDetector | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], source: str) -> Calibration:
        temperature = checkpoint.get("temperature", 1.0)
        if not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
            raise UserError(f"{source} has an invalid temperature {temperature!r}; refit it with "
                            "`resnext calibrate`.")  # fmt: skip
        state = checkpoint.get("unknown")
        return cls(float(temperature), UnknownDetector.from_state(state, source) if state else None)

    def choose(self, enabled: bool, accept: float | None) -> Calibration:
        """--no-calibration: temperature 1 and no unknown verdicts, as before calibration
        existed; --unknown-threshold: another share of new photos like the val ones accepted."""
        if not enabled:
            return Calibration()
        if accept is not None and self.unknown is not None:
            return replace(self, unknown=self.unknown.with_accept(accept))
        return self

    def to(self, device: torch.device) -> Calibration:
        return replace(self, unknown=self.unknown.to(device) if self.unknown else None)

    def apply(self, views: list[tuple[torch.Tensor, torch.Tensor | None]]) -> BatchOutput:
        """Probabilities and unknown scores of a batch from each view's (logits, features),
        averaged over the views (one, or the image and its mirror with --tta)."""
        t = self.temperature
        probs = torch.stack([torch.softmax(apply_temperature(logits.float(), t), 1) for logits, _ in views])
        raw = probs if t == 1.0 else torch.stack([torch.softmax(logits.float(), 1) for logits, _ in views])
        probs, raw = probs.mean(0), raw.mean(0)
        if self.unknown is None:
            return BatchOutput(probs.cpu(), raw.cpu())
        scores = torch.stack([self.unknown.score(logits, f, t) for logits, f in views]).mean(0)
        return BatchOutput(probs.cpu(), raw.cpu(), scores.cpu(), self.unknown.known(scores).cpu())
