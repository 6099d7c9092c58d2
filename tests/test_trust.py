"""Issue 25: calibrated probabilities (temperature scaling) and unknown detection."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from resnext_cli.config import InferenceConfig
from resnext_cli.data.batches import get_batch
from resnext_cli.data.loaders import collate_skipping_failures
from resnext_cli.errors import UserError
from resnext_cli.model import networks, trust
from resnext_cli.model.engines import load_inference_model
from resnext_cli.outputs.metrics import auroc, expected_calibration_error, fpr_at_tpr, reliability_bins
from tests.conftest import TINY_TRAIN, invoke, make_dataset
from tests.test_predict import image_folder


def read_rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open()))


def far_images(folder: Path) -> Path:
    """Pictures unlike the training set's colour squares on grey: a flat black field and a
    colour gradient. (The session's model has a random frozen backbone, so "far" is what its
    features tell apart; `odd_images` adds pictures they see as closer.)"""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), (0, 0, 0)).save(folder / "black.png")
    gradient = Image.new("RGB", (40, 40))
    gradient.putdata([(x * 6, y * 6, 128) for y in range(40) for x in range(40)])
    gradient.save(folder / "gradient.png")
    return folder


def odd_images(folder: Path) -> Path:
    """far_images, plus full-amplitude noise and a white field."""
    far_images(folder)
    Image.effect_noise((40, 40), 255).convert("RGB").save(folder / "noise.png")
    Image.new("RGB", (40, 40), (255, 255, 255)).save(folder / "white.png")
    return folder


def old_checkpoint(trained_run: Path, target: Path) -> Path:
    """best.pt as written before calibration existed: no `temperature`, no `unknown`."""
    checkpoint = torch.load(trained_run / "best.pt", weights_only=True)
    for key in ("temperature", "unknown"):
        checkpoint.pop(key)
    target.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, target / "best.pt")
    return target / "best.pt"


# ---------------------------------------------------------------- the numbers, by hand


def test_ece_auroc_and_fpr_match_hand_computed_values():
    # two bins used: (0.6, 0.6667] holds 0.62, 0.65 (1 of 2 right); (0.9333, 1] holds 0.95, 0.99 (both)
    confidences, correct = [0.62, 0.65, 0.95, 0.99], [True, False, True, True]
    assert expected_calibration_error(confidences, correct) == pytest.approx(
        0.5 * abs(0.5 - 0.635) + 0.5 * abs(1.0 - 0.97))
    assert [b.count for b in reliability_bins(confidences, correct) if b.count] == [2, 2]
    assert auroc([0.1, 0.2, 0.3], [0.4, 0.5]) == 1.0 and auroc([0.4, 0.5], [0.1, 0.2]) == 0.0
    assert auroc([1.0, 2.0], [1.0, 3.0]) == pytest.approx(0.625)  # the tie counts half
    known = [i / 100 for i in range(100)]  # the threshold accepting 95 of them is 0.94
    assert fpr_at_tpr(known, [0.5, 0.94, 0.95, 2.0]) == pytest.approx(0.5)


def test_temperature_lowers_the_nll_of_an_overconfident_model():
    torch.manual_seed(0)
    logits = torch.randn(2000, 4) * 2
    labels = torch.multinomial(torch.softmax(logits, 1), 1)[:, 0]  # softmax(logits) is calibrated
    overconfident = logits * 8  # the same ranking, far too sure
    t = trust.fit_temperature(overconfident, labels)
    assert 6 < t < 10
    assert trust.nll(overconfident, labels, t) < 0.5 * trust.nll(overconfident, labels)
    probs = torch.softmax(overconfident / t, 1)
    before = torch.softmax(overconfident, 1)
    right = (overconfident.argmax(1) == labels).tolist()
    assert expected_calibration_error(probs.max(1).values.tolist(), right) < 0.05 < \
        expected_calibration_error(before.max(1).values.tolist(), right)


def test_a_val_split_all_right_does_not_make_every_prediction_certain():
    torch.manual_seed(1)
    logits = torch.randn(30, 3) * 3
    labels = logits.argmax(1)  # all 30 right: the NLL keeps falling as T -> 0
    t = trust.fit_temperature(logits, labels)
    mean_top = float(torch.softmax(logits / t, 1).max(1).values.mean())
    assert mean_top <= 31 / 32 + 1e-6  # Laplace: (right + 1) / (n + 2)


def test_one_mistake_keeps_the_nll_minimum():
    """29 of 30 right with wide margins, one wrong by a hair: the NLL has its minimum at a
    sharp T, which stays (Laplace's guard, (right + 1) / (n + 2), is for a split with no
    mistake, whose NLL has none: applying it here too softened calibrated probabilities)."""
    logits = torch.zeros(30, 3)
    logits[:, 0] = 4.0
    labels = torch.zeros(30, dtype=torch.long)
    labels[0] = 1
    logits[0, 1] = 3.9  # the mistake: class 0 by 0.1
    t = trust.fit_temperature(logits, labels)
    grid = torch.linspace(0.05, 3.0, 2000)
    best = grid[torch.tensor([trust.nll(logits, labels, float(g)) for g in grid]).argmin()]
    assert t == pytest.approx(float(best), rel=0.01)
    assert float(torch.softmax(logits / t, 1).max(1).values.mean()) > 30 / 32  # beyond the guard's cap


def test_the_score_ranks_far_away_features_above_the_training_ones():
    torch.manual_seed(0)
    centres = torch.randn(3, 64) * 3
    labels = torch.arange(300) % 3
    train = (centres[labels] + torch.randn(300, 64)).relu()
    val_labels = torch.arange(60) % 3
    val = (centres[val_labels] + torch.randn(60, 64)).relu()
    head = torch.nn.Linear(64, 3)
    with torch.no_grad():
        head.weight.copy_(centres)
        head.bias.zero_()
        train_logits, val_logits = head(train), head(val)
        for name in ("msp+cknn", "knn", "mahalanobis", "energy+cknn"):
            components = trust.parse_score(name)
            stats, k = trust.fit_statistics(components, train, labels)
            detector = trust.fit_detector(components, stats, k, val_logits, val, 1.0)
            far = torch.rand(20, 64) * 6  # nothing like the classes
            far_scores = detector.score(head(far), far, 1.0)
            train_scores = detector.score(train_logits, train, 1.0)
            assert far_scores.min() > train_scores.max(), name
            # the state a checkpoint stores gives the same scores after the round trip
            state = trust.UnknownDetector.from_state(detector.to_state(), "x")
            assert torch.allclose(state.score(head(far), far, 1.0), far_scores, rtol=1e-4), name


def test_style_sees_what_the_pooled_features_do_not():
    """Rows whose pooled features and logits are the training images' own, but whose second
    stage's channel spread is unlike theirs (a drawing of a flower, a texture): only `style`,
    the default's feature component, ranks them above every training image; energy+knn, the
    default before it, does not."""
    torch.manual_seed(0)
    centres, spread_centres = torch.randn(3, 64) * 3, torch.rand(3, 16) + 0.5
    labels, val_labels = torch.arange(300) % 3, torch.arange(60) % 3
    pooled = (centres[labels] + torch.randn(300, 64)).relu()
    spread = spread_centres[labels] + 0.05 * torch.randn(300, 16)
    val = torch.cat([(centres[val_labels] + torch.randn(60, 64)).relu(),
                     spread_centres[val_labels] + 0.05 * torch.randn(60, 16)], 1)  # fmt: skip
    train = torch.cat([pooled, spread], 1)
    odd = torch.cat([pooled[:20], torch.rand(20, 16) * 2], 1)  # same pooled part, other spread
    head = torch.nn.Linear(64, 3)
    with torch.no_grad():
        head.weight.copy_(centres)
        head.bias.zero_()
    logits = {name: head(x[:, :64]).detach() for name, x in (("train", train), ("val", val), ("odd", odd))}
    verdicts = {}
    for name in (trust.DEFAULT_SCORE, "energy+knn"):
        components = trust.parse_score(name)
        stats, k = trust.fit_statistics(components, train, labels, pooled=64)
        detector = trust.fit_detector(components, stats, k, logits["val"], val, 1.0)
        verdicts[name] = bool(detector.score(logits["odd"], odd, 1.0).min()
                              > detector.score(logits["train"], train, 1.0).max())  # fmt: skip
    assert verdicts == {trust.DEFAULT_SCORE: True, "energy+knn": False}
    assert trust.DEFAULT_SCORE == "energy+2*style" and trust.parse_score("energy+2*style") == \
        ("energy", "style", "style")
    assert trust.UnknownDetector(("energy", "style", "style"), {}).name == "energy+2*style"


def test_pooled_components_ignore_the_trailing_spread_columns():
    """A checkpoint fitted on the pooled features alone (every one before `style` existed)
    scores the same rows the same when the model now also returns the channel spread."""
    torch.manual_seed(1)
    train, val, labels = torch.randn(60, 32).relu(), torch.randn(30, 32).relu(), torch.arange(60) % 3
    for name in ("energy+knn", "msp+cknn", "energy+mahalanobis", "rawmaha"):
        components = trust.parse_score(name)
        stats, k = trust.fit_statistics(components, train, labels)
        detector = trust.fit_detector(components, stats, k, val[:, :3], val, 1.0)
        wide = torch.cat([val, torch.rand(30, 8)], 1)
        assert torch.equal(detector.score(val[:, :3], wide, 1.0), detector.score(val[:, :3], val, 1.0)), name


@pytest.mark.parametrize("name", ["style+style", "0*style", "10*style", "x*style", "2*nope", "energy+"])
def test_invalid_weighted_scores_are_refused(name):
    with pytest.raises(UserError, match="Invalid --unknown-score"):
        trust.parse_score(name)


def test_known_flips_at_the_threshold():
    quantiles = torch.linspace(-2.0, 2.0, trust.QUANTILES)
    detector = trust.UnknownDetector(("msp",), {}, quantiles=quantiles).with_accept(0.75)
    assert detector.threshold == pytest.approx(1.0)
    t = detector.threshold
    verdicts = detector.known(torch.tensor([t - 1e-3, t, t + 1e-3]))
    assert verdicts.tolist() == [True, True, False]
    assert detector.with_accept(1.0).threshold == pytest.approx(2.0)


def test_the_threshold_accepts_the_share_of_new_photos_like_val():
    """Split conformal rank: over 2,000 val sets of 45 scores, a new photo drawn like them is
    known with probability 0.95 or more on average (44 / 46 in theory); the plain 95% quantile
    of the 45 accepts about 93%. Every val set itself is accepted at 95% or more, and one too
    small for the rank is accepted whole."""
    generator, normal = torch.Generator().manual_seed(0), torch.distributions.Normal(0.0, 1.0)
    grid = torch.linspace(0, 1, trust.QUANTILES, dtype=torch.float64)
    conformal, plain = [], []
    for _ in range(2000):
        scores = torch.randn(45, generator=generator, dtype=torch.float64)
        quantiles = torch.quantile(scores, grid).float()
        threshold = trust.threshold_for(quantiles, 0.95, len(scores))
        assert float((scores <= threshold + 1e-6).double().mean()) >= 0.95
        conformal.append(float(normal.cdf(torch.tensor(threshold))))
        plain.append(float(normal.cdf(quantiles[950])))
    assert sum(conformal) / len(conformal) >= 0.95 > 0.94 > sum(plain) / len(plain)
    few = torch.quantile(torch.randn(10, generator=generator, dtype=torch.float64), grid).float()
    assert trust.threshold_for(few, 0.95, 10) == pytest.approx(float(few[-1]))


def test_class_balanced_subsample_is_bounded_and_even():
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 1000)
    chosen = trust.balanced_subsample(labels, 20)
    counts = torch.bincount(labels[chosen], minlength=3).tolist()
    assert counts == [8, 3, 9] and len(set(chosen.tolist())) == 20
    assert torch.equal(chosen, trust.balanced_subsample(labels, 20))  # seeded
    assert len(trust.balanced_subsample(labels, 5000)) == len(labels)


# ---------------------------------------------------------------- train, predict, evaluate


def test_train_stores_the_calibration_in_best_pt_only(trained_run: Path):
    best = torch.load(trained_run / "best.pt", map_location="cpu", weights_only=True)
    last = torch.load(trained_run / "last.pt", map_location="cpu", weights_only=True)
    assert isinstance(best["temperature"], float) and 0 < best["temperature"] < 100
    unknown = best["unknown"]
    assert unknown["score"] == trust.DEFAULT_SCORE and unknown["accept"] == 0.95
    # the second stage's class means and whitening (resnet18: 128 channels), whatever the training set's size
    assert unknown["stats"]["style_means"].shape == (3, 128)
    assert unknown["stats"]["style_whiten"].shape == (128, 128)
    assert unknown["stats"]["style_whiten"].dtype == torch.float32
    assert "temperature" not in last and "unknown" not in last  # the resume point is as trained
    # the threshold accepts 95% of the val split it was set on
    result = invoke(["evaluate", "--checkpoint", trained_run / "best.pt", "--json", "--workers", "0",
                     "--out", trained_run.parent / "eval_check"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["known_accepted"] >= 0.94


def test_predictions_carry_the_unknown_score_and_its_verdict(tmp_path, trained_run, dataset):
    odd = odd_images(tmp_path / "odd")
    out = tmp_path / "preds.csv"
    folder = image_folder(tmp_path / "imgs", ["a.png", "b.png", "c.png"])
    for picture in odd.iterdir():
        shutil.copy(picture, folder / picture.name)
    result = invoke(["batch-predict", folder, "--checkpoint", trained_run / "best.pt", "--workers", "0",
                     "--output", out])
    assert result.exit_code == 0, result.stderr
    rows = {Path(r["path"]).name: r for r in read_rows(out)}
    assert list(next(iter(rows.values()))) == ["path", "class", "prob", "error", "unknown_score", "known"]
    threshold = torch.load(trained_run / "best.pt", weights_only=True)["unknown"]["threshold"]
    for row in rows.values():
        assert row["known"] == ("true" if float(row["unknown_score"]) <= threshold else "false")
        assert row["class"]  # the top class stays, whatever the verdict
    # every odd picture scores above every training image; the far ones are unknown
    train = read_rows_of(tmp_path, trained_run, dataset / "train")
    assert max(float(r["unknown_score"]) for r in train) < min(float(rows[p.name]["unknown_score"])
                                                               for p in odd.iterdir())  # fmt: skip
    assert rows["black.png"]["known"] == rows["gradient.png"]["known"] == "false"
    assert [rows[name]["known"] for name in ("a.png", "b.png", "c.png")] == ["true"] * 3


def read_rows_of(tmp_path: Path, trained_run: Path, folder: Path) -> list[dict[str, str]]:
    out = tmp_path / f"{folder.name}.csv"
    result = invoke(["batch-predict", folder, "--recursive", "--checkpoint", trained_run / "best.pt",
                     "--workers", "0", "--quiet", "--output", out])
    assert result.exit_code == 0, result.stderr
    return read_rows(out)


def test_reject_unknown_and_the_threshold_flag(tmp_path, trained_run):
    folder = far_images(tmp_path / "far")
    image_folder(folder, ["a.png", "b.png"])
    strict, lenient = tmp_path / "strict.jsonl", tmp_path / "lenient.csv"
    base = ["batch-predict", folder, "--checkpoint", trained_run / "best.pt", "--workers", "0", "--quiet"]
    result = invoke([*base, "--reject-unknown", "--output", strict])
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in strict.read_text().splitlines()]
    assert {r["known"] for r in records} == {True, False}
    for record in records:
        assert (record["class"] is None) == (record["known"] is False)
        assert record["topk"][0]["class"]  # the nearest class is still there
    assert "look like none of the classes" in result.stdout
    # accepting every val photo moves the threshold up to the highest val score: fewer unknowns
    result = invoke([*base, "--unknown-threshold", "1.0", "--output", lenient])
    assert result.exit_code == 0, result.stderr
    lenient_unknowns = sum(r["known"] == "false" for r in read_rows(lenient))
    assert lenient_unknowns <= sum(r["known"] is False for r in records)
    bad = invoke([*base, "--unknown-threshold", "1.5"])
    assert bad.exit_code == 2 and "--unknown-threshold" in bad.stderr
    both = invoke([*base, "--reject-unknown", "--no-calibration"])
    assert both.exit_code == 2 and "--no-calibration" in both.stderr


def test_predict_says_unknown_with_the_nearest_classes(tmp_path, trained_run):
    far = far_images(tmp_path / "far")
    result = invoke(["predict", far / "gradient.png", "--checkpoint", trained_run / "best.pt", "--topk", "2"])
    assert result.exit_code == 0, result.stderr
    assert "unknown, unlike the classes it was trained on" in result.stdout
    assert "the nearest classes" in result.stdout and result.stdout.count("%") == 2
    as_json = invoke(["predict", far / "gradient.png", "--checkpoint", trained_run / "best.pt", "--json"])
    record = json.loads(as_json.stdout)[0]
    assert record["known"] is False and record["unknown_score"] > 0


def test_old_checkpoints_load_and_predict_exactly_as_before(tmp_path, trained_run):
    old = old_checkpoint(trained_run, tmp_path / "old")
    folder = image_folder(tmp_path / "imgs", [f"{i}.png" for i in range(5)], seed=3)
    base = ["batch-predict", folder, "--checkpoint", old, "--workers", "0", "--quiet", "--precision", "fp32",
            "--no-channels-last"]
    outputs = {}
    for name, flags in {"plain": [], "no_calibration": ["--no-calibration"]}.items():
        outputs[name] = tmp_path / f"{name}.csv"
        result = invoke([*base, *flags, "--output", outputs[name]])
        assert result.exit_code == 0, result.stderr
    rows = read_rows(outputs["no_calibration"])
    assert rows == read_rows(outputs["plain"])  # an old checkpoint means temperature 1, no score
    assert all(r["unknown_score"] == "" and r["known"] == "" for r in rows)
    # the probabilities of the plain torchvision model, softmax(model(x)), as before
    checkpoint = torch.load(old, weights_only=True)
    model = networks.build_model("resnet18", 3).eval()
    model.load_state_dict(checkpoint["model"])
    engine = load_inference_model(InferenceConfig(checkpoint=str(old), device="cpu", precision="fp32",
                                                  channels_last=False), announce=False)
    dataset = engine.dataset([(r["path"], -1) for r in rows])
    batch = get_batch(collate_skipping_failures([dataset[i] for i in range(len(dataset))]), engine.spec)
    with torch.inference_mode():
        expected = torch.softmax(model(batch.inputs), dim=1)
    for row, probs in zip(rows, expected):
        assert row["prob"] == f"{float(probs.max()):.6f}"
    refused = invoke([*base, "--reject-unknown"])
    assert refused.exit_code == 2 and "resnext calibrate" in refused.stderr


def test_no_calibration_shows_the_raw_softmax(tmp_path, trained_run):
    folder = image_folder(tmp_path / "imgs", ["a.png", "b.png"])
    records = {}
    for name, flags in {"calibrated": [], "raw": ["--no-calibration"]}.items():
        result = invoke(["predict", folder / "a.png", folder / "b.png", "--checkpoint", trained_run / "best.pt",
                         "--json", *flags])
        assert result.exit_code == 0, result.stderr
        records[name] = json.loads(result.stdout)
    t = torch.load(trained_run / "best.pt", weights_only=True)["temperature"]
    for calibrated, raw in zip(records["calibrated"], records["raw"]):
        assert raw["known"] is None and calibrated["known"] is not None
        assert calibrated["topk"][0]["class"] == raw["topk"][0]["class"]  # same ranking
        p, q = raw["topk"][0]["prob"], calibrated["topk"][0]["prob"]
        assert (q > p) == (t < 1) and abs(q - p) > 1e-4  # sharper below 1, softer above


def test_evaluate_reports_calibration_and_unknowns_and_the_report_shows_them(tmp_path, trained_run, dataset):
    far = far_images(tmp_path / "far")
    out = tmp_path / "eval"
    result = invoke(["evaluate", dataset, "--checkpoint", trained_run / "best.pt", "--workers", "0",
                     "--out", out, "--unknown", far])
    assert result.exit_code == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("ece", "nll", "ece_uncalibrated", "nll_uncalibrated", "temperature", "known_accepted"):
        assert 0 <= metrics[key] < math.inf, key
    assert metrics["nll"] <= metrics["nll_uncalibrated"] + 1e-9  # fitted on these very images
    assert metrics["unknown_images"] == 2 and metrics["unknown_auroc"] == 1.0
    assert metrics["unknown_rejected"] == 1.0 and metrics["unknown_fpr95"] == 0.0
    assert "AUROC 1.000" in result.stdout and "Calibration: temperature" in result.stdout
    assert (out / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert {r["known"] for r in read_rows(out / "unknown.csv")} == {"false"}
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.rmtree(run / "eval")
    reported = invoke(["report", run, "--workers", "0", "--unknown", far])
    assert reported.exit_code == 0, reported.stderr
    page = (run / "report.html").read_text()
    assert 'id="trust"' in page and "reliability diagrams" in page and "FPR at 95% TPR" in page
    missing = invoke(["evaluate", dataset, "--checkpoint", trained_run / "best.pt", "--unknown", tmp_path / "nope"])
    assert missing.exit_code == 2 and "--unknown" in missing.stderr


def test_calibrate_refits_and_fits_an_old_checkpoint(tmp_path, trained_run, dataset):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    old_checkpoint(trained_run, run)  # best.pt without calibration
    # a deliberately over-confident model: the same head, logits x 20
    checkpoint = torch.load(run / "best.pt", weights_only=True)
    checkpoint["model"]["fc.weight"] *= 20
    checkpoint["model"]["fc.bias"] *= 20
    torch.save(checkpoint, run / "best.pt")
    held_out = make_dataset(tmp_path / "held_out", train_per_class=2, val_per_class=10, seed=9) / "val"
    for picture in sorted((held_out / "alpha").iterdir())[:3]:  # some mistakes it is sure of
        shutil.move(picture, held_out / "beta" / picture.name)
    result = invoke(["calibrate", run, "--data", held_out, "--workers", "0"])
    assert result.exit_code == 0, result.stderr
    fitted = torch.load(run / "best.pt", weights_only=True)
    assert fitted["temperature"] > 2  # softened
    assert fitted["unknown"]["score"] == trust.DEFAULT_SCORE  # computed from the run's training images
    trained = torch.load(trained_run / "best.pt", weights_only=True)["unknown"]["stats"]
    for key in ("style_means", "style_whiten"):  # the same 36 training images, the same backbone
        assert torch.allclose(fitted["unknown"]["stats"][key], trained[key], atol=1e-3), key
    assert torch.equal(fitted["model"]["fc.weight"], checkpoint["model"]["fc.weight"])  # weights as they were
    evaluated = invoke(["evaluate", held_out, "--checkpoint", run / "best.pt", "--json", "--workers", "0",
                        "--out", tmp_path / "eval"])
    metrics = json.loads(evaluated.stdout)
    assert metrics["nll"] < metrics["nll_uncalibrated"]
    again = invoke(["calibrate", run, "--unknown-score", "energy+mahalanobis", "--unknown-threshold", "0.9",
                    "--workers", "0"])
    assert again.exit_code == 0, again.stderr
    unknown = torch.load(run / "best.pt", weights_only=True)["unknown"]
    assert (unknown["score"], unknown["accept"]) == ("energy+mahalanobis", 0.9)
    bad = invoke(["calibrate", run, "--unknown-score", "msp+nope"])
    assert bad.exit_code == 2 and "Invalid --unknown-score" in bad.stderr


def test_train_without_the_cache_calibrates_from_a_pass_over_the_data(tmp_path, dataset):
    out = tmp_path / "run"
    result = invoke(["train", dataset, *TINY_TRAIN, "--weights", "none", "--epochs", "1", "--seed", "0",
                     "--no-cache-features", "--out", out, "--unknown-score", "msp+knn", "--unknown-threshold", "0.9"])
    assert result.exit_code == 0, result.stderr
    assert "Calibrated on 18 val images" in result.stdout
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["unknown"]["score"] == "msp+knn" and best["unknown"]["accept"] == 0.9
    assert best["unknown"]["stats"]["bank"].shape == (36, 512)


def test_train_on_cached_features_calibrates_the_default_score_without_another_pass(tmp_path, dataset, monkeypatch):
    """The feature cache's plain view keeps the second stage's channel spread, so the default
    score (`style` reads it) is fitted from the cache: no pass of best.pt over val and train at
    the end of training; the statistics are the ones such a pass gives (`resnext calibrate`)."""
    from resnext_cli.commands import train as train_command

    def no_pass(*args, **kwargs):
        raise AssertionError("a pass over the images at the end of training")

    out = tmp_path / "run"
    with monkeypatch.context() as patched:
        patched.setattr(train_command, "collect_outputs", no_pass)
        result = invoke(["train", dataset, *TINY_TRAIN, "--weights", "none", "--freeze", "--epochs", "1",
                         "--seed", "0", "--out", out, "--precision", "fp32"])
    assert result.exit_code == 0, result.stderr
    assert "not calibrated" not in result.stdout + result.stderr
    cached = torch.load(out / "best.pt", weights_only=True)["unknown"]
    assert cached["score"] == trust.DEFAULT_SCORE and cached["val_images"] == 18
    assert invoke(["calibrate", out, "--workers", "0", "--device", "cpu", "--precision", "fp32"]).exit_code == 0
    passed = torch.load(out / "best.pt", weights_only=True)["unknown"]
    for key in ("style_means", "style_whiten"):
        assert torch.allclose(cached["stats"][key], passed["stats"][key], atol=1e-4), key
    assert cached["threshold"] == pytest.approx(passed["threshold"], rel=1e-3)


@pytest.mark.parametrize("case", ["identical", "constant channel", "fewer images than dimensions"])
def test_gaussians_fit_on_training_images_that_barely_vary(case):
    """Identical photos (a folder of copies), a channel that never changes, or 3 images in 64
    dimensions: the shared covariance is singular, yet the fit gives finite distances that
    still rank a different feature above the training ones (it used to stop train with
    linalg.inv's error)."""
    torch.manual_seed(0)
    features = torch.randn(3 if case.startswith("fewer") else 12, 64)
    if case == "identical":
        features = features[:1].repeat(12, 1)
    if case == "constant channel":
        features[:, 5] = 0.25
    labels = torch.arange(len(features)) % 2
    whiten, means = trust.fit_gaussians(features, labels)
    near = ((features @ whiten)[:, None] - means[None]).pow(2).sum(-1).min(1).values
    far = ((torch.full((1, 64), 3.0) @ whiten)[:, None] - means[None]).pow(2).sum(-1).min(1).values
    assert torch.isfinite(whiten).all() and torch.isfinite(near).all()
    assert far.item() > near.max().item()
