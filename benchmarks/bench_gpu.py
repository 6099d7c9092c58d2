"""GPU throughput: the model alone vs a hand-written Pillow loop vs `resnext` decoding on the CPU
(`--decode cpu`) and on the GPU (`--decode gpu`), side by side in one run on the same photos.

Photos are made from what the repository holds (data/sample, or --photos DIR): upscaled to
500x375 JPEGs and replicated into a train/val set of several thousand, and upscaled to 3000x2000
for the large-photo rows. Rows, each in images/s and as a ratio to the model alone:
  model alone (random tensors already on the GPU): full fine-tune step, frozen-backbone step,
    inference;
  a hand-written loop (ImageFolder, Pillow transforms, DataLoader with every core, bf16,
    channels-last): full and frozen training, inference;
  resnext train --no-freeze / frozen (--no-cache-features: images every epoch), the
    --cache-features extraction, batch-predict (batch 128),
    each with --decode cpu and --decode gpu; batch-predict on the 3000x2000 photos;
  and a second table: JPEG decode alone on the device, torchcodec (resnext's decoder) vs
    torchvision's deprecated one.
resnext rows are in-loop rates (epochs 2.., from metrics.csv; batch-predict's own loop time),
with whole-command seconds beside them.

    python benchmarks/bench_gpu.py                          # on a CUDA machine, ~5-10 minutes
    python benchmarks/bench_gpu.py --photos ../shared/data/flowers5 --arch resnext50_32x4d

Goals on an H100 with 16 cores, resnet50, 224 px (issue 17): full fine-tuning >= 0.75x the model
alone, frozen >= 0.6x, batch-predict in-loop >= 0.5x at batch 128, >= 1,200 img/s on 3000x2000.
`--device cpu --decode-on-cpu` runs every row on the CPU with tiny sizes, to check this script
where there is no GPU (its numbers mean nothing). `--agreement CHECKPOINT` only compares the
two decode paths' top-1 on the val photos of --photos with a trained model (on any device).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import platform
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from PIL import Image
from torch import nn
from torchvision import datasets, transforms

from resnext_cli.commands import predict
from resnext_cli.commands import train as train_module
from resnext_cli.commands.train import train
from resnext_cli.config import BatchPredictConfig, EvaluateConfig, TrainConfig, available_cores
from resnext_cli.data import batches
from resnext_cli.data.folders import list_images
from resnext_cli.model import engines, features, networks
from resnext_cli.model.device import autocast, precision_for
from resnext_cli.model.engines import load_inference_model
from resnext_cli.outputs.evaluation import evaluation_samples, score

REPO = Path(__file__).resolve().parent.parent
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def make_photos(sources: list[str], root: Path, size: tuple[int, int], count: int, classes: int,
                split: str) -> Path:
    """`count` JPEGs of `size` in `classes` class folders: each source upscaled once, then
    linked as often as needed (decoding cost is per file, whatever its content)."""
    made: list[Path] = []
    store = root / f"_{size[0]}x{size[1]}"
    store.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        source = sources[i % len(sources)]
        target = store / f"{Path(source).stem}_{i % len(sources)}.jpg"
        if not target.exists():
            with Image.open(source) as img:
                img.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(target, quality=90)
        folder = root / split / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / f"img_{i:05d}.jpg"
        if not link.exists():
            os.symlink(target, link)
        made.append(link)
    return root


def timed_loop(step, batches: int, batch_size: int, device: torch.device) -> float:
    step()  # warm-up (cuDNN autotuning, allocator)
    step()
    sync(device)
    started = time.perf_counter()
    for _ in range(batches):
        step()
    sync(device)
    return batches * batch_size / (time.perf_counter() - started)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               device: torch.device, precision: str) -> None:
    """The standard step of a hand-written loop: train mode, autocast forward, backward, step."""
    model.train()
    with autocast(device, precision):
        loss = nn.functional.cross_entropy(model(x).float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def model_alone(arch: str, device: torch.device, precision: str, batch: int, img: int,
                batches: int) -> dict[str, float]:
    model = networks.build_model(arch, 10).to(device, memory_format=torch.channels_last)
    x = torch.randn(batch, 3, img, img, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def full() -> None:
        train_step(model, opt, x, y, device, precision)

    head_opt = torch.optim.Adam(model.fc.parameters(), lr=1e-3)

    def frozen() -> None:
        networks.set_train_mode(model, backbone_frozen=True)
        with autocast(device, precision):
            with torch.no_grad():
                feats = networks.backbone_features(model, x)
            loss = loss_fn(model.fc(feats).float(), y)
        head_opt.zero_grad(set_to_none=True)
        loss.backward()
        head_opt.step()

    def infer() -> None:
        model.eval()
        with torch.inference_mode(), autocast(device, precision):
            torch.softmax(model(x).float(), dim=1)

    return {name: timed_loop(fn, batches, batch, device)
            for name, fn in (("full", full), ("frozen", frozen), ("inference", infer))}


def pil_loop(data: Path, arch: str, device: torch.device, precision: str, batch: int, img: int,
             workers: int, freeze: bool | None) -> float:
    """The standard hand-written loop; freeze None: inference over val."""
    if freeze is None:
        tf = transforms.Compose([transforms.Resize(int(img * 256 / 224)), transforms.CenterCrop(img),
                                 transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
        ds = datasets.ImageFolder(str(data / "val"), tf)
    else:
        tf = transforms.Compose([transforms.RandomResizedCrop(img), transforms.RandomHorizontalFlip(),
                                 transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
        ds = datasets.ImageFolder(str(data / "train"), tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=freeze is not None,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         drop_last=True)
    model = networks.build_model(arch, len(ds.classes)).to(device, memory_format=torch.channels_last)
    params = model.fc.parameters() if freeze else model.parameters()
    opt = torch.optim.Adam(params, lr=1e-4)
    seen, started = 0, time.perf_counter()
    warm_up = min(2, len(loader) - 1)
    for i, (x, y) in enumerate(loader):
        if i == warm_up:  # time from here
            sync(device)
            started, seen = time.perf_counter(), 0
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        if freeze is None:
            with torch.inference_mode(), autocast(device, precision):
                model.eval()
                model(x)
        else:
            train_step(model, opt, x, y, device, precision)
        seen += len(y)
    sync(device)
    return seen / (time.perf_counter() - started)


def resnext_train(data: Path, out: Path, arch: str, device: str, decode: str, batch: int, img: int,
                  epochs: int, cache: Path, **options) -> dict[str, float]:
    """In-loop images/s (train + val images over an epoch's seconds, epochs 2..) and wall time."""
    os.environ["RESNEXT_CACHE"] = str(cache)
    extraction: list[tuple[int, float]] = []  # (images, seconds) per cached part
    real_compute = features.compute_part

    def timed_compute(*args, **kwargs):
        started = time.perf_counter()
        part = real_compute(*args, **kwargs)
        images = len(part["train"]) + len(part.get("val", []))
        extraction.append((images, time.perf_counter() - started))
        return part

    features.compute_part = timed_compute
    config = TrainConfig(data=str(data), arch=arch, weights="none", device=device, decode=decode,
                         batch_size=batch, img_size=img, epochs=epochs, lr=1e-4, seed=0,
                         out=str(out), report=False, **options)
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            train(config)
    finally:
        features.compute_part = real_compute
    wall = time.perf_counter() - started
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    n = sum(1 for _ in (data / "train").rglob("*.jpg")) + sum(1 for _ in (data / "val").rglob("*.jpg"))
    later = rows[1:] or rows
    in_loop = n * len(later) / sum(float(r["seconds"]) for r in later)
    if extraction:  # the cache's rate: images through the backbone per second of extraction
        in_loop = sum(i for i, _ in extraction) / sum(s for _, s in extraction)
    return {"images_per_s": in_loop, "wall": wall}


def resnext_predict(folder: Path, checkpoint: Path, device: str, decode: str, batch: int) -> dict[str, float]:
    recorded: dict[str, float] = {}
    real_show = predict.BatchSummary.show

    def show(self, seconds: float, output: str | None) -> None:
        recorded["seconds"], recorded["n"] = seconds, sum(self.per_class.values())

    predict.BatchSummary.show = show  # type: ignore[method-assign]
    started = time.perf_counter()
    try:
        code = predict.batch_predict(BatchPredictConfig(
            data=str(folder), recursive=True, checkpoint=str(checkpoint), batch_size=batch,
            device=device, decode=decode, quiet=True))
    finally:
        predict.BatchSummary.show = real_show  # type: ignore[method-assign]
    assert code == 0
    return {"images_per_s": recorded["n"] / recorded["seconds"], "wall": time.perf_counter() - started}


def decoder_rows(folders: dict[str, Path], device: torch.device, batch: int) -> list[tuple[str, str, float]]:
    """JPEG decode alone, in batches on `device` (the drained-stream guard included), with each
    decoder installed: torchcodec (what resnext uses) and torchvision's deprecated one."""
    rows = []
    for label, folder in folders.items():
        files = sorted(folder.rglob("*.jpg"))[: 4 * batch]
        data = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]
        chunks = [data[i : i + batch] for i in range(0, len(data), batch)]
        for make in batches.JPEG_DECODERS:
            decoder = make()
            if decoder is None:
                continue
            with mock.patch.object(batches, "jpeg_decoder", lambda: decoder):
                batches.decode_jpegs(chunks[0], device)  # warm-up: the decoder's own setup
                sync(device)
                started = time.perf_counter()
                for chunk in chunks:
                    batches.decode_jpegs(chunk, device)
                sync(device)
            rows.append((label, decoder.name, len(data) / (time.perf_counter() - started)))
    return rows


def agreement(checkpoint: str, data: str, device: str) -> None:
    """Top-1 of the device decode path against Pillow's, same model, same photos (fp32)."""
    engine = load_inference_model(EvaluateConfig(checkpoint=checkpoint, device=device, precision="fp32"),
                                  announce=False)  # fmt: skip
    samples = evaluation_samples(data, engine.classes, None).samples
    results = {}
    for on_device in (False, True):
        engine.decode_on_device = on_device
        started = time.perf_counter()
        results[on_device] = (score(engine, samples, 32, None, warn=False), time.perf_counter() - started)
    pillow, tensor = results[False][0], results[True][0]
    same = sum(a.predicted == b.predicted for a, b in zip(pillow.predictions, tensor.predictions))
    print(f"{checkpoint} on {data} ({len(samples)} photos, {engine.preprocessing}, {device}):")
    print(f"  top-1 agreement {same}/{len(pillow.predictions)} = {same / len(pillow.predictions):.1%}; "
          f"accuracy Pillow {pillow.report.accuracy:.1%}, device path {tensor.report.accuracy:.1%}; "
          f"{results[False][1]:.1f} s vs {results[True][1]:.1f} s")


def allow_device_decode_on_cpu() -> None:
    """For --decode-on-cpu: the device pipeline on the CPU (what the tests exercise), so that
    every row of this script runs where there is no GPU."""
    def anywhere(requested: str, device: torch.device) -> bool:
        return requested == "gpu" or (requested == "auto" and device.type == "cuda")

    train_module.decode_on_device = anywhere
    engines.decode_on_device = anywhere


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", default=str(REPO / "data" / "sample"), help="source photos")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--count", type=int, default=8640, help="train photos (500x375)")
    parser.add_argument("--val-count", type=int, default=960)
    parser.add_argument("--large-count", type=int, default=1024, help="3000x2000 photos")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3, help="resnext train epochs (1 is warm-up)")
    parser.add_argument("--model-batches", type=int, default=30)
    parser.add_argument("--decode-on-cpu", action="store_true", help="smoke test without a GPU")
    parser.add_argument("--agreement", metavar="CHECKPOINT", help="only the decode paths' top-1 agreement")
    args = parser.parse_args()
    if args.agreement:
        return agreement(args.agreement, args.photos, args.device if torch.cuda.is_available() else "cpu")

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA device here. For a smoke test of this script without a GPU: "
                         "--device cpu --decode-on-cpu --count 64 --val-count 16 --large-count 8 "
                         "--batch-size 16 --img-size 64 --arch resnet18")
    if args.decode_on_cpu:
        allow_device_decode_on_cpu()
    precision = precision_for("auto", device)
    cores = available_cores()
    work = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    sources = list_images(args.photos, recursive=True)
    if not sources:
        raise SystemExit(f"no images in {args.photos}")
    data = work / "photos"
    make_photos(sources, data, (500, 375), args.count, 5, "train")
    make_photos(sources, data, (500, 375), args.val_count, 5, "val")
    large = make_photos(sources, work / "large", (3000, 2000), args.large_count, 5, "all") / "all"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"{name}, {cores} cores, torch {torch.__version__}, {args.arch}, {args.img_size} px, "
          f"{precision}, channels-last, batch {args.batch_size}; {args.count} train / "
          f"{args.val_count} val photos 500x375, {args.large_count} at 3000x2000", flush=True)

    alone = model_alone(args.arch, device, precision, args.batch_size, args.img_size, args.model_batches)
    rows = [(f"model alone, {k}", v, None, k) for k, v in alone.items()]
    for label, freeze in (("full", False), ("frozen", True), ("inference", None)):
        rate = pil_loop(data, args.arch, device, precision, args.batch_size, args.img_size, cores, freeze)
        rows.append((f"hand-written Pillow loop, {cores} workers, {label}", rate, None, label))
        print(f"  {rows[-1][0]}: {rate:.0f} img/s", flush=True)
    common = dict(arch=args.arch, device=args.device, batch=args.batch_size, img=args.img_size)
    runs: dict[tuple[str, str], Path] = {}
    for decode in ("cpu", "gpu"):
        for label, key, options in (("train --no-freeze", "full", {"freeze": False}),
                                    ("train (frozen)", "frozen", {"cache_features": False}),
                                    ("train --cache-features: extraction", "inference",
                                     {"cache_features": True})):
            out = runs[decode, label] = work / f"run_{decode}_{len(rows)}"
            epochs = 1 if "cache" in label else args.epochs
            m = resnext_train(data, out, decode=decode, epochs=epochs, cache=work / f"cache{len(rows)}",
                              **common, **options)
            rows.append((f"resnext {label}, --decode {decode}", m["images_per_s"], m["wall"], key))
            print(f"  {rows[-1][0]}: {m['images_per_s']:.0f} img/s, {m['wall']:.1f} s", flush=True)
        checkpoint = runs[decode, "train (frozen)"] / "best.pt"
        for label, folder in (("500x375", data / "val"), ("3000x2000", large)):
            m = resnext_predict(folder, checkpoint, args.device, decode, args.batch_size)
            rows.append((f"resnext batch-predict {label}, --decode {decode}", m["images_per_s"],
                         m["wall"], "inference"))
            print(f"  {rows[-1][0]}: {m['images_per_s']:.0f} img/s", flush=True)

    print("\n| what | images/s | x model alone | whole command s |")
    print("|---|---|---|---|")
    for label, rate, wall, key in rows:
        wall_text = f"{wall:.1f}" if wall is not None else ""
        print(f"| {label} | {rate:,.0f} | {rate / alone[key]:.2f} | {wall_text} |")
    print(f"\nJPEG decode alone on {device}, batches of {args.batch_size}\n| photos | decoder | images/s |\n|---|---|---|")
    for label, name, rate in decoder_rows({"500x375": data / "val", "3000x2000": large}, device, args.batch_size):
        print(f"| {label} | {name} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
