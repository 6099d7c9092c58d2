from __future__ import annotations

import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from resnext_cli.errors import UserError
from resnext_cli.model import networks
from tests.conftest import invoke

PUBLISHED_PARAMETERS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
    "resnext101_64x4d": 83_455_272,
    "wide_resnet50_2": 68_883_240,
    "wide_resnet101_2": 126_886_696,
}


def test_parameter_counts_match_published():
    assert networks.arch_parameter_counts() == PUBLISHED_PARAMETERS


def test_resnext50_first_stage_is_grouped():
    with torch.device("meta"):
        model = networks.build_model("resnext50_32x4d", 5)
    conv = model.layer1[0].conv2
    assert (conv.in_channels, conv.out_channels, conv.groups, conv.kernel_size) == (128, 128, 32, (3, 3))
    assert model.fc.out_features == 5


def test_archs_command_lists_every_arch_with_count():
    result = invoke(["archs"])
    assert result.exit_code == 0
    for name, count in PUBLISHED_PARAMETERS.items():
        assert name in result.stdout and f"{count:,}" in result.stdout


def test_help_does_not_import_torch():
    code = "import sys, resnext_cli.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_official_layout_loads_strictly_and_fp16_is_cast(tmp_path: Path):
    reference = torchvision.models.resnet18()
    state = {k: v.half() if v.is_floating_point() else v for k, v in reference.state_dict().items()}
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    model = networks.build_model("resnet18", 4)
    messages: list[str] = []
    networks.load_weights(model, "resnet18", str(path), messages.append)
    assert any("Replaced the classifier" in m and "1000 outputs -> 4" in m for m in messages)
    for key, value in model.state_dict().items():
        if not key.startswith("fc."):
            assert value.dtype == reference.state_dict()[key].dtype
            assert torch.equal(value, state[key].to(value.dtype)), key


def test_wrong_keys_are_named(tmp_path: Path):
    state = torchvision.models.resnet18().state_dict()
    del state["layer1.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(UserError) as info:
        networks.load_weights(networks.build_model("resnet18", 3), "resnet18", str(path), print)
    assert "layer1.0.conv1.weight" in str(info.value) and "extra.weight" in str(info.value)


def test_wrong_arch_is_reported(tmp_path: Path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(UserError, match="are for resnet18 .* the architecture in use is resnet34"):
        networks.load_weights(networks.build_model("resnet34", 3), "resnet34", str(path), print)


def test_imagenet_weights_come_from_the_hub_cache(tmp_path: Path, monkeypatch):
    """The real torchvision download path, served from a file placed in the cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    cache = tmp_path / "hub" / "checkpoints" / Path(url).name
    cache.parent.mkdir(parents=True)
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), cache)
    model = networks.build_model("resnet18", 3)
    networks.load_weights(model, "resnet18", "imagenet", print)
    assert torch.equal(model.conv1.weight, reference.conv1.weight)


def test_offline_imagenet_error_names_url_and_cache_path(tmp_path: Path, monkeypatch, dataset):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torch.hub.load_state_dict_from_url", offline)
    result = invoke(["train", "--data", dataset, "--arch", "resnet18", "--out", tmp_path / "r"])
    assert result.exit_code == 2
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    expected_cache = str(tmp_path / "hub" / "checkpoints" / Path(url).name)
    assert result.stderr.startswith("Error:") and url in result.stderr
    assert expected_cache in result.stderr and "--weights none" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "r" / "best.pt").exists()


def test_frozen_mode_keeps_backbone_in_eval():
    model = networks.build_model("resnet18", 3)
    networks.set_train_mode(model, backbone_frozen=True)
    assert not model.bn1.training and not model.layer4[1].bn2.training
    networks.set_train_mode(model, backbone_frozen=False)
    assert model.bn1.training


def test_backbone_features_feed_the_head():
    model = networks.build_model("resnet18", 3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.fc(networks.backbone_features(model, x)), model(x))


def test_logits_and_features_are_the_forward_pass_and_layer2_spread():
    """One pass gives torchvision's logits, the pooled features, then each layer2 channel's
    standard deviation over the image (what the unknown score's `style` reads)."""
    model = networks.build_model("resnet18", 3).eval()
    x = torch.randn(2, 3, 64, 64)
    seen = {}
    model.layer2.register_forward_hook(lambda _m, _i, out: seen.setdefault("layer2", out))
    with torch.no_grad():
        logits, features = networks.logits_and_features(model, x)
        expected = model(x)
    pooled = model.fc.in_features
    assert features.shape == (2, pooled + 128)
    assert torch.allclose(logits, expected, atol=1e-5)
    assert torch.allclose(model.fc(features[:, :pooled]), expected, atol=1e-5)
    spread = seen["layer2"].flatten(2).std(2, correction=0)
    assert torch.allclose(features[:, pooled:], spread, atol=1e-5)
