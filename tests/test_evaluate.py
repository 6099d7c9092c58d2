"""`resnext evaluate` and the metrics behind it."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from resnext_cli.outputs.evaluation import Prediction, mistakes, summarise
from resnext_cli.outputs.metrics import classification_report, confusion_matrix
from tests.conftest import TINY_TRAIN, invoke, make_dataset

# a small fixed set, scored by hand below (rows: true a a a a b b c c c)
CLASSES = ["a", "b", "c", "d", "e"]
TRUE = [0, 0, 0, 0, 1, 1, 2, 2, 2]
PRED = [0, 0, 0, 1, 1, 2, 2, 0, 3]


def test_confusion_matrix_counts_true_rows_by_predicted_columns():
    assert confusion_matrix(TRUE, PRED, 5) == [
        [3, 1, 0, 0, 0],
        [0, 1, 1, 0, 0],
        [1, 0, 1, 1, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
    ]


def test_metrics_match_values_computed_by_hand():
    report = classification_report(confusion_matrix(TRUE, PRED, 5), CLASSES)
    assert report.accuracy == pytest.approx(5 / 9) and report.n == 9
    by_name = {c.name: c for c in report.per_class}
    # "e" is neither true nor predicted: left out; "d" was predicted once, never true
    assert list(by_name) == ["a", "b", "c", "d"]
    expected = {  # precision, recall, f1, support
        "a": (3 / 4, 3 / 4, 0.75, 4),
        "b": (1 / 2, 1 / 2, 0.5, 2),
        "c": (1 / 2, 1 / 3, 0.4, 3),  # f1 = 2 * (1/2 * 1/3) / (1/2 + 1/3)
        "d": (0.0, 0.0, 0.0, 0),  # 0/1 precision; recall 0/0 counts as 0
    }
    for name, (precision, recall, f1, support) in expected.items():
        got = by_name[name]
        assert (got.precision, got.recall, got.f1, got.support) == pytest.approx(
            (precision, recall, f1, support)
        ), name
    assert report.macro.precision == pytest.approx(1.75 / 4)
    assert report.macro.recall == pytest.approx(19 / 48)
    assert report.macro.f1 == pytest.approx(1.65 / 4)
    assert report.weighted.precision == pytest.approx(5.5 / 9)
    assert report.weighted.recall == pytest.approx(5 / 9)
    assert report.weighted.f1 == pytest.approx(5.2 / 9)


def test_top5_and_most_confident_mistakes_first():
    probs = [0.9, 0.8, 0.7, 0.95, 0.6, 0.55, 0.5, 0.99, 0.4]
    top5 = [True] * 8 + [False]
    predictions = [
        Prediction(f"img{i}.png", t, p, prob, hit)
        for i, (t, p, prob, hit) in enumerate(zip(TRUE, PRED, probs, top5))
    ]
    evaluation = summarise([*CLASSES, "f"], predictions, [("bad.png", "OSError")])
    metrics = evaluation.metrics()
    assert metrics["top5"] == pytest.approx(8 / 9)
    assert metrics["n"] == 9 and metrics["unreadable"] == 1
    assert metrics["accuracy"] == pytest.approx(5 / 9)
    assert [m.path for m in mistakes(evaluation)] == ["img7.png", "img3.png", "img5.png", "img8.png"]
    assert evaluation.shown == ["a", "b", "c", "d"]
    # 5 classes or fewer: the true class is always in the top 5, so no top-5 is reported
    assert "top5" not in summarise(CLASSES, predictions, []).metrics()
    assert "top5" not in summarise(CLASSES[:4], predictions[:3], []).metrics()


def _read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open()))


def test_evaluate_writes_the_interface_files_and_agrees_with_batch_predict(tmp_path, trained_run, dataset):
    # a dataset root whose val split has 4 alpha pictures mislabelled as beta: sure mistakes
    root = tmp_path / "root"
    shutil.copytree(dataset / "val", root / "val")
    shutil.copytree(dataset / "train", root / "train")
    for picture in sorted((root / "val" / "alpha").iterdir())[:4]:
        shutil.move(picture, root / "val" / "beta" / picture.name)
    out = tmp_path / "eval"
    result = invoke(["evaluate", "--data", root, "--checkpoint", trained_run / "best.pt",
                     "--out", out, "--workers", "0"])
    assert result.exit_code == 0, result.stderr
    assert "macro avg" in result.stdout and "weighted avg" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 18  # the val split only: 3 classes x 6
    assert "top5" not in metrics  # 3 classes
    assert {"accuracy", "macro_f1", "weighted_f1", "n"} <= set(metrics)

    # an independent count from batch-predict's per-image classes
    preds = tmp_path / "preds.csv"
    assert invoke(["batch-predict", root / "val", "--recursive", "--checkpoint",
                   trained_run / "best.pt", "--output", preds, "--quiet", "--workers", "0"]).exit_code == 0
    rows = _read_csv(preds)
    wrong = {r["path"] for r in rows if r["class"] != Path(r["path"]).parent.name}
    assert len(wrong) >= 4
    assert metrics["accuracy"] == pytest.approx(1 - len(wrong) / len(rows))

    matrix = list(csv.reader((out / "confusion_matrix.csv").open()))
    assert matrix[0] == ["true\\pred", "alpha", "beta", "gamma"]
    assert sum(int(v) for row in matrix[1:] for v in row[1:]) == 18
    per_class = _read_csv(out / "per_class.csv")
    assert [r["class"] for r in per_class] == ["alpha", "beta", "gamma"]
    assert sum(int(r["support"]) for r in per_class) == 18
    missed = _read_csv(out / "misclassified.csv")
    assert {r["path"] for r in missed} == wrong
    probs = [float(r["prob"]) for r in missed]
    assert probs == sorted(probs, reverse=True)
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_classes_are_matched_by_name_not_folder_order(tmp_path, trained_run, dataset):
    # only beta and gamma: an ImageFolder would label them 0 and 1, the model knows them as 1 and 2
    subset = tmp_path / "subset"
    for name in ("gamma", "beta"):
        shutil.copytree(dataset / "val" / name, subset / name)
    result = invoke(["evaluate", "--data", subset, "--checkpoint", trained_run / "best.pt",
                     "--json", "--workers", "0", "--out", tmp_path / "eval"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["n"] == 12
    assert report["accuracy"] >= 0.9  # colour classes: a working model, labels lined up
    supports = {c["name"]: c["support"] for c in report["per_class"]}
    assert supports["beta"] == 6 and supports["gamma"] == 6 and supports.get("alpha", 0) == 0


def test_unknown_class_is_an_error_listing_them(tmp_path, trained_run, dataset):
    data = tmp_path / "data"
    shutil.copytree(dataset / "val" / "alpha", data / "alpha")
    shutil.copytree(dataset / "val" / "beta", data / "zebra")
    result = invoke(["evaluate", "--data", data, "--checkpoint", trained_run / "best.pt"])
    assert result.exit_code == 2
    assert "zebra" in result.stderr and "alpha, beta, gamma" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreadable_files_are_counted_not_fatal(tmp_path, trained_run, dataset):
    data = tmp_path / "data"
    shutil.copytree(dataset / "val", data)
    (data / "alpha" / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "eval"
    result = invoke(["evaluate", "--data", data, "--checkpoint", trained_run / "best.pt",
                     "--out", out, "--workers", "0"])
    assert result.exit_code == 0, result.stderr
    assert "broken.jpg" in result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 18 and metrics["unreadable"] == 1


def test_a_folder_the_run_split_itself_is_evaluated_on_its_recorded_val_split(tmp_path):
    flat = make_dataset(tmp_path / "flat", train_per_class=10, split_folders=False)
    run = tmp_path / "run"
    assert invoke(["train", "--data", flat, *TINY_TRAIN, "--weights", "none", "--epochs", "1",
                   "--seed", "0", "--out", run, "--val-split", "0.2"]).exit_code == 0
    result = invoke(["evaluate", "--data", flat, "--checkpoint", run / "best.pt", "--workers", "0"])
    assert result.exit_code == 0, result.stderr
    assert "split.json" in result.stderr
    held_out = json.loads((run / "split.json").read_text())["val"]
    metrics = json.loads((run / "eval" / "metrics.json").read_text())  # default: beside the checkpoint
    assert metrics["n"] == len(held_out) == 6


def test_evaluate_without_data_needs_the_recorded_data_to_exist(tmp_path, trained_run):
    ckpt = torch.load(trained_run / "best.pt", weights_only=True)
    ckpt["config"]["data"] = str(tmp_path / "moved")
    torch.save(ckpt, tmp_path / "best.pt")
    result = invoke(["evaluate", "--checkpoint", tmp_path / "best.pt"])
    assert result.exit_code == 2 and "moved" in result.stderr and "does not exist" in result.stderr
