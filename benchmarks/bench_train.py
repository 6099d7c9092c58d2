"""Training speed and accuracy: `resnext train` against the tutorial's training loop.

One run, same data (a DATA/train + DATA/val folder), same backbone weights, per architecture
and per epoch count:
  (a) the tutorial loop, frozen backbone (requires_grad=False, but net.train() every epoch),
      Adam 1e-3, batch 16, RandomResizedCrop + flip, validation each epoch;
  (b) `resnext train` frozen, --no-cache-features (batch 16, Adam 1e-3);
  (c) `resnext train --cache-features --feature-views 1`, cold: the feature cache is computed
      inside the timed run; (c') the same rerun with other head settings (lr 3e-3), reusing it;
  (d) full fine-tuning: the tutorial loop without freezing vs `resnext train --no-freeze` at
      the default (best measured) precision.
The resnext runs are `train` at its defaults, so their wall time includes the per-epoch
plots and the end-of-run evaluation of best.pt with report.html.
Each row: wall time, train images/s (train images x epochs / wall time, so validation and
feature extraction count against it) and best val accuracy, with the ratio of time to its
tutorial baseline.

    python benchmarks/bench_train.py ../shared/data/flowers5
    python benchmarks/bench_train.py ../shared/data/flowers5 --archs resnet18 --epochs 3

Backbone weights: ImageNet weights cannot be downloaded on the development machine, so by
default every run starts from the same fixed random init (seed 0), saved once as a torchvision
state dict; --weights ARCH=PATH uses a real one. With random weights the accuracy columns only
show that nothing is broken; the speed columns do not depend on the weights.
Targets on a 2-core CPU: (c) at 10 epochs >= 5x faster than (a); (b) >= 1.2x (a); (d) >= 1.3x.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import tutorial  # benchmarks/tutorial.py: the baseline loops

from resnext_cli.commands.train import train
from resnext_cli.config import TrainConfig
from resnext_cli.model import networks
from resnext_cli.model.device import cpu_has_native_bf16, precision_for


def ours(data: str, arch: str, weights: Path, epochs: int, out: Path, cache: Path | None = None,
         **options) -> dict:
    if cache is not None:
        os.environ["RESNEXT_CACHE"] = str(cache)
    settings = dict(data=data, arch=arch, weights=str(weights), epochs=epochs, batch_size=16,
                    lr=1e-3, seed=0, out=str(out))
    config = TrainConfig(**{**settings, **options})
    started = time.perf_counter()
    result = train(config)
    seconds = time.perf_counter() - started
    n_train = sum(1 for _ in Path(data, "train").rglob("*.*"))
    return {"seconds": seconds, "images_per_s": n_train * epochs / seconds,
            "best_val_acc": result.best_val_acc}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="DATA with train/ and val/ class folders")
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnext50_32x4d"])
    parser.add_argument("--epochs", nargs="+", type=int, default=[3, 10])
    parser.add_argument("--weights", action="append", default=[], help="ARCH=PATH")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    given = dict(item.split("=", 1) for item in args.weights)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, native bf16: "
          f"{cpu_has_native_bf16()}, torch {torch.__version__}; resnext precision "
          f"{precision_for('auto', torch.device('cpu'))}, channels-last", flush=True)
    rows = []
    for arch in args.archs:
        if arch in given:
            weights, source = Path(given[arch]), given[arch]
        else:
            torch.manual_seed(0)
            weights, source = work / f"{arch}_init.pth", "fixed random init (seed 0)"
            torch.save(networks.build_model(arch, 1000).state_dict(), weights)

        def tutorial_net() -> torch.nn.Module:
            net = networks.build_model(arch, 1000)
            net.load_state_dict(torch.load(weights, weights_only=True))
            return net

        for epochs in args.epochs:
            cache = work / f"cache_{arch}_{epochs}"  # a new, empty cache for each (c)
            runs = {
                "(a) tutorial, frozen": lambda: tutorial.train(tutorial_net(), args.data, epochs, freeze=True),
                "(b) resnext frozen": lambda: ours(args.data, arch, weights, epochs, work / f"{arch}{epochs}b",
                                                   cache_features=False),
                "(c) resnext --cache-features": lambda: ours(
                    args.data, arch, weights, epochs, work / f"{arch}{epochs}c", cache, cache_features=True,
                    feature_views=1),
                "(c') same, cache reused": lambda: ours(
                    args.data, arch, weights, epochs, work / f"{arch}{epochs}c2", cache, cache_features=True,
                    feature_views=1, lr=3e-3),
                "(d) tutorial, full fine-tune": lambda: tutorial.train(tutorial_net(), args.data, epochs, freeze=False),
                "(d) resnext --no-freeze": lambda: ours(
                    args.data, arch, weights, epochs, work / f"{arch}{epochs}d", freeze=False),
            }
            measured = {}
            for name, run in runs.items():
                torch.manual_seed(0)
                measured[name] = run()
                print(f"  {arch} {epochs} epochs {name}: {measured[name]['seconds']:.1f} s", flush=True)
            for name, m in measured.items():
                baseline = measured["(d) tutorial, full fine-tune" if name.startswith("(d)")
                                    else "(a) tutorial, frozen"]
                rows.append({"arch": arch, "epochs": epochs, "run": name, "weights": source, **m,
                             "speedup": baseline["seconds"] / m["seconds"]})

    print("\n| arch | epochs | run | wall s | train img/s | best val acc | speed-up vs tutorial |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['epochs']} | {r['run']} | {r['seconds']:.1f} | "
              f"{r['images_per_s']:.1f} | {r['best_val_acc']:.1%} | {r['speedup']:.2f}x |")
    print(f"\nweights: {', '.join(sorted({r['arch'] + ': ' + r['weights'] for r in rows}))}")


if __name__ == "__main__":
    main()
