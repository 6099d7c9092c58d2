"""Cached backbone features: with a frozen backbone, push each image through it once, not once
per epoch, and train the head on the stored features.

The cache lives on disk (`$RESNEXT_CACHE`, default `~/.cache/resnext/features`), keyed by
everything that changes the features: the files (paths, sizes, mtimes), the architecture, the
weights, image size, views, precision, decoder and (where it matters) the seed. Re-running with
other head settings reuses it; touching the data makes a new one. Each entry has a .json beside
it saying what it holds; the least recently used entries go when the folder outgrows
`$RESNEXT_CACHE_MAX_GB` (default 10); `resnext cache list|clear` shows and empties it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from resnext_cli import ui
from resnext_cli.config import TrainConfig
from resnext_cli.data.folders import DatasetLayout
from resnext_cli.data.loaders import EpochSampler, ImageListDataset, image_dataset, make_loader
from resnext_cli.data.transforms import Preprocessing
from resnext_cli.files import atomic_write_text
from resnext_cli.model.checkpoint import save_torch
from resnext_cli.model.distributed import DistContext, barrier
from resnext_cli.model.networks import backbone_features
from resnext_cli.model.steps import Step, TrainTally, Validation, ValidationTally

Reporter = Callable[[list[tuple[int, str]], list[tuple[str, int]]], None]


@dataclass
class FeatureCache:
    """train: [views, N, D]; val: [M, D]; *_ok marks the images that decoded."""

    train: torch.Tensor
    train_ok: torch.Tensor
    val: torch.Tensor
    val_ok: torch.Tensor

    @property
    def views(self) -> int:
        return int(self.train.shape[0])


def cache_root() -> Path:
    return Path(os.environ.get("RESNEXT_CACHE", Path.home() / ".cache" / "resnext" / "features"))


def cache_limit_bytes() -> int:
    """The most the cache folder may hold: $RESNEXT_CACHE_MAX_GB, default 10 (GB)."""
    try:
        gigabytes = float(os.environ.get("RESNEXT_CACHE_MAX_GB", "10"))
    except ValueError:
        gigabytes = 10.0
    return int(gigabytes * 1e9)


@dataclass
class CacheEntry:
    path: Path  # <key>.pt; what it holds in <key>.json beside it
    size: int  # bytes
    last_used: float  # mtime: written or last reused
    about: dict[str, Any]


def cache_entries() -> list[CacheEntry]:
    """The cache's entries, least recently used first."""
    entries = []
    for path in cache_root().glob("*.pt"):
        try:
            stat = path.stat()
            sidecar = path.with_suffix(".json")
            about = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else {}
        except (OSError, ValueError):
            continue  # being replaced by another process, or a damaged sidecar: skip it
        entries.append(CacheEntry(path, stat.st_size, stat.st_mtime, about))
    return sorted(entries, key=lambda e: e.last_used)


def remove_entry(entry: CacheEntry) -> None:
    entry.path.unlink(missing_ok=True)
    entry.path.with_suffix(".json").unlink(missing_ok=True)


def keep_within_limit(keep: Path) -> list[CacheEntry]:
    """Remove least recently used entries (never `keep`) until the cache fits its limit."""
    entries = cache_entries()
    total, limit, removed = sum(e.size for e in entries), cache_limit_bytes(), []
    for entry in entries:
        if total <= limit:
            break
        if entry.path != keep:
            remove_entry(entry)
            total -= entry.size
            removed.append(entry)
    return removed


def cache_keys(layout: DatasetLayout, cfg: TrainConfig, preprocessing: Preprocessing,
               views: int) -> list[str]:  # fmt: skip
    """One digest per part of the cache, of what that part depends on (never the head's
    hyperparameters): view 0 (with the val features) on the files and the backbone's input; an
    augmented view also on the seed and its number. So `resnext audit`, which needs view 0,
    and training runs with more views or other seeds share what they can. The files are
    listed (and stat-ed) once for all parts."""
    files = hashlib.sha256()
    for split, samples in (("train", layout.train), ("val", layout.val)):
        for path, label in samples:
            try:
                stat = os.stat(path)
                identity = f"{stat.st_size}:{stat.st_mtime_ns}"
            except OSError:
                identity = "missing"
            files.update(f"{split}|{os.path.abspath(path)}|{identity}|{label}\n".encode())
    keys = []
    for view in range(views):
        settings = _feature_settings(cfg, preprocessing)
        if view > 0:
            settings.update(view=view, augmented_with_seed=cfg.seed)
        digest = files.copy()
        digest.update(json.dumps(settings, sort_keys=True).encode())
        keys.append(digest.hexdigest()[:32])
    return keys


def _feature_settings(cfg: TrainConfig, preprocessing: Preprocessing) -> dict[str, Any]:
    weights: Any = cfg.weights
    if cfg.weights not in ("imagenet", "none") and os.path.exists(cfg.weights):
        stat = os.stat(cfg.weights)
        weights = [os.path.abspath(cfg.weights), stat.st_size, stat.st_mtime_ns]
    return {
        "arch": cfg.arch,
        "weights": weights,
        "img_size": cfg.img_size,
        "resize_size": preprocessing.resize_size,
        "precision": cfg.precision,
        "decode": cfg.decode,  # the device path resizes a little differently from Pillow
        "seed": cfg.seed if cfg.weights == "none" else None,  # random weights depend on it
        "format": 3,
    }


def load_or_compute(
    layout: DatasetLayout, cfg: TrainConfig, preprocessing: Preprocessing,
    compute: Callable[[int], dict[str, torch.Tensor]],
) -> FeatureCache:  # fmt: skip
    """Each part read from the cache if it is there, else computed by `compute(view)` and
    stored (atomically): view 0 with the val features, then the augmented views 1..K-1."""
    views = cfg.feature_views if cfg.augment else 1  # without augmentation every view is view 0
    keys = cache_keys(layout, cfg, preprocessing, views)
    parts = [_load_or_compute_part(layout, cfg, preprocessing, view, cache_root() / f"{key}.pt", compute)
             for view, key in enumerate(keys)]  # fmt: skip
    train = torch.stack([parts[v % views]["train"] for v in range(cfg.feature_views)])
    train_ok = torch.stack([part["train_ok"] for part in parts]).all(dim=0)
    return FeatureCache(train, train_ok, parts[0]["val"], parts[0]["val_ok"])


def _load_or_compute_part(
    layout: DatasetLayout, cfg: TrainConfig, preprocessing: Preprocessing, view: int, path: Path,
    compute: Callable[[int], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:  # fmt: skip
    if path.is_file():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            os.utime(path)  # recently used: the last to go when the cache outgrows its limit
            ui.info(f"Features: reusing the cache {path}")
            return stored
        except Exception as exc:  # a damaged cache is recomputed, not fatal
            ui.warn(f"ignoring the unreadable feature cache {path}: {exc}")
    part = compute(view)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_torch(part, path)
        about = {"data": os.path.abspath(cfg.data or ""), "images": len(layout.train) + len(layout.val),
                 "view": view, **_feature_settings(cfg, preprocessing),
                 "created": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
        atomic_write_text(path.with_suffix(".json"), json.dumps(about, indent=1) + "\n")
        ui.info(f"Features: cached in {path} ({path.stat().st_size / 1e6:.1f} MB; `resnext cache "
                "list` shows the cache)")
        removed = keep_within_limit(keep=path)
        if removed:
            ui.info(f"Features: removed {len(removed)} least recently used cache entries "
                    f"({sum(e.size for e in removed) / 1e6:.0f} MB) to stay within "
                    f"{cache_limit_bytes() / 1e9:g} GB ($RESNEXT_CACHE_MAX_GB).")
    except Exception as exc:  # training goes on; only the reuse is lost
        ui.warn(f"could not store the feature cache in {path}: {exc}")
    return part


def compute_part(
    model: torch.nn.Module, layout: DatasetLayout, cfg: TrainConfig, step: Step, workers: int,
    pin_memory: bool, report_failures: Reporter, view: int,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """View 0: the deterministic val transform, with the val features. Views 1..K-1: seeded
    random augmentations (the same crops a normal run would draw for epochs 1..K-1)."""
    extractor = _Extractor(model, cfg, step, workers, pin_memory, report_failures)
    prep, on_device = step.spec.preprocessing, step.spec.decode_on_device
    dataset = image_dataset(layout.train, prep, train=view > 0, augment_seed=cfg.seed,
                            on_device=on_device)  # fmt: skip
    train, train_ok = extractor.run(dataset, view, f"features {view + 1}/{cfg.feature_views}")
    if view > 0:
        return {"train": train, "train_ok": train_ok}
    val, val_ok = extractor.run(image_dataset(layout.val, prep, on_device=on_device), 0,
                                "features val")  # fmt: skip
    return {"train": train, "train_ok": train_ok, "val": val, "val_ok": val_ok}


@dataclass
class _Extractor:
    """Runs the frozen backbone over a dataset once, in file order."""

    model: torch.nn.Module
    cfg: TrainConfig
    step: Step
    workers: int
    pin_memory: bool
    report_failures: Reporter

    def run(self, dataset: ImageListDataset, view: int, label: str) -> tuple[torch.Tensor, torch.Tensor]:
        sampler = EpochSampler(len(dataset), self.cfg.seed, shuffle=False, pad=False)
        sampler.set_epoch(view)  # keys the augmentation of this view
        loader = make_loader(dataset, batch_size=self.cfg.batch_size, workers=self.workers,
                             sampler=sampler, pin_memory=self.pin_memory)  # fmt: skip
        features = torch.zeros(len(dataset), self.model.fc.in_features)
        ok = torch.zeros(len(dataset), dtype=torch.bool)
        self.model.eval()
        with torch.inference_mode():
            for loaded in ui.progress(loader, desc=label, unit="batch"):
                batch = self.step.get(loaded)
                self.report_failures(batch.failures, dataset.samples)
                if batch.inputs is None:
                    continue
                with self.step.autocast():
                    out = backbone_features(self.model, batch.inputs).float().cpu()
                index = torch.tensor(batch.indices)
                features[index] = out
                ok[index] = True
        return features, ok


# ---------------------------------------------------------------- training on the cache


def prepare_cache(
    model: torch.nn.Module, layout: DatasetLayout, cfg: TrainConfig, step: Step, ctx: DistContext,
    pin: bool, report_failures: Reporter,
) -> FeatureCache:  # fmt: skip
    """Rank 0 computes (or finds) the cache; under torchrun the others then read it."""

    def compute(view: int) -> dict[str, torch.Tensor]:
        return compute_part(model, layout, cfg, step, cfg.workers or 0, pin, report_failures, view)

    preprocessing = step.spec.preprocessing
    cache = load_or_compute(layout, cfg, preprocessing, compute) if ctx.is_main else None
    barrier(ctx)
    if not ctx.is_main:
        cache = load_or_compute(layout, cfg, preprocessing, compute)
    assert cache is not None
    return cache


def train_head_epoch(
    model: torch.nn.Module,
    cache: FeatureCache,
    view: int,
    labels: torch.Tensor,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    step: Step,
) -> tuple[float, float]:
    """The head's epoch on cached features, in the batches the image loader would have made
    (same sampler order, batch size and drop_last; a balanced sampler's repeats included)."""
    order = [key[1] for key in loader.sampler]
    size = loader.batch_size or 1
    batches = [order[k : k + size] for k in range(0, len(order), size)]
    if loader.drop_last and batches and len(batches[-1]) < size:
        batches.pop()
    model.fc.train()
    tally = TrainTally()
    for positions in batches:
        index = torch.tensor([i for i in positions if cache.train_ok[i]], dtype=torch.long)
        if len(index) == 0:
            continue
        features = cache.train[view][index].to(step.device)
        targets = labels[index].to(step.device)
        with step.autocast():
            logits = model.fc(features)
            loss = step.criterion(logits.float(), targets)
        step.update(loss, optimizer, scheduler, scaler, average=list(model.fc.parameters()))
        tally.add(loss, logits, targets)
    return tally.result(step)


def validate_head(
    model: torch.nn.Module, cache: FeatureCache, labels: torch.Tensor, step: Step
) -> Validation:
    rank, world = (step.dist.rank, step.dist.world_size) if step.dist else (0, 1)
    index = torch.tensor(
        [i for i in range(rank, len(labels), world) if cache.val_ok[i]], dtype=torch.long
    )
    model.fc.eval()
    tally = ValidationTally(model.fc.out_features)
    if len(index):
        with torch.inference_mode(), step.autocast():
            logits = model.fc(cache.val[index].to(step.device)).float()
        targets = labels[index].to(step.device)
        tally.add(*step.scored(logits, targets), targets)
    return tally.result(step)
