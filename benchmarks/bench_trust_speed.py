"""batch-predict throughput with calibration and the unknown score against the code before them:
issue 25's "within 5% of today's".

Runs `python -m resnext_cli batch-predict` as separate processes, interleaved so that the drift
of a shared machine hits each alike: (before) a checkout of the code before issue 25 (given with
--baseline, e.g. the main branch) on the same checkpoint, which it reads without the new keys;
(after) this checkout, calibrated probabilities and unknown score (the default); (raw) this
checkout with --no-calibration. Each on the same photos, batch size and defaults. Reported: the
in-loop rate batch-predict prints (images/s from the first batch to the last, checkpoint load
excluded) and the whole command's wall time, best of --repeats.

--bank N also runs a copy of each checkpoint whose kNN bank is padded with random normalised
rows to N (BANK_LIMIT, 8192, is the most a training set of any size keeps): the cost of the
largest bank.

    python benchmarks/bench_trust_speed.py PHOTOS --baseline ../main --checkpoint runs/x/best.pt
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RATE = re.compile(r"Predicted (\d+) image\(s\), \d+ unreadable, in ([\d.]+) s")


def padded_bank(checkpoint: Path, rows: int, out: Path) -> Path:
    """A copy of the checkpoint whose feature bank holds `rows` rows (random, normalised)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    stats = state["unknown"]["stats"]
    key = "cbank" if "cbank" in stats else "bank"
    bank = stats[key].float()
    extra = torch.nn.functional.normalize(torch.randn(rows - len(bank), bank.shape[1]), dim=1)
    stats[key] = torch.cat([bank, extra]).half()
    torch.save(state, out)
    return out


def run(code: Path, photos: str, checkpoint: Path, flags: list[str], batch: int) -> tuple[float, float]:
    """(in-loop images/s, whole command seconds) of one batch-predict process."""
    out = Path(tempfile.mkdtemp(prefix="issue25-speed-")) / "preds.csv"
    env = dict(os.environ, PYTHONPATH=str(code))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "resnext_cli", "batch-predict", photos, "--recursive",
                           "--checkpoint", str(checkpoint), "--batch-size", str(batch), "--quiet",
                           "--output", str(out), *flags], env=env, capture_output=True, text=True)  # fmt: skip
    seconds = time.perf_counter() - started
    match = RATE.search(done.stdout)
    if done.returncode != 0 or match is None:
        raise SystemExit(f"batch-predict failed ({code}): {done.stderr[-2000:]}")
    return int(match.group(1)) / float(match.group(2)), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", help="a folder of photos (searched recursively)")
    parser.add_argument("--baseline", required=True, help="a checkout of the code before issue 25")
    parser.add_argument("--checkpoint", action="append", required=True, help="a calibrated best.pt")
    parser.add_argument("--bank", type=int, default=0, help="also with the kNN bank padded to N rows")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="issue25-speed-"))
    checkpoints = [Path(p) for p in args.checkpoint]
    if args.bank:
        checkpoints += [padded_bank(p, args.bank, work / f"{i}_bank{args.bank}.pt") for i, p in enumerate(checkpoints)]
    ours = HERE.parent
    variants = {"before": (Path(args.baseline), []), "after": (ours, []), "raw": (ours, ["--no-calibration"])}
    print(f"{os.cpu_count()} cores, torch {torch.__version__}; batch {args.batch_size}; best of {args.repeats}")
    print("| checkpoint | arch | bank rows | before img/s | after img/s | raw img/s | after / before | "
          "before s | after s |\n|---|---|---|---|---|---|---|---|---|")
    for checkpoint in checkpoints:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        stats = state["unknown"]["stats"]
        rows = len(stats.get("cbank", stats.get("bank", torch.zeros(0))))
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, (code, flags) in variants.items():
                results[name].append(run(code, args.photos, checkpoint, flags, args.batch_size))
        rate = {name: max(r for r, _ in runs) for name, runs in results.items()}
        wall = {name: min(s for _, s in runs) for name, runs in results.items()}
        print(f"| {checkpoint.parent.name}/{checkpoint.name} | {state['arch']} | {rows} | {rate['before']:.1f} | {rate['after']:.1f} | "
              f"{rate['raw']:.1f} | {rate['after'] / rate['before']:.3f} | {wall['before']:.1f} | "
              f"{wall['after']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
