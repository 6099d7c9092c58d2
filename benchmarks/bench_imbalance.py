"""Class imbalance: what each `--balance` strategy does to the rare classes, on long-tailed cuts
of real data with a balanced val split, and what it costs on balanced data.

Held out honestly: first `--test-per-class` (20) images of each class are drawn out of train
as a balanced test set that neither training nor the choice of the best epoch ever sees. The
rest of train is cut to a long tail: with K classes, the class of rank i keeps
round(n_max * ratio^(-i / (K - 1))) images (at least 1; n_max = the smallest class's remaining
images), so the largest / smallest ratio is `ratio`; which class is the head and which images
are kept are drawn from the seed (the rare classes differ between seeds). val stays whole and
balanced and picks best.pt, as in any run. Ratio 1 is balanced: n_max images of every class.
The folders are made of symbolic links in a scratch folder; no image is copied.

Per dataset, architecture (the Tiny-ImageNet backbones at 64 px), ratio, seed and strategy it
trains the default recipe (frozen backbone, cached features, 4 views, 10 epochs), evaluates
best.pt on the test set with the prediction's default prior, and reports balanced accuracy,
macro-F1 and the tail recall: the mean recall of the two classes with the fewest training
images.

Strategies: the five of `--balance` (none is today's training, auto the default: on balanced
data it must equal none), plus candidates that are not flags, measured by setting
`data/balance.py`'s knobs for the run (on top of the default's: the sampler's candidates below
are blended as `sampler` is, unless they say otherwise):
  weights (effective number): Cui et al.'s (1 - beta^n) / (1 - beta) with beta 0.99 instead of
      inverse frequency;  sampler (square root): images drawn ~ n_class^-0.5 instead of 1/n_class;
  sampler (repeats share the view): on cached features, every draw of an image in an epoch gets
      the view's one feature (as before SAMPLER_FEATURE_REPEATS), not its own augmentation;
  sampler (borrowed spread): on cached features, each repeated draw moved by the within-class
      deviation of an image of another class (BORROWED_SPREAD 1); with "2 nearest classes" the
      donors are only the 2 classes whose mean is nearest (SPREAD_NEIGHBOURS 2), with "predictive
      scale" the deviation is scaled by sqrt(2 / n) for a class of n images (SPREAD_PREDICTIVE);
  sampler (tau-normalised head): the sampler's best.pt with each class's head row scaled to norm
      1 and the bias dropped (Kang et al., ICLR 2020, tau = 1: TAU_NORM 1, TAU_KEEP_BIAS False);
      "tau 0.5" / "tau 0.75": rows divided by norm^tau, the bias with them ("no bias": dropped).
  sampler (imprinted): on cached features, the head's rows start at the centred class means'
      directions, at the random rows' norm (IMPRINT 1; Qi et al. 2018, SimpleShot's centring);
      "3x norm" / "10x norm" at 3 / 10 times it (the class means weigh more against the few steps
      that follow: towards a nearest-class-mean head folded into the Linear layer),
      "not centred" Qi et al.'s raw normalised means with bias 0 (IMPRINT_CENTRED False).
  sampler (not blended): best.pt's head as trained, not blended towards the class means
      (HEAD_BLEND 0: the sampler before the fourth follow-up; `sampler` blends at k 3);
  sampler (blended to class means, k K): the sampler's best.pt with a class of n images' row and
      bias mixed with its centred class-mean row by K / (K + n) (HEAD_BLEND K; the default is 3);
  sampler (rare rows step less, k K): each step's change to a class of n images' head row scaled
      by n / (n + K) (RARE_STEP K).

    python benchmarks/bench_imbalance.py                       # flowers5 + data/sample, ~40 min
    python benchmarks/bench_imbalance.py --datasets flowers5 --archs resnet18 --ratios 1 10 --seeds 0
    python benchmarks/bench_imbalance.py --ratios 1.5 2 3 5 --strategies none logit-adjust  # threshold
    python benchmarks/bench_imbalance.py --recipe unfreeze    # --unfreeze-after 3, no cache
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from resnext_cli.commands.train import train
from resnext_cli.config import EvaluateConfig, TrainConfig
from resnext_cli.data import balance
from resnext_cli.data.folders import find_splits
from resnext_cli.model.device import cpu_has_native_bf16
from resnext_cli.model.engines import load_inference_model
from resnext_cli.outputs.evaluation import evaluation_samples, score

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
DATASETS = {"flowers5": SHARED / "data" / "flowers5", "sample": HERE.parent / "data" / "sample"}
STRATEGIES = {  # name: (--balance, knobs of data/balance.py for the run)
    "none": ("none", {}),
    "auto": ("auto", {}),
    "weights": ("weights", {}),
    "weights (effective number)": ("weights", {"EFFECTIVE_NUMBER_BETA": 0.99}),
    "sampler": ("sampler", {}),
    "sampler (square root)": ("sampler", {"SAMPLER_POWER": 0.5}),
    "sampler (repeats share the view)": ("sampler", {"SAMPLER_FEATURE_REPEATS": 0}),
    "sampler (borrowed spread)": ("sampler", {"BORROWED_SPREAD": 1.0}),
    "logit-adjust": ("logit-adjust", {}),
    "sampler (borrowed spread, 2 nearest classes)": ("sampler", {"BORROWED_SPREAD": 1.0, "SPREAD_NEIGHBOURS": 2}),
    "sampler (borrowed spread, predictive scale)": ("sampler", {"BORROWED_SPREAD": 1.0, "SPREAD_PREDICTIVE": True}),
    "sampler (tau-normalised head)": ("sampler", {"TAU_NORM": 1.0, "TAU_KEEP_BIAS": False}),
    "sampler (imprinted)": ("sampler", {"IMPRINT": 1.0}),
    "sampler (imprinted, 3x norm)": ("sampler", {"IMPRINT": 3.0}),
    "sampler (imprinted, 10x norm)": ("sampler", {"IMPRINT": 10.0}),
    "sampler (imprinted, not centred)": ("sampler", {"IMPRINT": 1.0, "IMPRINT_CENTRED": False}),
    "sampler (not blended)": ("sampler", {"HEAD_BLEND": 0.0}),  # the sampler as before the blend
    "sampler (blended to class means, k 1)": ("sampler", {"HEAD_BLEND": 1.0}),
    "sampler (blended to class means, k 10)": ("sampler", {"HEAD_BLEND": 10.0}),
    "sampler (tau 0.5)": ("sampler", {"TAU_NORM": 0.5}),
    "sampler (tau 0.5, no bias)": ("sampler", {"TAU_NORM": 0.5, "TAU_KEEP_BIAS": False}),
    "sampler (tau 0.75)": ("sampler", {"TAU_NORM": 0.75}),
    "sampler (tau 0.75, no bias)": ("sampler", {"TAU_NORM": 0.75, "TAU_KEEP_BIAS": False}),
    "sampler (rare rows step less, k 1)": ("sampler", {"RARE_STEP": 1.0}),
    "sampler (rare rows step less, k 3)": ("sampler", {"RARE_STEP": 3.0}),
}
RECIPES = {"default": {}, "plain": {"cache_features": False},
           "unfreeze": {"unfreeze_after": 3, "cache_features": False}}  # fmt: skip


def long_tail(source: Path, ratio: float, seed: int, test: int, work: Path) -> tuple[Path, Path, list[str]]:
    """A dataset folder of links (train cut to `ratio`, val as it is) and a test folder of
    `test` train images per class that the dataset does not hold; returns both and the classes
    from the most to the fewest training images."""
    splits = find_splits(source)
    train = splits["train"].classes
    rng = random.Random(seed)
    order = sorted(train)
    rng.shuffle(order)
    n_max, k = min(len(paths) for paths in train.values()) - test, len(order)
    root, test_root = work / f"{source.name}_r{ratio:g}_s{seed}", work / f"{source.name}_test_s{seed}"
    for rank, name in enumerate(order):
        paths = sorted(train[name])
        random.Random(f"{seed}-{name}").shuffle(paths)  # the test images depend on the seed alone
        keep = max(1, round(n_max * ratio ** (-rank / (k - 1))))
        _link(sorted(paths[:test]), test_root / name)
        _link(sorted(paths[test : test + keep]), root / "train" / name)
    for name, paths in splits["val"].classes.items():
        _link(paths, root / "val" / name)
    return root, test_root, order


def _link(paths: list[str], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for path in paths:
        target = folder / Path(path).name
        if not target.exists():
            target.symlink_to(Path(path).resolve())


@contextlib.contextmanager
def knobs(values: dict) -> object:
    saved = {name: getattr(balance, name) for name in values}
    for name, value in values.items():
        setattr(balance, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(balance, name, value)


def run_one(data: Path, test: Path, order: list[str], arch: str, weights: Path, seed: int, strategy: str,
            recipe: dict, out: Path, epochs: int) -> dict:
    flag, values = STRATEGIES[strategy]
    config = TrainConfig(data=str(data), arch=arch, weights=str(weights), epochs=epochs, seed=seed,
                         img_size=64, out=str(out), report=False, balance=flag, **recipe)
    started = time.perf_counter()
    with knobs(values), contextlib.redirect_stdout(io.StringIO()):
        result = train(config)
    seconds = time.perf_counter() - started
    engine = load_inference_model(EvaluateConfig(checkpoint=str(out / "best.pt")), announce=False)
    samples = evaluation_samples(str(test), engine.classes, None).samples
    evaluation = score(engine, samples, 32, None, warn=False)
    recall = {c.name: c.recall for c in evaluation.report.per_class}
    return {"acc": evaluation.report.accuracy, "balanced_acc": evaluation.report.balanced_accuracy,
            "macro_f1": evaluation.report.macro.f1, "tail_recall": statistics.mean(recall[c] for c in order[-2:]),
            "recall": [recall[c] for c in order], "best_epoch": result.best_epoch, "seconds": seconds,
            "val_acc": result.best_val_acc}  # fmt: skip


def spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def print_tables(results: dict) -> None:
    print("\n| data | arch | ratio | strategy | balanced acc % | macro-F1 % | tail recall % | acc % | "
          "Δ bal. acc vs none | train s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (data, arch, ratio), by_strategy in results.items():
        none = by_strategy.get("none")
        for strategy, runs in by_strategy.items():
            gain = ""
            if none and strategy != "none":
                pairs = zip(runs, none)  # the same seeds, in order
                gain = f"{100 * statistics.mean(r['balanced_acc'] - n['balanced_acc'] for r, n in pairs):+.1f}"
            print(f"| {data} | {arch} | {ratio:g} | {strategy} | {spread([r['balanced_acc'] for r in runs])} | "
                  f"{spread([r['macro_f1'] for r in runs])} | {spread([r['tail_recall'] for r in runs])} | "
                  f"{spread([r['acc'] for r in runs])} | {gain} | "
                  f"{statistics.mean(r['seconds'] for r in runs):.1f} |")  # fmt: skip
    print("\nRecall by training-class rank (0 = most images), mean over seeds:")
    for (data, arch, ratio), by_strategy in results.items():
        for strategy, runs in by_strategy.items():
            ranks = [statistics.mean(r["recall"][i] for r in runs) for i in range(len(runs[0]["recall"]))]
            print(f"  {data} | {arch} | {ratio:g} | {strategy}: " + " ".join(f"{100 * v:.0f}" for v in ranks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--flowers5", default=str(DATASETS["flowers5"]), help="its folder")
    parser.add_argument("--backbones", default=str(SHARED / "backbones"))
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnext50_32x4d"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[1, 10, 50])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--recipe", default="default", choices=list(RECIPES))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--test-per-class", type=int, default=20)
    parser.add_argument("--json", help="also write every run's numbers here")
    parser.add_argument("--work", help="scratch folder (default: a new one); reusing one reuses its cached "
                                       "features, which are keyed by the linked paths")  # fmt: skip
    args = parser.parse_args()
    DATASETS["flowers5"] = Path(args.flowers5)

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="issue26-imbalance-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RESNEXT_CACHE", str(work / "cache"))  # shared by the strategies of a cut
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, native bf16: {cpu_has_native_bf16()}, "
          f"torch {torch.__version__}; recipe {args.recipe}, {args.epochs} epochs at 64 px; seeds "
          f"{args.seeds}; scratch {work}", flush=True)  # fmt: skip
    runs = Path(tempfile.mkdtemp(prefix="runs-", dir=work))  # new runs, also in a reused scratch folder
    results: dict = {}
    for name in args.datasets:
        for arch in args.archs:
            weights = Path(args.backbones) / f"{arch}-tinyimagenet.pth"
            for ratio in args.ratios:
                for seed in args.seeds:
                    data, test, order = long_tail(DATASETS[name], ratio, seed, args.test_per_class,
                                                  work / "data")  # fmt: skip
                    for strategy in args.strategies:
                        out = runs / f"{name}_{arch}_r{ratio:g}_s{seed}_{list(STRATEGIES).index(strategy)}"
                        run = run_one(data, test, order, arch, weights, seed, strategy, RECIPES[args.recipe],
                                      out, args.epochs)  # fmt: skip
                        results.setdefault((name, arch, ratio), {}).setdefault(strategy, []).append(run)
                        print(f"  {name} | {arch} | ratio {ratio:g} | seed {seed} | {strategy}: balanced "
                              f"{run['balanced_acc']:.1%}, tail {run['tail_recall']:.1%} "
                              f"({run['seconds']:.1f} s)", flush=True)  # fmt: skip
    print_tables(results)
    if args.json:
        Path(args.json).write_text(json.dumps({" | ".join(map(str, k)): v for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
