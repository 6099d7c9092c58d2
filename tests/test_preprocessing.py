"""Eval preprocessing travels with the weights: torchvision's own resize for ImageNet weights,
stored in the checkpoint, and used by predict, evaluate and export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

from resnext_cli.data import loaders
from resnext_cli.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, read_preprocess_json
from resnext_cli.model import networks
from tests.conftest import invoke
from tests.test_predict import image_folder


def test_imagenet_weights_bring_their_own_resize():
    v2 = networks.weights_preprocessing("resnext50_32x4d", "imagenet", 224)  # IMAGENET1K_V2
    assert v2 == Preprocessing(224, 232, IMAGENET_MEAN, IMAGENET_STD)
    assert networks.weights_preprocessing("resnet18", "imagenet", 224).resize_size == 256  # V1
    assert networks.weights_preprocessing("resnext50_32x4d", "imagenet", 64).resize_size == 66
    for weights in ("none", "some/file.pth"):
        assert networks.weights_preprocessing("resnext50_32x4d", weights, 224).resize_size == 256
        assert networks.weights_preprocessing("resnet18", weights, 64).resize_size == 73


def test_training_on_imagenet_weights_stores_their_resize(tmp_path: Path, dataset: Path, monkeypatch):
    reference = torchvision.models.resnet50()  # torchvision's DEFAULT for it is V2: 232/224
    monkeypatch.setattr(networks, "imagenet_state_dict", lambda arch: reference.state_dict())
    result = invoke(["train", "--data", dataset, "--arch", "resnet50", "--img-size", "32",
                     "--batch-size", "8", "--workers", "0", "--no-report", "--epochs", "1",
                     "--seed", "0", "--out", tmp_path / "run"])
    assert result.exit_code == 0, result.stderr
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert (best["img_size"], best["resize_size"]) == (32, round(32 * 232 / 224))


@pytest.mark.parametrize("resize,expected", [(48, 48), (None, 37)])
def test_inference_follows_the_checkpoint(tmp_path, trained_run, monkeypatch, resize, expected):
    """A checkpoint's resize_size is what predict decodes and resizes to, and what export
    writes; an older checkpoint without the key keeps 256/224 (37 at 32 px)."""
    ckpt = torch.load(trained_run / "best.pt", weights_only=True)
    ckpt.pop("resize_size")
    if resize is not None:
        ckpt["resize_size"] = resize
    path = tmp_path / "best.pt"
    torch.save(ckpt, path)
    seen = []
    real = loaders.load_rgb
    monkeypatch.setattr(loaders, "load_rgb", lambda p, min_size=None: seen.append(min_size) or real(p, min_size))
    folder = image_folder(tmp_path / "imgs", ["a.jpg", "b.png"])
    result = invoke(["batch-predict", folder, "--checkpoint", path, "--workers", "0"])
    assert result.exit_code == 0, result.stderr
    assert seen == [expected, expected]
    result = invoke(["export", "--checkpoint", path, "--format", "torchscript", "--out", tmp_path / "x"])
    assert result.exit_code == 0, result.stderr
    written = json.loads((tmp_path / "x" / "preprocess.json").read_text())
    assert written["resize_size"] == expected
    assert read_preprocess_json(tmp_path / "x" / "preprocess.json").resize_size == expected


def test_a_smaller_img_size_keeps_the_checkpoints_ratio(trained_run):
    from resnext_cli.model.checkpoint import checkpoint_preprocessing

    ckpt = torch.load(trained_run / "best.pt", weights_only=True)
    ckpt["resize_size"] = 40  # 32 crop
    assert checkpoint_preprocessing(ckpt, 64).resize_size == 80
    assert checkpoint_preprocessing(ckpt).resize_size == 40
