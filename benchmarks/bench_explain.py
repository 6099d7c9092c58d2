"""Heatmaps (`resnext explain`): where the peaks fall, and what each method costs on the CPU.

(1) Pointing game. tests/marks.py's synthetic set: the class (red, blue, yellow) is decided only
    by a 30-px square of colour at a random place on a textured 116x104 photo (11% of the part
    the model sees); a third of the held-out photos are EXIF-turned JPEGs. resnet18 is trained
    from scratch at 96 px (4 epochs, seeds 0..N-1, as the test does), then `resnext explain`
    runs on the 60 held-out photos with each method. Per method: the share of peaks on the mark
    (strict), and within the classic pointing game's tolerance (15 px at 224, i.e. 1/15 of the
    crop's side, Zhang et al. 2016), beside chance (a random peak in the model's view).
(2) Speed of the maps alone. Seconds per image for each method on batches of 8, fp32 (as the
    maps are always computed), for resnet18 and resnext50_32x4d at 64 and 224 px, beside the
    model's forward pass alone (inference, fp32); pytorch-grad-cam's GradCAM on the same inputs
    when it is installed (the library comparison in docs/design.md).
(3) The whole command. `resnext explain DIR --recursive` on real photos (flowers5's 100 val
    photos, a resnet18 head trained on the Tiny-ImageNet backbone at 64 px): seconds per image
    with decoding, overlays and PNG files, per method.

    python benchmarks/bench_explain.py --data ../shared/data/flowers5 --backbones ../shared/backbones
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.marks, run from anywhere

from resnext_cli.cli import app  # noqa: E402
from resnext_cli.config import ExplainConfig  # noqa: E402
from resnext_cli.model.cam import activation_maps  # noqa: E402
from resnext_cli.model.engines import load_inference_model  # noqa: E402
from resnext_cli.model.networks import apply_state_dict, build_model, read_state_dict  # noqa: E402
from resnext_cli.outputs.heatmaps import explain_images  # noqa: E402
from tests.marks import chance, make_mark_dataset, pointing_game  # noqa: E402

METHODS = ("gradcam-fine", "gradcam", "occlusion", "integrated-gradients")
BLOCKS = "gradcam, cells centred in 32-px blocks"


def cli(*args: object) -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exit_code != 0:
        raise SystemExit(f"resnext {' '.join(map(str, args))} failed:\n{result.stderr}")


def tolerant(entries: list[dict], marks: dict[str, list[int]], crop_side: float) -> float:
    pad = crop_side / 15
    hits = 0
    for entry in entries:
        x0, y0, x1, y1 = marks[entry["path"]]
        x, y = entry["peak"] or (-1e9, -1e9)
        hits += x0 - pad <= x < x1 + pad and y0 - pad <= y < y1 + pad
    return hits / len(entries)


def pointing(work: Path, seeds: int) -> dict:
    rows: dict[str, list] = {m: [] for m in METHODS}
    for seed in range(seeds):
        root = work / f"marks{seed}"
        marks = make_mark_dataset(root, seed=seed)
        run = work / f"run{seed}"
        cli("train", root, "--arch", "resnet18", "--weights", "none", "--img-size", 96, "--epochs", 4,
            "--batch-size", 16, "--no-augment", "--device", "cpu", "--workers", 0, "--seed", seed,
            "--no-report", "--out", run)  # fmt: skip
        crop_side = 116 * 96 / 122  # the crop's side in photo pixels (104 -> 110 resize, 96 crop)
        for method in METHODS:
            out = work / f"{method}{seed}"
            started = time.perf_counter()
            cli("explain", root / "val", "--recursive", "--checkpoint", run / "best.pt", "--method", method,
                "--out", out, "--device", "cpu", "--workers", 0, "--batch-size", 16)  # fmt: skip
            seconds = time.perf_counter() - started
            entries = json.loads((out / "explain.json").read_text())
            rows[method].append((pointing_game(entries, marks), tolerant(entries, marks, crop_side),
                                 seconds / len(entries)))  # fmt: skip
            print(f"seed {seed} {method:22s} on the mark {rows[method][-1][0]:.1%}, within tolerance "
                  f"{rows[method][-1][1]:.1%}, {rows[method][-1][2]:.3f} s/image (whole command)", flush=True)
        blocks = rows.setdefault(BLOCKS, [])
        blocks.append(block_centred(run, marks))
        print(f"seed {seed} chance {chance(marks):.1%}; Grad-CAM with cells centred in 32-px blocks "
              f"(cv2.resize / align_corners=False) on the mark {blocks[-1][0]:.1%}", flush=True)  # fmt: skip
    return {m: {"strict": [r[0] for r in v], "tolerance": [r[1] for r in v], "s_per_image": [r[2] for r in v]}
            for m, v in rows.items()} | {"chance": chance(marks)}  # fmt: skip


def block_centred(run: Path, marks: dict[str, list[int]]) -> tuple[float, float, float]:
    """Grad-CAM's peaks if cell j were centred at 32j + 16 (the middle of its 32-px block), as
    resizing the map with cv2.resize or align_corners=False places it, instead of 32j + 0.5."""
    engine = load_inference_model(ExplainConfig(images=["-"], checkpoint=str(run / "best.pt"), device="cpu"),
                                  announce=False)  # fmt: skip
    val = [(path, None) for path in marks if "/val/" in path]
    entries = []
    for items, _ in explain_images(engine, val, "gradcam", 16, 0):
        entries += [dataclasses.replace(item, offset=16.0).record() for item in items]
    return pointing_game(entries, marks), float("nan"), float("nan")


def model(arch: str, backbones: Path | None) -> torch.nn.Module:
    net = build_model(arch, 200)
    weights = backbones / f"{arch}-tinyimagenet.pth" if backbones else None
    if weights and weights.is_file():
        apply_state_dict(net, read_state_dict(str(weights)), str(weights), log=lambda _: None)
    return net.eval()


def per_image(run, images: int, repeats: int = 3) -> float:
    run()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best / images


def speed(backbones: Path | None, archs: list[str], sizes: list[int], methods: list[str]) -> list[dict]:
    rows = []
    for arch in archs:
        net = model(arch, backbones)
        for size in sizes:
            x = torch.randn(8, 3, size, size)
            target = torch.zeros(8, dtype=torch.long)
            row = {"arch": arch, "size": size}
            with torch.inference_mode():
                row["forward"] = per_image(lambda: net(x), 8)
            for method in methods:
                repeats = 3 if method.startswith("gradcam") else 1
                row[method] = per_image(lambda: activation_maps(net, arch, x, target, method), 8, repeats)
            row["pytorch-grad-cam GradCAM"] = grad_cam_library(net, x)
            rows.append(row)
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
            print(json.dumps(shown), flush=True)
    return rows


def grad_cam_library(net: torch.nn.Module, x: torch.Tensor) -> float | None:
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        return None

    def run() -> None:
        with GradCAM(model=net, target_layers=[net.layer4]) as cam:
            cam(x, targets=[ClassifierOutputTarget(0)] * len(x))
        net.zero_grad(set_to_none=True)  # it leaves .grad on every parameter

    return per_image(run, len(x))


def whole_command(data: Path, backbones: Path, work: Path) -> dict:
    run = work / "flowers"
    cli("train", data, "--arch", "resnet18", "--weights", backbones / "resnet18-tinyimagenet.pth",
        "--img-size", 64, "--epochs", 3, "--device", "cpu", "--seed", 0, "--no-report",
        "--out", run)  # fmt: skip
    images = sorted(p for p in (data / "val").rglob("*") if p.is_file())
    rows = {}
    for method in METHODS:
        started = time.perf_counter()
        cli("explain", data / "val", "--recursive", "--checkpoint", run / "best.pt", "--method", method,
            "--out", work / f"flowers-{method}", "--device", "cpu")  # fmt: skip
        rows[method] = (time.perf_counter() - started) / len(images)
        print(f"flowers5 val ({len(images)} photos) {method:22s} {rows[method]:.3f} s/image, whole command",
              flush=True)  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--data", type=Path, help="flowers5 (train/ + val/), for (3)")
    parser.add_argument("--backbones", type=Path, help="the *-tinyimagenet.pth files, for (2) and (3)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--parts", default="pointing,speed,command")
    parser.add_argument("--archs", default="resnet18,resnext50_32x4d", help="for (2)")
    parser.add_argument("--sizes", default="64,224", help="input sizes for (2)")
    parser.add_argument("--methods", default=",".join(METHODS), help="methods for (2)")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    os.environ.setdefault("RESNEXT_CACHE", tempfile.mkdtemp(prefix="resnext-bench-explain-cache-"))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)  # fmt: skip
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="resnext-bench-explain-") as tmp:
        parts = args.parts.split(",")
        if "pointing" in parts:
            results["pointing"] = pointing(Path(tmp), args.seeds)
            for method in [*METHODS, BLOCKS]:
                p = results["pointing"][method]
                seeds = ", ".join(f"{v:.0%}" for v in p["strict"])
                print(f"{method:22s} on the mark {statistics.mean(p['strict']):.1%} (seeds: {seeds}), "
                      f"within tolerance {statistics.mean(p['tolerance']):.1%}; "
                      f"chance {results['pointing']['chance']:.1%}")  # fmt: skip
        if "speed" in parts:
            sizes = [int(s) for s in args.sizes.split(",")]
            results["speed"] = speed(args.backbones, args.archs.split(","), sizes, args.methods.split(","))
        if "command" in parts and args.data and args.backbones:
            results["command"] = whole_command(args.data, args.backbones, Path(tmp))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
