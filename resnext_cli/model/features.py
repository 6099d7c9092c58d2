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

import contextlib
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from resnext_cli import ui
from resnext_cli.config import TrainConfig
from resnext_cli.data.balance import BorrowedSpread, feature_repeat
from resnext_cli.data.folders import DatasetLayout
from resnext_cli.data.loaders import EpochSampler, ImageListDataset, Sample, image_dataset, make_loader
from resnext_cli.data.transforms import Preprocessing
from resnext_cli.errors import UserError
from resnext_cli.files import atomic_write_text, make_folder
from resnext_cli.model.checkpoint import save_torch
from resnext_cli.model.distributed import DistContext, barrier
from resnext_cli.model.networks import backbone_features, pooled_and_spread
from resnext_cli.model.steps import Step, TrainTally, Validation, ValidationTally

Reporter = Callable[[list[tuple[int, str]], list[tuple[str, int]]], None]
Draw = tuple[int, int, int]  # (view, train image, repeat >= 1): a repeated draw's own augmentation


@dataclass
class FeatureCache:
    """train: [views, N, D]; val: [M, D]; *_ok marks the images that decoded. With the balanced
    sampler also `repeats`, [R, D]: the features of its repeated draws, row `repeat_rows[draw]`,
    and `borrowed` (`balance.BorrowedSpread`, off by default, set by train's setup), which moves each repeated draw by
    a borrowed within-class deviation. The plain view and val also keep the second stage's
    channel spread ([N, S], [M, S]): what the unknown score's `style` reads, so that calibrating
    needs no pass of its own."""

    train: torch.Tensor
    train_ok: torch.Tensor
    val: torch.Tensor
    val_ok: torch.Tensor
    repeats: torch.Tensor | None = None
    repeat_rows: dict[Draw, int] = field(default_factory=dict)
    borrowed: BorrowedSpread | None = None
    train_spread: torch.Tensor | None = None
    val_spread: torch.Tensor | None = None

    @property
    def views(self) -> int:
        return int(self.train.shape[0])

    def plain(self, split: str) -> torch.Tensor:
        """The plain view's features of "train" or "val" laid out as prediction's are (pooled,
        then the channel spread: `networks.logits_and_features`)."""
        pooled, spread = (self.train[0], self.train_spread) if split == "train" else (self.val, self.val_spread)
        return pooled if spread is None else torch.cat([pooled, spread], 1)

    def batch(self, view: int, keys: list[tuple[int, ...]]) -> torch.Tensor:
        """The features of the sampler's draws `keys` ((epoch, image[, repeat])) in `view`: a
        repeated draw's own augmentation where one was computed, else the view's feature."""
        features = self.train[view][torch.tensor([key[1] for key in keys], dtype=torch.long)]
        if self.repeats is not None:
            for k, key in enumerate(keys):
                row = self.repeat_rows.get((view, key[1], feature_repeat(key[2]))) if len(key) > 2 else None
                if row is not None:
                    features[k] = self.repeats[row]
        return features if self.borrowed is None else self.borrowed.add(features, view, keys)


def cache_root() -> Path:
    return Path(os.environ.get("RESNEXT_CACHE", Path.home() / ".cache" / "resnext" / "features"))


def cache_limit_bytes() -> int:
    """The most the cache folder may hold: $RESNEXT_CACHE_MAX_GB, default 10 (GB). A value that
    is not a size (`nan`, `inf`, `-1`, `ten`) is an error that names the variable, rather than a
    limit silently ignored or a crash when it is applied."""
    given = os.environ.get("RESNEXT_CACHE_MAX_GB", "10")
    try:
        gigabytes = float(given)
    except ValueError:
        gigabytes = math.nan
    if not (math.isfinite(gigabytes) and 0 <= gigabytes < 1e9):
        raise UserError(
            f"RESNEXT_CACHE_MAX_GB={given!r} is not a size in GB: set it to a number such as 10 "
            "(0 keeps only the entry in use), or unset it for the default of 10 GB."
        )
    return int(gigabytes * 1e9)


CACHE_FORMAT = "resnext-feature-cache/1"  # in the root's marker and in every entry's sidecar
CACHE_MARKER = "resnext-cache.json"  # in the cache root: resnext keeps its feature cache here
_ENTRY = re.compile(r"^[0-9a-f]{32}\.pt$")  # <key>.pt, the key a digest (`cache_keys`)
_TEMPORARY = re.compile(r"^\.[0-9a-f]{32}\.(pt|json)\.[A-Za-z0-9_]+\.tmp$")  # atomic_write's
STALE_TEMPORARY_SECONDS = 3600  # a temporary file this old is a killed writer's, not one at work


@dataclass
class CacheEntry:
    path: Path  # <key>.pt; what it holds in <key>.json beside it
    size: int  # bytes
    last_used: float  # mtime: written or last reused
    about: dict[str, Any]


@dataclass
class CacheContents:
    """What the cache folder holds: the entries resnext can prove it wrote (a marker in the root,
    a sidecar naming the entry and its size), temporary files of its writes, and everything else,
    which is never deleted."""

    entries: list[CacheEntry]  # least recently used first
    temporary: list[Path]
    foreign: list[Path]


def cache_contents() -> CacheContents:
    root = cache_root()
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return CacheContents([], [], [])
    except OSError as exc:
        raise UserError(f"Cannot read the feature cache {root}: {exc.strerror or exc}.") from None
    marked = is_cache_root(root)
    entries = [e for e in (owned_entry(root / n) for n in names if marked) if e is not None]
    known = {CACHE_MARKER} if marked else set()
    known |= {name for e in entries for name in (e.path.name, e.path.with_suffix(".json").name)}
    temporary = [root / n for n in names if marked and _TEMPORARY.match(n)]
    foreign = [root / n for n in names if n not in known and root / n not in temporary]
    return CacheContents(sorted(entries, key=lambda e: e.last_used), temporary, foreign)


def cache_entries() -> list[CacheEntry]:
    """The cache's entries that resnext wrote, least recently used first."""
    return cache_contents().entries


def is_cache_root(root: Path) -> bool:
    """Whether `root` carries resnext's marker (written with its first entry)."""
    try:
        marker = json.loads((root / CACHE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == CACHE_FORMAT


def owned_entry(path: Path) -> CacheEntry | None:
    """The entry at `path` if resnext provably wrote it: named `<key>.pt`, and its sidecar
    `<key>.json` says it is a resnext cache entry of that name and of that size."""
    if not _ENTRY.match(path.name):
        return None
    try:
        stat = path.stat()
        about = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # no sidecar (or one being written, or damaged): not provably ours
    owned = (isinstance(about, dict) and about.get("cache") == CACHE_FORMAT
             and about.get("entry") == path.name and about.get("bytes") == stat.st_size)  # fmt: skip
    return CacheEntry(path, stat.st_size, stat.st_mtime, about) if owned else None


def looks_like_entry(path: Path) -> bool:
    """Named like an entry (`<key>.pt`), whoever wrote it."""
    return bool(_ENTRY.match(path.name))


def remove_entry(entry: CacheEntry) -> None:
    entry.path.unlink(missing_ok=True)
    entry.path.with_suffix(".json").unlink(missing_ok=True)


def stale_temporary(contents: CacheContents) -> list[Path]:
    """Temporary files of cache writes whose process died (older than an hour)."""
    cutoff = time.time() - STALE_TEMPORARY_SECONDS
    stale = []
    for path in contents.temporary:
        with contextlib.suppress(OSError):
            if path.stat().st_mtime < cutoff:
                stale.append(path)
    return stale


def keep_within_limit(keep: Path) -> list[CacheEntry]:
    """Remove least recently used entries (never `keep`, never a file resnext did not write)
    until its entries fit the limit."""
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


def store_entry(path: Path, part: dict[str, torch.Tensor], about: dict[str, Any]) -> None:
    """`<key>.pt` and its sidecar, in a root that carries the marker; a file already at `path`
    that resnext cannot prove it wrote is left alone (UserError)."""
    make_folder(path.parent)
    if path.exists() and owned_entry(path) is None:
        raise UserError(f"{path} is there already and resnext cannot tell it wrote it; left it alone.")
    _mark_cache_root(path.parent)
    save_torch(part, path)
    _write_sidecar(path, about)


def _mark_cache_root(root: Path) -> None:
    """The root's marker, written with its first entry; a file of that name that is not
    resnext's is left alone (UserError: nothing is cached there)."""
    if is_cache_root(root):
        return
    if (root / CACHE_MARKER).exists():
        raise UserError(f"{root / CACHE_MARKER} is not resnext's marker; left it alone.")
    marker = {"format": CACHE_FORMAT, "created": time.strftime("%Y-%m-%d %H:%M"),
              "about": "resnext's feature cache. `resnext cache clear` and the size limit only ever "
                       "delete a <key>.pt whose <key>.json sidecar names it; other files are left "
                       "alone."}  # fmt: skip
    atomic_write_text(root / CACHE_MARKER, json.dumps(marker, indent=1) + "\n")


def _write_sidecar(path: Path, about: dict[str, Any]) -> None:
    sidecar = {**about, "cache": CACHE_FORMAT, "entry": path.name, "bytes": path.stat().st_size}
    atomic_write_text(path.with_suffix(".json"), json.dumps(sidecar, indent=1) + "\n")


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
            files.update(f"{split}|{os.path.abspath(path)}|{identity}|{label}\n".encode(errors="surrogateescape"))
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
        "format": 4,  # 4: the plain view keeps layer2's channel spread
    }


def load_or_compute(
    layout: DatasetLayout, cfg: TrainConfig, preprocessing: Preprocessing,
    compute: Callable[[int], dict[str, torch.Tensor]], draws: list[Draw] | None = None,
    compute_draws: Callable[[list[Draw]], dict[str, torch.Tensor]] | None = None,
) -> FeatureCache:  # fmt: skip
    """Each part read from the cache if it is there, else computed by `compute(view)` and
    stored (atomically): view 0 with the val features, then the augmented views 1..K-1, then
    the balanced sampler's repeated `draws` (by `compute_draws`)."""
    cache_limit_bytes()  # a bad $RESNEXT_CACHE_MAX_GB is said before the work, not after it
    views = cfg.feature_views if cfg.augment else 1  # without augmentation every view is view 0
    keys = cache_keys(layout, cfg, preprocessing, views)
    parts = [_load_or_compute_part(layout, cfg, preprocessing, view, cache_root() / f"{key}.pt", compute)
             for view, key in enumerate(keys)]  # fmt: skip
    train = torch.stack([parts[v % views]["train"] for v in range(cfg.feature_views)])
    train_ok = torch.stack([part["train_ok"] for part in parts]).all(dim=0)
    plain = parts[0]
    cache = FeatureCache(train, train_ok, plain["val"], plain["val_ok"], train_spread=plain["train_spread"],
                         val_spread=plain["val_spread"])  # fmt: skip
    if draws and compute_draws is not None:
        part = _load_or_compute_repeats(layout, cfg, preprocessing, keys[0], draws, compute_draws)
        cache.repeats, cache.repeat_rows = part["train"], {draw: row for row, draw in enumerate(draws)}
        cache.train_ok &= _ok_everywhere(part["train_ok"], draws, len(layout.train))
    return cache


def _ok_everywhere(ok: torch.Tensor, draws: list[Draw], images: int) -> torch.Tensor:
    """Per train image: False where one of its repeated draws failed to decode."""
    result = torch.ones(images, dtype=torch.bool)
    for row, (_, index, _) in enumerate(draws):
        result[index] &= bool(ok[row])
    return result


def _load_or_compute_repeats(
    layout: DatasetLayout, cfg: TrainConfig, preprocessing: Preprocessing, plain_key: str,
    draws: list[Draw], compute: Callable[[list[Draw]], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:  # fmt: skip
    """The repeated draws' part, keyed by the plain view's key (the files and the backbone's
    input), the seed and the draws themselves."""
    digest = hashlib.sha256(f"{plain_key}|repeats|{cfg.seed}|{draws}".encode()).hexdigest()[:32]
    path = cache_root() / f"{digest}.pt"
    about = {"data": os.path.abspath(cfg.data or ""), "view": "repeats", "images": len(draws),
             "train_images": len(layout.train), "val_images": 0, **_feature_settings(cfg, preprocessing),
             "augmented_with_seed": cfg.seed, "created": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    stored = _reuse(path, partial(_fits_rows, sizes={"train": len(draws), "train_ok": len(draws)}), about)
    if stored is not None:
        return stored
    part = compute(draws)
    _store(path, part, about)
    return part


def _load_or_compute_part(
    layout: DatasetLayout, cfg: TrainConfig, preprocessing: Preprocessing, view: int, path: Path,
    compute: Callable[[int], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:  # fmt: skip
    about = {"data": os.path.abspath(cfg.data or ""), "view": view,
             "images": len(layout.train) + (len(layout.val) if view == 0 else 0),
             "train_images": len(layout.train), "val_images": len(layout.val) if view == 0 else 0,
             **_feature_settings(cfg, preprocessing), "created": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    stored = _reuse(path, partial(_fits, layout=layout, view=view), about)
    if stored is not None:
        return stored
    part = compute(view)
    _store(path, part, about)
    return part


def _store(path: Path, part: dict[str, torch.Tensor], about: dict[str, Any]) -> None:
    """A computed part into the cache; training goes on (without the reuse) when it cannot."""
    try:
        store_entry(path, part, about)
        ui.info(f"Features: cached in {path} ({path.stat().st_size / 1e6:.1f} MB; `resnext cache "
                "list` shows the cache)")
        removed = keep_within_limit(keep=path)
        if removed:
            ui.info(f"Features: removed {len(removed)} least recently used cache entries "
                    f"({sum(e.size for e in removed) / 1e6:.0f} MB) to stay within "
                    f"{cache_limit_bytes() / 1e9:g} GB ($RESNEXT_CACHE_MAX_GB).")
    except Exception as exc:  # training goes on; only the reuse is lost
        ui.warn(f"could not store the feature cache in {path}: {exc}")


def _reuse(
    path: Path, fits: Callable[[Any], bool], about: dict[str, Any]
) -> dict[str, torch.Tensor] | None:
    """The stored part, if there is one that fits these images. An entry of an earlier resnext
    (no sidecar of this format) that fits is adopted: its digest name says it holds exactly these
    features, so it gets a sidecar and, like the others, can be cleared."""
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if not fits(stored):
            raise ValueError("it does not hold a feature vector per image")
        os.utime(path)  # recently used: the last to go when the cache outgrows its limit
        if owned_entry(path) is None:
            _adopt(path, about)
        ui.info(f"Features: reusing the cache {path}")
        return stored
    except Exception as exc:  # a damaged cache is recomputed, not fatal
        ui.warn(f"ignoring the unreadable feature cache {path}: {exc}")
        return None


def _adopt(path: Path, about: dict[str, Any]) -> None:
    """An entry of an earlier resnext (see `_reuse`) gets the marker and a sidecar, unless a
    `<key>.json` is there that is not an earlier resnext's sidecar; the entry is used either way."""
    sidecar = path.with_suffix(".json")
    try:
        earlier = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.exists() else {"arch": None}
        if isinstance(earlier, dict) and "arch" in earlier:
            _mark_cache_root(path.parent)
            _write_sidecar(path, about)
    except (OSError, ValueError, UserError):
        pass


def _fits(stored: Any, layout: DatasetLayout, view: int) -> bool:
    """A part as `compute_part` makes it, for these images: one row per train (and val) image."""
    sizes = {"train": len(layout.train), "train_ok": len(layout.train)}
    if view == 0:
        sizes.update(val=len(layout.val), val_ok=len(layout.val), train_spread=len(layout.train),
                     val_spread=len(layout.val))  # fmt: skip
    return _fits_rows(stored, sizes)


def _fits_rows(stored: Any, sizes: dict[str, int]) -> bool:
    return isinstance(stored, dict) and all(
        isinstance(stored.get(k), torch.Tensor) and stored[k].shape[:1] == (n,) for k, n in sizes.items()
    )


def compute_part(
    model: torch.nn.Module, layout: DatasetLayout, cfg: TrainConfig, step: Step, workers: int,
    pin_memory: bool, report_failures: Reporter, view: int,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """View 0: the deterministic val transform, with the val features, and for both the second
    stage's channel spread. Views 1..K-1: seeded random augmentations (the same crops a normal
    run would draw for epochs 1..K-1)."""
    extractor = _Extractor(model, cfg, step, workers, pin_memory, report_failures)
    prep, on_device = step.spec.preprocessing, step.spec.decode_on_device
    dataset = image_dataset(layout.train, prep, train=view > 0, augment_seed=cfg.seed,
                            on_device=on_device)  # fmt: skip
    train = extractor.run(dataset, view, f"features {view + 1}/{cfg.feature_views}", spread=view == 0)
    if view > 0:
        return {"train": train.features, "train_ok": train.ok}
    val = extractor.run(image_dataset(layout.val, prep, on_device=on_device), 0, "features val", spread=True)
    return {"train": train.features, "train_ok": train.ok, "val": val.features, "val_ok": val.ok,
            "train_spread": train.spread, "val_spread": val.spread}  # fmt: skip


def compute_draws(
    model: torch.nn.Module, layout: DatasetLayout, cfg: TrainConfig, step: Step, workers: int,
    pin_memory: bool, report_failures: Reporter, draws: list[Draw],
) -> dict[str, torch.Tensor]:  # fmt: skip
    """The balanced sampler's repeated draws (`ClassBalancedSampler.repeated_draws`): each
    train image augmented with the crop keyed by (seed, view, image, repeat), one row a draw."""
    extractor = _Extractor(model, cfg, step, workers, pin_memory, report_failures)
    images = image_dataset(layout.train, step.spec.preprocessing, train=True, augment_seed=cfg.seed,
                           on_device=step.spec.decode_on_device)  # fmt: skip
    drawn = extractor.run(DrawImages(images, draws), 0, f"features of {len(draws)} repeated draws")
    return {"train": drawn.features, "train_ok": drawn.ok}


class DrawImages:
    """The images of `draws`, each augmented as its (view, image, repeat) says, indexed by the
    draw's row (the `Sample`'s index too, so a batch's features land in their rows)."""

    def __init__(self, images: ImageListDataset, draws: list[Draw]) -> None:
        self.images, self.draws = images, draws
        self.samples = [images.samples[index] for _, index, _ in draws]

    def __len__(self) -> int:
        return len(self.draws)

    def __getitem__(self, key: int | tuple[int, ...]) -> Sample:
        row = key[1] if isinstance(key, tuple) else key
        return self.images[self.draws[row]]._replace(index=row)


@dataclass
class Extracted:
    features: torch.Tensor  # [N, D] pooled
    ok: torch.Tensor  # [N] decoded
    spread: torch.Tensor | None  # [N, S] the second stage's channel spread, when asked for


@dataclass
class _Extractor:
    """Runs the frozen backbone over a dataset once, in file order."""

    model: torch.nn.Module
    cfg: TrainConfig
    step: Step
    workers: int
    pin_memory: bool
    report_failures: Reporter

    def run(self, dataset: ImageListDataset | DrawImages, view: int, label: str,
            spread: bool = False) -> Extracted:  # fmt: skip
        sampler = EpochSampler(len(dataset), self.cfg.seed, shuffle=False, pad=False)
        sampler.set_epoch(view)  # keys the augmentation of this view
        loader = make_loader(dataset, batch_size=self.cfg.batch_size, workers=self.workers,
                             sampler=sampler, pin_memory=self.pin_memory)  # fmt: skip
        out = Extracted(torch.zeros(len(dataset), self.model.fc.in_features),
                        torch.zeros(len(dataset), dtype=torch.bool),
                        torch.zeros(len(dataset), _spread_width(self.model)) if spread else None)  # fmt: skip
        self.model.eval()
        with torch.inference_mode():
            for loaded in ui.progress(loader, desc=label, unit="batch"):
                batch = self.step.get(loaded)
                self.report_failures(batch.failures, dataset.samples)
                if batch.inputs is None:
                    continue
                index = torch.tensor(batch.indices)
                with self.step.autocast():
                    if out.spread is None:
                        out.features[index] = backbone_features(self.model, batch.inputs).float().cpu()
                    else:
                        pooled, spreads = pooled_and_spread(self.model, batch.inputs)
                        out.features[index], out.spread[index] = pooled.float().cpu(), spreads.cpu()
                out.ok[index] = True
        return out


def _spread_width(model: torch.nn.Module) -> int:
    """Channels of the second stage's output (its last block's last BatchNorm)."""
    norms = [m for m in model.layer2[-1].modules() if isinstance(m, torch.nn.BatchNorm2d)]
    return norms[-1].num_features


# ---------------------------------------------------------------- training on the cache


def prepare_cache(
    model: torch.nn.Module, layout: DatasetLayout, cfg: TrainConfig, step: Step, ctx: DistContext,
    pin: bool, report_failures: Reporter, draws: list[Draw] | None = None,
) -> FeatureCache:  # fmt: skip
    """Rank 0 computes (or finds) the cache; under torchrun the others then read it. `draws`:
    the balanced sampler's repeated draws, each to get its own augmentation."""
    run = (model, layout, cfg, step, cfg.workers or 0, pin, report_failures)
    compute, computed_draws = partial(compute_part, *run), partial(compute_draws, *run)
    preprocessing = step.spec.preprocessing
    load = partial(load_or_compute, layout, cfg, preprocessing, compute, draws, computed_draws)
    cache = load() if ctx.is_main else None
    barrier(ctx)
    if not ctx.is_main:
        cache = load()
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
    (same sampler order, batch size and drop_last; a balanced sampler's repeated draws each on its
    own augmentation where the cache holds one, `FeatureCache.batch`)."""
    keys = list(loader.sampler)
    size = loader.batch_size or 1
    batches = [keys[k : k + size] for k in range(0, len(keys), size)]
    if loader.drop_last and batches and len(batches[-1]) < size:
        batches.pop()
    model.fc.train()
    tally = TrainTally()
    for drawn in batches:
        drawn = [key for key in drawn if cache.train_ok[key[1]]]
        if not drawn:
            continue
        index = torch.tensor([key[1] for key in drawn], dtype=torch.long)
        features = cache.batch(view, drawn).to(step.device)
        targets = labels[index].to(step.device)
        with step.autocast():
            logits = model.fc(features)
            loss = step.criterion(logits.float(), targets)
        step.update(loss, optimizer, scheduler, scaler, average=list(model.fc.parameters()))
        tally.add(loss, logits, targets)
        if tally.stop_now(step):
            break
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
