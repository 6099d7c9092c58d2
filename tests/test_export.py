from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from resnext_cli.commands.export import realistic_batch
from tests.conftest import invoke
from tests.test_predict import image_folder


@pytest.fixture(scope="module")
def exports(trained_run: Path, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("exports")
    folders = {}
    for name, flags in {"onnx_dynamic": ["--format", "onnx", "--dynamic-batch"],
                        "onnx_static": ["--format", "onnx"],
                        "torchscript": ["--format", "torchscript"]}.items():
        result = invoke(["export", "--checkpoint", trained_run / "best.pt", *flags, "--out", out / name])
        assert result.exit_code == 0, result.stderr
        assert "top-1 agreement 100%" in result.stdout
        folders[name] = out / name
    return folders


def reference(trained_run: Path, inputs: torch.Tensor) -> torch.Tensor:
    from resnext_cli.model import networks

    ckpt = torch.load(trained_run / "best.pt", weights_only=True)
    model = networks.build_model(ckpt["arch"], len(ckpt["classes"])).eval()
    model.load_state_dict(ckpt["model"])
    with torch.inference_mode():
        return model(inputs)


def test_onnx_export_reloads_and_matches(exports, trained_run):
    import onnxruntime as ort

    folder = exports["onnx_dynamic"]
    assert json.loads((folder / "class_indices.json").read_text()) == {"0": "alpha", "1": "beta", "2": "gamma"}
    prep = json.loads((folder / "preprocess.json").read_text())
    assert (prep["img_size"], prep["resize_size"], prep["arch"], prep["batch"]) == (32, 37, "resnet18", "dynamic")
    assert prep["mean"] == [0.485, 0.456, 0.406] and prep["std"] == [0.229, 0.224, 0.225]
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = realistic_batch(5, 32, prep["mean"], prep["std"], seed=4)
    logits = session.run(None, {"images": inputs.numpy()})[0]
    expected = reference(trained_run, inputs).numpy()
    assert np.abs(logits - expected).max() < 1e-3
    assert (logits.argmax(1) == expected.argmax(1)).all()
    static = ort.InferenceSession(str(exports["onnx_static"] / "model.onnx"), providers=["CPUExecutionProvider"])
    assert static.get_inputs()[0].shape[0] == 1


def test_torchscript_export_reloads_and_matches(exports, trained_run):
    loaded = torch.jit.load(str(exports["torchscript"] / "model.torchscript.pt"))
    inputs = realistic_batch(4, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), seed=5)
    with torch.inference_mode():
        assert torch.allclose(loaded(inputs), reference(trained_run, inputs), atol=1e-4)


@pytest.mark.parametrize("model", ["onnx_dynamic", "onnx_static"])
def test_batch_predict_on_onnxruntime_matches_pytorch(tmp_path, exports, trained_run, model):
    folder = image_folder(tmp_path / "imgs", [f"{i}.png" for i in range(7)], seed=2)
    (folder / "broken.jpg").write_bytes(b"nope")
    rows = {}
    for name, source in {"torch": ["--checkpoint", trained_run / "best.pt", "--precision", "fp32"],
                         "onnx": ["--onnx", exports[model] / "model.onnx"]}.items():
        out = tmp_path / f"{name}.csv"
        result = invoke(["batch-predict", folder, *source, "--batch-size", "3", "--workers", "0",
                         "--quiet", "--output", out])
        assert result.exit_code == 0, result.stderr
        rows[name] = list(csv.DictReader(out.open()))
    assert [r["class"] for r in rows["onnx"]] == [r["class"] for r in rows["torch"]]
    assert rows["onnx"][0]["error"] == "" and any(r["error"] for r in rows["onnx"])
    for a, b in zip(rows["onnx"], rows["torch"]):
        if a["prob"]:
            assert abs(float(a["prob"]) - float(b["prob"])) < 1e-3
            # the unknown score from the exported features output, as PyTorch computes it
            score = float(b["unknown_score"])
            assert abs(float(a["unknown_score"]) - score) < 1e-3 * max(1.0, abs(score))
            assert a["known"] == b["known"] and a["known"] in ("true", "false")


def test_disagreement_beyond_tolerance_fails_loudly(tmp_path, trained_run):
    result = invoke(["export", "--checkpoint", trained_run / "best.pt", "--tolerance", "1e-12",
                     "--out", tmp_path / "x"])
    assert result.exit_code == 1 and "disagrees" in result.stderr
    assert not (tmp_path / "x" / "model.onnx").exists()
    assert not list((tmp_path / "x").glob(".*tmp"))


def test_missing_onnx_packages_say_what_to_install(tmp_path, trained_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    result = invoke(["export", "--checkpoint", trained_run / "best.pt", "--out", tmp_path / "x"])
    assert result.exit_code == 2 and "pip install 'resnext-cli[export]'" in result.stderr
    image_folder(tmp_path / "imgs", ["a.png"])
    result = invoke(["batch-predict", tmp_path / "imgs", "--onnx", tmp_path / "model.onnx"])
    assert result.exit_code == 2 and "onnxruntime" in result.stderr


def test_onnx_without_its_preprocessing_file(tmp_path, exports):
    lonely = tmp_path / "model.onnx"
    lonely.write_bytes((exports["onnx_dynamic"] / "model.onnx").read_bytes())
    image_folder(tmp_path / "imgs", ["a.png"])
    result = invoke(["batch-predict", tmp_path / "imgs", "--onnx", lonely])
    assert result.exit_code == 2 and "preprocess.json" in result.stderr
