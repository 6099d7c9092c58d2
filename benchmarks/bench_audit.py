"""`resnext audit` on a dataset with planted problems: precision and recall of the label errors
it reports, whether it finds every planted near-copy, and how long it takes.

From ../shared/data/flowers5 (or --data), with the shared resnext50 backbone at 64 px, per noise
level (5% and 10% of the train images): that many train images moved to another, random class
folder (seeded); 5 resized, re-encoded copies of train images put into another class; 5 such
copies of train images put into val. The images are linked, never copied or changed. Also: the
audit of the unchanged data (what is there already), and the similarity of the planted pairs
against the closest natural pairs, which is what the default --similarity is chosen from.

    python benchmarks/bench_audit.py
    python benchmarks/bench_audit.py --data DIR --weights PATH --arch resnet18

Goal (issue 20): recall >= 0.8 of the planted label flips at precision >= 0.6, and every planted
near-duplicate pair found.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from resnext_cli.commands import audit
from resnext_cli.config import AuditConfig
from resnext_cli.data.folders import discover_dataset

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"


def linked_copy(source: Path, target: Path) -> None:
    """The dataset as symlinks: planting moves links, never the user's files."""
    for path in sorted(source.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            link = target / path.relative_to(source)
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(path.resolve(), link)


def near_copy(source: Path, target: Path, rng: random.Random) -> None:
    with Image.open(source) as img:
        scale = rng.uniform(0.8, 0.95)
        size = (int(img.width * scale), int(img.height * scale))
        img.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(target, quality=rng.randint(70, 85))


def plant(root: Path, rate: float, seed: int) -> dict:
    rng = random.Random(seed)
    classes = sorted(p.name for p in (root / "train").iterdir())
    train = sorted((root / "train").rglob("*.*"))
    flipped = []
    for path in rng.sample(train, round(rate * len(train))):
        target_class = rng.choice([c for c in classes if c != path.parent.name])
        moved = root / "train" / target_class / f"flip_{path.parent.name}_{path.name}"
        path.rename(moved)
        flipped.append(str(moved))
    remaining = [p for p in sorted((root / "train").rglob("*.*")) if not p.name.startswith("flip_")]
    picked = rng.sample(remaining, 10)
    cross, leaks = [], []
    for i, path in enumerate(picked[:5]):
        other = rng.choice([c for c in classes if c != path.parent.name])
        copy = root / "train" / other / f"copy_{i}_{path.stem}.jpg"
        near_copy(path, copy, rng)
        cross.append((str(path), str(copy)))
    for i, path in enumerate(picked[5:]):
        copy = root / "val" / path.parent.name / f"leak_{i}_{path.stem}.jpg"
        near_copy(path, copy, rng)
        leaks.append((str(path), str(copy)))
    return {"flips": flipped, "cross": cross, "leaks": leaks}


def run_audit(root: Path, out: Path, args: argparse.Namespace) -> tuple[list[dict], dict, float]:
    config = AuditConfig(data=str(root), weights=args.weights, arch=args.arch, img_size=args.img_size,
                         out=str(out), seed=0, similarity=args.similarity)
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        audit.audit(config)
    seconds = time.perf_counter() - started
    rows = list(csv.DictReader((out / "audit.csv").open()))
    return rows, json.loads((out / "audit.json").read_text()), seconds


def pair_similarities(root: Path, args: argparse.Namespace, planted: dict) -> dict:
    """Centred cosine similarity of each planted pair, and of the closest natural pairs."""
    config = AuditConfig(data=str(root), weights=args.weights, arch=args.arch, img_size=args.img_size,
                         seed=0)
    layout = discover_dataset(str(root), config.val_split, config.seed)
    with contextlib.redirect_stdout(io.StringIO()):
        embedded = audit.embed(layout, config)
    index = {p: i for i, p in enumerate(embedded.paths)}
    centred = embedded.features - embedded.features.mean(0)
    unit = centred / centred.norm(dim=1, keepdim=True)
    planted_pairs = planted["cross"] + planted["leaks"]
    sims = {"planted": sorted(float(unit[index[a]] @ unit[index[b]]) for a, b in planted_pairs)}
    matrix = unit @ unit.T
    for a, b in planted_pairs:
        matrix[index[a], index[b]] = matrix[index[b], index[a]] = -1
    matrix.fill_diagonal_(-1)
    upper = matrix[torch.triu(torch.ones_like(matrix, dtype=torch.bool), diagonal=1)]
    sims["natural_top"] = sorted(upper.topk(8).values.tolist(), reverse=True)
    return sims


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "data" / "flowers5"))
    parser.add_argument("--weights", default=str(SHARED / "backbones" / "resnext50_32x4d-tinyimagenet.pth"))
    parser.add_argument("--arch", default="resnext50_32x4d")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--similarity", type=float, default=AuditConfig().similarity)
    parser.add_argument("--rates", nargs="+", type=float, default=[0.05, 0.10])
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_audit_"))
    os.environ.setdefault("RESNEXT_CACHE", str(work / "cache"))
    print(f"{args.data}, {args.arch} ({args.weights}), {args.img_size} px, similarity >= "
          f"{args.similarity}; torch {torch.__version__}, {os.cpu_count()} cores", flush=True)
    clean = work / "clean"
    linked_copy(Path(args.data), clean)
    baseline, base_summary, seconds = run_audit(clean, work / "audit_clean", args)
    natural = {r["path"].replace(str(clean), "") for r in baseline if r["issue"] == "label"}
    print(f"unchanged data: {len(natural)} label issues, {base_summary['counts']['duplicate']} "
          f"near-duplicate pairs, {base_summary['counts']['leak']} leaks, {seconds:.1f} s "
          f"({base_summary['images']} images; out-of-fold accuracy "
          f"{base_summary['out_of_fold_accuracy']:.1%})", flush=True)
    table = []
    for rate in args.rates:
        root = work / f"noisy_{rate}"
        linked_copy(Path(args.data), root)
        planted = plant(root, rate, seed=int(rate * 1000))
        rows, summary, seconds = run_audit(root, work / f"audit_{rate}", args)
        reported = {r["path"] for r in rows if r["issue"] == "label"}
        errors = set(planted["flips"]) | {copy for _, copy in planted["cross"]}
        true = reported & errors
        new = {p for p in reported if p.replace(str(root), "") not in natural}
        pairs = {(r["issue"], frozenset((r["path"], r["related_path"]))) for r in rows if r["related_path"]}
        cross_found = sum(("duplicate", frozenset(p)) in pairs for p in planted["cross"])
        leaks_found = sum(("leak", frozenset(p)) in pairs for p in planted["leaks"])
        sims = pair_similarities(root, args, planted)
        table.append({
            "rate": rate, "flips": len(planted["flips"]), "reported": len(reported),
            "recall": len(true & set(planted["flips"])) / len(planted["flips"]),
            "precision": len(true) / max(1, len(reported)),
            "precision_new": len(true & new) / max(1, len(new)),
            "cross": cross_found, "leaks": leaks_found, "seconds": seconds,
            "oof": summary["out_of_fold_accuracy"], "sims": sims,
            "duplicates": summary["counts"]["duplicate"], "leak_count": summary["counts"]["leak"],
        })  # fmt: skip
        print(f"  {rate:.0%}: {table[-1]}", flush=True)
    print("\n| label noise | flips planted | label issues reported | recall of flips | precision | "
          "precision, beyond the unchanged data's issues | cross-class copies found | train/val "
          "copies found | pairs reported (dup/leak) | out-of-fold acc | audit s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for t in table:
        print(f"| {t['rate']:.0%} | {t['flips']} | {t['reported']} | {t['recall']:.2f} | "
              f"{t['precision']:.2f} | {t['precision_new']:.2f} | {t['cross']}/5 | {t['leaks']}/5 | "
              f"{t['duplicates']}/{t['leak_count']} | {t['oof']:.1%} | {t['seconds']:.1f} |")
    for t in table:
        print(f"similarities at {t['rate']:.0%}: planted pairs {[round(s, 3) for s in t['sims']['planted']]}; "
              f"closest natural pairs {[round(s, 3) for s in t['sims']['natural_top']]}")
    shutil.rmtree(work / "cache", ignore_errors=True)


if __name__ == "__main__":
    main()
