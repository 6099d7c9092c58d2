"""Cached backbone features: same head as a plain frozen run, reused, invalidated, viewed."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_TRAIN, invoke, make_dataset, save_backbone


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("RESNEXT_CACHE", str(path))
    return path


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    return save_backbone(tmp_path_factory.mktemp("backbone") / "r18.pth", seed=1)


def train(data: Path, out: Path, backbone: Path, *extra: str):
    args = ["train", "--data", data, *TINY_TRAIN, "--weights", backbone, "--epochs", "3", "--seed", "0",
            "--lr", "0.01", "--precision", "fp32", "--out", out, *extra]
    result = invoke(args)
    assert result.exit_code == 0, result.stderr
    return result


def metrics(run: Path) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in r.items() if k != "seconds"} for r in csv.DictReader((run / "metrics.csv").open())]


def test_cached_run_reaches_the_plain_frozen_head(tmp_path, dataset, backbone, cache_dir):
    train(dataset, tmp_path / "plain", backbone, "--no-augment", "--no-cache-features")
    cached = train(dataset, tmp_path / "cached", backbone, "--no-augment", "--cache-features")
    assert "Features: cached in" in cached.stdout
    plain_ckpt = torch.load(tmp_path / "plain" / "last.pt", weights_only=True)["model"]
    cached_ckpt = torch.load(tmp_path / "cached" / "last.pt", weights_only=True)["model"]
    assert plain_ckpt.keys() == cached_ckpt.keys()  # the same full-model checkpoint
    for key in ("fc.weight", "fc.bias"):
        assert torch.allclose(plain_ckpt[key], cached_ckpt[key], atol=1e-4), key
    assert torch.equal(plain_ckpt["layer1.0.bn1.running_mean"], cached_ckpt["layer1.0.bn1.running_mean"])
    for a, b in zip(metrics(tmp_path / "plain"), metrics(tmp_path / "cached")):
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=1e-4), key


def test_cache_is_reused_and_invalidated(tmp_path, backbone, cache_dir):
    data = make_dataset(tmp_path / "ds", train_per_class=4, val_per_class=2)
    one = ["--cache-features", "--feature-views", "1"]  # one cache file per setting
    train(data, tmp_path / "a", backbone, *one)
    again = train(data, tmp_path / "b", backbone, *one, "--lr", "0.05", "--batch-size", "4")
    assert "reusing the cache" in again.stdout  # other head settings, same features
    assert len(list(cache_dir.glob("*.pt"))) == 1
    image = next((data / "train" / "alpha").iterdir())
    os.utime(image, (1, 1))  # the dataset changed
    changed = train(data, tmp_path / "c", backbone, *one)
    assert "reusing" not in changed.stdout and len(list(cache_dir.glob("*.pt"))) == 2
    other_size = train(data, tmp_path / "d", backbone, *one, "--img-size", "48")
    assert "reusing" not in other_size.stdout and len(list(cache_dir.glob("*.pt"))) == 3


def test_feature_views_are_augmented_and_cycled(tmp_path, backbone, cache_dir):
    data = make_dataset(tmp_path / "ds", train_per_class=4, val_per_class=2)
    train(data, tmp_path / "run", backbone, "--cache-features", "--feature-views", "3")
    parts = {json.loads(p.with_suffix(".json").read_text())["view"]: torch.load(p, weights_only=True)
             for p in cache_dir.glob("*.pt")}  # one file per view; view 0 holds the val features
    assert sorted(parts) == [0, 1, 2] and parts[0]["val"].shape[0] == 6
    assert all(part["train"].shape[0] == 12 for part in parts.values())
    assert not torch.allclose(parts[0]["train"], parts[1]["train"])  # an augmented view
    assert not torch.allclose(parts[1]["train"], parts[2]["train"])
    again = train(data, tmp_path / "again", backbone, "--cache-features", "--feature-views", "4")
    assert again.stdout.count("reusing the cache") == 3  # only the 4th view is new


def test_unfreeze_after_with_cached_features(tmp_path, dataset, backbone, cache_dir):
    result = train(dataset, tmp_path / "run", backbone, "--cache-features", "--unfreeze-after", "1")
    assert "unfreezing the backbone" in result.stdout
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    assert not torch.equal(state["conv1.weight"], torch.load(backbone, weights_only=True)["conv1.weight"])
    assert len(metrics(tmp_path / "run")) == 3


def test_unreadable_files_with_cached_features(tmp_path, backbone, cache_dir):
    data = make_dataset(tmp_path / "ds", train_per_class=4, val_per_class=2)
    (data / "train" / "beta" / "broken.png").write_bytes(b"no")
    result = train(data, tmp_path / "run", backbone, "--cache-features")
    assert "broken.png" in result.stderr and (tmp_path / "run" / "best.pt").exists()


def test_compiled_frozen_training_matches_eager(tmp_path, dataset, backbone, cache_dir):
    """--compile (torch.compile of the frozen backbone's forward) changes speed, not results."""
    train(dataset, tmp_path / "eager", backbone, "--epochs", "1", "--no-cache-features")
    train(dataset, tmp_path / "compiled", backbone, "--epochs", "1", "--compile", "--no-cache-features")
    for a, b in zip(metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")):
        assert a["val_acc"] == b["val_acc"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-3)
