"""Classification metrics from a confusion matrix: plain Python, so the numbers can be checked
by hand and computed the same way in `train`, `evaluate` and `report`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


def confusion_matrix(true: Sequence[int], predicted: Sequence[int], n_classes: int) -> list[list[int]]:
    """Counts: row = true class, column = predicted class."""
    matrix = [[0] * n_classes for _ in range(n_classes)]
    for t, p in zip(true, predicted, strict=True):
        matrix[t][p] += 1
    return matrix


@dataclass
class ClassScores:
    name: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class ClassificationReport:
    accuracy: float
    n: int
    per_class: list[ClassScores]  # the classes that occur in the data or in the predictions
    macro: ClassScores
    weighted: ClassScores
    balanced_accuracy: float = 0.0  # mean recall over the classes that occur in the data

    def summary(self) -> dict[str, float | int]:
        return {
            "accuracy": self.accuracy,
            "balanced_accuracy": self.balanced_accuracy,
            "macro_precision": self.macro.precision,
            "macro_recall": self.macro.recall,
            "macro_f1": self.macro.f1,
            "weighted_precision": self.weighted.precision,
            "weighted_recall": self.weighted.recall,
            "weighted_f1": self.weighted.f1,
            "n": self.n,
        }


def classification_report(matrix: list[list[int]], classes: Sequence[str]) -> ClassificationReport:
    """Per-class precision / recall / F1 / support, with macro and support-weighted averages,
    and the balanced accuracy (mean recall of the classes in the data: what accuracy would be if
    every class had as many images).

    Like scikit-learn's default, only classes that occur (as truth or as a prediction) take part,
    and a ratio with a zero denominator counts as 0 (a class never predicted has precision 0);
    balanced accuracy, like scikit-learn's `balanced_accuracy_score`, averages over true classes.
    """
    n_classes = len(classes)
    support = [sum(matrix[i]) for i in range(n_classes)]
    predicted = [sum(matrix[i][j] for i in range(n_classes)) for j in range(n_classes)]
    total = sum(support)
    correct = sum(matrix[i][i] for i in range(n_classes))
    rows = []
    for i, name in enumerate(classes):
        if support[i] == 0 and predicted[i] == 0:
            continue
        precision = _ratio(matrix[i][i], predicted[i])
        recall = _ratio(matrix[i][i], support[i])
        f1 = _ratio(2 * precision * recall, precision + recall)
        rows.append(ClassScores(name, precision, recall, f1, support[i]))
    macro = ClassScores(
        "macro avg",
        _mean([r.precision for r in rows]),
        _mean([r.recall for r in rows]),
        _mean([r.f1 for r in rows]),
        total,
    )
    weighted = ClassScores(
        "weighted avg",
        _ratio(sum(r.precision * r.support for r in rows), total),
        _ratio(sum(r.recall * r.support for r in rows), total),
        _ratio(sum(r.f1 * r.support for r in rows), total),
        total,
    )
    balanced = _mean([r.recall for r in rows if r.support > 0])
    return ClassificationReport(_ratio(correct, total), total, rows, macro, weighted, balanced)


def row_normalised(matrix: list[list[int]]) -> list[list[float]]:
    """Each true class's row as fractions of its images (recall on the diagonal)."""
    return [[_ratio(v, sum(row)) for v in row] for row in matrix]


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


# ---------------------------------------------------------------- calibration and unknowns


@dataclass
class ReliabilityBin:
    low: float
    high: float
    count: int
    confidence: float  # mean top probability of the images in the bin
    accuracy: float  # share of them predicted right


def reliability_bins(confidences: Sequence[float], correct: Sequence[bool], bins: int = 15) -> list[ReliabilityBin]:
    """Equal-width confidence bins (Guo et al. 2017): (low, high], the first one [0, high]."""
    members: list[list[int]] = [[] for _ in range(bins)]
    for i, confidence in enumerate(confidences):
        members[min(bins - 1, max(0, math.ceil(confidence * bins) - 1))].append(i)
    return [
        ReliabilityBin(b / bins, (b + 1) / bins, len(m), _mean([confidences[i] for i in m]),
                       _mean([float(correct[i]) for i in m]))  # fmt: skip
        for b, m in enumerate(members)
    ]


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], bins: int = 15) -> float:
    """ECE: the gap between confidence and accuracy, averaged over the bins by their share of
    images (15 equal-width bins, as Guo et al. report it)."""
    total = len(confidences)
    return sum(b.count / total * abs(b.accuracy - b.confidence)
               for b in reliability_bins(confidences, correct, bins) if b.count)  # fmt: skip


def auroc(known: Sequence[float], unknown: Sequence[float]) -> float:
    """The chance that an unknown image scores higher than a known one (ties count half): the
    area under the ROC curve of the score as a detector of unknowns (Mann-Whitney U)."""
    ranked = sorted([(s, 0) for s in known] + [(s, 1) for s in unknown])
    rank_sum, i = 0.0, 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        average_rank = (i + j + 1) / 2  # ranks i+1 .. j, ties share their mean
        rank_sum += average_rank * sum(flag for _, flag in ranked[i:j])
        i = j
    n_known, n_unknown = len(known), len(unknown)
    return (rank_sum - n_unknown * (n_unknown + 1) / 2) / (n_known * n_unknown)


def fpr_at_tpr(known: Sequence[float], unknown: Sequence[float], tpr: float = 0.95) -> float:
    """The share of unknown images accepted when the threshold accepts `tpr` of the known ones
    (FPR@95TPR, the usual out-of-distribution measure): the threshold is the smallest score
    that accepts at least that share of the known images."""
    ordered = sorted(known)
    threshold = ordered[max(0, math.ceil(tpr * len(ordered)) - 1)]
    return sum(s <= threshold for s in unknown) / len(unknown)
