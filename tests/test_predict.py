from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from resnext_cli.config import BatchPredictConfig
from resnext_cli.data import folders, images, loaders, transforms
from resnext_cli.data.batches import get_batch, pixel_batch
from resnext_cli.model.engines import load_inference_model
from tests.conftest import CLASS_COLOURS, draw_image, invoke, run_subprocess


def image_folder(root: Path, names: list[str], seed: int = 0) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    colours = list(CLASS_COLOURS.values())
    for i, name in enumerate(names):
        img = draw_image(colours[i % 3], rng)
        fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP"}
        img.save(root / name, format=fmt[name.rsplit(".", 1)[1].lower()])
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open()))


@pytest.mark.parametrize("count,batch", [(7, 3), (2, 8), (8, 4), (1, 1)])
def test_every_image_is_predicted_including_the_last_partial_batch(tmp_path, trained_run, count, batch):
    exts = ["jpg", "JPG", "png", "PNG", "Jpeg", "webp", "bmp"]
    names = [f"img_{i:02d}.{exts[i % len(exts)]}" for i in range(count)]
    folder = image_folder(tmp_path / "imgs", names)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "preds.csv"
    result = invoke(["batch-predict", folder, "--checkpoint", trained_run / "best.pt",
                     "--batch-size", batch, "--workers", "0", "--output", out])
    assert result.exit_code == 0, result.stderr
    rows = read_csv(out)
    assert [r["path"] for r in rows] == sorted(str(folder / n) for n in names)
    assert all(r["class"] in CLASS_COLOURS and r["error"] == "" for r in rows)
    assert result.stdout.count("image: ") == count
    assert f"Predicted {count} image(s), 0 unreadable" in result.stdout


def test_predictions_agree_with_the_colours(tmp_path, trained_run):
    folder = image_folder(tmp_path / "imgs", [f"{i}.png" for i in range(9)], seed=5)
    out = tmp_path / "p.csv"
    invoke(["batch-predict", folder, "--checkpoint", trained_run / "best.pt", "--workers", "0", "--output", out])
    names = list(CLASS_COLOURS)
    rows = read_csv(out)
    correct = sum(r["class"] == names[int(Path(r["path"]).stem) % 3] for r in rows)
    assert correct >= 8


def test_unreadable_files_are_rows_with_errors(tmp_path, trained_run):
    folder = image_folder(tmp_path / "imgs", ["a.png", "c.jpg"])
    (folder / "b.jpg").write_bytes(b"random bytes, not a jpeg")
    (folder / "d.png").write_bytes(b"")
    (folder / "e.jpg").mkdir()
    out = tmp_path / "preds.csv"
    result = invoke(["batch-predict", folder, "--checkpoint", trained_run / "best.pt", "--batch-size", "2",
                     "--workers", "1", "--topk", "2", "--output", out])
    assert result.exit_code == 0, result.stderr
    rows = read_csv(out)
    assert list(rows[0]) == ["path", "class", "prob", "error", "class_2", "prob_2", "unknown_score", "known"]
    by_name = {Path(r["path"]).name: r for r in rows}
    assert set(by_name) == {"a.png", "b.jpg", "c.jpg", "d.png", "e.jpg"}
    for bad in ("b.jpg", "d.png", "e.jpg"):
        assert by_name[bad]["error"] and by_name[bad]["class"] == "" and by_name[bad]["prob"] == ""
        assert bad in result.stderr
    assert by_name["a.png"]["class_2"] and float(by_name["a.png"]["prob"]) >= float(by_name["a.png"]["prob_2"])
    assert "3 unreadable" in result.stdout


def test_jsonl_output(tmp_path, trained_run):
    folder = image_folder(tmp_path / "imgs", ["a.png", "b.png", "c.png"])
    (folder / "z.png").write_bytes(b"broken")
    out = tmp_path / "preds.jsonl"
    result = invoke(["batch-predict", folder, "--checkpoint", trained_run / "best.pt", "--topk", "3",
                     "--workers", "0", "--quiet", "--output", out])
    assert result.exit_code == 0 and "image: " not in result.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["path"]).name for r in records] == ["a.png", "b.png", "c.png", "z.png"]
    first = records[0]
    assert set(first) == {"path", "class", "prob", "topk", "error", "unknown_score", "known"} and first["error"] == ""
    assert len(first["topk"]) == 3 and first["topk"][0]["class"] == first["class"]
    assert sum(t["prob"] for t in first["topk"]) == pytest.approx(1.0, abs=1e-4)
    assert records[3]["class"] is None and records[3]["error"]


def test_no_predictable_image_exits_1(tmp_path, trained_run):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "x.jpg").write_bytes(b"junk")
    result = run_subprocess(["batch-predict", folder, "--checkpoint", trained_run / "best.pt", "--workers", "0"],
                            cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke(["batch-predict", empty, "--checkpoint", trained_run / "best.pt"])
    assert result.exit_code == 1 and "No image files" in result.stderr


def test_failed_run_keeps_the_previous_output(tmp_path, trained_run):
    folder = image_folder(tmp_path / "imgs", ["a.png"])
    out = tmp_path / "preds.csv"
    out.write_text("previous results\n")
    result = invoke(["batch-predict", folder, "--checkpoint", tmp_path / "missing.pt", "--output", out])
    assert result.exit_code == 2 and out.read_text() == "previous results\n"


def test_batch_predict_decodes_with_draft_size(tmp_path, trained_run, monkeypatch):
    folder = image_folder(tmp_path / "imgs", ["a.jpg"])
    seen = []
    real = images.load_rgb
    monkeypatch.setattr(loaders, "load_rgb", lambda path, min_size=None: seen.append(min_size) or real(path, min_size))
    invoke(["batch-predict", folder, "--checkpoint", trained_run / "best.pt", "--workers", "0"])
    assert seen == [transforms.resize_size(32)]


def test_draft_decode_agrees_with_full_decode_on_large_photos(tmp_path, trained_run):
    """Large JPEGs decoded at reduced DCT scale give the same top-1 as a full decode."""
    engine = load_inference_model(BatchPredictConfig(data=".", checkpoint=str(trained_run / "best.pt")))
    transform = engine.preprocessing.eval_transform()
    rng = random.Random(3)
    full, drafted = [], []
    for i in range(12):
        big = draw_image(list(CLASS_COLOURS.values())[i % 3], rng).resize((1600, 1200), Image.BICUBIC)
        path = tmp_path / f"big_{i}.jpg"
        big.save(path, quality=90)
        reduced = images.load_rgb(path, engine.preprocessing.decode_min_size)
        assert reduced.size[0] < 1600 and min(reduced.size) >= engine.preprocessing.decode_min_size
        drafted.append(transform(reduced))
        full.append(transform(images.load_rgb(path)))
    top_full = engine.probabilities(get_batch(pixel_batch(torch.stack(full)), engine.spec).inputs).argmax(1)
    top_draft = engine.probabilities(get_batch(pixel_batch(torch.stack(drafted)), engine.spec).inputs).argmax(1)
    assert torch.equal(top_full, top_draft)


def test_predict_table_json_and_plot(tmp_path, trained_run):
    folder = image_folder(tmp_path / "imgs", ["a.png", "b.jpg"])
    result = invoke(["predict", folder / "a.png", folder / "b.jpg", "--checkpoint", trained_run / "best.pt",
                     "--topk", "2", "--json", "--plot", tmp_path / "plot.png"])
    assert result.exit_code == 0, result.stderr
    records = json.loads(result.stdout)
    assert [r["path"] for r in records] == [str(folder / "a.png"), str(folder / "b.jpg")]
    assert records[0]["checkpoint"] == str(trained_run / "best.pt")
    assert records[0]["topk"][0]["class"] == "alpha" and len(records[0]["topk"]) == 2
    with Image.open(tmp_path / "plot.png") as plot:
        assert plot.format == "PNG" and plot.width >= 2 * plot.height * 0.8
    table = invoke(["predict", folder / "a.png", "--checkpoint", trained_run / "best.pt"])
    assert table.exit_code == 0 and "alpha" in table.stdout and "%" in table.stdout


def test_predict_uses_the_newest_run(tmp_path, trained_run):
    runs = tmp_path / "runs"
    shutil.copytree(trained_run, runs / "exp")
    folder = image_folder(tmp_path / "imgs", ["a.png"])
    result = invoke(["predict", folder / "a.png"], cwd=tmp_path)
    assert result.exit_code == 0, result.stderr
    assert "runs/exp/best.pt" in result.stderr
    nothing = invoke(["predict", folder / "a.png"], cwd=folder)
    assert nothing.exit_code == 2 and "No checkpoint given" in nothing.stderr


def test_tutorial_artefacts_state_dict_plus_class_indices(tmp_path, trained_run):
    weights = tmp_path / "resNet18.pth"
    torch.save(torch.load(trained_run / "best.pt", weights_only=True)["model"], weights)
    folder = image_folder(tmp_path / "imgs", ["a.png"])
    args = ["predict", folder / "a.png", "--weights", weights, "--arch", "resnet18", "--img-size", "32", "--json"]
    result = invoke([*args, "--class-indices", trained_run / "class_indices.json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)[0]["topk"][0]["class"] == "alpha"
    wrong = tmp_path / "four.json"
    wrong.write_text(json.dumps({str(i): f"c{i}" for i in range(4)}))
    mismatch = invoke([*args, "--class-indices", wrong])
    assert mismatch.exit_code == 2 and "3 outputs" in mismatch.stderr and "4 classes" in mismatch.stderr


@pytest.mark.parametrize("case", ["missing", "folder", "unreadable", "not_checkpoint"])
def test_predict_errors(tmp_path, trained_run, case):
    folder = image_folder(tmp_path / "imgs", ["a.png"])
    (folder / "bad.jpg").write_bytes(b"nope")
    (tmp_path / "foreign.pt").write_bytes(b"not a torch file")
    image = {"missing": tmp_path / "nope.jpg", "folder": folder, "unreadable": folder / "bad.jpg",
             "not_checkpoint": folder / "a.png"}[case]
    ckpt = tmp_path / "foreign.pt" if case == "not_checkpoint" else trained_run / "best.pt"
    result = invoke(["predict", image, "--checkpoint", ckpt], cwd=tmp_path)
    assert result.exit_code == 2 and result.stderr.startswith("Error:"), result.stderr
    assert "Traceback" not in result.stderr
    if case == "folder":
        assert "batch-predict" in result.stderr


def test_default_decode_workers_follow_image_size_device_and_cores(tmp_path, monkeypatch):
    from resnext_cli.data.transforms import Preprocessing
    from resnext_cli.model.engines import InferenceModel

    small = image_folder(tmp_path / "small", [f"s{i}.jpg" for i in range(5)])  # 40 px
    large = tmp_path / "large"
    large.mkdir()
    for i in range(3):
        Image.new("RGB", (1200, 800), (90, 120, 30)).save(large / f"l{i}.jpg")
    small_paths = folders.list_images(small, False)
    large_paths = folders.list_images(large, False)

    def engine(device: str) -> InferenceModel:
        preprocessing = Preprocessing(224, 256, (0.5,) * 3, (0.5,) * 3)
        return InferenceModel(None, "resnet18", ["a"], preprocessing, "x.pt", torch.device(device))

    assert images.typical_short_side(large_paths) == 800
    monkeypatch.setattr(loaders, "available_cores", lambda: 2)
    cpu = engine("cpu")
    assert cpu.decode_workers(small_paths, None) == 0  # 2 cores, small images: main process
    assert cpu.decode_workers(large_paths, None) == 1  # large photos keep their worker
    assert cpu.decode_workers(small_paths, 3) == 3  # --workers always wins
    assert engine("meta").decode_workers(small_paths, None) == 1  # not the CPU: workers
    monkeypatch.setattr(loaders, "available_cores", lambda: 8)
    assert cpu.decode_workers(small_paths, None) == 4  # bigger machines: workers, as ever
    assert loaders.default_workers("cuda") == 8 and loaders.default_workers("cpu") == 4  # CUDA: every core
    assert engine("cuda").decode_workers(small_paths, None) == 5  # (capped by the 5 images)
    assert cpu.decode_workers(small_paths[:2], None) == 2  # never more than the images
