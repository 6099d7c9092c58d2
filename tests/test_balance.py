"""Class imbalance (issue 26): --balance in every training path, --select-by, balanced accuracy
and macro-F1 in metrics.csv / evaluate / report.html, class_counts and predict --prior."""

from __future__ import annotations

import csv
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from resnext_cli.commands import train as train_module
from resnext_cli.commands.train import RunHistory
from resnext_cli.data import balance
from resnext_cli.data.loaders import EpochSampler, ImageListDataset
from resnext_cli.data.transforms import Preprocessing
from resnext_cli.model import features
from resnext_cli.model.checkpoint import describe_run
from resnext_cli.outputs.metrics import classification_report
from resnext_cli.outputs.run_index import read_summary
from tests.conftest import CLASS_COLOURS, TINY_TRAIN, draw_image, invoke

TRAIN = [*TINY_TRAIN, "--weights", "none", "--freeze", "--seed", "0", "--lr", "0.02"]


def make_tail(root: Path, train: dict[str, int], val: dict[str, int], seed: int = 0) -> Path:
    """Class folders with the given numbers of images (the colour classes of conftest)."""
    rng = random.Random(seed)
    for split, counts in (("train", train), ("val", val)):
        for name, count in counts.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                draw_image(CLASS_COLOURS[name], rng).save(folder / f"{name}_{i:02d}.png")
    return root


def rows(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run / "metrics.csv").open()))


def without_seconds(run: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows(run)]


def train(data: Path, out: Path, *extra) -> str:
    result = invoke(["train", "--data", data, *TRAIN, "--out", out, *extra])
    assert result.exit_code == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def tail_data(tmp_path_factory) -> Path:
    """16 / 6 / 2 training images (8x), balanced val."""
    root = tmp_path_factory.mktemp("tail") / "ds"
    return make_tail(root, {"alpha": 16, "beta": 6, "gamma": 2}, {"alpha": 4, "beta": 4, "gamma": 4})


@pytest.fixture(scope="module")
def tail_run(tmp_path_factory, tail_data) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("tail_run") / "run"
    stdout = train(tail_data, out, "--epochs", "3", "--report")
    return out, stdout


# ---------------------------------------------------------------- decisions


def test_auto_acts_on_imbalance_only_from_the_measured_ratio():
    assert balance.imbalance_ratio([60, 20, 6]) == 10 and balance.imbalance_ratio([5]) == 1.0
    assert balance.imbalance_ratio([0, 4, 8]) == 2  # a class without images does not count
    below = [30, 30, math.ceil(30 / balance.BALANCE_AUTO_RATIO) + 1]
    at = [30, 30, int(30 / balance.BALANCE_AUTO_RATIO)]
    assert balance.resolve_balance("auto", [40, 40, 40]) == "none"
    assert balance.resolve_balance("auto", below) == "none"
    assert balance.resolve_balance("auto", at) == balance.BALANCE_AUTO
    assert balance.resolve_balance("sampler", [40, 40, 40]) == "sampler"  # a choice is kept
    assert balance.resolve_select_by("auto", [20, 20, 20]) == "acc"
    assert balance.resolve_select_by("auto", [20, 20, 19]) == "acc"  # rounding of a split
    assert balance.resolve_select_by("auto", [20, 20, 10]) == "balanced_acc"
    assert balance.resolve_select_by("macro_f1", [20, 20, 20]) == "macro_f1"


def test_loss_weights_are_inverse_class_sizes_averaging_one_per_image():
    weights = balance.loss_weights([40, 10, 5])
    assert weights.tolist() == pytest.approx([55 / 120, 55 / 30, 55 / 15])  # N / (K n_c)
    assert float((weights * torch.tensor([40, 10, 5])).sum()) == pytest.approx(55)
    assert balance.loss_weights([7, 7, 7]).tolist() == pytest.approx([1, 1, 1])


def test_weighted_loss_averages_over_images_so_shards_add_up():
    weights = balance.loss_weights([40, 10, 5])
    criterion = balance.WeightedCrossEntropy(weights, label_smoothing=0.1)
    logits, targets = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 0, 0, 1, 0, 2, 0, 1])
    whole = criterion(logits, targets)
    halves = (criterion(logits[:4], targets[:4]) + criterion(logits[4:], targets[4:])) / 2
    assert float(whole) == pytest.approx(float(halves))  # two torchrun processes' mean is the whole
    reference = torch.nn.functional.cross_entropy(logits, targets, weight=weights, reduction="sum",
                                                  label_smoothing=0.1) / 8  # fmt: skip
    assert float(whole) == pytest.approx(float(reference))


def test_prior_offsets_move_the_logits_between_priors():
    counts = [60, 30, 10]
    log_prior = torch.log(torch.tensor(counts) / 100.0)
    assert balance.prior_offsets(counts, "none", "train") is None  # the logits already are
    assert balance.prior_offsets(counts, "sampler", "uniform") is None
    assert torch.allclose(balance.prior_offsets(counts, "none", "uniform"), -log_prior)
    assert torch.allclose(balance.prior_offsets(counts, "logit-adjust", "uniform"), -log_prior)
    assert torch.allclose(balance.prior_offsets(counts, "weights", "train"), log_prior)
    assert [balance.default_prior(b) for b in ("none", "weights", "sampler", "logit-adjust")] == \
        ["train", "uniform", "uniform", "uniform"]  # fmt: skip


# ---------------------------------------------------------------- the sampler


def test_balanced_sampler_draws_classes_equally_keyed_by_seed_and_epoch():
    labels = [0] * 90 + [1] * 9 + [2] * 1
    sampler = balance.ClassBalancedSampler(labels, seed=3)
    drawn = []
    for epoch in range(1, 41):
        sampler.set_epoch(epoch)
        drawn += [labels[i] for _, i, _ in sampler]
    shares = [drawn.count(c) / len(drawn) for c in range(3)]
    assert shares == pytest.approx([1 / 3] * 3, abs=0.03)  # 4,000 draws, not 90 / 9 / 1 %
    sampler.set_epoch(7)
    again = balance.ClassBalancedSampler(labels, seed=3)  # e.g. after a resume: no replay needed
    again.set_epoch(7)
    assert list(sampler) == list(again) and len(list(sampler)) == len(labels) == len(sampler)
    again.set_epoch(8)
    assert list(sampler) != list(again)
    keys = list(sampler)
    for n, (epoch, index, repeat) in enumerate(keys):  # repeat: earlier draws of the same image
        assert epoch == 7 and repeat == sum(1 for _, i, _ in keys[:n] if i == index)


def test_square_root_sampling_sits_between(monkeypatch):
    monkeypatch.setattr(balance, "SAMPLER_POWER", 0.5)
    labels = [0] * 100 + [1] * 4
    sampler = balance.ClassBalancedSampler(labels, seed=0)
    assert float(sampler.weights[0] / sampler.weights[-1]) == pytest.approx(math.sqrt(4 / 100))


@pytest.mark.parametrize("world", [2, 3])
def test_balanced_sampler_shards_one_global_order(world):
    labels = [0] * 10 + [1] * 2  # 12 images: the same global order for any world size
    single = balance.ClassBalancedSampler(labels, seed=1)
    single.set_epoch(2)
    shards = []
    for rank in range(world):
        shard = balance.ClassBalancedSampler(labels, seed=1, rank=rank, world_size=world)
        shard.set_epoch(2)
        shards.append(list(shard))
        assert len(shards[-1]) == len(shard) == 12 // world
    assert [shards[n % world][n // world] for n in range(12)] == list(single)


def test_each_repeat_of_an_image_gets_its_own_augmentation(tmp_path):
    path = tmp_path / "a.png"
    draw_image((200, 50, 50), random.Random(0), size=48).save(path)
    prep = Preprocessing(32, 37, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    dataset = ImageListDataset([(str(path), 0)], prep.train_transform(), None, augment_seed=5)
    first, plain, second = dataset[(3, 0, 0)].image, dataset[(3, 0)].image, dataset[(3, 0, 1)].image
    assert torch.equal(first, plain)  # an image drawn once keeps EpochSampler's augmentation
    assert not torch.equal(first, second)
    assert torch.equal(second, dataset[(3, 0, 1)].image)  # and a repeat's is keyed, not random



def test_repeated_draws_are_listed_per_view_and_capped(monkeypatch):
    labels = [0] * 30 + [1] * 1  # the lone image of class 1 is drawn ~15 times an epoch
    sampler = balance.ClassBalancedSampler(labels, seed=0)
    draws = sampler.repeated_draws([1, 2, 3, 4, 5, 6], views=4)
    for epoch in (2, 6):  # both train on view 1
        most = max(r for _, i, r in sampler.draws(epoch) if i == 30)
        assert {(1, 30, r) for r in range(1, min(most, balance.SAMPLER_FEATURE_REPEATS) + 1)} <= set(draws)
    assert {view for view, _, _ in draws} == {0, 1, 2, 3} and all(r >= 1 for _, _, r in draws)
    assert max(r for _, _, r in draws) == balance.SAMPLER_FEATURE_REPEATS  # 15 draws an epoch, capped
    monkeypatch.setattr(balance, "SAMPLER_FEATURE_REPEATS", 3)
    assert max(r for _, _, r in sampler.repeated_draws([1, 2], views=4)) == 3
    assert [balance.feature_repeat(r) for r in range(8)] == [0, 1, 2, 3, 1, 2, 3, 1]  # in turn
    monkeypatch.setattr(balance, "SAMPLER_FEATURE_REPEATS", 0)
    assert sampler.repeated_draws([1, 2], views=4) == [] and balance.feature_repeat(5) == 0


def test_feature_cache_serves_a_repeated_draw_its_own_feature():
    train = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)  # 2 views, 3 images
    repeats = torch.tensor([[-1.0, -1.0], [-2.0, -2.0]])
    cache = features.FeatureCache(train, torch.ones(3, dtype=torch.bool), torch.zeros(0, 2),
                                  torch.zeros(0, dtype=torch.bool), repeats, {(1, 2, 1): 0, (1, 2, 2): 1})
    keys = [(5, 0, 0), (5, 2, 0), (5, 2, 1), (5, 2, 2), (5, 1, 1)]  # (epoch, image, repeat)
    assert cache.batch(1, keys).tolist() == [train[1][0].tolist(), train[1][2].tolist(), [-1.0, -1.0],
                                             [-2.0, -2.0], train[1][1].tolist()]  # no repeat stored: the view's
    assert torch.equal(cache.batch(0, keys), train[0][[0, 2, 2, 2, 1]])  # view 0 holds none
    plain = features.FeatureCache(train, torch.ones(3, dtype=torch.bool), torch.zeros(0, 2),
                                  torch.zeros(0, dtype=torch.bool))  # fmt: skip
    assert torch.equal(plain.batch(1, [(1, 2), (1, 0)]), train[1][[2, 0]])  # EpochSampler's keys


def test_borrowed_spread_moves_only_repeated_draws_by_another_class_deviation():
    """A repeated draw of a rare image is moved by an image of another class minus that class's
    mean (Bessel-scaled); first draws and EpochSampler's keys stay as they are."""
    train = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [4.0, 0.0], [10.0, 10.0], [10.0, 12.0], [-5.0, -5.0]]])
    labels, ok = torch.tensor([0, 0, 0, 1, 1, 2]), torch.ones(6, dtype=torch.bool)
    spread = balance.BorrowedSpread(train, ok, labels, seed=3, scale=1.0)
    assert [d.tolist() for d in spread.donors] == [[3, 4], [0, 1, 2], [0, 1, 2, 3, 4]]  # never its own
    borrowed = {tuple(round(v, 4) for v in spread.deviation(0, i).tolist()) for i in range(5)}
    assert borrowed == {(round(-2 * math.sqrt(1.5), 4), 0.0), (0.0, 0.0), (round(2 * math.sqrt(1.5), 4), 0.0),
                        (0.0, round(-math.sqrt(2), 4)), (0.0, round(math.sqrt(2), 4))}  # fmt: skip
    keys = [(1, 5, 0), (1, 5, 1), (1, 5, 2), (1, 5, 3), (1, 0), (2, 5, 1)]
    moved = spread.add(train[0][[5, 5, 5, 5, 0, 5]].clone(), 0, keys)
    assert moved[0].tolist() == [-5.0, -5.0] and moved[4].tolist() == [0.0, 0.0]
    for row in (1, 2, 3, 5):
        assert tuple(round(v, 4) for v in (moved[row] - train[0][5]).tolist()) in borrowed
    assert len({tuple(moved[row].tolist()) for row in (1, 2, 3, 5)}) > 1  # donors drawn per draw
    assert torch.equal(spread.add(train[0][[5, 5, 5, 5, 0, 5]].clone(), 0, keys), moved)  # keyed, not random
    nearest = balance.BorrowedSpread(train, ok, labels, seed=3, scale=1.0, neighbours=1)
    assert nearest.donors[2].tolist() == [0, 1, 2]  # class 0's mean is nearer to class 2's than class 1's


def test_cached_training_gives_each_repeated_draw_its_own_augmentation(tmp_path, tail_data, monkeypatch):
    """The sampler draws gamma's 2 images (of 24) ~4 times each an epoch. On cached features
    each draw past an image's first gets its own augmented feature, computed once and cached,
    instead of the view's one feature again (SAMPLER_FEATURE_REPEATS 0, as before: another run)."""
    monkeypatch.setenv("RESNEXT_CACHE", str(tmp_path / "cache"))
    train(tail_data, tmp_path / "own", "--epochs", "2", "--balance", "sampler")
    parts = {e.about["view"]: torch.load(e.path, weights_only=True) for e in features.cache_entries()}
    assert set(parts) == {0, 1, 2, 3, "repeats"}
    labels = [0] * 16 + [1] * 6 + [2] * 2  # the layout's order: by class, then file
    draws = balance.ClassBalancedSampler(labels, seed=0).repeated_draws([1, 2], views=4)
    repeats = parts["repeats"]["train"]
    assert len(repeats) == len(draws) and {22, 23} <= {i for _, i, _ in draws}
    assert len(torch.unique(repeats, dim=0)) == len(repeats)  # every row another augmentation
    for row, (view, index, _) in enumerate(draws):
        assert not torch.allclose(repeats[row], parts[view]["train"][index])
    monkeypatch.setattr(balance, "SAMPLER_FEATURE_REPEATS", 0)
    train(tail_data, tmp_path / "shared", "--epochs", "2", "--balance", "sampler")
    assert [r["train_loss"] for r in rows(tmp_path / "own")] != [r["train_loss"] for r in rows(tmp_path / "shared")]


def test_cached_sampler_borrows_spread_for_repeated_draws_and_resumes_exactly(tmp_path, tail_data, monkeypatch):
    """With BORROWED_SPREAD (a measured candidate, off by default) the sampler's repeated draws
    of gamma's 2 images on cached features are moved by other classes' deviations: other losses
    than the default's; keyed by seed, epoch, image and repeat, so a run stopped after epoch 2
    and resumed equals a straight one."""
    monkeypatch.setenv("RESNEXT_CACHE", str(tmp_path / "cache"))
    common = ["--balance", "sampler", "--scheduler", "none"]
    train(tail_data, tmp_path / "unmoved", "--epochs", "3", *common)
    monkeypatch.setattr(balance, "BORROWED_SPREAD", 1.0)
    train(tail_data, tmp_path / "straight", "--epochs", "3", *common)
    train(tail_data, tmp_path / "split", "--epochs", "2", *common)
    resumed = invoke(["train", "--resume", tmp_path / "split", "--epochs", "3"])
    assert resumed.exit_code == 0, resumed.stderr
    assert without_seconds(tmp_path / "split") == without_seconds(tmp_path / "straight")
    moved, unmoved = rows(tmp_path / "straight"), rows(tmp_path / "unmoved")
    assert all(a["train_loss"] != b["train_loss"] for a, b in zip(moved, unmoved, strict=True))


def test_imprinting_starts_each_row_at_its_class_mean():
    """Before any training step the imprinted head calls each class's mean feature that class
    (also a one-photo class), its rows keep the random rows' mean norm (times the scale), a class
    without images keeps its row, and the head is still a plain Linear (fc.weight, fc.bias)."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 32, generator=generator).abs() * 3 + 5  # positive, like pooled ReLU features
    labels = torch.tensor([0] * 20 + [1] * 6 + [2])  # class 3 has no images
    train = centres[labels] + torch.randn(2, len(labels), 32, generator=generator)  # 2 views
    ok = torch.ones(len(labels), dtype=torch.bool)
    for centred in (True, False):
        fc = torch.nn.Linear(32, 4)
        torch.nn.init.normal_(fc.weight, std=0.1, generator=generator)
        before, norm = fc.weight.detach().clone(), fc.weight.detach().norm(dim=1).mean()
        balance.imprint_head(fc, train, ok, labels, scale=2.0, centred=centred)
        means = torch.stack([train[:, labels == c].mean(dim=(0, 1)) for c in range(3)])
        assert fc(means).argmax(dim=1).tolist() == [0, 1, 2]
        assert torch.allclose(fc.weight[:3].norm(dim=1), torch.full((3,), 2 * float(norm)))
        assert torch.equal(fc.weight[3], before[3])
        assert list(fc.state_dict()) == ["weight", "bias"]


def test_imprinting_is_entered_only_by_a_new_sampler_run_on_cached_features(tmp_path, tail_data, dataset,
                                                                           monkeypatch):  # fmt: skip
    """IMPRINT (a measured candidate, off by default) imprints the head of a new run with the
    balanced sampler: other losses than without, the checkpoint's head keys as before, and a run
    stopped after epoch 2 and resumed equals a straight one (the resumed head is last.pt's, not
    imprinted again). On balanced data auto is `none` and never reaches it."""
    monkeypatch.setenv("RESNEXT_CACHE", str(tmp_path / "cache"))
    common = ["--balance", "sampler", "--scheduler", "none"]
    train(tail_data, tmp_path / "random", "--epochs", "3", *common)
    monkeypatch.setattr(balance, "IMPRINT", 1.0)
    calls = []
    imprint = balance.imprint_head
    monkeypatch.setattr(balance, "imprint_head", lambda *args: calls.append(1) or imprint(*args))
    train(tail_data, tmp_path / "straight", "--epochs", "3", *common)
    assert len(calls) == 1
    train(tail_data, tmp_path / "split", "--epochs", "2", *common)
    resumed = invoke(["train", "--resume", tmp_path / "split", "--epochs", "3"])
    assert resumed.exit_code == 0, resumed.stderr
    assert len(calls) == 2  # not on the resume
    assert without_seconds(tmp_path / "split") == without_seconds(tmp_path / "straight")
    imprinted, random_head = rows(tmp_path / "straight"), rows(tmp_path / "random")
    assert imprinted[0]["train_loss"] != random_head[0]["train_loss"]
    best = torch.load(tmp_path / "straight" / "best.pt", weights_only=True)["model"]
    assert list(best) == list(torch.load(tmp_path / "random" / "best.pt", weights_only=True)["model"])
    train(dataset, tmp_path / "balanced", "--epochs", "1")
    assert len(calls) == 2


def test_blending_leans_a_rare_class_on_its_mean_and_keeps_a_common_one():
    """HEAD_BLEND's mix: class c's row and bias move k / (k + n_c) of the way to its centred
    class-mean row (at the trained rows' mean norm), so the one-photo class's row is half its
    mean's at k 1 and the 40-image class's hardly moves; a class without images keeps its row."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=generator).abs() * 3 + 5
    labels = torch.tensor([0] * 40 + [1])  # classes 2 and 3 have no images
    train = centres[labels] + torch.randn(2, len(labels), 16, generator=generator)
    ok = torch.ones(len(labels), dtype=torch.bool)
    weight, bias = torch.randn(4, 16, generator=generator), torch.randn(4, generator=generator)
    blended, blended_bias = balance.blend_head(weight, bias, [40, 1, 0, 0], train, ok, labels, k=1.0)
    _, rows, biases = balance.mean_rows(train, ok, labels, 4, weight.double().norm(dim=1).mean())
    assert torch.allclose(blended[1], (weight[1] + rows[1].float()) / 2, atol=1e-6)
    assert torch.allclose(blended_bias[1], (bias[1] + biases[1].float()) / 2, atol=1e-6)
    assert torch.allclose(blended[0], (40 * weight[0] + rows[0].float()) / 41, atol=1e-6)
    assert torch.equal(blended[2:], weight[2:]) and torch.equal(blended_bias[2:], bias[2:])
    assert not torch.equal(weight[1], blended[1])  # new tensors: the run's own head is untouched


def test_tau_normalisation_divides_each_row_by_its_norm_to_the_tau():
    weight, bias = torch.tensor([[3.0, 4.0], [0.0, 1.0]]), torch.tensor([5.0, 2.0])
    rows, kept = balance.tau_normalise(weight, bias, 1.0)
    assert torch.allclose(rows.norm(dim=1), torch.ones(2)) and torch.allclose(kept, torch.tensor([1.0, 2.0]))
    rows, dropped = balance.tau_normalise(weight, bias, 0.5, keep_bias=False)
    assert torch.allclose(rows[0], weight[0] / math.sqrt(5)) and torch.equal(dropped, torch.zeros(2))


def test_rare_rows_step_less_and_only_with_the_balanced_sampler(monkeypatch):
    """RARE_STEP scales each step's change to class c's row by n_c / (n_c + k): with SGD the one-photo
    class's row moves half as far as undamped at k 1; off, or with `EpochSampler`, steps are as before."""
    def step_change(sampler) -> torch.Tensor:
        fc = torch.nn.Linear(3, 2)
        torch.nn.init.ones_(fc.weight)
        fc.bias.data = torch.tensor([1.0, 0.0])  # the two classes' scores differ: both rows get a gradient
        optimizer = torch.optim.SGD(fc.parameters(), lr=0.1)
        balance.damp_rare_rows(sampler, optimizer, fc, [3, 1])
        torch.nn.functional.cross_entropy(fc(torch.ones(2, 3)), torch.tensor([0, 1])).backward()
        optimizer.step()
        return fc.weight.detach() - 1

    balanced, plain = balance.ClassBalancedSampler([0, 0, 0, 1], seed=0), EpochSampler(4, seed=0)
    undamped = step_change(balanced)
    monkeypatch.setattr(balance, "RARE_STEP", 1.0)
    assert torch.allclose(step_change(balanced), undamped * torch.tensor([[0.75], [0.5]]))
    assert torch.equal(step_change(plain), undamped)


def test_finished_head_changes_only_best_pt_and_only_with_the_sampler(tmp_path, tail_data, monkeypatch):
    """TAU_NORM (a measured candidate, off by default) finishes best.pt's head (after the default
    blend): its rows at norm 1 and no bias at tau 1, the keys as before, while training (metrics)
    is the run without it; `finished_head` leaves a run without the balanced sampler, or with the
    knobs off, alone."""
    monkeypatch.setenv("RESNEXT_CACHE", str(tmp_path / "cache"))
    common = ["--epochs", "2", "--balance", "sampler", "--scheduler", "none"]
    train(tail_data, tmp_path / "plain", *common)
    monkeypatch.setattr(balance, "TAU_NORM", 1.0)
    monkeypatch.setattr(balance, "TAU_KEEP_BIAS", False)
    train(tail_data, tmp_path / "tau", *common)
    assert without_seconds(tmp_path / "tau") == without_seconds(tmp_path / "plain")
    best = torch.load(tmp_path / "tau" / "best.pt", weights_only=True)["model"]
    assert list(best) == list(torch.load(tmp_path / "plain" / "best.pt", weights_only=True)["model"])
    assert torch.allclose(best["fc.weight"].norm(dim=1), torch.ones(len(best["fc.bias"])))
    assert not best["fc.bias"].any()
    weight, bias, unused = torch.ones(2, 3), torch.ones(2), lambda: pytest.fail("features asked for")
    assert balance.finished_head(EpochSampler(4, seed=0), weight, bias, [3, 1], unused) is None
    monkeypatch.setattr(balance, "TAU_NORM", 0.0)
    monkeypatch.setattr(balance, "HEAD_BLEND", 0.0)
    sampler = balance.ClassBalancedSampler([0, 0, 0, 1], seed=0)
    assert balance.finished_head(sampler, weight, bias, [3, 1], unused) is None


@pytest.mark.parametrize("path", [[], ["--no-cache-features"], ["--unfreeze-after", "1"]],
                         ids=["cached", "images", "unfreeze"])  # fmt: skip
def test_the_blend_reaches_best_pt_on_every_path_and_leaves_training_alone(tmp_path, tail_data, monkeypatch, path):
    """By default, with the balanced sampler, best.pt's head is blended towards the class means
    whatever the path (the cached views' means; one pass over train on the image path and after
    the unfreezing): its rows differ from the trained head's (HEAD_BLEND 0), its keys and backbone
    do not, and the run (metrics, last.pt) is the one without the blend, the pass over train
    included."""
    monkeypatch.setenv("RESNEXT_CACHE", str(tmp_path / "cache"))
    common = ["--epochs", "2", "--balance", "sampler", "--scheduler", "none", *path]
    train(tail_data, tmp_path / "blended", *common)
    monkeypatch.setattr(balance, "HEAD_BLEND", 0.0)
    train(tail_data, tmp_path / "trained", *common)
    assert without_seconds(tmp_path / "blended") == without_seconds(tmp_path / "trained")
    load = lambda run, name: torch.load(tmp_path / run / name, weights_only=True)["model"]  # noqa: E731
    trained, blended = load("trained", "best.pt"), load("blended", "best.pt")
    assert list(blended) == list(trained)
    assert all(torch.equal(blended[k], trained[k]) for k in trained if not k.startswith("fc."))
    assert not torch.allclose(blended["fc.weight"], trained["fc.weight"])
    last_trained, last_blended = load("trained", "last.pt"), load("blended", "last.pt")
    assert all(torch.equal(last_blended[k], last_trained[k]) for k in last_trained)


def test_a_frozen_backbone_s_class_means_are_a_single_pass_over_train(tmp_path, tail_data, monkeypatch):
    """On the image path (no feature cache) the blend's pass over train is made at the first
    improved epoch only while the backbone is frozen (its features do not change); after the
    unfreezing, each improved epoch makes its own."""
    monkeypatch.setenv("RESNEXT_CACHE", str(tmp_path / "cache"))
    passes: list[str] = []
    original = train_module.collect_outputs

    def counted(engine, images, *args):
        passes.append(args[-1])
        return original(engine, images, *args)

    monkeypatch.setattr(train_module, "collect_outputs", counted)
    saved: list[int] = []
    monkeypatch.setattr(train_module.TrainRecipe, "finished_best",
                        record_calls(train_module.TrainRecipe.finished_best, saved))  # fmt: skip
    common = ["--epochs", "4", "--balance", "sampler", "--no-cache-features", "--lr", "0.05"]
    train(tail_data, tmp_path / "frozen", *common)
    assert len(saved) >= 2, "the test needs best.pt written at two epochs at least"
    assert passes.count("class means: train") == 1
    passes.clear(), saved.clear()
    train(tail_data, tmp_path / "unfrozen", *common, "--unfreeze-after", "1")
    assert passes.count("class means: train") == len(saved) >= 2


def record_calls(method, calls: list[int]):
    def wrapped(self, checkpoint):
        calls.append(checkpoint["epoch"])
        return method(self, checkpoint)

    return wrapped


@pytest.fixture(scope="module")
def unfreeze_resume_runs(tmp_path_factory, tail_data) -> tuple[Path, Path]:
    """(straight, resumed): the balanced sampler across the unfreezing (--unfreeze-after 1), 3
    epochs straight, and 2 epochs then resumed to 3. Two tests check different files of the same
    pair (best.pt's blend; metrics and last.pt), so it is trained once; they only read it."""
    work = tmp_path_factory.mktemp("unfreeze_resume")
    common = ["--balance", "sampler", "--unfreeze-after", "1", "--scheduler", "none"]
    train(tail_data, work / "straight", "--epochs", "3", *common)
    train(tail_data, work / "split", "--epochs", "2", *common)
    resumed = invoke(["train", "--resume", work / "split", "--epochs", "3"])
    assert resumed.exit_code == 0, resumed.stderr
    return work / "straight", work / "split"


def test_a_resumed_run_blends_best_pt_as_a_straight_one(unfreeze_resume_runs):
    """Stopped after epoch 2 and resumed across the unfreezing, best.pt (blended by default) is
    the straight run's."""
    straight, split = unfreeze_resume_runs
    a = torch.load(split / "best.pt", weights_only=True)["model"]
    b = torch.load(straight / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)


# ---------------------------------------------------------------- training


def test_imbalanced_run_records_what_it_did(tail_run):
    run, stdout = tail_run
    assert "Class balance: 'alpha' 16 training images, 'gamma' 2 (8.0x); --balance auto -> " \
           f"{balance.BALANCE_AUTO}" in stdout  # fmt: skip
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert (config["balance"], config["select_by"]) == (balance.BALANCE_AUTO, "acc")  # val is balanced
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert header == "epoch,train_loss,train_acc,val_loss,val_acc,lr,seconds,val_balanced_acc,val_macro_f1"
    for row in rows(run):  # balanced val: balanced accuracy is accuracy
        assert float(row["val_balanced_acc"]) == pytest.approx(float(row["val_acc"]))
        assert 0 <= float(row["val_macro_f1"]) <= 1
    for name in ("best.pt", "last.pt"):
        assert torch.load(run / name, weights_only=True)["class_counts"] == [16, 6, 2]
    assert "val_bal_acc" in stdout and "val_f1" in stdout  # the epoch table


def test_balanced_data_trains_exactly_as_before(tmp_path, dataset):
    """auto on balanced data is `none` + accuracy: the same rows and weights as asking for that
    explicitly, which trains as the code before --balance did (no weights, the plain sampler,
    no adjustment)."""
    stdout = train(dataset, tmp_path / "auto", "--epochs", "2")
    train(dataset, tmp_path / "none", "--epochs", "2", "--balance", "none", "--select-by", "acc")
    assert "Class balance" not in stdout and "Best val accuracy" in stdout
    assert without_seconds(tmp_path / "auto") == without_seconds(tmp_path / "none")
    auto = torch.load(tmp_path / "auto" / "best.pt", weights_only=True)
    none = torch.load(tmp_path / "none" / "best.pt", weights_only=True)
    assert auto["config"]["balance"] == "none" and auto["config"]["select_by"] == "acc"
    assert all(torch.equal(auto["model"][k], none["model"][k]) for k in none["model"])


@pytest.fixture(scope="module")
def tail_none_run(tmp_path_factory, tail_data) -> Path:
    """The reference of every strategy below: the same data and settings with --balance none
    (it was trained again by each parametrized case). Read only."""
    out = tmp_path_factory.mktemp("tail_none") / "none"
    train(tail_data, out, "--epochs", "2", "--balance", "none")
    return out


@pytest.mark.parametrize("how", ["weights", "sampler", "logit-adjust"])
def test_each_strategy_changes_training_or_validation(tmp_path, tail_data, tail_none_run, how):
    train(tail_data, tmp_path / how, "--epochs", "2", "--balance", how)
    none, chosen = rows(tail_none_run), rows(tmp_path / how)
    if how == "logit-adjust":  # the same training steps; validation scores adjusted logits
        assert [r["train_loss"] for r in chosen] == [r["train_loss"] for r in none]
        assert [r["val_loss"] for r in chosen] != [r["val_loss"] for r in none]
    else:
        assert [r["train_loss"] for r in chosen] != [r["train_loss"] for r in none]


def test_the_image_path_honours_balance_too(tmp_path, tail_data):
    """--no-cache-features: every step sends the images through the backbone; the weighted
    loss and the balanced sampler must reach that path as they reach the cached one."""
    loss = {}
    for how in ("none", "weights", "sampler"):
        train(tail_data, tmp_path / how, "--epochs", "1", "--no-cache-features", "--balance", how)
        assert yaml.safe_load((tmp_path / how / "config.yaml").read_text())["cache_features"] is False
        loss[how] = rows(tmp_path / how)[0]["train_loss"]
    assert loss["weights"] != loss["none"] and loss["sampler"] != loss["none"]


def test_resume_is_exact_with_the_sampler_across_the_unfreezing(unfreeze_resume_runs):
    """Epoch 1 on cached features, then the image path (--unfreeze-after 1); a run stopped
    after epoch 2 and resumed equals a straight run: the sampler is keyed by seed and epoch (a
    generator running across epochs would restart at epoch 1's order)."""
    straight, split = unfreeze_resume_runs
    assert len(rows(split)) == 3
    assert without_seconds(split) == without_seconds(straight)
    a = torch.load(split / "last.pt", weights_only=True)["model"]
    b = torch.load(straight / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_imbalanced_val_picks_the_best_epoch_by_balanced_accuracy(tmp_path):
    data = make_tail(tmp_path / "ds", {"alpha": 12, "beta": 12, "gamma": 12}, {"alpha": 9, "beta": 3, "gamma": 2})
    stdout = train(data, tmp_path / "run", "--epochs", "4", "--lr", "0.05")
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["select_by"] == "balanced_acc" and config["balance"] == "none"
    assert "Best epoch by val balanced accuracy (val classes 2 to 9 images)" in stdout
    table = rows(tmp_path / "run")
    best = max(table, key=lambda r: float(r["val_balanced_acc"]))  # the first of a tie
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["epoch"] == int(best["epoch"])
    assert f"Best val balanced accuracy {float(best['val_balanced_acc']):.2%}" in stdout
    described = describe_run(tmp_path / "run")  # what predict says of the run it picks by default
    assert f"val accuracy {float(best['val_acc']):.2%} at epoch {best['epoch']}" in described


def test_run_history_selects_by_its_column_and_resumes_it():
    history = RunHistory("val_balanced_acc")
    assert history.add({"epoch": 1, "val_acc": 0.9, "val_balanced_acc": 0.5})
    assert not history.add({"epoch": 2, "val_acc": 0.95, "val_balanced_acc": 0.5})  # a tie keeps the first
    assert history.add({"epoch": 3, "val_acc": 0.8, "val_balanced_acc": 0.7})
    assert (history.best_epoch, history.best_acc, history.best_value) == (3, 0.8, 0.7)
    state = {"metrics": history.rows, "best_epoch": 3, "best_val_acc": 0.8}
    again = RunHistory.resumed(state, "val_balanced_acc")
    assert (again.best_epoch, again.best_value) == (3, 0.7)
    assert not again.add({"epoch": 4, "val_acc": 0.99, "val_balanced_acc": 0.6})


def test_a_run_from_before_balance_resumes_as_it_trained(tmp_path, tail_data):
    """config.yaml without balance/select_by and last.pt rows without the new columns: resumed
    without balancing, by accuracy, its metrics.csv completed with empty cells."""
    run = tmp_path / "old"
    train(tail_data, run, "--epochs", "1", "--balance", "none", "--select-by", "acc")
    config = yaml.safe_load((run / "config.yaml").read_text())
    del config["balance"], config["select_by"]
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    last = torch.load(run / "last.pt", weights_only=True)
    last["metrics"] = [{k: v for k, v in r.items() if not k.startswith("val_") or k in ("val_acc", "val_loss")}
                       for r in last["metrics"]]  # fmt: skip
    del last["class_counts"]
    torch.save(last, run / "last.pt")
    result = invoke(["train", "--resume", run, "--epochs", "2"])
    assert result.exit_code == 0, result.stderr
    assert "(8.0x); --balance none." in result.stdout and "Best val accuracy" in result.stdout
    table = rows(run)
    assert table[0]["val_balanced_acc"] == "" and table[1]["val_balanced_acc"] != ""


# ---------------------------------------------------------------- predictions


def test_prior_uniform_divides_the_train_prior_out(tmp_path, tail_run, tail_data):
    """The same model under both priors: p_uniform(c) is p_train(c) / prior(c), renormalised
    (the raw softmax: a temperature would raise the prior to 1/T)."""
    run, _ = tail_run
    image = tail_data / "val" / "gamma" / "gamma_00.png"

    def probs(prior: str) -> dict[str, float]:
        result = invoke(["predict", image, "--checkpoint", run / "best.pt", "--json", "--device", "cpu",
                         "--prior", prior, "--no-calibration"])  # fmt: skip
        assert result.exit_code == 0, result.stderr
        return {e["class"]: e["prob"] for e in json.loads(result.stdout)[0]["topk"]}

    train_prior, uniform = probs("train"), probs("uniform")
    counts = {"alpha": 16, "beta": 6, "gamma": 2}
    divided = {c: train_prior[c] / counts[c] for c in counts}
    total = sum(divided.values())
    for c in counts:
        assert uniform[c] == pytest.approx(divided[c] / total, abs=2e-4)
    assert uniform["gamma"] > train_prior["gamma"]
    default = invoke(["predict", image, "--checkpoint", run / "best.pt", "--json", "--device", "cpu"])
    assert json.loads(default.stdout)[0]["topk"] == json.loads(
        invoke(["predict", image, "--checkpoint", run / "best.pt", "--json", "--device", "cpu",
                "--prior", "uniform"]).stdout)[0]["topk"]  # fmt: skip; a balanced run predicts uniform


def test_prior_needs_class_counts(tmp_path, tail_run, tail_data):
    run, _ = tail_run
    image = tail_data / "val" / "alpha" / "alpha_00.png"
    old = torch.load(run / "best.pt", weights_only=True)
    del old["class_counts"]
    old["config"] = {k: v for k, v in old["config"].items() if k not in ("balance", "select_by")}
    torch.save(old, tmp_path / "old.pt")
    before = invoke(["predict", image, "--checkpoint", tmp_path / "old.pt", "--device", "cpu"])
    assert before.exit_code == 0, before.stderr  # an older checkpoint predicts as it always did
    refused = invoke(["predict", image, "--checkpoint", tmp_path / "old.pt", "--prior", "uniform"])
    assert refused.exit_code == 2 and "does not record" in refused.stderr
    bad = invoke(["predict", image, "--checkpoint", run / "best.pt", "--prior", "even"])
    assert bad.exit_code == 2 and "Invalid prior 'even'" in bad.stderr


def test_evaluate_shows_balanced_accuracy_and_recall_by_training_count(tmp_path, tail_run, tail_data):
    run, _ = tail_run
    result = invoke(["evaluate", tail_data, "--checkpoint", run / "best.pt", "--out", tmp_path / "eval",
                     "--device", "cpu", "--workers", "0"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    per_class = list(csv.DictReader((tmp_path / "eval" / "per_class.csv").open()))
    assert [r["class"] for r in per_class] == ["alpha", "beta", "gamma"]  # most training images first
    assert [r["train_images"] for r in per_class] == ["16", "6", "2"]
    assert metrics["balanced_accuracy"] == pytest.approx(sum(float(r["recall"]) for r in per_class) / 3, abs=1e-6)
    assert metrics["prior"] == "uniform" and "macro_f1" in metrics
    assert "balanced accuracy" in result.stdout and "train images" in result.stdout


def test_report_shows_recall_by_training_images(tail_run):
    run, _ = tail_run
    page = (run / "report.html").read_text()
    section = page[page.index('id="balance"'):page.index('id="mistakes"')]
    assert "Balanced accuracy" in section and f"--balance {balance.BALANCE_AUTO}" in section
    assert section.index(">alpha<") < section.index(">beta<") < section.index(">gamma<")
    assert section.count('class="bar"') == 3


def test_balanced_accuracy_is_the_mean_recall_of_the_true_classes():
    matrix = [[8, 2, 0], [1, 1, 0], [0, 0, 0]]  # class c is never true, never predicted
    report = classification_report(matrix, ["a", "b", "c"])
    assert report.balanced_accuracy == pytest.approx((0.8 + 0.5) / 2)
    assert report.accuracy == pytest.approx(9 / 12)
    matrix = [[8, 2, 1], [1, 1, 0], [0, 0, 0]]  # c predicted once but never true: not averaged in
    assert classification_report(matrix, ["a", "b", "c"]).balanced_accuracy == pytest.approx((8 / 11 + 0.5) / 2)


def test_epoch_sampler_is_unchanged():
    """Balanced training data keeps the plain sampler, whose order runs and caches depend on
    (these are the orders of the code before --balance existed)."""
    sampler = EpochSampler(6, seed=0)
    assert [i for _, i in sampler] == [4, 2, 3, 5, 0, 1]
    sampler.set_epoch(3)
    assert [i for _, i in sampler] == [1, 5, 2, 3, 0, 4]


def test_balanced_sampling_under_torchrun_matches_one_process(tmp_path, monkeypatch):
    """Two gloo processes each take every other image of one balanced order (cached features):
    the same epochs as one process with their global batch."""
    data = make_tail(tmp_path / "ds", {"alpha": 10, "beta": 4, "gamma": 2}, {"alpha": 3, "beta": 3, "gamma": 3})
    common = ["--data", data, "--arch", "resnet18", "--weights", "none", "--freeze", "--epochs", "2",
              "--img-size", "32", "--workers", "0", "--seed", "0", "--lr", "0.02", "--precision", "fp32",
              "--no-augment", "--balance", "sampler", "--device", "cpu", "--no-report"]  # fmt: skip
    monkeypatch.setenv("RESNEXT_CACHE", str(tmp_path / "cache"))
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "resnext_cli", "train", *map(str, common), "--batch-size", "4", "--out", "ddp"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = invoke(["train", *common, "--batch-size", "8", "--out", tmp_path / "single"])
    assert single.exit_code == 0, single.stderr
    for d, s in zip(rows(tmp_path / "ddp"), rows(tmp_path / "single"), strict=True):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_acc"):
            assert float(d[key]) == pytest.approx(float(s[key]), abs=1e-5), key


def test_check_data_says_what_train_will_do(tmp_path):
    mild = make_tail(tmp_path / "mild", {"alpha": 12, "beta": 12, "gamma": 3}, {"alpha": 6, "beta": 6, "gamma": 2})
    result = invoke(["check-data", mild, "--json", "--workers", "0"])
    assert result.exit_code == 0, result.stderr
    found = {f["check"]: f for f in json.loads(result.stdout)["findings"]}
    assert "class_imbalance" not in found  # 4x: under check-data's warning (5x), above auto's 3x
    assert found["mild_class_imbalance"]["severity"] == "info"
    assert f"--balance auto: {balance.BALANCE_AUTO}" in found["mild_class_imbalance"]["hint"]
    assert "balanced accuracy" in found["val_imbalance"]["hint"] and "(3.0x)" in found["val_imbalance"]["message"]
    strong = make_tail(tmp_path / "strong", {"alpha": 16, "beta": 2}, {"alpha": 2, "beta": 2})
    found = {f["check"]: f for f in json.loads(invoke(["check-data", strong, "--json"]).stdout)["findings"]}
    assert found["class_imbalance"]["severity"] == "warning" and "counters it" in found["class_imbalance"]["hint"]
    assert "val_imbalance" not in found and "mild_class_imbalance" not in found
    even = make_tail(tmp_path / "even", {"alpha": 4, "beta": 4}, {"alpha": 2, "beta": 2})
    found = {f["check"] for f in json.loads(invoke(["check-data", even, "--json"]).stdout)["findings"]}
    assert not found & {"class_imbalance", "mild_class_imbalance", "val_imbalance"}


def test_onnx_export_carries_the_prior(tmp_path, tail_run, tail_data):
    """preprocess.json records class_counts and --balance; onnxruntime predictions adjust the
    logits as the checkpoint's do, under either prior."""
    run, _ = tail_run
    exported = invoke(["export", "--checkpoint", run / "best.pt", "--dynamic-batch", "--out", tmp_path / "x"])
    assert exported.exit_code == 0, exported.stderr
    prep = json.loads((tmp_path / "x" / "preprocess.json").read_text())
    assert (prep["class_counts"], prep["balance"], prep["prior"]) == ([16, 6, 2], balance.BALANCE_AUTO, "uniform")
    offsets = balance.prior_offsets([16, 6, 2], balance.BALANCE_AUTO, "uniform")  # None for a balanced fit
    assert prep["logit_offsets"] == (None if offsets is None else pytest.approx(offsets.tolist(), abs=1e-5))
    for prior in ("uniform", "train"):
        outputs = {}
        for name, source in {"torch": ["--checkpoint", run / "best.pt"],
                             "onnx": ["--onnx", tmp_path / "x" / "model.onnx"]}.items():  # fmt: skip
            out = tmp_path / f"{name}_{prior}.csv"
            result = invoke(["batch-predict", tail_data / "val" / "gamma", *source, "--prior", prior, "--workers",
                             "0", "--device", "cpu", "--precision", "fp32", "--output", out, "--quiet"])  # fmt: skip
            assert result.exit_code == 0, result.stderr
            outputs[name] = list(csv.DictReader(out.open()))
        assert [r["class"] for r in outputs["onnx"]] == [r["class"] for r in outputs["torch"]]
        for a, b in zip(outputs["onnx"], outputs["torch"]):
            assert float(a["prob"]) == pytest.approx(float(b["prob"]), abs=1e-3)


def test_training_curves_draw_balanced_accuracy_and_old_rows():
    from resnext_cli.outputs.plots import training_curves_png

    def row(epoch: int, acc: float, bal: object) -> dict:
        return {"epoch": epoch, "train_loss": 1.0, "val_loss": 1.0, "train_acc": 0.5, "val_acc": acc,
                "lr": 1e-3, "val_balanced_acc": bal}  # fmt: skip

    imbalanced = [row(1, 0.9, 0.5), row(2, 0.8, 0.7)]
    plain = [row(1, 0.9, 0.9), row(2, 0.8, 0.8)]
    assert training_curves_png(imbalanced, "val_balanced_acc") != training_curves_png(plain, "val_balanced_acc")
    resumed_old = [row(1, 0.9, ""), row(2, 0.8, 0.7)]  # a row from before the column: best by accuracy
    assert training_curves_png(resumed_old, "val_balanced_acc").startswith(b"\x89PNG")



def test_best_pt_keeps_its_own_val_accuracy_after_the_blend(tmp_path, tail_data, monkeypatch):
    """best.pt's head is finished after the epoch that chose it: its `val_acc` is the finished
    head's own (the end-of-run evaluation's accuracy on val), not the table's, and train says
    so; so do train's last line, run.json's `best`, `resnext runs`, the "Using" line and the
    report. A blend that rolls the rows (each class scored by another's row) makes them differ."""
    monkeypatch.setenv("RESNEXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(balance, "blend_head", lambda weight, bias, *_: (weight.roll(1, 0), bias.roll(1, 0)))
    stdout = train(tail_data, tmp_path / "run", "--epochs", "3", "--balance", "sampler", "--report")
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    measured = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())["accuracy"]
    table = {int(r["epoch"]): float(r["val_acc"]) for r in csv.DictReader(open(tmp_path / "run" / "metrics.csv"))}
    assert best["val_acc"] == pytest.approx(measured, abs=1e-9)
    assert table[int(best["epoch"])] > measured + 0.25
    assert "best.pt's head rows blended towards the class means" in stdout
    shown = f"{measured:.2%}"
    last_line = next(line for line in stdout.splitlines() if line.startswith("Best val"))
    assert f"accuracy {shown}" in last_line, last_line
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["best"]["val_acc"] == pytest.approx(measured, abs=1e-9)
    assert record["best"]["epoch"] == best["epoch"]
    assert read_summary(tmp_path / "run").best_val_acc == pytest.approx(measured, abs=1e-9)
    assert f"best val accuracy {shown}" in describe_run(tmp_path / "run")
    assert f"best val accuracy<b>{shown}</b>" in (tmp_path / "run" / "report.html").read_text()
