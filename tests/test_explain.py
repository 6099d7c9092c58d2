"""Class-activation heatmaps: the maps themselves (Grad-CAM is the CAM of the classifier's
weights), the model left as it was, the way back through resize + centre crop (and EXIF) to the
photo, and `resnext explain`, `predict --explain`, evaluate's and report.html's heatmaps."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from resnext_cli.data.loaders import image_dataset
from resnext_cli.data.transforms import Preprocessing, centre_crop_box
from resnext_cli.model.cam import activation_maps
from resnext_cli.outputs.heatmaps import Explained, PhotoFrame, display_size, overlay_image, photo_frame
from tests.conftest import invoke
from tests.marks import chance, make_mark_dataset, pointing_game
from tests.test_cli import help_rows

METHODS = ("gradcam-fine", "gradcam", "occlusion", "integrated-gradients")


def random_resnet18(classes: int = 4, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=classes).eval()


def layer4_cam(model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The class activation map by hand (Zhou et al.): the classifier's weights for the class
    times the last stage's features, which is what Grad-CAM reduces to when the last stage is
    pooled by a global average and fed to one linear layer."""
    features = {}
    hook = model.layer4.register_forward_hook(lambda _m, _i, out: features.update(out=out))
    with torch.no_grad():
        model(x)
    hook.remove()
    a = features["out"].float()
    weights = model.fc.weight[targets]
    return torch.relu(torch.einsum("nchw,nc->nhw", a, weights) / (a.shape[-1] * a.shape[-2]))


def test_gradcam_is_the_class_activation_map_of_the_classifier():
    model = random_resnet18()
    x = torch.randn(3, 3, 96, 96)
    targets = torch.tensor([0, 2, 3])
    maps = activation_maps(model, "resnet18", x, targets, "gradcam")
    assert maps.maps.shape == (3, 3, 3) and maps.stride == 32 and maps.offset == 0.5
    expected = layer4_cam(model, x, targets)
    assert expected.max() > 0
    torch.testing.assert_close(maps.maps, expected, rtol=1e-4, atol=1e-6)


def layer3_gradcam(model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of the stage before the last, by hand: the stage's features weighted by the
    spatial mean of the class logit's gradient, summed over channels, ReLU'd."""
    features = {}
    hook = model.layer3.register_forward_hook(lambda _m, _i, out: features.update(out=out))
    logits = model(x)
    hook.remove()
    grads = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), features["out"])[0]
    weights = grads.mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * features["out"]).sum(1)).detach()


def test_gradcam_fine_is_the_last_stage_map_sharpened_by_the_stage_before():
    """On the 16-px grid of layer3: the last stage's map (bilinear between its cells' centres,
    which sit at every other fine cell) times layer3's Grad-CAM, each scaled to a maximum of 1.
    So a place the classifier's own stage saw nothing of stays cold however layer3 lights up."""
    model = random_resnet18()
    x = torch.randn(3, 3, 96, 96)
    targets = torch.tensor([0, 2, 3])
    maps = activation_maps(model, "resnet18", x, targets, "gradcam-fine")
    assert maps.maps.shape == (3, 6, 6) and maps.stride == 16 and maps.offset == 0.5
    coarse, fine = layer4_cam(model, x, targets), layer3_gradcam(model, x, targets)
    up = torch.nn.functional.interpolate(coarse[:, None], size=(5, 5), mode="bilinear", align_corners=True)[:, 0]
    up = torch.cat([up, up[:, -1:]], dim=1)
    up = torch.cat([up, up[:, :, -1:]], dim=2)  # fine cell 5 lies past the last coarse centre
    unit = lambda m: m / m.flatten(1).amax(1)[:, None, None]  # noqa: E731
    expected = unit(up) * unit(fine)
    assert expected.flatten(1).amax(1).min() > 0
    torch.testing.assert_close(maps.maps, expected, rtol=1e-4, atol=1e-6)
    assert (maps.maps[up == 0] == 0).all()


def test_heatmaps_are_computed_in_fp32_whatever_the_layout_and_precision():
    """A bf16 channels-last model gives the fp32 contiguous model's maps: the maps run with
    autocast off (here even inside an autocast region) on the model as laid out."""
    model = random_resnet18()
    x = torch.randn(2, 3, 64, 64)
    targets = torch.tensor([1, 3])
    reference = {m: activation_maps(model, "resnet18", x, targets, m).maps for m in METHODS}
    model.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for method in METHODS:
            maps = activation_maps(model, "resnet18", x_cl, targets, method).maps
            assert maps.dtype == torch.float32
            torch.testing.assert_close(maps, reference[method], rtol=1e-3, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the same sum in bf16: visibly not that
        rough = layer4_cam(model, x_cl, targets).float()
    assert not torch.allclose(rough, reference["gradcam"], rtol=1e-3, atol=1e-5)
    assert reference["gradcam-fine"].shape[-1] == 2 * reference["gradcam"].shape[-1]


def model_state(model: torch.nn.Module) -> dict:
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "flags": [p.requires_grad for p in model.parameters()],
        "layouts": [p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters()],
    }


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = model_state(model)
    assert after["modes"] == before["modes"]
    assert after["flags"] == before["flags"]
    assert after["layouts"] == before["layouts"]
    assert all(torch.equal(before["tensors"][k], v) for k, v in after["tensors"].items())
    assert all(p.grad is None for p in model.parameters())
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not module._backward_hooks and not getattr(module, "_backward_pre_hooks", {})


@pytest.mark.parametrize("method", METHODS)
def test_the_model_is_left_exactly_as_it_was(method):
    """Modes, requires_grad flags, weights, BatchNorm statistics, layout: all as before; no hook
    left behind, no .grad written; also when the attribution fails half-way."""
    model = random_resnet18().to(memory_format=torch.channels_last)
    model.train()  # a model mid-training: BN in train mode, a frozen stem, a trainable rest
    model.layer1.eval()
    for param in [*model.conv1.parameters(), *model.bn1.parameters()]:
        param.requires_grad_(False)
    before = model_state(model)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    activation_maps(model, "resnet18", x, torch.tensor([0, 1]), method)
    assert_unchanged(model, before)
    with pytest.raises(Exception):
        activation_maps(model, "resnet18", x, torch.tensor([0, 99]), method)  # no class 99
    assert_unchanged(model, before)


# ---------------------------------------------------------------- back to the photo


def one_hot_cells(h: int, w: int, row: int, col: int) -> torch.Tensor:
    cells = torch.zeros(h, w)
    cells[row, col] = 1.0
    return cells


def test_the_peak_maps_back_through_resize_and_centre_crop():
    """A 300x200 photo at 64 px (resize 73): the crop keeps x 60.6..236.7, y 11.0..186.3 of it,
    and the last stage's cell (row 0, column 1) is centred on input pixel (32, 0)."""
    box = centre_crop_box(300, 200, 64, 73)
    frame = PhotoFrame((300, 200), box, 64)
    x0, y0, x1, y1 = box
    assert (round(x0, 1), round(y0, 1), round(x1, 1), round(y1, 1)) == (60.6, 11.0, 236.7, 186.3)
    item = Explained("p.jpg", "a", 0.9, "gradcam", frame, one_hot_cells(2, 2, 0, 1), 32.0, 0.5)
    scale = (x1 - x0) / 64
    assert item.peak == (int(x0 + 32.5 * scale), int(y0 + 0.5 * scale)) == (150, 12)
    item = Explained("p.jpg", "a", 0.9, "gradcam", frame, one_hot_cells(2, 2, 1, 0), 32.0, 0.5)
    assert item.peak == (int(x0 + 0.5 * scale), int(y0 + 32.5 * scale))
    silent = Explained("p.jpg", "a", 0.0, "gradcam", frame, torch.zeros(2, 2), 32.0, 0.5)
    assert silent.peak is None and silent.record()["peak"] is None
    heat = item.sample(torch.tensor([10.0, 150.0, 290.0]), torch.tensor([5.0, 100.0, 195.0]))
    assert torch.isnan(heat[:, 0]).all() and torch.isnan(heat[:, 2]).all()  # left, right of the crop
    assert torch.isnan(heat[0]).all() and torch.isnan(heat[2]).all()  # above, below it
    assert 0 <= float(heat[1, 1]) <= 1


def exif_rotated_photo(path: Path, dot: tuple[int, int]) -> Path:
    """A JPEG stored 240 wide and 400 high with EXIF orientation 6 (turn 90 degrees clockwise to
    view): upright it is 400x240, with a red dot at `dot` in upright pixels."""
    upright = np.full((240, 400, 3), 110, np.uint8)
    x, y = dot
    upright[y - 6 : y + 7, x - 6 : x + 7] = (230, 20, 20)
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # undone by orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, quality=95, exif=exif.tobytes())
    return path


@pytest.mark.parametrize("dot", [(140, 60), (300, 190), (205, 120)])
def test_the_frame_is_the_crop_the_loader_takes_of_the_upright_photo(tmp_path: Path, dot):
    """Where a dot lands in the model's input crop, mapped back through `photo_frame`, is where
    it is in the upright photo (within a pixel of the 64-px crop: 2.6 photo pixels)."""
    path = exif_rotated_photo(tmp_path / "turned.jpg", dot)
    pre = Preprocessing(64, 73)
    frame = photo_frame(str(path), pre)
    assert frame.size == (400, 240)
    crop = image_dataset([(str(path), 0)], pre)[0].image.numpy().astype(int)
    redness = crop[0] - (crop[1] + crop[2]) / 2
    v, u = np.unravel_index(np.argmax(redness), redness.shape)
    weights = np.clip(redness - redness.max() / 2, 0, None)
    u = float((weights.sum(0) * (np.arange(64) + 0.5)).sum() / weights.sum())
    v = float((weights.sum(1) * (np.arange(64) + 0.5)).sum() / weights.sum())
    x0, y0, x1, y1 = frame.box
    x, y = x0 + u * (x1 - x0) / 64, y0 + v * (y1 - y0) / 64
    scale = (x1 - x0) / 64
    assert abs(x - (dot[0] + 0.5)) <= scale and abs(y - (dot[1] + 0.5)) <= scale, (x, y, dot)


def test_the_overlay_is_upright_and_greys_out_what_the_model_did_not_see(tmp_path: Path):
    path = exif_rotated_photo(tmp_path / "turned.jpg", (200, 120))
    frame = photo_frame(str(path), Preprocessing(64, 73))
    item = Explained(str(path), "poppy", 0.87, "gradcam", frame, one_hot_cells(2, 2, 1, 1), 32.0, 0.5)
    picture = np.asarray(overlay_image(item)).astype(int)
    assert picture.shape == (240, 400, 3)  # upright, at its own size (384..1024 px: kept)
    x0, y0, x1, y1 = (round(v) for v in frame.box)
    outside = picture[:, : x0 - 2]  # left of the crop: grey (R = G = B)
    assert np.abs(outside[..., 0] - outside[..., 1]).max() <= 1
    inside = picture[y0 + 20 : y1 - 20, x0 + 20 : x1 - 20]  # coloured by the heatmap
    assert np.abs(inside[..., 0] - inside[..., 2]).max() > 40
    assert display_size((40, 24)) == (384, 230)  # small photos grow, large ones shrink
    assert display_size((4000, 3000)) == (1024, 768)


# ---------------------------------------------------------------- the commands


def test_help_shows_the_heatmap_options_and_defaults():
    rows = {cmd: help_rows(cmd) for cmd in ("predict", "evaluate")}
    assert any(r.strip().startswith("--explain") and "[default: off]" in r for r in rows["predict"])
    assert any(r.strip().startswith("--heatmaps") and "[default: 24]" in r for r in rows["evaluate"])


def explain_args(trained_run: Path, *args) -> list:
    return ["explain", *args, "--checkpoint", trained_run / "best.pt", "--device", "cpu", "--workers", "0"]


def test_explain_writes_an_overlay_per_image_and_explain_json(tmp_path: Path, trained_run: Path,
                                                              dataset: Path):  # fmt: skip
    out = tmp_path / "ex"
    result = invoke(explain_args(trained_run, dataset / "val", "--recursive", "--out", out))
    assert result.exit_code == 0, result.stderr
    entries = json.loads((out / "explain.json").read_text(encoding="utf-8"))
    images = sorted(str(p) for p in (dataset / "val").rglob("*.png"))
    assert sorted(e["path"] for e in entries) == images  # one entry each: the predicted class
    predicted = json.loads(invoke(["predict", images[0], "--checkpoint", trained_run / "best.pt",
                                   "--device", "cpu", "--json"]).stdout)[0]["topk"][0]  # fmt: skip
    first = next(e for e in entries if e["path"] == images[0])
    # the same probability, up to float rounding: explain's pass (batch, autograd) is not predict's
    assert first["class"] == predicted["class"] and first["prob"] == pytest.approx(predicted["prob"], abs=1e-5)
    for entry in entries:
        assert set(entry) == {"path", "class", "prob", "method", "peak", "overlay"}
        assert entry["method"] == "gradcam-fine"  # the default
        assert entry["overlay"] == f"{Path(entry['path']).stem}_{entry['class']}.png"
        assert entry["peak"] is None or (0 <= entry["peak"][0] < 40 and 0 <= entry["peak"][1] < 40)
        assert Image.open(out / entry["overlay"]).format == "PNG"
    assert f"Explained {len(images)} image(s)" in result.stdout


def test_explain_classes_asked_for_and_json(tmp_path: Path, trained_run: Path, dataset: Path):
    image = sorted((dataset / "val" / "beta").iterdir())[0]
    result = invoke(explain_args(trained_run, image, "--class", "alpha", "--class", "beta", "--json",
                                 "--out", tmp_path / "ex"))  # fmt: skip
    assert result.exit_code == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed == json.loads((tmp_path / "ex" / "explain.json").read_text(encoding="utf-8"))
    assert [e["class"] for e in printed] == ["alpha", "beta"]
    assert printed[1]["prob"] > printed[0]["prob"]  # a beta picture
    result = invoke(explain_args(trained_run, image, "--class", "betta"))
    assert result.exit_code == 2 and "Did you mean 'beta'" in result.stderr


def test_explain_folders_errors_and_unreadable_files(tmp_path: Path, trained_run: Path, dataset: Path):
    result = invoke(explain_args(trained_run, dataset / "val"))  # only class folders inside
    assert result.exit_code == 2 and "--recursive" in result.stderr and "Traceback" not in result.stderr
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a picture")
    good = sorted((dataset / "val" / "alpha").iterdir())[0]
    result = invoke(explain_args(trained_run, good, broken, "--out", tmp_path / "a"))
    assert result.exit_code == 0 and "broken.jpg" in result.stderr
    assert "1 unreadable" in result.stdout
    result = invoke(explain_args(trained_run, broken, "--out", tmp_path / "b"))
    assert result.exit_code == 1  # nothing could be explained
    assert invoke(explain_args(trained_run, tmp_path / "missing.jpg")).exit_code == 2


def test_explain_never_writes_over_what_it_did_not_write(tmp_path: Path, trained_run: Path, dataset: Path):
    image = sorted((dataset / "val" / "gamma").iterdir())[0]
    out = tmp_path / "mine"
    out.mkdir()
    foreign = out / f"{image.stem}_gamma.png"
    foreign.write_bytes(b"the user's own file")
    assert invoke(explain_args(trained_run, image, "--out", out)).exit_code == 0
    assert foreign.read_bytes() == b"the user's own file"  # the overlay took another name
    entries = json.loads((out / "explain.json").read_text(encoding="utf-8"))
    assert entries[0]["overlay"] == f"{image.stem}-2_gamma.png"
    other = sorted((dataset / "val" / "alpha").iterdir())[0]
    assert invoke(explain_args(trained_run, image, other, "--out", out)).exit_code == 0
    again = json.loads((out / "explain.json").read_text(encoding="utf-8"))
    assert [e["overlay"] for e in again] == [f"{image.stem}-2_gamma.png", f"{other.stem}_alpha.png"]
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "explain.json").write_text("{}")
    result = invoke(explain_args(trained_run, image, "--out", tmp_path / "theirs"))
    assert result.exit_code == 2 and "not written by resnext explain" in result.stderr
    assert (tmp_path / "theirs" / "explain.json").read_text() == "{}"


def test_explain_default_folders_are_new_each_time(tmp_path: Path, trained_run: Path, dataset: Path):
    image = sorted((dataset / "val" / "alpha").iterdir())[0]
    for _ in range(2):
        assert invoke(explain_args(trained_run, image), cwd=tmp_path).exit_code == 0
    assert (tmp_path / "runs" / "explain" / "explain.json").is_file()
    assert (tmp_path / "runs" / "explain2" / "explain.json").is_file()


def without_captum(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "captum" or m.startswith("captum.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "captum", None)  # `import captum...` now raises ImportError


def test_without_captum_explain_says_what_to_install(tmp_path: Path, trained_run: Path, dataset: Path,
                                                     monkeypatch: pytest.MonkeyPatch):  # fmt: skip
    without_captum(monkeypatch)
    image = sorted((dataset / "val" / "alpha").iterdir())[0]
    for args in (explain_args(trained_run, image, "--out", tmp_path / "ex"),
                 ["predict", image, "--checkpoint", trained_run / "best.pt", "--explain"]):  # fmt: skip
        result = invoke(args, cwd=tmp_path)
        assert result.exit_code == 2, result.stderr
        assert "pip install 'resnext-cli[explain]'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "ex" / "explain.json").exists() and not (tmp_path / "explain.png").exists()


def test_predict_explain_draws_the_heatmap_beside_the_probabilities(tmp_path: Path, trained_run: Path,
                                                                    dataset: Path):  # fmt: skip
    images = [sorted((dataset / "val" / c).iterdir())[0] for c in ("alpha", "gamma")]
    args = ["predict", *images, "--checkpoint", trained_run / "best.pt", "--device", "cpu", "--explain"]
    result = invoke([*args, "--json", "--plot", tmp_path / "fig.png"])
    assert result.exit_code == 0, result.stderr
    for entry in json.loads(result.stdout):
        top = entry["topk"][0]
        assert entry["explain"]["class"] == top["class"]
        assert entry["explain"]["prob"] == pytest.approx(top["prob"], abs=1e-5)  # its own pass: float rounding
        assert entry["explain"]["method"] == "gradcam-fine" and len(entry["explain"]["peak"]) == 2
    figure = Image.open(tmp_path / "fig.png")
    assert figure.format == "PNG" and figure.width > 3 * figure.height / 2 * 0.9  # 3 panels a row
    for name in ("explain.png", "explain2.png"):  # without --plot: a new file, never overwritten
        result = invoke(args, cwd=tmp_path)
        assert result.exit_code == 0 and f"Saved {name}" in result.stdout
        assert "heatmap of" in result.stdout
    assert Image.open(tmp_path / "explain2.png").size == Image.open(tmp_path / "explain.png").size


def mislabelled_copy(tmp_path: Path, dataset: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(dataset / "val", data)
    for picture in sorted((data / "alpha").iterdir())[:5]:  # sure mistakes: alpha filed as gamma
        shutil.move(picture, data / "gamma" / picture.name)
    return data


def test_evaluate_and_report_show_heatmaps_of_the_most_confident_mistakes(
    tmp_path: Path, trained_run: Path, dataset: Path
):
    data = mislabelled_copy(tmp_path, dataset)
    ev = tmp_path / "ev"
    result = invoke(["evaluate", data, "--checkpoint", trained_run / "best.pt", "--out", ev,
                     "--heatmaps", "3", "--workers", "0", "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    missed = (ev / "misclassified.csv").read_text().splitlines()[1:4]
    entries = json.loads((ev / "heatmaps" / "explain.json").read_text(encoding="utf-8"))
    assert len(entries) == 6 and "Heatmaps of the 3 most confident mistakes" in result.stdout
    for rank, row in enumerate(missed, 1):
        path, true, predicted, _ = row.split(",")
        pair = {e["role"]: e for e in entries if e["path"] == path}
        assert pair["predicted"]["class"] == predicted and pair["true"]["class"] == true
        assert pair["predicted"]["prob"] > pair["true"]["prob"]
        for entry in pair.values():
            assert entry["overlay"].startswith(f"{rank:02d}_")
            assert (ev / "heatmaps" / entry["overlay"]).is_file()
    result = invoke(["evaluate", data, "--checkpoint", trained_run / "best.pt", "--out", ev,
                     "--heatmaps", "0", "--workers", "0", "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0 and not list((ev / "heatmaps").iterdir())  # the earlier ones went

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert invoke(["report", run, "--data", data, "--gallery", "2", "--workers", "0"]).exit_code == 0
    page = (run / "report.html").read_text(encoding="utf-8")
    assert page.count('<figure class="explained">') == 2 and "heatmap of predicted class" in page
    assert "heatmap of true class" in page and "Grad-CAM heatmaps" in page


def test_without_captum_evaluate_works_and_says_why_no_heatmaps(tmp_path: Path, trained_run: Path,
                                                               dataset: Path, monkeypatch):  # fmt: skip
    without_captum(monkeypatch)
    data = mislabelled_copy(tmp_path, dataset)
    result = invoke(["evaluate", data, "--checkpoint", trained_run / "best.pt", "--out", tmp_path / "ev",
                     "--workers", "0", "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "No heatmaps of the mistakes" in result.stderr and "resnext-cli[explain]" in result.stderr
    assert (tmp_path / "ev" / "metrics.json").is_file() and not (tmp_path / "ev" / "heatmaps").exists()


# ---------------------------------------------------------------- the pointing game


def pointing_scores(work: Path, seed: int) -> dict[str, float]:
    """Train resnet18 from scratch on the marks set (96 px, 4 epochs, CPU), explain the held-out
    photos with each method, and score where the peaks fall."""
    marks = make_mark_dataset(work / "marks", seed=seed, val_per_class=15)
    result = invoke(["train", work / "marks", "--arch", "resnet18", "--weights", "none", "--img-size", "96",
                     "--epochs", "4", "--batch-size", "16", "--no-augment", "--device", "cpu", "--workers",
                     "0", "--seed", seed, "--no-report", "--out", work / "run"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    scores = {"chance": chance(marks)}
    for method in ("gradcam-fine", "gradcam", "integrated-gradients"):
        result = invoke(["explain", work / "marks" / "val", "--recursive", "--checkpoint",
                         work / "run" / "best.pt", "--method", method, "--out", work / method,
                         "--device", "cpu", "--workers", "0", "--batch-size", "16"])  # fmt: skip
        assert result.exit_code == 0, result.stderr
        entries = json.loads((work / method / "explain.json").read_text(encoding="utf-8"))
        assert len(entries) == 45
        scores["accuracy"] = sum(e["class"] == Path(e["path"]).parent.name for e in entries) / 45
        scores[method] = pointing_game(entries, marks)
    return scores


def test_the_heatmap_points_at_the_mark_that_decides_the_class(tmp_path: Path):
    """The class is decided only by a 30-px square of colour somewhere on a textured photo (a
    random peak in the model's view lands on it 11% of the time); a third of the photos are
    EXIF-turned JPEGs. The default, `gradcam-fine` (the last stage sharpened by the one before,
    16-px cells), and integrated gradients (per pixel) put their peak on the mark in >= 70% and
    >= 80% of the held-out photos (measured, seeds 0, 1, 2: with 2 CPU threads 100, 100, 96% and 100% each;
    with 1 thread, as under `pytest -n 2`, whose other arithmetic trains another model, 76, 100,
    100% and 100% each); plain Grad-CAM, whose last-stage cells are 32 px apart (3x3 of them at
    96 px), in 44-58%: 4-5x chance, no more (benchmarks/bench_explain.py). A peak mapped back
    wrongly (crop offset, scale, EXIF turn) scores near chance (11%)."""
    scores = pointing_scores(tmp_path, seed=0)
    assert scores["accuracy"] >= 0.95, scores
    assert scores["gradcam-fine"] >= 0.7, scores
    assert scores["integrated-gradients"] >= 0.8, scores
    assert scores["gradcam"] >= 3 * scores["chance"], scores
