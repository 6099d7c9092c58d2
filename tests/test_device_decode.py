"""Decoding and cropping on the device (`--decode gpu`). The tensor pipeline runs on the CPU too
(torchcodec's decode_jpeg, or torchvision's without it, and roi_align), so it is checked here
against the Pillow path; the tests that need CUDA are marked and skip without it."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from resnext_cli.commands import train as train_module
from resnext_cli.config import EvaluateConfig
from resnext_cli.data import batches
from resnext_cli.data.batches import InputSpec, decode_jpegs, get_batch
from resnext_cli.data.images import load_rgb, read_header
from resnext_cli.data.loaders import EncodedImage, LoadedBatch, collate_skipping_failures, image_dataset
from resnext_cli.data.transforms import Preprocessing, train_transform
from resnext_cli.errors import UserError
from resnext_cli.model.device import decode_on_device
from resnext_cli.model.engines import load_inference_model
from resnext_cli.outputs.evaluation import evaluation_samples, score
from tests.conftest import TINY_TRAIN, invoke, make_dataset

REPO = Path(__file__).resolve().parent.parent
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def photo(path: Path, size: tuple[int, int], seed: int, orientation: int = 1, mode: str = "RGB",
          quality: int = 92) -> Path:
    """A smooth photo-like JPEG (noise is not what JPEG keeps), optionally EXIF-rotated."""
    rng = random.Random(seed)
    small = Image.new("RGB", (4, 3))
    small.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(12)])
    img = small.resize(size, Image.Resampling.BICUBIC).convert(mode)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    img.save(path, format="JPEG", quality=quality, exif=exif.tobytes())
    return path


def samples_of(paths: list[Path]) -> list[tuple[str, int]]:
    return [(str(p), i % 3) for i, p in enumerate(paths)]


def both_paths(samples, prep: Preprocessing, train: bool, epoch: int = 3):
    """(Pillow's uint8 crops as floats, the device path's crops, the device batch), one batch."""
    def batch(on_device: bool):
        ds = image_dataset(samples, prep, train=train, augment_seed=7 if train else None,
                           on_device=on_device)
        key = (lambda i: (epoch, i)) if train else (lambda i: i)
        return collate_skipping_failures([ds[key(i)] for i in range(len(ds))])

    pil, dev = batch(False), batch(True)
    unit = Preprocessing(prep.img_size, prep.resize_size, (0.0,) * 3, (1 / 255,) * 3)  # 0-255 out
    spec = InputSpec(torch.device("cpu"), False, unit, decode_on_device=True)
    on_device = get_batch(dev, spec)
    return pil, on_device


def test_train_transform_is_torchvisions_random_resized_crop_and_flip():
    rng = random.Random(0)
    for _ in range(100):
        img = Image.effect_noise((rng.randint(20, 300), rng.randint(20, 300)), 40).convert("RGB")
        seed = rng.randrange(10**9)
        torch.manual_seed(seed)
        reference = T.Compose([T.RandomResizedCrop(32), T.RandomHorizontalFlip(), T.PILToTensor()])(img)
        torch.manual_seed(seed)
        assert torch.equal(train_transform(32)(img), reference)


def test_the_header_predicts_pillows_reduced_decode(tmp_path: Path):
    """The box is drawn on the size Pillow's draft decode has; the header must know it without
    decoding, for large photos (reduced scale) and EXIF-rotated ones (width and height swap)."""
    for i, (size, orientation) in enumerate([((640, 480), 1), ((3000, 2000), 1), ((1200, 900), 6),
                                              ((333, 777), 8), ((900, 600), 3), ((50, 40), 5)]):
        path = photo(tmp_path / f"p{i}.jpg", size, i, orientation)
        header = read_header(path, 73)
        assert header.device_jpeg and header.orientation == orientation
        assert header.draft_size == load_rgb(path, 73).size
        assert header.size == load_rgb(path).size


@pytest.mark.parametrize("train", [False, True])
def test_device_path_takes_the_same_crops_as_pillow(tmp_path: Path, train: bool):
    """Same seed, same epoch: the same region of each photo, whatever its size or EXIF
    rotation, so the pixels agree up to the two resamplers (and Pillow's reduced decode)."""
    paths = [photo(tmp_path / f"p{i}.jpg", size, i, orientation) for i, (size, orientation) in
             enumerate([((120, 90), 1), ((90, 120), 6), ((500, 375), 1), ((375, 500), 8),
                        ((64, 64), 3), ((1600, 1200), 1)])]  # fmt: skip
    prep = Preprocessing(48, 55)
    pil, dev = both_paths(samples_of(paths), prep, train)
    assert dev.indices == pil.indices == list(range(len(paths))) and not dev.failures
    diff = (dev.inputs - pil.images.float()).abs().mean(dim=(1, 2, 3))
    assert diff.max() < 6, diff  # 0-255 scale; a different crop or flip differs by tens
    assert diff.mean() < 3, diff


def test_fallbacks_and_failures_are_kept_in_place(tmp_path: Path):
    """PNG and CMYK JPEGs go to Pillow in the worker; grayscale JPEGs decode on the device; a
    truncated or broken file is a failure with Pillow's own reason; labels stay aligned."""
    good = photo(tmp_path / "good.jpg", (200, 150), 1)
    gray = photo(tmp_path / "gray.jpg", (150, 200), 2, mode="L")
    cmyk = photo(tmp_path / "cmyk.jpg", (160, 120), 3, mode="CMYK")
    png = tmp_path / "pic.png"
    Image.new("RGBA", (80, 60), (200, 30, 30, 128)).save(png)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(photo(tmp_path / "whole.jpg", (300, 200), 4).read_bytes()[:600])
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8\xff not really a jpeg")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    files = [good, junk, gray, cmyk, cut, png, empty]
    samples = [(str(p), label) for label, p in enumerate(files)]
    ds = image_dataset(samples, Preprocessing(32, 37), on_device=True)
    loaded = collate_skipping_failures([ds[i] for i in range(len(ds))])
    assert [e.jpeg for e in loaded.encoded] == [True, True, False, False]  # good gray cmyk png
    assert [i for i, _ in loaded.failures] == [1, 4, 6]  # junk, cut (no end marker: Pillow), empty
    batch = get_batch(loaded, InputSpec(torch.device("cpu"), False, Preprocessing(32, 37), True))
    assert batch.indices == [0, 2, 3, 5] and batch.labels.tolist() == [0, 2, 3, 5]
    assert batch.inputs.shape == (4, 3, 32, 32)
    pillow = image_dataset(samples, Preprocessing(32, 37))  # today's path: the same reasons
    expected = collate_skipping_failures([pillow[i] for i in range(len(pillow))]).failures
    assert sorted(batch.failures) == sorted(expected) and [i for i, _ in expected] == [1, 4, 6]


def test_a_broken_jpeg_in_a_batch_does_not_take_the_others_down(tmp_path: Path):
    good = [photo(tmp_path / f"g{i}.jpg", (100, 80), i) for i in range(3)]
    data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in good]
    bad = torch.frombuffer(bytearray(good[0].read_bytes()[:200] + b"\x00" * 50 + b"\xff\xd9"),
                           dtype=torch.uint8)  # fmt: skip
    decoded = decode_jpegs([data[0], bad, data[1], data[2]], torch.device("cpu"))
    assert decoded[1] is None  # refused alone, the others decoded
    assert all(d is not None and d.shape == (3, 80, 100) for d in (decoded[0], decoded[2], decoded[3]))
    box = (0.0, 0.0, 100.0, 80.0)
    encoded = [EncodedImage(d, True, 1, box, False) for d in (data[0], bad, data[1])]
    loaded = LoadedBatch(None, torch.tensor([5, 6, 7]), [10, 11, 12], [(13, "earlier")], encoded)
    batch = get_batch(loaded, InputSpec(torch.device("cpu"), False, Preprocessing(32, 37), True))
    assert batch.indices == [10, 12] and batch.labels.tolist() == [5, 7]
    assert batch.failures[0] == (13, "earlier") and batch.failures[1][0] == 11
    assert batch.failures[1][1].startswith("OSError")  # Pillow's reason, as the CPU path gives


def test_both_jpeg_decoders_give_pillows_upright_pixels(tmp_path: Path, monkeypatch):
    """torchcodec (which applies EXIF orientation itself) and torchvision's deprecated decoder
    (turned upright here) give the same pixels as Pillow's full decode, EXIF-rotated or not."""
    pytest.importorskip("torchcodec")
    shapes = [((120, 90), 1), ((90, 120), 6), ((375, 500), 8), ((64, 48), 3), ((200, 100), 5)]
    paths = [photo(tmp_path / f"p{i}.jpg", size, i, o) for i, (size, o) in enumerate(shapes)]
    data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    turns = [read_header(p).orientation for p in paths]
    assert turns == [o for _, o in shapes]
    pillow = [T.functional.pil_to_tensor(load_rgb(p)) for p in paths]
    assert batches.jpeg_decoder().name == "torchcodec"
    with_codec = decode_jpegs(data, torch.device("cpu"), turns)
    monkeypatch.setattr(batches, "jpeg_decoder", batches.torchvision_decoder)
    with_vision = decode_jpegs(data, torch.device("cpu"), turns)
    for codec, vision, reference in zip(with_codec, with_vision, pillow):
        assert torch.equal(codec, reference) and torch.equal(vision, reference)


def test_decode_gpu_says_what_to_install_without_a_decoder(monkeypatch):
    monkeypatch.setattr("resnext_cli.model.device.jpeg_decoder", lambda: None)
    cuda = torch.device("cuda")  # only the name: nothing runs there
    with pytest.raises(UserError, match=r"pip install 'resnext-cli\[gpu\]'"):
        decode_on_device("gpu", cuda)
    assert decode_on_device("auto", cuda) is False  # Pillow in the workers, as on the CPU


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory) -> Path:
    """resnet18 trained on the bundled sample data (64 px JPEGs), as in the quick start but for one
    epoch instead of 3 (the suite's longest setup): the test needs a model that tells the kinds
    apart, and one epoch gave 100% val accuracy at seed 0 with 1 and 2 threads, 97% at seeds 1
    and 2, the device path agreeing with Pillow on 100 of 100 photos each time."""
    out = tmp_path_factory.mktemp("sample") / "run"
    result = invoke(["train", REPO / "data" / "sample", *TINY_TRAIN, "--img-size", "64", "--weights",
                     "none", "--epochs", "1", "--batch-size", "16", "--seed", "0", "--out", out])
    assert result.exit_code == 0, result.stderr
    return out


def test_eval_predictions_agree_with_the_pillow_path(sample_run: Path):
    """Top-1 of the device path equals Pillow's on >= 99% of the sample val photos."""
    engine = load_inference_model(EvaluateConfig(checkpoint=str(sample_run / "best.pt"), device="cpu"),
                                  announce=False)  # fmt: skip
    chosen = evaluation_samples(str(REPO / "data" / "sample"), engine.classes, None)
    pillow = score(engine, chosen.samples, 16, 0, warn=False)
    engine.decode_on_device = True
    device = score(engine, chosen.samples, 16, 0, warn=False)
    assert len(device.predictions) == len(pillow.predictions) == 100
    same = sum(a.predicted == b.predicted for a, b in zip(pillow.predictions, device.predictions))
    assert same / 100 >= 0.99, same
    assert device.report.accuracy >= 0.9


def test_a_seeded_run_decoding_on_the_device_repeats(tmp_path: Path, monkeypatch):
    """--decode gpu's pipeline, here on the CPU: the same seed gives the same run, with a
    worker process drawing the crops."""
    monkeypatch.setattr(train_module, "decode_on_device", lambda requested, device: True)
    root = make_dataset(tmp_path / "ds", train_per_class=6, val_per_class=2)
    for split in ("train", "val"):  # JPEGs, so that they take the device's decoder
        for png in (root / split).rglob("*.png"):
            Image.open(png).convert("RGB").save(png.with_suffix(".jpg"), quality=95)
            png.unlink()

    def run(name: str) -> list[dict[str, str]]:
        result = invoke(["train", root, *TINY_TRAIN[:-2], "--workers", "1", "--weights", "none",
                         "--epochs", "2", "--seed", "3", "--out", tmp_path / name])
        assert result.exit_code == 0, result.stderr
        rows = list(csv.DictReader((tmp_path / name / "metrics.csv").open()))
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    first = run("a")
    assert first == run("b")
    saved = (tmp_path / "a" / "config.yaml").read_text()
    assert "decode: gpu" in saved


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_decode_gpu_without_cuda_is_an_error(tmp_path: Path, dataset: Path):
    result = invoke(["train", dataset, "--arch", "resnet18", "--weights", "none", "--decode", "gpu",
                     "--out", tmp_path / "run"], cwd=tmp_path)
    assert result.exit_code == 2 and "--decode gpu needs a CUDA device" in result.stderr
    assert not (tmp_path / "run" / "best.pt").exists()
    folder = tmp_path / "imgs"
    folder.mkdir()
    photo(folder / "a.jpg", (40, 40), 0)
    result = invoke(["batch-predict", folder, "--decode", "gpu", "--checkpoint", tmp_path / "x.pt"], cwd=tmp_path)
    assert result.exit_code == 2 and result.stderr.startswith("Error:")


# ---------------------------------------------------------------- on a GPU


@CUDA
def test_gpu_decode_matches_the_cpu_decode(tmp_path: Path):
    paths = [photo(tmp_path / f"p{i}.jpg", (640 + 32 * i, 480), i) for i in range(8)]
    data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    on_gpu = decode_jpegs(data, torch.device("cuda"))
    on_cpu = decode_jpegs(data, torch.device("cpu"))
    for g, c in zip(on_gpu, on_cpu):
        assert g.is_cuda and g.shape == c.shape
        assert (g.cpu().float() - c.float()).abs().mean() < 2  # JPEG decoders differ slightly


@CUDA
def test_gpu_decode_waits_for_kernels_still_queued(tmp_path: Path):
    """The H100 hazard (pytorch/vision PR 9606): memory freed while kernels that read it are
    still queued must not be overwritten by the decode. A long chain of matmuls reads `a`; `a`
    is freed before they run; then a batch is decoded. The chain's result must be exact."""
    device = torch.device("cuda")
    paths = [photo(tmp_path / f"p{i}.jpg", (1024, 768), i) for i in range(16)]
    data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    reference = decode_jpegs(data, torch.device("cpu"))
    for _ in range(3):
        a = torch.randn(4096, 4096, device=device)
        expected = a.double().sum().item()
        b = a
        for _ in range(30):  # queued work that reads a's memory
            b = b @ torch.eye(4096, device=device)
        total = b.sum()
        del a, b  # the allocator may hand this memory to the decoder now
        decoded = decode_jpegs(data, device)
        assert abs(total.item() - expected) < 1e-2 * max(1.0, abs(expected))
        for g, c in zip(decoded, reference):
            assert (g.cpu().float() - c.float()).abs().mean() < 2


@CUDA
def test_training_and_prediction_with_gpu_decode(tmp_path: Path):
    root = make_dataset(tmp_path / "ds", train_per_class=6, val_per_class=2)
    for png in root.rglob("*.png"):
        Image.open(png).convert("RGB").save(png.with_suffix(".jpg"), quality=95)
        png.unlink()
    result = invoke(["train", root, "--arch", "resnet18", "--weights", "none", "--epochs", "2",
                     "--img-size", "32", "--decode", "gpu", "--cache-features", "--freeze",
                     "--out", tmp_path / "run"])
    assert result.exit_code == 0, result.stderr
    assert "decode: gpu" in (tmp_path / "run" / "config.yaml").read_text()
    out = tmp_path / "p.csv"
    result = invoke(["batch-predict", root / "val", "--recursive", "--checkpoint", tmp_path / "run" / "best.pt",
                     "--decode", "gpu", "--output", out])
    assert result.exit_code == 0, result.stderr
    assert len(out.read_text().splitlines()) == 1 + 6
