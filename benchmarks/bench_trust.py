"""Calibration and unknown detection, measured on photos held out honestly: which unknown score
to ship, and whether the shipped one meets issue 25's goals.

Known and unknown classes. flowers5 has 5 species; each split trains `resnext train` (the
defaults: frozen backbone, 4 cached views, 10 epochs; --img-size 64 with the shared
Tiny-ImageNet backbones) on 3 of them and keeps the other 2 as *near* unknowns (other species
of the same kind). Of each known class's 60 train photos, 45 train and 15 are the val split (a
seeded draw per split): the temperature, the score's standardisation and its threshold are
fitted on those 15 x 3, as `train` does at its end. The known test photos are flowers5's own
val folder of the 3 classes (20 each), minus any that is a near-copy of a training photo (a
32x32 grey thumbnail correlating >= 0.95: flowers5 has such leaks). Near unknowns: all 160
photos of the other 2 species.

Far unknowns (made here, the same for every split; none of them is a flower photo):
  photos: 40 random crops (10-60% of the area) of each real non-flower photo this machine has:
      matplotlib's grace_hopper.jpg (a portrait), scikit-learn's china.jpg (a temple) and, if
      present, a photo of a pier under clouds; `--photos DIR` adds more;
  textures: 120 generated images: smooth colour fields, stripes, checkerboards, shapes;
  drawings: the repository's data/sample val images (synthetic flower drawings, 100);
  scrambled: the near unknowns' val photos cut into 4x4 tiles and shuffled (40): a photo's
      colours and textures without its object.

For each candidate score: AUROC and FPR at 95% TPR (known test photos as positives) against
near and far unknowns, mean over the splits; ECE (15 bins) and NLL of the known test photos
before and after the temperature, pooled over the splits; the time the score adds per
batch of 8 and the bytes it stores. Then the score `train` stored in each best.pt (the
default), at the threshold stored with it: the share of known test photos accepted and of
unknowns rejected. A last table: every 5-class run (train on 45 of flowers5/train per class,
val the other 15, test flowers5/val) for ECE with all classes; with --five-class-pooled-seeds,
also 5-class runs whose train / val / test (45 / 15 / 20 per class) are drawn from both folders
pooled, so that val and test come from one pool, as temperature scaling assumes.

    python benchmarks/bench_trust.py                       # both backbones, 10 splits (2.5 h on 2 shared cores)
    python benchmarks/bench_trust.py --archs resnet18 --splits 3
    python benchmarks/bench_trust.py --work /tmp/issue25-trust-bench --reuse   # re-score saved runs

--reuse re-scores the runs an earlier invocation trained and left in --work (their best.pt and
split folders, the far images) with the current code, without training: new candidates on the
same models. The shipped score is then refitted as `train` fits it (the default score).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from resnext_cli.commands.train import train
from resnext_cli.config import TrainConfig
from resnext_cli.data.batches import get_batch
from resnext_cli.data.folders import list_images
from resnext_cli.data.loaders import make_loader
from resnext_cli.data.transforms import Preprocessing
from resnext_cli.model import networks, trust
from resnext_cli.model.device import cpu_has_native_bf16, precision_for, prepare_model
from resnext_cli.model.engines import InferenceModel
from resnext_cli.outputs.metrics import auroc, expected_calibration_error, fpr_at_tpr

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
REAL_PHOTOS = [  # real photos of no flower that ship with packages on this machine
    "matplotlib/mpl-data/sample_data/grace_hopper.jpg",
    "sklearn/datasets/images/china.jpg",
]
PIER = Path("/usr/lib/google-cloud-sdk/platform/google_appengine/google/appengine/tools/java/jetty12/"
            "jetty-home/modules/demo.d/root/images/jetty-pic.png")
CANDIDATES = {  # name: (components, k of the kNN ones or None for the rule)
    "msp": (("msp",), None),
    "maxlogit": (("maxlogit",), None),
    "energy": (("energy",), None),
    "knn (k=1)": (("knn",), 1),
    "knn (k=5)": (("knn",), 5),
    "knn centred (k=1)": (("cknn",), 1),
    "knn centred (k=5)": (("cknn",), 5),
    "mahalanobis (normalised)": (("mahalanobis",), None),
    "mahalanobis (raw)": (("rawmaha",), None),
    "msp+knn": (("msp", "knn"), None),
    "energy+knn": (("energy", "knn"), None),
    "msp+cknn": (("msp", "cknn"), None),
    "energy+cknn": (("energy", "cknn"), None),
    "maxlogit+cknn": (("maxlogit", "cknn"), None),
    "msp+mahalanobis": (("msp", "mahalanobis"), None),
    "energy+mahalanobis": (("energy", "mahalanobis"), None),
    "msp+rawmaha": (("msp", "rawmaha"), None),
    "msp+cknn+mahalanobis": (("msp", "cknn", "mahalanobis"), None),
    "style": (("style",), None),
    "energy+style": (("energy", "style"), None),
    "energy+2*style": (("energy", "style", "style"), None),
    "energy+knn+2*style": (("energy", "knn", "style", "style"), None),
}
EXTRA_SETS = ("objects",)  # unknowns reported alone, not pooled into "far" (comparable with before)
ALL_COMPONENTS = tuple(sorted({c for components, _ in CANDIDATES.values() for c in components}))


# ---------------------------------------------------------------- the images


def site_packages() -> Path:
    return Path(torch.__file__).resolve().parent.parent


def far_sets(out: Path, flowers: Path, repo: Path, extra: str | None) -> dict[str, list[str]]:
    """The far-unknown images (made once, seeded); scrambles are per class, chosen per split."""
    if out.is_dir():  # --reuse: the images an earlier run made
        drawings = list_images(repo / "data" / "sample" / "val", True)
        found = {n: sorted(map(str, (out / n).glob("*.*"))) for n in ("photos", "textures")}
        found.update({f"scrambled/{c.name}": sorted(map(str, c.glob("*.*"))) for c in (out / "scrambled").iterdir()})
        return {**found, "drawings": drawings}
    rng = random.Random(0)
    sources = [site_packages() / p for p in REAL_PHOTOS] + ([PIER] if PIER.is_file() else [])
    if extra:
        sources += [Path(p) for p in list_images(Path(extra), recursive=True)]
    sets = {"photos": [], "textures": [], "drawings": list_images(repo / "data" / "sample" / "val", True)}
    for s, source in enumerate(sources):
        with Image.open(source) as picture:
            picture = picture.convert("RGB")
            for i in range(40):
                sets["photos"].append(_save(random_crop(picture, rng), out / "photos" / f"{s}_{i:02d}.jpg"))
    for i in range(120):
        sets["textures"].append(_save(texture(i, rng), out / "textures" / f"{i:03d}.png"))
    for path in list_images(flowers / "val", recursive=True):
        name = Path(path).parent.name
        target = out / "scrambled" / name / Path(path).name
        with Image.open(path) as picture:
            sets.setdefault(f"scrambled/{name}", []).append(_save(scramble(picture.convert("RGB"), rng), target))
    return sets


def object_photos(out: Path, source: Path | None) -> list[str]:
    """`--objects DIR`: photos of animals and objects (the issue's "unrelated photos"), added
    after the score was chosen and never used to choose anything: each photo whole and 20
    random crops of it (made once, seeded; --reuse finds them)."""
    if out.is_dir():
        return sorted(map(str, out.glob("*.*")))
    if source is None:
        return []
    rng, made = random.Random(1), []
    for s, path in enumerate(list_images(source, recursive=True)):
        with Image.open(path) as picture:
            picture = picture.convert("RGB")
            made.append(_save(picture, out / f"{s}_whole.jpg"))
            made += [_save(random_crop(picture, rng), out / f"{s}_{i:02d}.jpg") for i in range(20)]
    return made


def _save(picture: Image.Image, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return str(path)


def random_crop(picture: Image.Image, rng: random.Random) -> Image.Image:
    width, height = picture.size
    area = rng.uniform(0.1, 0.6) * width * height
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w = min(width, int(round(math.sqrt(area * ratio))))
    h = min(height, int(round(math.sqrt(area / ratio))))
    x, y = rng.randint(0, width - w), rng.randint(0, height - h)
    return picture.crop((x, y, x + w, y + h)).resize((128, 128), Image.Resampling.BICUBIC)


def texture(i: int, rng: random.Random) -> Image.Image:
    """Smooth colour fields, stripes, checkerboards and random shapes, in turn."""
    size = 128
    g = torch.Generator().manual_seed(i)
    kind = i % 4
    if kind == 0:
        coarse = torch.rand(1, 3, rng.randint(2, 8), rng.randint(2, 8), generator=g)
        pixels = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0]
    elif kind in (1, 2):
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        angle, period = rng.uniform(0, math.pi), rng.uniform(6, 40)
        if kind == 1:
            wave = torch.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period) > 0
        else:
            wave = ((xx // int(period)) + (yy // int(period))) % 2 == 0
        a, b = torch.rand(3, generator=g), torch.rand(3, generator=g)
        pixels = torch.where(wave[None], a[:, None, None], b[:, None, None])
    else:
        picture = Image.new("RGB", (size, size), tuple(rng.randint(0, 255) for _ in range(3)))
        draw = ImageDraw.Draw(picture)
        for _ in range(rng.randint(3, 12)):
            x0, y0 = rng.randint(-20, size), rng.randint(-20, size)
            box = (x0, y0, x0 + rng.randint(10, 70), y0 + rng.randint(10, 70))
            colour = tuple(rng.randint(0, 255) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        return picture
    noise = torch.randn(3, size, size, generator=g) * 0.04
    array = ((pixels + noise).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def scramble(picture: Image.Image, rng: random.Random, tiles: int = 4) -> Image.Image:
    width, height = picture.size
    tw, th = width // tiles, height // tiles
    pieces = [picture.crop((x * tw, y * th, (x + 1) * tw, (y + 1) * th))
              for y in range(tiles) for x in range(tiles)]  # fmt: skip
    rng.shuffle(pieces)
    out = Image.new("RGB", (tw * tiles, th * tiles))
    for k, piece in enumerate(pieces):
        out.paste(piece, ((k % tiles) * tw, (k // tiles) * th))
    return out


def thumbnail_vector(path: str) -> torch.Tensor:
    with Image.open(path) as picture:
        grey = torch.tensor(list(picture.convert("L").resize((32, 32)).tobytes()), dtype=torch.float32)
    grey = grey - grey.mean()
    return grey / (grey.norm() + 1e-6)


def near_copies(test: list[str], train_paths: list[str]) -> set[str]:
    """Test photos that are a near-copy of a training photo (flowers5 has such leaks)."""
    a = torch.stack([thumbnail_vector(p) for p in test])
    b = torch.stack([thumbnail_vector(p) for p in train_paths])
    return {test[i] for i in torch.nonzero((a @ b.T).max(1).values >= 0.95).flatten().tolist()}


# ---------------------------------------------------------------- features and runs


def embedder(arch: str, weights: Path) -> InferenceModel:
    """The pretrained backbone as prediction runs it (default precision and layout, 64 px)."""
    model = networks.build_model(arch, 200)
    networks.load_weights(model, arch, str(weights), lambda _: None)
    model.eval()
    device = torch.device("cpu")
    precision = precision_for("auto", device)
    prepare_model(model, device, True)
    return InferenceModel(model, arch, [], Preprocessing.classic(64), str(weights), device, precision, True)


def embed(engine: InferenceModel, paths: list[str]) -> dict[str, torch.Tensor]:
    loader = make_loader(engine.dataset([(p, -1) for p in paths]), batch_size=32, workers=1,
                         pin_memory=False)  # fmt: skip
    features: dict[str, torch.Tensor] = {}
    for loaded in loader:
        batch = get_batch(loaded, engine.spec)
        assert not batch.failures, batch.failures
        (_, feats), = engine.views(batch.inputs)
        for i, f in zip(batch.indices, feats):
            features[paths[i]] = f.clone()
    return features


def split_dataset(root: Path, flowers: Path, known: list[str], seed: int) -> dict[str, list[tuple[str, int]]]:
    """root/train and root/val as symlinks (45 / 15 of flowers5/train per class); with --reuse,
    the ones an earlier run made."""
    if root.is_dir():
        return {split: [(str(p.resolve()), known.index(p.parent.name)) for p in sorted((root / split).rglob("*.*"))]
                for split in ("train", "val")}  # fmt: skip
    rng = random.Random(seed)
    parts: dict[str, list[tuple[str, int]]] = {"train": [], "val": []}
    for label, name in enumerate(known):
        photos = sorted(list_images(flowers / "train" / name, recursive=True))
        rng.shuffle(photos)
        for split, chosen in (("train", photos[:45]), ("val", photos[45:])):
            for path in chosen:
                link_into(root / split / name, path)
                parts[split].append((path, label))
    return parts


def link_into(folder: Path, path: str) -> None:
    """A symlink to the photo in `folder` (kept if an earlier run made it: --reuse)."""
    link = folder / Path(path).name
    if not link.is_symlink():
        folder.mkdir(parents=True, exist_ok=True)
        os.symlink(Path(path).resolve(), link)


def train_run(data: Path, arch: str, weights: Path, seed: int, out: Path) -> tuple[dict, float]:
    if (out / "best.pt").is_file():  # --reuse
        return torch.load(out / "best.pt", map_location="cpu", weights_only=True), 0.0
    config = TrainConfig(data=str(data), arch=arch, weights=str(weights), img_size=64, seed=seed,
                         out=str(out), report=False, device="cpu")  # fmt: skip
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        train(config)
    return torch.load(out / "best.pt", map_location="cpu", weights_only=True), time.perf_counter() - started


def head_logits(checkpoint: dict, features: torch.Tensor) -> torch.Tensor:
    """The head on the pooled features (the leading columns; the channel spread follows)."""
    weight, bias = checkpoint["model"]["fc.weight"], checkpoint["model"]["fc.bias"]
    return features[:, : weight.shape[1]] @ weight.T + bias


# ---------------------------------------------------------------- measuring


def candidate_scores(name: str, fitted: tuple[dict, int], val_logits, val_feats, temperature,
                     sets: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[dict, trust.UnknownDetector]:
    """The candidate's detector (from the statistics fitted once per split) and its scores."""
    components, k = CANDIDATES[name]
    stats = trust.select_statistics(fitted[0], components)
    detector = trust.fit_detector(components, stats, k or fitted[1], val_logits, val_feats, temperature)
    return {s: detector.score(l, f, temperature) for s, (l, f) in sets.items()}, detector


def ood_metrics(scores: dict[str, torch.Tensor], far_names: list[str]) -> dict[str, float]:
    known = scores["known"].tolist()
    near = scores["near"].tolist()
    far = [v for n in far_names for v in scores[n].tolist()]
    out = {"near_auroc": auroc(known, near), "near_fpr": fpr_at_tpr(known, near),
           "far_auroc": auroc(known, far), "far_fpr": fpr_at_tpr(known, far)}  # fmt: skip
    for n in [*far_names, *(e for e in EXTRA_SETS if e in scores)]:  # each set alone
        out[f"{n}_fpr"] = fpr_at_tpr(known, scores[n].tolist())
        out[f"{n}_auroc"] = auroc(known, scores[n].tolist())
    return out


def score_cost(detector: trust.UnknownDetector, dim: int, classes: int, repeats: int = 10) -> float:
    """Milliseconds the score adds to a batch of 8 on this CPU (the best of 3 rounds: the
    machine is shared)."""
    logits, features = torch.randn(8, classes), torch.randn(8, dim).abs()
    detector.score(logits, features, 1.0)
    rounds = []
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeats):
            detector.score(logits, features, 1.0)
        rounds.append((time.perf_counter() - started) / repeats * 1000)
    return min(rounds)


def stored_bytes(detector: trust.UnknownDetector) -> int:
    buffer = io.BytesIO()
    torch.save(detector.to_state(), buffer)
    return buffer.getbuffer().nbytes


def run_split(arch, weights, flowers, work, features, far, known, seed, far_names) -> dict:
    classes = sorted(p.name for p in (flowers / "train").iterdir() if p.is_dir())
    unknown = [c for c in classes if c not in known]
    root = work / f"{arch}_{'-'.join(known)}_{seed}"
    parts = split_dataset(root / "data", flowers, known, seed)
    checkpoint, seconds = train_run(root / "data", arch, weights, seed, root / "run")
    test = [(p, i) for i, c in enumerate(known) for p in list_images(flowers / "val" / c, True)]
    leaks = near_copies([p for p, _ in test], [p for p, _ in parts["train"]])
    test = [(p, i) for p, i in test if p not in leaks]
    near = [p for c in unknown for split in ("train", "val") for p in list_images(flowers / split / c, True)]
    groups = {"known": [p for p, _ in test], "near": near, "photos": far["photos"],
              "textures": far["textures"], "drawings": far["drawings"],
              "scrambled": [p for c in unknown for p in far[f"scrambled/{c}"]],
              **{n: far[n] for n in EXTRA_SETS if far.get(n)}}  # fmt: skip
    sets = {}
    for name, paths in groups.items():
        feats = torch.stack([features[p] for p in paths])
        sets[name] = (head_logits(checkpoint, feats), feats)
    train_feats = torch.stack([features[p] for p, _ in parts["train"]])
    train_labels = torch.tensor([label for _, label in parts["train"]])
    val_feats = torch.stack([features[p] for p, _ in parts["val"]])
    val_labels = torch.tensor([label for _, label in parts["val"]])
    val_logits = head_logits(checkpoint, val_feats)
    temperature = trust.fit_temperature(val_logits, val_labels)
    result = {"known": known, "seed": seed, "train_seconds": seconds, "leaks_removed": len(leaks),
              "temperature": temperature, "stored_temperature": checkpoint.get("temperature"),
              "candidates": {}}  # fmt: skip
    test_logits, test_labels = sets["known"][0], torch.tensor([i for _, i in test])
    result["calibration"] = calibration_numbers(test_logits, test_labels, temperature)
    pooled = checkpoint["model"]["fc.weight"].shape[1]
    fitted = trust.fit_statistics(ALL_COMPONENTS, train_feats, train_labels, pooled=pooled)
    for name in CANDIDATES:
        scores, detector = candidate_scores(name, fitted, val_logits, val_feats, temperature, sets)
        numbers = ood_metrics(scores, far_names)
        numbers["ms_per_batch8"] = score_cost(detector, train_feats.shape[1], len(known))
        numbers["bytes"] = stored_bytes(detector)
        result["candidates"][name] = numbers
    if seconds == 0.0:  # --reuse: the default score as `train` would fit it now
        components = trust.parse_score(trust.DEFAULT_SCORE)
        stats = trust.fit_statistics(components, train_feats, train_labels, pooled=pooled)
        detector = trust.fit_detector(components, *stats, val_logits, val_feats, temperature)
        checkpoint = {**checkpoint, "temperature": temperature, "unknown": detector.to_state()}
    if checkpoint.get("unknown"):
        result["shipped"] = shipped_numbers(checkpoint, sets, far_names, test_labels)
    return result


def shipped_numbers(checkpoint: dict, sets: dict, far_names: list[str], labels: torch.Tensor) -> dict:
    """The score best.pt carries, at its own threshold: what a user of `train` gets (and the
    accuracy on the known test photos, all of them and those accepted)."""
    calibration = trust.Calibration.from_checkpoint(checkpoint, "best.pt")
    detector, t = calibration.unknown, calibration.temperature
    verdicts = {name: detector.known(detector.score(l, f, t)) for name, (l, f) in sets.items()}
    known = {name: v.float().mean().item() for name, v in verdicts.items()}
    right = sets["known"][0].argmax(1) == labels
    far_all = torch.cat([verdicts[n] for n in far_names]).float().mean().item()
    return {"score": detector.name, "threshold": detector.threshold, "known_accepted": known["known"],
            "near_rejected": 1 - known["near"], "far_rejected": 1 - far_all,
            "accuracy": right.float().mean().item(), "accuracy_accepted": right[verdicts["known"]].float().mean().item(),
            **{f"{n}_rejected": 1 - known[n] for n in [*far_names, *(e for e in EXTRA_SETS if e in known)]}}  # fmt: skip


def calibration_numbers(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict:
    out = {"n": len(labels), "accuracy": float((logits.argmax(1) == labels).float().mean())}
    for name, t in (("before", 1.0), ("after", temperature)):
        probs = torch.softmax(logits / t, 1)
        confidence, predicted = probs.max(1)
        out[f"ece_{name}"] = expected_calibration_error(confidence.tolist(), (predicted == labels).tolist())
        out[f"nll_{name}"] = trust.nll(logits, labels, t)
        out[f"confidences_{name}"] = confidence.tolist()
    out["correct"] = (logits.argmax(1) == labels).tolist()
    return out


def pooled_split(root: Path, flowers: Path, classes: list[str], seed: int) -> dict[str, list[tuple[str, int]]]:
    """train / val / test of 45 / 15 / 20 per class drawn from flowers5's train and val folders
    pooled, so that val and test are exchangeable (as temperature scaling assumes); root/train
    and root/val as symlinks, test listed only. With --reuse, the draw is made again (seeded)."""
    rng = random.Random(f"pool-{seed}")
    parts: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
    for label, name in enumerate(classes):
        photos = sorted(p for split in ("train", "val") for p in list_images(flowers / split / name, recursive=True))
        rng.shuffle(photos)
        for split, chosen in (("train", photos[:45]), ("val", photos[45:60]), ("test", photos[60:80])):
            for path in chosen:
                parts[split].append((path, label))
                if split != "test":
                    link_into(root / split / name, path)
    return parts


def five_class_run(arch, weights, flowers, work, features, seed, pool: bool = False) -> dict:
    """All 5 classes (45/15 of flowers5/train, test flowers5/val; with `pool`, all three drawn
    from both folders pooled): calibration with every class."""
    classes = sorted(p.name for p in (flowers / "train").iterdir() if p.is_dir())
    root = work / f"{arch}_all{'_pooled' if pool else ''}_{seed}"
    if pool:
        parts = pooled_split(root / "data", flowers, classes, seed)
        test = parts["test"]
    else:
        parts = split_dataset(root / "data", flowers, classes, seed)
        test = [(p, i) for i, c in enumerate(classes) for p in list_images(flowers / "val" / c, True)]
    checkpoint, _ = train_run(root / "data", arch, weights, seed, root / "run")
    leaks = near_copies([p for p, _ in test], [p for p, _ in parts["train"]])
    test = [(p, i) for p, i in test if p not in leaks]
    val_feats = torch.stack([features[p] for p, _ in parts["val"]])
    val_logits = head_logits(checkpoint, val_feats)
    temperature = trust.fit_temperature(val_logits, torch.tensor([i for _, i in parts["val"]]))
    logits = head_logits(checkpoint, torch.stack([features[p] for p, _ in test]))
    numbers = calibration_numbers(logits, torch.tensor([i for _, i in test]), temperature)
    return {"seed": seed, "temperature": temperature, "stored_temperature": checkpoint.get("temperature"),
            "calibration": numbers}


def size_at_scale(dim: int, images: int = 100_000, classes: int = 100) -> dict[str, int]:
    """Bytes the shipped score stores for a training set of `images` (class-balanced cap);
    `dim` pooled features, followed by dim / 4 of channel spread (layer2's width)."""
    labels = torch.arange(images) % classes
    features = torch.rand(images, dim + dim // 4)
    out = {}
    for name in ("knn", "cknn", "mahalanobis", trust.DEFAULT_SCORE):
        components = trust.parse_score(name)
        stats, k = trust.fit_statistics(components, features, labels, pooled=dim)
        detector = trust.UnknownDetector(components, stats, k, quantiles=torch.zeros(trust.QUANTILES))
        out[name] = stored_bytes(detector)
    return out


def spread(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    mean = statistics.mean(values) * scale
    sd = (statistics.stdev(values) if len(values) > 1 else 0.0) * scale
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def ece_floor(confidences: list[float], draws: int = 1000, seed: int = 0) -> tuple[float, float]:
    """The ECE a perfectly calibrated model would show on these many photos at these
    confidences (each right with the probability it claims): its mean and 95th percentile over
    `draws` simulated test sets. With a few hundred photos the 15-bin estimate is biased upwards
    by about as much as the 0.03 goal, so a measured ECE is read against it."""
    rng = random.Random(seed)
    values = sorted(expected_calibration_error(confidences, [rng.random() < c for c in confidences])
                    for _ in range(draws))  # fmt: skip
    return statistics.mean(values), values[int(0.95 * draws)]


def pooled_calibration(runs: list[dict]) -> dict[str, float]:
    confidences = {w: [c for r in runs for c in r["calibration"][f"confidences_{w}"]] for w in ("before", "after")}
    correct = [c for r in runs for c in r["calibration"]["correct"]]
    floor, floor95 = ece_floor(confidences["after"])
    return {
        "n": len(correct), "accuracy": sum(correct) / len(correct), "ece_floor": floor, "ece_floor95": floor95,
        **{f"ece_{w}": expected_calibration_error(confidences[w], correct) for w in confidences},
        **{f"nll_{w}": statistics.mean(r["calibration"][f"nll_{w}"] for r in runs) for w in confidences},
        "temperature": statistics.mean(r["temperature"] for r in runs),
    }  # fmt: skip


def print_tables(results: dict, far_names: list[str]) -> None:
    print("\n| arch | score | near AUROC | near FPR@95 | far AUROC | far FPR@95 | "
          + " | ".join(f"{n} FPR" for n in far_names) + " | ms / batch of 8 | stored KB |")
    print("|---|---|---|---|---|---|" + "---|" * len(far_names) + "---|---|")
    for arch, runs in results.items():
        for name in CANDIDATES if runs["splits"] else ():  # --splits 0: the 5-class runs alone
            rows = [r["candidates"][name] for r in runs["splits"]]
            cells = [spread([r[m] for r in rows]) for m in ("near_auroc", "near_fpr", "far_auroc", "far_fpr")]
            cells += [f"{statistics.mean(r[f'{n}_fpr'] for r in rows):.3f}" for n in far_names]
            cells += [f"{statistics.mean(r['ms_per_batch8'] for r in rows):.3f}",
                      f"{statistics.mean(r['bytes'] for r in rows) / 1e3:.0f}"]  # fmt: skip
            print(f"| {arch} | {name} | " + " | ".join(cells) + " |")
    print("\n| arch | classes | runs | test photos | accuracy | T (mean) | ECE before | ECE after | "
          "ECE if calibrated (mean / 95%) | NLL before | NLL after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for arch, runs in results.items():
        for label, key in (("3 of 5", "splits"), ("all 5", "five"), ("all 5, folders pooled", "five_pooled")):
            if runs.get(key):
                c = pooled_calibration(runs[key])
                print(f"| {arch} | {label} | {len(runs[key])} | {c['n']} | {c['accuracy']:.1%} | "
                      f"{c['temperature']:.2f} | {c['ece_before']:.3f} | {c['ece_after']:.3f} | "
                      f"{c['ece_floor']:.3f} / {c['ece_floor95']:.3f} | {c['nll_before']:.3f} | {c['nll_after']:.3f} |")
    print("\nThe shipped score at the threshold stored in best.pt (mean over splits):")
    print("| arch | score | known test accepted | accuracy (all / accepted) | near rejected | "
          + " | ".join(f"{n} rejected" for n in far_names) + " | all far rejected |")
    print("|---|---|---|---|---|" + "---|" * len(far_names) + "---|")
    for arch, runs in results.items():
        shipped = [r["shipped"] for r in runs["splits"] if "shipped" in r]
        if shipped:
            mean = {m: statistics.mean(s[m] for s in shipped) for m in shipped[0] if m != "score"}
            cells = [f"{mean['known_accepted']:.1%}", f"{mean['accuracy']:.1%} / {mean['accuracy_accepted']:.1%}"]
            cells += [f"{mean[m]:.1%}" for m in ("near_rejected", *[f"{n}_rejected" for n in far_names], "far_rejected")]
            print(f"| {arch} | {shipped[0]['score']} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "data" / "flowers5"))
    parser.add_argument("--backbones", default=str(SHARED / "backbones"))
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnext50_32x4d"])
    parser.add_argument("--splits", type=int, default=10, help="how many of the 10 choices of 3 known classes")
    parser.add_argument("--five-class-seeds", type=int, default=3)
    parser.add_argument("--five-class-pooled-seeds", type=int, default=0,
                        help="5-class runs with train/val/test drawn from both folders pooled")
    parser.add_argument("--photos", help="a folder of more non-flower photos for the far set")
    parser.add_argument("--objects", help="a folder of photos of animals and objects, reported as their own set")
    parser.add_argument("--work", default="/tmp/issue25-trust-bench")
    parser.add_argument("--json", help="also write every number here")
    parser.add_argument("--reuse", action="store_true", help="re-score the runs already in --work, no training")
    args = parser.parse_args()

    flowers, work = Path(args.data), Path(args.work)
    if work.exists() and not args.reuse:
        raise SystemExit(f"{work} exists; remove it or pass another --work")
    os.environ.setdefault("RESNEXT_CACHE", str(work / "cache"))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, native bf16: {cpu_has_native_bf16()}, "
          f"torch {torch.__version__}; data {flowers}; 64 px", flush=True)  # fmt: skip
    far = far_sets(work / "far", flowers, HERE.parent, args.photos)
    far["objects"] = object_photos(work / "far" / "objects", Path(args.objects) if args.objects else None)
    far_names = ["photos", "textures", "drawings", "scrambled"]
    print("far sets: " + ", ".join(f"{n} {len(far[n])}" for n in far_names[:3]) + ", scrambled 40 per split")
    classes = sorted(p.name for p in (flowers / "train").iterdir() if p.is_dir())
    choices = list(itertools.combinations(classes, 3))
    random.Random(0).shuffle(choices)
    results: dict = {}
    for arch in args.archs:
        weights = Path(args.backbones) / f"{arch}-tinyimagenet.pth"
        engine = embedder(arch, weights)
        everything = list_images(flowers, recursive=True) + [p for v in far.values() for p in v]
        started = time.perf_counter()
        features = embed(engine, sorted(set(everything)))
        print(f"{arch}: {len(features)} images embedded in {time.perf_counter() - started:.1f} s", flush=True)
        runs = results.setdefault(arch, {"splits": [], "five": []})
        for seed, known in enumerate(choices[: args.splits]):
            run = run_split(arch, weights, flowers, work, features, far, list(known), seed, far_names)
            runs["splits"].append(run)
            best = max(run["candidates"], key=lambda n: run["candidates"][n]["near_auroc"])
            print(f"  {arch} split {seed} {known}: T {run['temperature']:.2f}, acc "
                  f"{run['calibration']['accuracy']:.1%}, best near AUROC {best} "
                  f"{run['candidates'][best]['near_auroc']:.3f}", flush=True)
        for seed in range(args.five_class_seeds):
            runs["five"].append(five_class_run(arch, weights, flowers, work, features, seed))
        for seed in range(args.five_class_pooled_seeds):
            runs.setdefault("five_pooled", []).append(
                five_class_run(arch, weights, flowers, work, features, seed, pool=True))
        runs["size_100k"] = size_at_scale(engine.model.fc.in_features)
        print(f"  {arch}: stored bytes for 100k training images: {runs['size_100k']}", flush=True)
    extras = [n for n in EXTRA_SETS if far.get(n)]
    print_tables(results, far_names + extras)
    for n in extras:
        print(f"\n{n} ({len(far[n])} images, not pooled into far), mean over splits: AUROC / FPR@95")
        for arch, runs in results.items():
            for name in CANDIDATES if runs["splits"] else ():
                rows = [r["candidates"][name] for r in runs["splits"]]
                print(f"| {arch} | {name} | {spread([r[f'{n}_auroc'] for r in rows])} | "
                      f"{spread([r[f'{n}_fpr'] for r in rows])} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
