"""Recipes measured with real pretrained backbones: accuracy (mean and spread over seeds) and
wall time of each way to train, on the same data from the same weights.

The backbones in ../shared/backbones were pretrained on Tiny-ImageNet at 64 px, so every run is
at --img-size 64. Per architecture and seed, 10 epochs each:
  tutorial loop: the classic train.py (net.train() every epoch with a frozen backbone, so its
      BatchNorm statistics drift; Adam 1e-4 as the tutorial has it);
  frozen: `resnext train` frozen, no cache;  cached x1 / cached x4: --cache-features with 1 and
      with 4 views (the cache built inside the timed run);
  unfreeze-after 3, BN train / BN frozen: head first, then the whole network at lr x0.1, with the
      backbone's BatchNorm statistics moving (train mode) or kept as loaded (--freeze-bn);
  no-freeze, BN train / BN frozen: the whole network from the first step.
Then test-time augmentation (mirror) on each frozen and unfreeze-after run's best.pt: the
accuracy with and without, and the time of each evaluation. resnext runs use --no-report, so
their wall time is training alone.

    python benchmarks/bench_accuracy.py                      # flowers5, both backbones, ~40 min
    python benchmarks/bench_accuracy.py --data DIR --archs resnet18 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import tutorial  # benchmarks/tutorial.py: the baseline loops

from resnext_cli.commands.train import train
from resnext_cli.config import EvaluateConfig, TrainConfig
from resnext_cli.model import networks
from resnext_cli.model.device import cpu_has_native_bf16
from resnext_cli.model.engines import load_inference_model
from resnext_cli.outputs.evaluation import evaluation_samples, score

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"

RECIPES = {  # name: TrainConfig options (None: the tutorial loop)
    "tutorial loop (frozen, net.train(), Adam 1e-4)": None,
    "frozen (no cache)": dict(cache_features=False),
    "--cache-features, 1 view": dict(cache_features=True, feature_views=1),
    "--cache-features, 4 views": dict(cache_features=True, feature_views=4),
    "--unfreeze-after 3, BN train": dict(unfreeze_after=3, freeze_bn=False, cache_features=False),
    "--unfreeze-after 3, BN frozen": dict(unfreeze_after=3, freeze_bn=True, cache_features=False),
    "--no-freeze, BN train": dict(freeze=False, freeze_bn=False),
    "--no-freeze, BN frozen": dict(freeze=False, freeze_bn=True),
}
TTA_RECIPES = ("frozen (no cache)", "--unfreeze-after 3, BN frozen", "--unfreeze-after 3, BN train")


def run_resnext(data: str, arch: str, weights: Path, seed: int, epochs: int, img_size: int,
                out: Path, options: dict) -> dict:
    os.environ["RESNEXT_CACHE"] = str(out.parent / f"cache_{out.name}")  # cold: built in the run
    config = TrainConfig(data=data, arch=arch, weights=str(weights), epochs=epochs, seed=seed,
                         img_size=img_size, out=str(out), report=False, **options)
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        result = train(config)
    seconds = time.perf_counter() - started
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    return {"acc": result.best_val_acc, "seconds": seconds, "checkpoint": str(out / "best.pt"),
            "train_loss": [float(r["train_loss"]) for r in rows]}


def run_tutorial(data: str, arch: str, weights: Path, seed: int, epochs: int, img_size: int) -> dict:
    torch.manual_seed(seed)
    net = networks.build_model(arch, 200)
    net.load_state_dict({k: v.float() for k, v in torch.load(weights, weights_only=True).items()})
    m = tutorial.train(net, data, epochs, freeze=True, lr=1e-4, img_size=img_size)
    return {"acc": m["best_val_acc"], "seconds": m["seconds"]}


def tta_gain(checkpoint: str, data: str) -> dict:
    """Accuracy and evaluation time of best.pt on the val split, without and with mirror TTA."""
    engine = load_inference_model(EvaluateConfig(checkpoint=checkpoint), announce=False)
    samples = evaluation_samples(data, engine.classes, None).samples
    measured = {}
    for tta in (False, True):
        engine.tta = tta
        started = time.perf_counter()
        evaluation = score(engine, samples, 16, None, warn=False)
        measured[tta] = (evaluation.report.accuracy, time.perf_counter() - started)
    return {"acc": measured[False][0], "acc_tta": measured[True][0],
            "seconds": measured[False][1], "seconds_tta": measured[True][1]}


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * sd:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "data" / "flowers5"))
    parser.add_argument("--backbones", default=str(SHARED / "backbones"))
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnext50_32x4d"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--json", help="also write every run's numbers here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_accuracy_"))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, native bf16: "
          f"{cpu_has_native_bf16()}, torch {torch.__version__}; data {args.data}; "
          f"{args.epochs} epochs at {args.img_size} px; seeds {args.seeds}", flush=True)
    results: dict = {}
    for arch in args.archs:
        weights = Path(args.backbones) / f"{arch}-tinyimagenet.pth"
        for name in args.recipes:
            for seed in args.seeds:
                options = RECIPES[name]
                if options is None:
                    run = run_tutorial(args.data, arch, weights, seed, args.epochs, args.img_size)
                else:
                    out = work / f"{arch}_{list(RECIPES).index(name)}_{seed}"
                    run = run_resnext(args.data, arch, weights, seed, args.epochs, args.img_size,
                                      out, options)
                    if name in TTA_RECIPES:
                        run["tta"] = tta_gain(run["checkpoint"], args.data)
                results.setdefault(arch, {}).setdefault(name, []).append(run)
                print(f"  {arch} | {name} | seed {seed}: {run['acc']:.1%} in {run['seconds']:.1f} s",
                      flush=True)

    print("\n| arch | recipe | best val acc % (mean ± sd) | seeds | wall s (mean) |")
    print("|---|---|---|---|---|")
    for arch, by_recipe in results.items():
        for name, runs in by_recipe.items():
            print(f"| {arch} | {name} | {spread([r['acc'] for r in runs])} | {len(runs)} | "
                  f"{statistics.mean(r['seconds'] for r in runs):.1f} |")
    print("\nTest-time augmentation (mirror) on best.pt, val split:")
    print("| arch | recipe | acc % | acc % with --tta | gain (points) | eval s | eval s with --tta |")
    print("|---|---|---|---|---|---|---|")
    for arch, by_recipe in results.items():
        for name, runs in by_recipe.items():
            tta = [r["tta"] for r in runs if "tta" in r]
            if tta:
                gain = statistics.mean(t["acc_tta"] - t["acc"] for t in tta)
                print(f"| {arch} | {name} | {spread([t['acc'] for t in tta])} | "
                      f"{spread([t['acc_tta'] for t in tta])} | {100 * gain:+.1f} | "
                      f"{statistics.mean(t['seconds'] for t in tta):.2f} | "
                      f"{statistics.mean(t['seconds_tta'] for t in tta):.2f} |")
    unfreeze = [n for n in RECIPES if n.startswith("--unfreeze-after")]
    print("\nTraining loss around the unfreezing (epochs 3 -> 4 -> 5, mean over seeds):")
    for arch, by_recipe in results.items():
        for name in unfreeze:
            if name in by_recipe and args.epochs >= 5:
                losses = [statistics.mean(r["train_loss"][e] for r in by_recipe[name]) for e in (2, 3, 4)]
                print(f"  {arch} | {name}: " + " -> ".join(f"{v:.3f}" for v in losses))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
