"""What issue 24's finiteness checks cost, against the work they guard.

- Training: each step's loss is already read with `.item()`; the check adds `math.isfinite` on
  that float and `TrainTally.stop_now`. Measured against the cheapest step resnext takes, the
  head's step on cached features (a Linear layer, Adam), where a per-step overhead weighs most.
- Prediction: `engines.finite_probabilities` on a batch's probabilities, against
  `InferenceModel.probabilities` for the same batch (resnet18, 8 images).

Both sides are timed interleaved in one process (best of several rounds), so a loaded machine
slows them alike.

    python benchmarks/bench_checks.py
    python benchmarks/bench_checks.py --classes 102 --img-size 224
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Callable

import torch

from resnext_cli.data.transforms import Preprocessing
from resnext_cli.model import engines
from resnext_cli.model.distributed import DistContext
from resnext_cli.model.networks import build_model
from resnext_cli.model.steps import TrainTally


def best_time(work: Callable[[], object], repeats: int, rounds: int = 7) -> float:
    """Seconds per call, the best of `rounds` rounds of `repeats` calls."""
    best = math.inf
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeats):
            work()
        best = min(best, (time.perf_counter() - started) / repeats)
    return best


def head_step_costs(classes: int, features: int, batch: int) -> tuple[float, float]:
    head = torch.nn.Linear(features, classes)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    criterion = torch.nn.CrossEntropyLoss()
    x, y = torch.randn(batch, features), torch.randint(0, classes, (batch,))

    class Step:  # what stop_now reads
        dist = DistContext()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(head(x), y)
        loss.backward()
        optimizer.step()
        loss.item()

    tally, value = TrainTally(), 0.6931

    def check() -> None:  # the added work: a finite check of the float .item() returned
        if tally.diverged is None and not math.isfinite(value):
            tally.diverged = (value, 1)
        tally.stop_now(Step)

    return best_time(step, 300), best_time(check, 100_000)


def predict_costs(classes: int, img_size: int, batch: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = build_model("resnet18", classes).eval()
    engine = engines.InferenceModel(model, "resnet18", [str(i) for i in range(classes)],
                                    Preprocessing.classic(img_size), "bench", torch.device("cpu"))  # fmt: skip
    inputs = torch.randn(batch, 3, img_size, img_size)
    probs = engine.probabilities(inputs)
    return best_time(lambda: engine.probabilities(inputs), 3), best_time(
        lambda: engines.finite_probabilities(probs, "bench"), 10_000
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1, help="torch threads: 1 keeps a shared "
                        "machine's contention from inflating the steps (and so shrinking the share)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    step, check = head_step_costs(args.classes, 512, 16)
    print(f"train: head step on cached features (resnet18 width 512, batch 16): {step * 1e6:.1f} us; "
          f"finite check: {check * 1e6:.3f} us = {check / step:.3%} of the step")  # fmt: skip
    batch, check = predict_costs(args.classes, args.img_size, 8)
    print(f"predict: probabilities of 8 images, resnet18 at {args.img_size} px: {batch * 1e3:.1f} ms; "
          f"finite check: {check * 1e6:.1f} us = {check / batch:.4%} of the batch")  # fmt: skip


if __name__ == "__main__":
    main()
