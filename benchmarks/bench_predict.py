"""Batch prediction throughput: model alone vs `resnext batch-predict` vs the tutorial's loop.

Measured in one process, on the same images, model weights and batch size:
  (a) model only: the network on random tensors (the ceiling for end-to-end throughput);
  (b) resnext batch-predict end to end: checkpoint load, file listing, decoding in DataLoader
      workers, model, CSV output (the same function the CLI calls);
  (c) the tutorial's batch_predict loop re-implemented faithfully: PIL decode and transforms in
      the main process, no workers, `torch.no_grad`.
on the photos as given and on the same photos upscaled to 3000x2000 JPEGs.

    python benchmarks/bench_predict.py ../shared/data/flowers5
    python benchmarks/bench_predict.py ../shared/data/flowers5 --archs resnet18 --large-count 40

A second table runs batch-predict once per precision/layout setting (fp32, fp32 channels-last,
bf16, bf16 channels-last) and with --onnx (an ONNX export on onnxruntime): images/s and top-1
agreement with the fp32 pass.

Weights are a fixed random init (seed 0), or a resnext checkpoint given with --checkpoint for
its architecture: throughput does not depend on the values, but agreement does (near-uniform
random-init probabilities make it a worst case).
Targets on a 2-core CPU: b/a >= 0.85 on the photos as given; b/c >= 1.5 on the large photos.

`--scale` runs the issue-28 rows instead, each command in its own process as a user runs it:
  1 vs 2 processes: `resnext batch-predict` alone and under `torchrun --nproc_per_node 2`
    (gloo), interleaved; whole-command seconds and the in-loop rate the command prints;
  sharding: two single-thread processes, each predicting its share at the same time, shares cut
    as contiguous halves or dealt a batch at a time (what `model.distributed.shard` does), on
    the photos as given and on a folder whose sorted order puts the large photos first;
  memory: peak RSS of one batch-predict process over 10,000 vs 100,000 tiny images (16 px,
    CSV and Parquet), which must not grow with the count beyond the file list itself.

    python benchmarks/bench_predict.py ../shared/data/flowers5 --scale --archs resnet18
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import tutorial  # benchmarks/tutorial.py: the baseline loops
from PIL import Image

from resnext_cli.commands.export import export
from resnext_cli.commands.predict import batch_predict
from resnext_cli.config import BatchPredictConfig, ExportConfig
from resnext_cli.data.batches import to_device
from resnext_cli.data.folders import list_images
from resnext_cli.data.transforms import Preprocessing
from resnext_cli.model import checkpoint as ckpt
from resnext_cli.model import networks
from resnext_cli.model.device import autocast, cpu_has_native_bf16, precision_for, prepare_model
from resnext_cli.model.distributed import DistContext, shard


def model_only(model: torch.nn.Module, n_images: int, batch_size: int, precision: str,
               channels_last: bool) -> float:
    """The network alone, with the same precision and layout batch-predict uses."""
    device = torch.device("cpu")
    prepare_model(model, device, channels_last)
    batch = to_device(torch.randn(batch_size, 3, 224, 224), device, channels_last)
    model.eval()
    with torch.inference_mode(), autocast(device, precision):
        model(batch)  # warm-up
        started = time.perf_counter()
        done = 0
        while done < n_images:
            torch.softmax(model(batch), dim=1)
            done += batch_size
    return done / (time.perf_counter() - started)


def make_large_copies(paths: list[str], folder: Path, size: tuple[int, int]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, path in enumerate(paths):
        target = folder / f"large_{i:04d}.jpg"
        with Image.open(path) as img:
            img.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(target, quality=90)
        out.append(str(target))
    return out


def predicted_classes(folder: Path, batch_size: int, workers: int, **source) -> tuple[list[str], float]:
    """One batch-predict pass: top-1 classes in file order, and images/s."""
    out = Path(tempfile.mkdtemp()) / "preds.csv"
    started = time.perf_counter()
    code = batch_predict(BatchPredictConfig(data=str(folder), batch_size=batch_size, workers=workers,
                                            output=str(out), quiet=True, device="cpu", **source))
    seconds = time.perf_counter() - started
    assert code == 0
    classes = [line.split(",")[1] for line in out.read_text().splitlines()[1:]]
    return classes, len(classes) / seconds


def agreement(a: list[str], b: list[str]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


SETTINGS = {  # name: batch-predict options; fp32 without channels-last is the reference
    "fp32": dict(precision="fp32", channels_last=False),
    "fp32 channels-last": dict(precision="fp32", channels_last=True),
    "bf16": dict(precision="bf16", channels_last=False),
    "bf16 channels-last": dict(precision="bf16", channels_last=True),
}


def numerics_rows(name: str, folder: Path, arch: str, checkpoint: Path, onnx: Path,
                  batch_size: int, workers: int, weights: str) -> list[dict]:
    """One batch-predict pass per precision/layout setting and on onnxruntime: images/s and
    top-1 agreement with the fp32 pass."""
    results = {}
    for setting, options in SETTINGS.items():
        results[setting] = predicted_classes(folder, batch_size, workers,
                                             checkpoint=str(checkpoint), **options)
    results["onnxruntime (fp32)"] = predicted_classes(folder, batch_size, workers, onnx=str(onnx))
    reference = results["fp32"][0]
    return [{"set": name, "arch": arch, "weights": weights, "setting": setting,
             "images_per_s": speed, "agree": agreement(classes, reference)}
            for setting, (classes, speed) in results.items()]


def bench_set(name: str, folder: Path, paths: list[str], arch: str, checkpoint: Path,
              batch_size: int, workers: int, repeats: int, precision: str,
              channels_last: bool) -> dict[str, float]:
    def load() -> torch.nn.Module:
        model = networks.build_model(arch, 5)
        model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
        return model

    a = model_only(load(), len(paths), batch_size, precision, channels_last)
    model = load()  # the tutorial's model: fp32, default layout
    b_runs, c_runs = [], []
    for _ in range(repeats):  # interleaved, so drift on a shared machine hits both alike
        out = Path(tempfile.mkdtemp()) / "preds.csv"
        started = time.perf_counter()
        code = batch_predict(BatchPredictConfig(data=str(folder), checkpoint=str(checkpoint),
                                                batch_size=batch_size, workers=workers,
                                                output=str(out), quiet=True, device="cpu",
                                                precision=precision, channels_last=channels_last))
        b_runs.append(len(paths) / (time.perf_counter() - started))
        assert code == 0 and sum(1 for _ in out.open()) == len(paths) + 1
        started = time.perf_counter()
        done = tutorial.batch_predict(model, paths, batch_size)
        c_runs.append(done / (time.perf_counter() - started))
    b, c = max(b_runs), max(c_runs)
    return {"set": name, "arch": arch, "images": len(paths), "a": a, "b": b, "c": c,
            "b/a": b / a, "b/c": b / c}


# ---------------------------------------------------------------- --scale (issue 28)

PREDICTED = re.compile(r"Predicted (\d+) image\(s\), \d+ unreadable, in ([\d.]+) s")


def run_cli(args: list[str], processes: int = 1, threads: int | None = None) -> dict[str, float]:
    """One `resnext batch-predict` command in its own process(es): whole-command seconds and
    the in-loop rate it prints."""
    program = [sys.executable, "-m", "resnext_cli"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
        str(processes), "-m", "resnext_cli"]  # fmt: skip
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    started = time.perf_counter()
    process = subprocess.Popen([*program, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)  # fmt: skip
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - started
    assert process.returncode == 0, stderr[-2000:]
    found = PREDICTED.search(stdout)
    assert found, stdout[-2000:]
    n, seconds = int(found[1]), float(found[2])
    return {"wall": wall, "rate": n / seconds, "n": n}


def peak_rss(args: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of one batch-predict process, from its own rusage."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen([sys.executable, "-m", "resnext_cli", *args], stdout=subprocess.DEVNULL,
                                   stderr=errors)  # fmt: skip
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        errors.seek(0)
        assert process.returncode == 0, errors.read()[-2000:]
    return usage.ru_maxrss / 1024, time.perf_counter() - started


def link_folder(paths: list[str], folder: Path) -> Path:
    folder.mkdir(parents=True)
    for path in paths:
        os.symlink(os.path.abspath(path), folder / Path(path).name)
    return folder


def sharding_rows(name: str, paths: list[str], checkpoint: Path, work: Path, batch: int,
                  repeats: int) -> list[dict]:
    """Two single-thread processes at once, each on its share: the job ends with the slower."""
    rows = []
    schemes = {
        "contiguous halves": [paths[: (len(paths) + 1) // 2], paths[(len(paths) + 1) // 2:]],
        "a batch at a time": [shard(paths, DistContext(r, 2), block=batch) for r in range(2)],
    }
    for attempt in range(repeats):  # interleaved: drift on a shared machine hits both alike
        for scheme, shares in schemes.items():
            folders = [link_folder(share, work / f"{name}-{attempt}-{scheme[:4]}-{r}") for r, share in enumerate(shares)]
            args = [["batch-predict", str(f), "--checkpoint", str(checkpoint), "--batch-size", str(batch),
                     "--quiet", "--device", "cpu"] for f in folders]  # fmt: skip
            started = time.perf_counter()
            procs = [subprocess.Popen([sys.executable, "-m", "resnext_cli", *a], stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}) for a in args]  # fmt: skip
            ends = []
            for proc in procs:
                proc.communicate()
                ends.append(time.perf_counter() - started)
                assert proc.returncode == 0
            rows.append({"set": name, "scheme": scheme, "wall": max(ends), "faster": min(ends)})
    return rows


def tiny_images(folder: Path, count: int) -> Path:
    """`count` distinct 16x16 PNGs (one picture's bytes, many names: creating them is the cost)."""
    folder.mkdir(parents=True, exist_ok=True)
    buffer = __import__("io").BytesIO()
    Image.new("RGB", (16, 16), (120, 60, 200)).save(buffer, "PNG")
    data = buffer.getvalue()
    for i in range(count):
        (folder / f"img_{i:06d}.png").write_bytes(data)
    return folder


def scale_report(args: argparse.Namespace, work: Path, flat: Path, flat_paths: list[str],
                 large_paths: list[str]) -> None:
    """The issue-28 rows: 1 vs 2 processes, sharding, memory over 10k vs 100k images."""
    arch = args.archs[0]
    checkpoint = work / f"{arch}.pt"
    random_checkpoint(arch, checkpoint, 224)
    print(f"\n1 vs 2 processes: {arch}, {len(flat_paths)} photos, batch {args.batch_size}; "
          "whole command (s) and in-loop images/s")
    print("| processes | whole command (s) | in-loop images/s |\n|---|---|---|")
    common = ["batch-predict", str(flat), "--checkpoint", str(checkpoint), "--batch-size", str(args.batch_size),
              "--quiet", "--device", "cpu"]  # fmt: skip
    runs: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    for attempt in range(args.repeats):
        for processes in (1, 2):
            out = work / f"scale-{processes}-{attempt}.csv"
            runs[processes].append(run_cli([*common, "--output", str(out)], processes))
    for processes, done in runs.items():
        print(f"| {processes} | {min(r['wall'] for r in done):.1f} | {max(r['rate'] for r in done):.1f} |")
    print(f"2 / 1 processes: whole command {min(r['wall'] for r in runs[1]) / min(r['wall'] for r in runs[2]):.2f}x, "
          f"in-loop {max(r['rate'] for r in runs[2]) / max(r['rate'] for r in runs[1]):.2f}x")

    clustered = sorted(large_paths) + sorted(flat_paths)[: len(flat_paths) - len(large_paths)]
    clustered_folder = link_folder(clustered, work / "clustered")  # large first in sorted order
    rows = sharding_rows("photos as given", flat_paths, checkpoint, work, args.batch_size, args.repeats)
    rows += sharding_rows("large photos first", list_images(clustered_folder, False), checkpoint, work,
                          args.batch_size, args.repeats)
    print("\nsharding over 2 single-thread processes: seconds until both are done (best of "
          f"{args.repeats}), and when the first was\n| photos | shares | both done (s) | first done (s) |\n|---|---|---|---|")
    for key in dict.fromkeys((r["set"], r["scheme"]) for r in rows):
        mine = [r for r in rows if (r["set"], r["scheme"]) == key]
        best = min(mine, key=lambda r: r["wall"])
        print(f"| {key[0]} | {key[1]} | {best['wall']:.1f} | {best['faster']:.1f} |")

    small = work / "tiny.pt"
    random_checkpoint("resnet18", small, 16)
    print("\nmemory: one batch-predict process, 16 px PNGs, resnet18 at 16 px, batch 64\n"
          "| images | output | peak RSS (MB) | seconds |\n|---|---|---|---|")
    for count in args.memory_counts:
        folder = tiny_images(work / f"tiny{count}", count)
        for suffix in (".csv", ".parquet"):
            rss, seconds = peak_rss(["batch-predict", str(folder), "--checkpoint", str(small), "--quiet",
                                     "--batch-size", "64", "--device", "cpu", "--output",
                                     str(work / f"tiny{count}{suffix}")])  # fmt: skip
            print(f"| {count:,} | {suffix[1:]} | {rss:.0f} | {seconds:.0f} |", flush=True)
        shutil.rmtree(folder)


def random_checkpoint(arch: str, path: Path, img_size: int) -> None:
    torch.manual_seed(0)
    model = networks.build_model(arch, 5)
    ckpt.save_torch(ckpt.build_checkpoint(
        model, arch=arch, classes=[f"c{i}" for i in range(5)],
        preprocessing=Preprocessing.classic(img_size), epoch=0, val_acc=0.0, config={},
    ), path)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a folder of photos (searched recursively)")
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnext50_32x4d"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None,
                        help="decode workers for (b); default: batch-predict's own choice")
    parser.add_argument("--large-count", type=int, default=80, help="photos to upscale")
    parser.add_argument("--large-size", default="3000x2000")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precision", default="auto", help="for (a) and (b); (c) is fp32")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--numerics-only", action="store_true",
                        help="only the precision/layout/onnxruntime table")
    parser.add_argument("--checkpoint", action="append", default=[],
                        help="a resnext checkpoint to use for its arch instead of random weights")
    parser.add_argument("--scale", action="store_true",
                        help="only the issue-28 rows: 1 vs 2 processes, sharding, memory")
    parser.add_argument("--memory-counts", type=int, nargs="+", default=[10_000, 100_000])
    args = parser.parse_args()

    photos = list_images(args.folder, recursive=True)
    if not photos:
        raise SystemExit(f"no images in {args.folder}")
    work = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    flat = work / "photos"
    flat.mkdir()
    for i, p in enumerate(photos):  # one flat folder, as batch-predict and the tutorial read it
        os.symlink(os.path.abspath(p), flat / f"photo_{i:04d}{Path(p).suffix.lower()}")
    flat_paths = list_images(flat, recursive=False)
    width, height = (int(v) for v in args.large_size.split("x"))
    large = work / "large"
    large_paths = make_large_copies(flat_paths[: args.large_count], large, (width, height))

    if args.scale:
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}")
        scale_report(args, work, flat, flat_paths, large_paths)
        return
    precision = precision_for(args.precision, torch.device("cpu"))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"native bf16: {cpu_has_native_bf16()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; batch {args.batch_size}, decode workers: "
          f"{'batch-predict default' if args.workers is None else args.workers}; (a),(b): {precision}{', channels-last' if args.channels_last else ''}")
    given = {ckpt.load_checkpoint(p)["arch"]: Path(p) for p in args.checkpoint}
    rows, numerics = [], []
    for arch in args.archs:
        checkpoint = given.get(arch) or work / f"{arch}.pt"
        if arch not in given:
            torch.manual_seed(0)
            model = networks.build_model(arch, 5)
            ckpt.save_torch(ckpt.build_checkpoint(
                model, arch=arch, classes=[f"c{i}" for i in range(5)],
                preprocessing=Preprocessing.classic(224), epoch=0, val_acc=0.0,
                config={},
            ), checkpoint)
        onnx = export(ExportConfig(checkpoint=str(checkpoint), dynamic_batch=True,
                                   out=str(work / f"{arch}_onnx")))
        weights = f"trained ({checkpoint})" if arch in given else "random init"
        for name, folder, paths in (("224px", flat, flat_paths),
                                    (f"{width}x{height}", large, large_paths)):
            if not args.numerics_only:
                rows.append(bench_set(name, folder, paths, arch, checkpoint, args.batch_size,
                                      args.workers, args.repeats, precision, args.channels_last))
            numerics += numerics_rows(name, folder, arch, checkpoint, onnx, args.batch_size,
                                      args.workers, weights)
            print(f"  done {arch} {name}", flush=True)

    header = f"| {'arch':16} | {'photos':9} | {'n':>4} | {'(a) model':>9} | {'(b) resnext':>11} | " \
             f"{'(c) tutorial':>12} | {'b/a':>5} | {'b/c':>5} |"
    print("\nimages/s (higher is better)\n" + header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        print(f"| {r['arch']:16} | {r['set']:9} | {r['images']:>4} | {r['a']:9.1f} | {r['b']:11.1f} | "
              f"{r['c']:12.1f} | {r['b/a']:5.2f} | {r['b/c']:5.2f} |")
    print("\nbatch-predict per setting: images/s (one pass) and top-1 agreement with fp32\n"
          "| arch | photos | setting | images/s | top-1 = fp32 |\n|---|---|---|---|---|")
    for r in numerics:
        print(f"| {r['arch']} | {r['set']} | {r['setting']} | {r['images_per_s']:.1f} | "
              f"{r['agree']:.1%} |")
    print(f"\nweights: {', '.join(sorted({r['arch'] + ': ' + r['weights'] for r in numerics}))}")


if __name__ == "__main__":
    main()
