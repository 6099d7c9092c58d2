"""Classification metrics from a confusion matrix: plain Python, so the numbers can be checked
by hand and computed the same way in `train`, `evaluate` and `report`."""

from __future__ import annotations

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
