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
    python benchmarks/bench_train.py ../shared/data/flowers5 --trackers --archs resnet18 --epochs 12 \
        --weights resnet18=../shared/backbones/resnet18-tinyimagenet.pth

--trackers measures `train --track` instead: the same run with no tracker, TensorBoard, MLflow
(a file store under the benchmark's folder) and both, interleaved, --repeats times each, for the
default recipe (`--recipes cached`: cached features, the shortest epochs, so the largest share)
and for --no-cache-features (`nocache`). Per epoch: the loop's time as training sees it (every epoch's hooks
included: checkpoints, plots, trackers), its median over the steady epochs (from the third) and
the spread over repeats; beside it, the time the tracking calls themselves take on the training
thread and on the trackers' thread, per epoch. Target: under 2% of an epoch.

Backbone weights: ImageNet weights cannot be downloaded on the development machine, so by
default every run starts from the same fixed random init (seed 0), saved once as a torchvision
state dict; --weights ARCH=PATH uses a real one. With random weights the accuracy columns only
show that nothing is broken; the speed columns do not depend on the weights.
Targets on a 2-core CPU: (c) at 10 epochs >= 5x faster than (a); (b) >= 1.2x (a); (d) >= 1.3x.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
import tutorial  # benchmarks/tutorial.py: the baseline loops

from resnext_cli.commands.train import TrainRecipe, train
from resnext_cli.config import TrainConfig
from resnext_cli.model import networks
from resnext_cli.model.device import cpu_has_native_bf16, precision_for
from resnext_cli.outputs import tracking


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


class EpochClock:
    """Each epoch's end as the training loop reaches it (`Tracking.log_epoch` is called once per
    epoch, trackers or not, after checkpoints and plots), and the time spent in the tracking
    calls: on the training thread (log_epoch) and on the trackers' thread, per call kind."""

    def __init__(self) -> None:
        self.start = 0.0
        self.ends: list[float] = []
        self.main = 0.0
        self.thread: dict[str, float] = collections.defaultdict(float)

    @contextlib.contextmanager
    def installed(self):
        def timed(kind, real):
            def call(*args, **kwargs):
                started = time.perf_counter()
                try:
                    return real(*args, **kwargs)
                finally:
                    self.thread[kind] += time.perf_counter() - started
            return call

        def train_epochs(recipe):
            self.start = time.perf_counter()
            return real_epochs(recipe)

        def log_epoch(tracked, row):
            self.ends.append(time.perf_counter())
            real_log_epoch(tracked, row)
            self.main += time.perf_counter() - self.ends[-1]

        real_epochs, real_log_epoch = TrainRecipe.train_epochs, tracking.Tracking.log_epoch
        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch.object(TrainRecipe, "train_epochs", train_epochs))
            stack.enter_context(mock.patch.object(tracking.Tracking, "log_epoch", log_epoch))
            for cls in (tracking.TensorBoardLog, tracking.MlflowLog):
                for kind in ("open", "log", "close"):
                    stack.enter_context(mock.patch.object(cls, kind, timed(kind, getattr(cls, kind))))
            yield self

    def epochs(self) -> list[float]:
        return [b - a for a, b in zip([self.start, *self.ends], self.ends)]


def tracker_overhead(args, weights: dict[str, Path], work: Path) -> None:
    """`train --track` against no tracker, same runs interleaved (see the module's docstring)."""
    os.environ["MLFLOW_TRACKING_URI"] = (work / "mlruns").as_uri()
    os.environ["RESNEXT_CACHE"] = str(work / "cache")
    epochs = max(args.epochs)
    recipes = {"cached": {"img_size": args.img_size},  # the default recipe
               "nocache": {"img_size": args.img_size, "cache_features": False}}  # --no-cache-features
    recipes = {name: recipes[name] for name in args.recipes}
    sets = {"none": None, "tensorboard": "tensorboard", "mlflow": "mlflow", "both": "tensorboard,mlflow"}
    measured: dict[tuple, list] = collections.defaultdict(list)
    for arch in args.archs:
        for recipe, options in recipes.items():
            ours(args.data, arch, weights[arch], 2, work / f"warm_{arch}_{recipe}", **options)  # the cache
            for repeat in range(args.repeats):
                for name, track in sets.items():
                    with EpochClock().installed() as clock:
                        out = work / f"{arch}_{recipe}_{name}_{repeat}"
                        whole = ours(args.data, arch, weights[arch], epochs, out, track=track, report=False,
                                     **options)  # fmt: skip
                    measured[(arch, recipe, name)].append((clock, whole["seconds"]))
                    steady = statistics.median(clock.epochs()[2:])
                    print(f"  {arch} {recipe} {name} #{repeat}: {steady:.3f} s/epoch, "
                          f"{whole['seconds']:.1f} s", flush=True)
    print_tracker_table(measured, epochs)


def print_tracker_table(measured: dict[tuple, list], epochs: int) -> None:
    print("\n| arch | recipe | trackers | s/epoch (median of epochs 3+) | vs none: median [min, max] "
          "| tracking calls per epoch: training thread / trackers' thread | share of an epoch "
          "| open / close (s, once) | whole run s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (arch, recipe, name), runs in measured.items():
        base = measured[(arch, recipe, "none")]
        steady = [statistics.median(clock.epochs()[2:]) for clock, _ in runs]
        ratios = [s / statistics.median(clock.epochs()[2:]) - 1 for s, (clock, _) in zip(steady, base)]
        main = statistics.median(clock.main / epochs for clock, _ in runs) * 1000
        thread = statistics.median(clock.thread["log"] / epochs for clock, _ in runs) * 1000
        share = (main + thread) / 1000 / statistics.median(steady)
        once = [(clock.thread["open"], clock.thread["close"]) for clock, _ in runs]
        print(f"| {arch} | {recipe} | {name} | {statistics.median(steady):.3f} "
              f"| {statistics.median(ratios):+.1%} [{min(ratios):+.1%}, {max(ratios):+.1%}] "
              f"| {main:.2f} / {thread:.2f} ms | {share:.2%} "
              f"| {statistics.median(o for o, _ in once):.2f} / {statistics.median(c for _, c in once):.2f} "
              f"| {statistics.median(w for _, w in runs):.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="DATA with train/ and val/ class folders")
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnext50_32x4d"])
    parser.add_argument("--epochs", nargs="+", type=int, default=[3, 10])
    parser.add_argument("--weights", action="append", default=[], help="ARCH=PATH")
    parser.add_argument("--trackers", action="store_true", help="measure train --track's overhead instead")
    parser.add_argument("--repeats", type=int, default=3, help="--trackers: runs of each setting")
    parser.add_argument("--img-size", type=int, default=224, help="--trackers: the crop size")
    parser.add_argument("--recipes", nargs="+", default=["cached", "nocache"], choices=["cached", "nocache"],
                        help="--trackers: the default recipe (cached features), --no-cache-features")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    given = dict(item.split("=", 1) for item in args.weights)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, native bf16: "
          f"{cpu_has_native_bf16()}, torch {torch.__version__}; resnext precision "
          f"{precision_for('auto', torch.device('cpu'))}, channels-last", flush=True)
    if args.trackers:
        weights = {arch: Path(given[arch]) for arch in args.archs}  # real backbones: --weights ARCH=PATH
        tracker_overhead(args, weights, work)
        return
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
