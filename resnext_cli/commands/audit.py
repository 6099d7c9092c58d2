"""`resnext audit DATA`: the mislabeled, duplicated and leaking images of a dataset, found with
a model, before anyone trains on it.

1. Every train and val image is embedded once by a frozen backbone, through the feature cache
   (so a second audit, or `train --cache-features` with the same backbone, reuses it).
2. Out-of-fold class probabilities: a linear head (multinomial logistic regression, L-BFGS) is
   fitted on k-1 stratified folds and predicts the k-th, so no image is judged by a model that
   saw its label.
3. Likely label errors: confident learning on those probabilities (cleanlab's
   `find_label_issues`), ranked by how sure the suggested class is.
4. Near-duplicates: cosine similarity of the centred embeddings, in blocks of rows (never the
   full N x N matrix): pairs across train/val are leaks, the others duplicates.
It reads the user's files and writes only into its own output folder.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table

from resnext_cli import ui
from resnext_cli.config import AuditConfig, TrainConfig
from resnext_cli.data.batches import InputSpec
from resnext_cli.data.folders import DatasetLayout, discover_dataset
from resnext_cli.data.loaders import default_workers
from resnext_cli.data.transforms import Preprocessing
from resnext_cli.errors import EXIT_OK, UserError
from resnext_cli.files import atomic_write_text, make_folder
from resnext_cli.model import features, networks
from resnext_cli.model.checkpoint import checkpoint_preprocessing, load_checkpoint
from resnext_cli.model.device import (
    decode_on_device,
    pin_memory_for,
    precision_for,
    prepare_model,
    select_device,
)
from resnext_cli.model.distributed import DistContext
from resnext_cli.model.steps import Step, report_failures
from resnext_cli.outputs.audit_page import render_audit_html

AUDIT_EXTRA = "pip install 'resnext-cli[audit]'  (cleanlab)"
CSV_COLUMNS = ("path", "given", "suggested", "confidence", "issue", "related_path")
BLOCK_BYTES = 256 << 20  # similarity rows computed at a time: at most this much float32


@dataclass
class Embedded:
    """Every readable image with its label, split and embedding (rows of `features`)."""

    paths: list[str]
    labels: np.ndarray  # int, index into classes
    in_val: np.ndarray  # bool
    features: torch.Tensor  # N x D float32
    classes: list[str]
    unreadable: dict[str, str]  # path -> reason


@dataclass
class Finding:
    path: str
    given: str
    suggested: str
    confidence: float  # label: probability of `suggested`; duplicate/leak: cosine similarity
    issue: str  # label | duplicate | leak
    related_path: str = ""

    def row(self) -> list[str]:
        return [self.path, self.given, self.suggested, f"{self.confidence:.4f}", self.issue,
                self.related_path]  # fmt: skip


def audit(cfg: AuditConfig) -> int:
    cleanlab = require_cleanlab()
    with ui.stdout_for_results(cfg.json):
        return _audit(cfg, cleanlab)


def _audit(cfg: AuditConfig, cleanlab: Any) -> int:
    started = time.perf_counter()
    assert cfg.data is not None
    out = Path(cfg.out or "runs/audit")
    make_folder(out)
    layout = discover_dataset(cfg.data, cfg.val_split, cfg.seed)
    for message in layout.warnings:
        ui.warn(message)
    embedded = embed(layout, cfg)
    embedding_seconds = time.perf_counter() - started
    if len(set(embedded.labels.tolist())) < 2:
        raise UserError("Fewer than 2 classes have readable images; nothing to audit.")
    probs, strength = out_of_fold_probabilities(embedded.features, embedded.labels,
                                                len(embedded.classes), cfg.folds, cfg.seed)  # fmt: skip
    accuracy = float((probs.argmax(1) == embedded.labels).mean())
    if accuracy < 0.6:
        ui.warn(f"the out-of-fold heads are right on only {accuracy:.0%} of the images: this "
                "backbone's features separate these classes poorly, so the label suggestions are "
                "weak. Try other --weights, or --checkpoint of a model trained on similar data.")  # fmt: skip
    labels, per_class = label_findings(cleanlab, embedded, probs)
    pairs = near_duplicates(embedded.features, cfg.similarity)
    duplicates = duplicate_findings(embedded, pairs)
    seconds = time.perf_counter() - started
    summary = _summary(cfg, embedded, accuracy, strength, labels, duplicates, per_class,
                       {"embedding": embedding_seconds, "total": seconds})  # fmt: skip
    findings = labels + duplicates
    write_outputs(out, findings, summary, embedded, probs, cfg.gallery)
    _show(findings, summary, out, cfg.json)
    return EXIT_OK


def require_cleanlab() -> Any:
    """cleanlab is an optional extra: say what to install instead of a traceback."""
    try:
        return importlib.import_module("cleanlab.filter"), importlib.import_module("cleanlab.count")
    except ImportError:
        raise UserError(f"resnext audit finds label errors with cleanlab, which is not installed: "
                        f"{AUDIT_EXTRA}.") from None  # fmt: skip


# ---------------------------------------------------------------- 1. embeddings


def embed(layout: DatasetLayout, cfg: AuditConfig) -> Embedded:
    """Pooled backbone features of every image, from the feature cache when it has them."""
    device = select_device(cfg.device)
    precision = precision_for(cfg.precision, device)
    on_device = decode_on_device(cfg.decode, device)
    model, arch, weights, prep = _backbone(cfg, len(layout.classes))
    prepare_model(model, device, channels_last=True)
    workers = cfg.workers if cfg.workers is not None else default_workers(device.type)
    # the settings `train --cache-features` keys its cache by, so that the two share it
    key = TrainConfig(data=cfg.data, arch=arch, weights=weights, img_size=prep.img_size,
                      feature_views=1, precision=precision, decode="gpu" if on_device else "cpu",
                      seed=cfg.seed, batch_size=cfg.batch_size, workers=workers)  # fmt: skip
    spec = InputSpec(device, True, prep, on_device)
    step = Step(spec, precision, torch.nn.CrossEntropyLoss(), DistContext())
    unreadable: dict[str, str] = {}
    ui.note(f"Embedding {len(layout.train) + len(layout.val)} images with {arch} ({weights}) on "
            f"{device}, {prep.img_size} px.")  # fmt: skip
    cache = features.prepare_cache(model, layout, key, step, DistContext(), pin_memory_for(device),
                                   partial(report_failures, seen=unreadable))  # fmt: skip
    samples = layout.train + layout.val
    ok = torch.cat([cache.train_ok, cache.val_ok]).numpy()
    vectors = torch.cat([cache.train[0], cache.val])[torch.from_numpy(ok)]
    in_val = np.array([False] * len(layout.train) + [True] * len(layout.val))[ok]
    paths = [p for (p, _), keep in zip(samples, ok) if keep]
    labels = np.array([label for (_, label), keep in zip(samples, ok) if keep], dtype=np.int64)
    for (path, _), keep in zip(samples, ok):
        if not keep and path not in unreadable:
            unreadable[path] = "unreadable (recorded in the feature cache)"
    return Embedded(paths, labels, in_val, vectors.float(), layout.classes, unreadable)


def _backbone(cfg: AuditConfig, n_classes: int) -> tuple[torch.nn.Module, str, str, Preprocessing]:
    """The frozen network, its arch, what its weights are (for the cache key) and its input."""
    if cfg.checkpoint:
        ckpt = load_checkpoint(cfg.checkpoint)
        arch = ckpt["arch"]
        if cfg.arch and cfg.arch != arch:
            raise UserError(f"--arch {cfg.arch} disagrees with {cfg.checkpoint}, a {arch}.")
        model = networks.build_model(arch, len(ckpt["classes"]))
        model.load_state_dict(ckpt["model"])
        return model, arch, cfg.checkpoint, checkpoint_preprocessing(ckpt, cfg.img_size)
    arch = cfg.arch or "resnext50_32x4d"
    torch.manual_seed(cfg.seed)  # --weights none: the same random backbone for the same seed
    model = networks.build_model(arch, n_classes)
    networks.load_weights(model, arch, cfg.weights, ui.note)
    return model, arch, cfg.weights, networks.weights_preprocessing(arch, cfg.weights, cfg.img_size or 224)


# ---------------------------------------------------------------- 2. out-of-fold probabilities


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """A fold number per image: each class shuffled (seeded) and dealt round-robin."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(labels), dtype=np.int64)
    offset = 0
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        fold[members] = (np.arange(len(members)) + offset) % folds
        offset += len(members)  # classes smaller than k do not all land in fold 0
    return fold


def out_of_fold_probabilities(
    x: torch.Tensor, labels: np.ndarray, n_classes: int, folds: int, seed: int
) -> tuple[np.ndarray, float]:
    """N x C probabilities, each row from a head that did not see that image; and the L2
    strength chosen (by log-loss on a held-out part of the first fold's training images)."""
    y = torch.from_numpy(labels)
    fold = stratified_folds(labels, min(folds, len(labels)), seed)
    train0 = np.flatnonzero(fold != 0)
    inner = stratified_folds(labels[train0], 5, seed + 1) == 0
    strength = min(
        (1e-4, 1e-3, 1e-2, 1e-1),
        key=lambda s: _log_loss(fit_linear(x[train0[~inner]], y[train0[~inner]], n_classes, s),
                                x[train0[inner]], y[train0[inner]]),
    )  # fmt: skip
    probs = np.zeros((len(labels), n_classes))
    for k in np.unique(fold):
        test = fold == k
        head = fit_linear(x[~test], y[~test], n_classes, strength)
        probs[test] = head(x[torch.from_numpy(test)]).double().numpy()
    return probs / probs.sum(axis=1, keepdims=True), strength


def fit_linear(x: torch.Tensor, y: torch.Tensor, n_classes: int, strength: float) -> Any:
    """Multinomial logistic regression on standardised features (full-batch L-BFGS); returns
    features -> probabilities."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    weight = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=200, history_size=20,
                                  line_search_fn="strong_wolfe")  # fmt: skip

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ weight + bias, y)
        loss = loss + strength * (weight**2).sum() / 2
        loss.backward()
        return loss

    optimizer.step(closure)
    weight, bias = weight.detach(), bias.detach()
    return lambda v: torch.softmax(((v - mean) / std) @ weight + bias, dim=1)


def _log_loss(head: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    if len(y) == 0:
        return 0.0
    return float(torch.nn.functional.nll_loss(torch.log(head(x).clamp_min(1e-12)), y))


# ---------------------------------------------------------------- 3. label errors


def label_findings(cleanlab: Any, embedded: Embedded, probs: np.ndarray) -> tuple[list[Finding], dict]:
    """cleanlab's label issues, most confident suggestion first; and per class: images,
    flagged, and the estimated share of its images that belong to another class."""
    filter_module, count_module = cleanlab
    labels = embedded.labels
    issues = filter_module.find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
    findings = []
    for i in issues:
        others = probs[i].copy()
        others[labels[i]] = -1  # the suggestion is another class than the given one
        suggested = int(others.argmax())
        findings.append(Finding(embedded.paths[i], embedded.classes[labels[i]],
                                embedded.classes[suggested], float(probs[i, suggested]), "label"))  # fmt: skip
    findings.sort(key=lambda f: -f.confidence)
    joint = count_module.compute_confident_joint(labels, probs)
    per_class = {}
    for c, name in enumerate(embedded.classes):
        images = int((labels == c).sum())
        row = joint[c].sum()
        per_class[name] = {
            "images": images,
            "flagged": sum(f.given == name for f in findings),
            "estimated_noise": float(1 - joint[c, c] / row) if row else 0.0,
        }
    return findings, per_class


# ---------------------------------------------------------------- 4. near-duplicates


def near_duplicates(x: torch.Tensor, threshold: float) -> list[tuple[int, int, float]]:
    """(i, j, similarity) with i < j and centred cosine similarity >= threshold. Rows go in
    blocks against all columns, so memory is block x N, never N x N."""
    centred = x - x.mean(0)
    unit = centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = len(unit)
    block = max(1, BLOCK_BYTES // (4 * max(n, 1)))
    pairs = []
    for start in range(0, n, block):
        sims = unit[start : start + block] @ unit.T
        rows, cols = torch.nonzero(sims >= threshold, as_tuple=True)
        keep = cols > rows + start  # upper triangle: each pair once, never an image with itself
        for r, c in zip(rows[keep].tolist(), cols[keep].tolist()):
            pairs.append((start + r, c, float(sims[r, c])))
    return sorted(pairs, key=lambda p: -p[2])


def duplicate_findings(embedded: Embedded, pairs: list[tuple[int, int, float]]) -> list[Finding]:
    """Train/val pairs are leaks; within a split, pairs across classes come before same-class
    ones (one of them is mislabeled or ambiguous)."""
    leaks, cross, same = [], [], []
    for i, j, similarity in pairs:
        a, b = embedded.classes[embedded.labels[i]], embedded.classes[embedded.labels[j]]
        finding = Finding(embedded.paths[i], a, b, similarity,
                          "leak" if embedded.in_val[i] != embedded.in_val[j] else "duplicate",
                          embedded.paths[j])  # fmt: skip
        (leaks if finding.issue == "leak" else cross if a != b else same).append(finding)
    return leaks + cross + same


# ---------------------------------------------------------------- outputs


def _summary(cfg: AuditConfig, embedded: Embedded, accuracy: float, strength: float,
             labels: list[Finding], duplicates: list[Finding], per_class: dict,
             seconds: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    cross = [d for d in duplicates if d.issue == "duplicate" and d.given != d.suggested]
    return {
        "data": cfg.data,
        "images": len(embedded.paths),
        "unreadable": [{"path": p, "error": e} for p, e in sorted(embedded.unreadable.items())],
        "classes": embedded.classes,
        "counts": {
            "label": len(labels),
            "duplicate": sum(d.issue == "duplicate" for d in duplicates),
            "duplicate_across_classes": len(cross),
            "leak": sum(d.issue == "leak" for d in duplicates),
        },
        "per_class": per_class,
        "out_of_fold_accuracy": accuracy,
        "settings": {"folds": cfg.folds, "similarity": cfg.similarity, "seed": cfg.seed,
                     "l2_strength": strength, "checkpoint": cfg.checkpoint, "weights": cfg.weights,
                     "arch": cfg.arch, "img_size": cfg.img_size},  # fmt: skip
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }


def write_outputs(out: Path, findings: list[Finding], summary: dict, embedded: Embedded,
                  probs: np.ndarray, gallery: int) -> None:  # fmt: skip
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows(f.row() for f in findings)
    atomic_write_text(out / "audit.csv", buffer.getvalue())
    atomic_write_text(out / "audit.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    typical = typical_images(embedded, probs, per_class=4)
    atomic_write_text(out / "audit.html", render_audit_html(summary, findings, typical, gallery))


def typical_images(embedded: Embedded, probs: np.ndarray, per_class: int) -> dict[str, list[str]]:
    """Per class, the images the out-of-fold heads were surest belong to it."""
    typical = {}
    for c, name in enumerate(embedded.classes):
        members = np.flatnonzero(embedded.labels == c)
        best = members[np.argsort(-probs[members, c])][:per_class]
        typical[name] = [embedded.paths[i] for i in best]
    return typical


def _show(findings: list[Finding], summary: dict, out: Path, as_json: bool) -> None:
    counts = summary["counts"]
    line = (
        f"Audited {summary['images']} images ({len(summary['unreadable'])} unreadable) in "
        f"{summary['seconds']['total']:.1f} s: {counts['label']} likely label errors, "
        f"{counts['duplicate']} near-duplicate pairs ({counts['duplicate_across_classes']} across "
        f"classes), {counts['leak']} train/val leaks. Out-of-fold accuracy "
        f"{summary['out_of_fold_accuracy']:.1%}. Wrote {out}/audit.csv, audit.json, audit.html"
    )
    if as_json:
        ui.note(line)
        rows = [dict(zip(CSV_COLUMNS, f.row())) for f in findings]
        print(json.dumps({**summary, "findings": rows}, indent=2, ensure_ascii=False))
        return
    table = Table("issue", "path", "given", "suggested / other", "conf. / sim.", box=None)
    for f in findings[:15]:
        shown = f.path if not f.related_path else f"{f.path}\n= {f.related_path}"
        table.add_row(f.issue, shown, f.given, f.suggested, f"{f.confidence:.2f}")
    if findings:
        ui.show(table)
        if len(findings) > 15:
            ui.info(f"... and {len(findings) - 15} more in {out}/audit.csv")
    ui.info(line)
