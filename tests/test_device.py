from __future__ import annotations

import csv

import pytest
import torch

from resnext_cli.data import batches
from resnext_cli.errors import UserError
from resnext_cli.model import device as dev
from tests.conftest import invoke
from tests.test_predict import image_folder


@pytest.mark.parametrize(
    "requested,device_type,native_bf16,cuda_bf16,expected",
    [
        ("auto", "cpu", True, False, "bf16"),
        ("auto", "cpu", False, False, "fp32"),  # emulated bf16 is many times slower
        ("auto", "cuda", False, True, "bf16"),
        ("auto", "cuda", False, False, "fp16"),
        ("auto", "mps", False, False, "fp32"),
        ("fp32", "cuda", True, True, "fp32"),
        ("bf16", "cpu", False, False, "bf16"),  # explicit choices are honoured
        ("fp16", "cuda", False, False, "fp16"),
    ],
)
def test_precision_resolution(monkeypatch, requested, device_type, native_bf16, cuda_bf16, expected):
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: native_bf16)
    assert dev.resolve_precision(requested, device_type, cuda_bf16) == expected


def test_fp16_on_cpu_is_refused():
    with pytest.raises(UserError, match="needs a CUDA device"):
        dev.resolve_precision("fp16", "cpu")


def test_grad_scaler_only_for_cuda_fp16():
    assert dev.needs_grad_scaler("cuda", "fp16")
    assert not dev.needs_grad_scaler("cuda", "bf16")
    assert not dev.needs_grad_scaler("cpu", "bf16") and not dev.needs_grad_scaler("cpu", "fp32")
    assert not dev.make_grad_scaler(torch.device("cpu"), "bf16").is_enabled()


def test_device_selection_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert dev.select_device("auto").type in ("cpu", "mps")
    with pytest.raises(UserError, match="no CUDA GPU"):
        dev.select_device("cuda:0")
    assert not dev.pin_memory_for(torch.device("cpu")) and dev.pin_memory_for(torch.device("cuda"))


def test_channels_last_inputs():
    x = torch.randn(2, 3, 8, 8)
    assert batches.to_device(x, torch.device("cpu"), True).is_contiguous(memory_format=torch.channels_last)
    assert batches.to_device(x, torch.device("cpu"), False).is_contiguous()


def test_bf16_and_channels_last_agree_with_fp32(tmp_path, trained_run):
    folder = image_folder(tmp_path / "imgs", [f"{i:02d}.png" for i in range(12)], seed=9)
    tops = {}
    for name, flags in {"fp32": ["--precision", "fp32", "--no-channels-last"],
                        "bf16": ["--precision", "bf16", "--channels-last"],
                        "fp32_cl": ["--precision", "fp32", "--channels-last"]}.items():
        out = tmp_path / f"{name}.csv"
        result = invoke(["batch-predict", folder, "--checkpoint", trained_run / "best.pt", "--workers", "0",
                         "--quiet", "--output", out, *flags])
        assert result.exit_code == 0, result.stderr
        tops[name] = [(r["class"], float(r["prob"])) for r in csv.DictReader(out.open())]
    assert [c for c, _ in tops["bf16"]] == [c for c, _ in tops["fp32"]]
    assert [c for c, _ in tops["fp32_cl"]] == [c for c, _ in tops["fp32"]]
    assert all(abs(a[1] - b[1]) < 0.05 for a, b in zip(tops["bf16"], tops["fp32"]))


def test_checkpoint_is_contiguous_whatever_the_layout(trained_run):
    state = torch.load(trained_run / "best.pt", weights_only=True)["model"]
    assert all(t.is_contiguous() for t in state.values())
