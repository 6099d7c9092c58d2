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
  sharding: `torchrun --nproc_per_node 2 batch-predict` with the images dealt out a batch at a
    time (resnext's `model.distributed.shard`) or cut into contiguous halves
    (benchmarks/contiguous_shards.py), on the photos as given and on a folder whose sorted order
    puts the 3000x2000 copies first;
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


def run_cli(args: list[str], processes: int = 1, threads: int | None = None,
            script: str | None = None) -> dict[str, float]:
    """One `resnext batch-predict` command in its own process(es) (under torchrun when more than
    one; `script` instead of `-m resnext_cli`): whole-command seconds and the in-loop rate it
    prints."""
    entry = [script] if script else ["-m", "resnext_cli"]
    program = [sys.executable, *entry] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
        str(processes), *entry]  # fmt: skip
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


def sharding_rows(name: str, folder: Path, checkpoint: Path, batch: int, repeats: int) -> list[dict]:
    """`torchrun --nproc_per_node 2 batch-predict` with the images dealt out a batch at a time
    (resnext) and cut into contiguous halves (benchmarks/contiguous_shards.py), interleaved."""
    rows = []
    args = ["batch-predict", str(folder), "--checkpoint", str(checkpoint), "--batch-size", str(batch),
            "--quiet", "--device", "cpu"]  # fmt: skip
    schemes = {"a batch at a time": None, "contiguous halves": str(Path(__file__).with_name("contiguous_shards.py"))}
    for attempt in range(repeats):  # interleaved: drift on a shared machine hits both alike
        for scheme, script in schemes.items():
            out = folder.parent / f"shard-{folder.name}-{attempt}-{scheme[:4]}.csv"  # one per set: no --overwrite
            done = run_cli([*args, "--output", str(out)], processes=2, script=script)
            rows.append({"set": name, "scheme": scheme, **done})
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
    args.scale = args.scale or ["processes", "sharding", "memory"]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} (others' work too), torch {torch.__version__}")
    checkpoint = work / f"{args.archs[0]}.pt"
    random_checkpoint(args.archs[0], checkpoint, 224)
    if "processes" in args.scale:
        processes_rows(args, work, flat, len(flat_paths), checkpoint)
    if "sharding" in args.scale:
        clustered = [f"a_{Path(p).name}" for p in large_paths] + [Path(p).name for p in flat_paths[len(large_paths):]]
        clustered_folder = work / "clustered"  # the large photos first in sorted order
        clustered_folder.mkdir()
        for name, source in zip(clustered, large_paths + flat_paths[len(large_paths):]):
            os.symlink(os.path.abspath(source), clustered_folder / name)
        rows = sharding_rows("photos as given", flat, checkpoint, args.batch_size, args.repeats)
        rows += sharding_rows(f"{len(large_paths)} of them 3000x2000, sorted first", clustered_folder,
                              checkpoint, args.batch_size, args.repeats)  # fmt: skip
        print(f"\nsharding: torchrun, 2 gloo processes, {args.archs[0]}, 224 px, batch {args.batch_size}; best "
              f"of {args.repeats}\n| photos | shares | whole command (s) | in-loop images/s |\n|---|---|---|---|")
        for key in dict.fromkeys((r["set"], r["scheme"]) for r in rows):
            mine = [r for r in rows if (r["set"], r["scheme"]) == key]
            print(f"| {key[0]} | {key[1]} | {min(r['wall'] for r in mine):.1f} | "
                  f"{max(r['rate'] for r in mine):.1f} |")
    if "memory" in args.scale:
        memory_rows(args.memory_counts, work)


def processes_rows(args: argparse.Namespace, work: Path, flat: Path, count: int, checkpoint: Path) -> None:
    """batch-predict alone (torch's default threads, and one thread) and under torchrun with 2
    processes (one thread each, as torchrun sets), interleaved."""
    print(f"\n1 vs 2 processes: {args.archs[0]}, {count} photos, batch {args.batch_size}; best of "
          f"{args.repeats}\n| command | whole command (s) | in-loop images/s |\n|---|---|---|")
    common = ["batch-predict", str(flat), "--checkpoint", str(checkpoint), "--batch-size", str(args.batch_size),
              "--quiet", "--device", "cpu"]  # fmt: skip
    setups = {"1 process": (1, None), "1 process, 1 thread": (1, 1), "torchrun, 2 processes": (2, None)}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in setups}
    for attempt in range(args.repeats):
        for name, (processes, threads) in setups.items():
            out = work / f"scale-{processes}-{threads}-{attempt}.csv"
            runs[name].append(run_cli([*common, "--output", str(out)], processes, threads))
    best = {name: (min(r["wall"] for r in done), max(r["rate"] for r in done)) for name, done in runs.items()}
    for name, (wall, rate) in best.items():
        print(f"| {name} | {wall:.1f} | {rate:.1f} |")
    one, two = best["1 process"], best["torchrun, 2 processes"]
    print(f"2 processes / 1: whole command {one[0] / two[0]:.2f}x, in-loop {two[1] / one[1]:.2f}x")


def memory_rows(counts: list[int], work: Path) -> None:
    small = work / "tiny.pt"
    random_checkpoint("resnet18", small, 16)
    print("\nmemory: one batch-predict process, 16 px PNGs, resnet18 at 16 px, batch 64\n"
          "| images | output | peak RSS (MB) | seconds |\n|---|---|---|---|")
    for count in counts:
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
    parser.add_argument("--scale", nargs="*", choices=["processes", "sharding", "memory"],
                        help="only the issue-28 rows (all three when none is named)")
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

    if args.scale is not None:
        return scale_report(args, work, flat, flat_paths, large_paths)
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
