"""The recipe defaults that the measurements chose: cached features for frozen training (with a
bounded, visible cache), BatchNorm statistics kept while a pretrained backbone fine-tunes after
its head-only epochs, and mirror test-time augmentation on request."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
import yaml

from resnext_cli.config import EvaluateConfig
from resnext_cli.data.batches import get_batch, pixel_batch
from resnext_cli.model.engines import load_inference_model
from tests.conftest import TINY_TRAIN, invoke, make_dataset, save_backbone
from tests.test_predict import image_folder


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    """A resnet18 state dict with non-trivial BN statistics; the tests only read it (--weights),
    so the module shares one instead of building and saving 45 MB per test."""
    return save_backbone(tmp_path_factory.mktemp("backbone") / "r18.pth", seed=2)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """12 train / 6 val images: enough batches for BN statistics to move or not, a third of the
    shared dataset's fine-tuning steps."""
    return make_dataset(tmp_path_factory.mktemp("small") / "ds", train_per_class=4, val_per_class=2)


def train(data: Path, out: Path, *extra) -> str:
    result = invoke(["train", data, *TINY_TRAIN, "--seed", "0", "--out", out, *extra])
    assert result.exit_code == 0, result.stderr
    return result.stdout


def test_frozen_training_caches_features_by_default(tmp_path: Path, dataset: Path, backbone: Path,
                                                    monkeypatch):  # fmt: skip
    monkeypatch.setenv("RESNEXT_CACHE", str(tmp_path / "cache"))
    out = train(dataset, tmp_path / "a", "--weights", backbone, "--epochs", "2")
    assert "Features: cached in" in out
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 4  # view 0 (+ val) and 3 augmented views
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert saved["cache_features"] is True and saved["feature_views"] == 4
    plain = train(dataset, tmp_path / "b", "--weights", backbone, "--epochs", "1", "--no-cache-features")
    assert "Features:" not in plain


def test_cache_list_clear_and_its_limit(tmp_path: Path, dataset: Path, backbone: Path, monkeypatch):
    monkeypatch.setenv("RESNEXT_CACHE", str(tmp_path / "cache"))
    train(dataset, tmp_path / "a", "--weights", backbone, "--epochs", "1", "--feature-views", "1")
    listed = invoke(["cache", "list", "--json"])
    assert listed.exit_code == 0, listed.stderr
    entries = json.loads(listed.stdout)["entries"]
    assert len(entries) == 1 and entries[0]["arch"] == "resnet18" and entries[0]["images"] == 54
    assert entries[0]["data"] == os.path.abspath(dataset)
    table = invoke(["cache", "list"])
    assert "1 entries" in table.stdout and str(tmp_path / "cache") in table.stdout
    old = entries[0]["file"]
    os.utime(old, (time.time() - 86400 * 3,) * 2)  # unused for three days
    # a limit smaller than two entries: the least recently used one goes when a new one comes
    monkeypatch.setenv("RESNEXT_CACHE_MAX_GB", str(1.5 * entries[0]["bytes"] / 1e9))
    out = train(dataset, tmp_path / "b", "--weights", backbone, "--epochs", "1", "--feature-views", "1",
                "--img-size", "40")
    assert "removed 1 least recently used" in out and not Path(old).exists()
    assert invoke(["cache", "clear", "--older-than", "1"]).stdout.startswith("Removed 0 cache entries")
    cleared = invoke(["cache", "clear"])
    assert cleared.exit_code == 0 and "Removed 1 cache entries" in cleared.stdout
    assert [p.name for p in (tmp_path / "cache").glob("*")] == ["resnext-cache.json"]  # the root's marker


def bn_stats(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)["model"]
    return {k: v for k, v in state.items() if "running_" in k}


@pytest.mark.parametrize("flags,frozen_bn", [(["--unfreeze-after", "1"], True),
                                              (["--unfreeze-after", "1", "--no-freeze-bn"], False),
                                              (["--no-freeze"], False),
                                              (["--no-freeze", "--freeze-bn"], True)])
def test_batchnorm_statistics_while_fine_tuning(tmp_path: Path, small_data: Path, backbone: Path,
                                                flags: list[str], frozen_bn: bool):  # fmt: skip
    """After the head-only epochs, the backbone's BN statistics stay as loaded by default (its
    weights train); from the first step (--no-freeze) they move; either way can be asked for."""
    train(small_data, tmp_path / "run", "--weights", backbone, "--epochs", "2", *flags)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["freeze_bn"] is frozen_bn
    loaded = {k: v for k, v in torch.load(backbone, weights_only=True).items() if "running_" in k}
    trained = bn_stats(tmp_path / "run" / "last.pt")
    same = all(torch.equal(trained[k], loaded[k]) for k in loaded)
    assert same is frozen_bn
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    assert not torch.equal(state["layer1.0.bn1.weight"], torch.load(backbone, weights_only=True)["layer1.0.bn1.weight"])


def test_weights_none_trains_batchnorm(tmp_path: Path, dataset: Path):
    train(dataset, tmp_path / "run", "--weights", "none", "--epochs", "1")
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["freeze_bn"] is False


def test_tta_averages_the_image_and_its_mirror(tmp_path: Path, trained_run: Path):
    folder = image_folder(tmp_path / "imgs", ["a.png", "b.png", "c.png"], seed=4)
    engine = load_inference_model(EvaluateConfig(checkpoint=str(trained_run / "best.pt"), device="cpu",
                                                 precision="fp32"), announce=False)  # fmt: skip
    dataset = engine.dataset([(str(p), 0) for p in sorted(folder.iterdir())])
    pixels = torch.stack([dataset[i].image for i in range(3)])
    inputs = get_batch(pixel_batch(pixels), engine.spec).inputs
    plain = engine.probabilities(inputs)
    mirrored = engine.probabilities(inputs.flip(-1))
    engine.tta = True
    assert torch.allclose(engine.probabilities(inputs), (plain + mirrored) / 2, atol=1e-6)
    args = ["--checkpoint", trained_run / "best.pt", "--precision", "fp32", "--device", "cpu"]
    with_tta = invoke(["predict", folder / "a.png", *args, "--json", "--tta"])
    without = invoke(["predict", folder / "a.png", *args, "--json"])
    assert with_tta.exit_code == 0 and without.exit_code == 0
    top = json.loads(with_tta.stdout)[0]["topk"][0]
    expected = (plain[0] + mirrored[0]) / 2
    assert top["prob"] == pytest.approx(float(expected.max()), abs=1e-5)
    labelled = make_dataset(tmp_path / "ds", 2, 2)
    for command in (["batch-predict", folder, "--workers", "0"],
                    ["evaluate", labelled, "--out", tmp_path / "eval", "--workers", "0"]):
        result = invoke([*command, *args, "--tta"])
        assert result.exit_code == 0, result.stderr
        assert "mirror TTA" in result.stderr  # said where the run is described
