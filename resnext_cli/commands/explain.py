"""`resnext explain IMAGE...`: where the model looked. For every image (files, or folders of
them as batch-predict takes them) and every class asked for (default: the predicted one), an
overlay PNG `<stem>_<class>.png` and an entry in explain.json, in a new `runs/explain*` folder
or `--out DIR`."""

from __future__ import annotations

import difflib
import json
import shlex
import time
from pathlib import Path
from typing import Any

from resnext_cli import ui
from resnext_cli.config import ExplainConfig
from resnext_cli.data.folders import list_images
from resnext_cli.errors import EXIT_FAILED, EXIT_OK, UserError
from resnext_cli.files import make_folder, next_free_folder
from resnext_cli.model.cam import require_captum
from resnext_cli.model.engines import load_inference_model
from resnext_cli.outputs.heatmaps import (
    EXPLAIN_JSON,
    Explained,
    explain_images,
    overlay_name,
    read_explain_json,
    write_explain_json,
    write_overlay,
)


def explain(cfg: ExplainConfig) -> int:
    """Write the overlays and explain.json; returns the exit code (1: no image could be read)."""
    require_captum()  # before anything slow: say at once what to install
    paths = image_paths(cfg.images, cfg.recursive)
    out = output_folder(cfg.out)
    earlier = earlier_entries(out)
    engine = load_inference_model(cfg, announce=not cfg.json)
    wanted = class_indices(cfg.classes, engine.classes)
    ui.note(f"Explaining {len(paths)} image(s) with {cfg.method}  |  {engine.describe()}")
    writer = OverlayWriter(out, earlier)
    started, unreadable = time.perf_counter(), 0
    samples = [(path, wanted) for path in paths]
    bar = ui.progress(total=len(paths), desc="explain", unit="img")
    try:
        for explained, failures in explain_images(engine, samples, cfg.method, cfg.batch_size, cfg.workers):
            for item in explained:
                entry = writer.add(item)
                if not cfg.json:
                    bar.write(f"image: {item.path}  class: {item.class_name}  prob: {item.prob:.3f}  "
                              f"peak: {_peak(entry['peak'])}  -> {entry['overlay']}")  # fmt: skip
            for path, reason in failures:
                unreadable += 1
                ui.warn(f"unreadable {path}: {reason}")
            bar.update(len({item.path for item in explained}) + len(failures))
    finally:
        bar.close()
        writer.close()
    if cfg.json:
        print(json.dumps(writer.new, indent=2, ensure_ascii=False))
    images, seconds = len({e["path"] for e in writer.new}), time.perf_counter() - started
    (ui.note if cfg.json else ui.info)(
        f"Explained {images} image(s) ({len(writer.new)} heatmap(s)), {unreadable} unreadable, in "
        f"{seconds:.1f} s. Wrote {out}/: {EXPLAIN_JSON} and the overlays."
    )
    return EXIT_OK if writer.new else EXIT_FAILED


def _peak(peak: list[int] | None) -> str:
    return f"({peak[0]}, {peak[1]})" if peak else "none (no evidence for the class)"


def image_paths(images: list[str], recursive: bool) -> list[str]:
    """Files as given, folders expanded like batch-predict's (sorted, `recursive` for their
    sub-folders); each file once, in the order given."""
    found: list[str] = []
    for image in images:
        p = Path(image)
        if not p.exists():
            raise UserError(f"{image} does not exist.")
        if not p.is_dir():
            found.append(image)
            continue
        inside = list_images(p, recursive)
        if not inside:
            nested = [] if recursive else list_images(p, recursive=True)
            hint = (f" Its sub-folders hold {len(nested)}: add --recursive (resnext explain "
                    f"{shlex.quote(image)} --recursive)." if nested else "")  # fmt: skip
            raise UserError(f"No image files in the folder {image}.{hint}")
        found += inside
    return list(dict.fromkeys(found))


def output_folder(out: str | None, root: str = "runs") -> Path:
    """--out as given, else the next free runs/explain, runs/explain2, ..."""
    if out:
        make_folder(Path(out))
        return Path(out)
    return next_free_folder(Path(root), "explain", "folder", f"Too many explain folders in {root}; pass --out.")


def earlier_entries(out: Path) -> list[dict[str, Any]]:
    """explain.json of an earlier `resnext explain` into the same folder (whose overlays may be
    replaced); a file of that name that is not one is never overwritten."""
    entries = read_explain_json(out)
    if not entries and (out / EXPLAIN_JSON).exists():
        raise UserError(f"{out / EXPLAIN_JSON} exists and was not written by resnext explain; "
                        "nothing was overwritten. Choose another --out.")  # fmt: skip
    return entries


def class_indices(names: list[str], classes: list[str]) -> list[int] | None:
    """--class NAME... as the model's class indices; None (the predicted class) without."""
    indices = []
    for name in names:
        if name not in classes:
            close = difflib.get_close_matches(name, classes, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UserError(f"The model has no class {name!r}.{hint} Its classes: {', '.join(classes)}.")
        indices.append(classes.index(name))
    return list(dict.fromkeys(indices)) or None


class OverlayWriter:
    """Writes each overlay as it comes and explain.json at the end: the earlier entries of the
    folder kept, those of an image and class explained again replaced (same file). A file in
    the folder that no explain.json lists is never written over: the name steps aside."""

    def __init__(self, out: Path, earlier: list[dict[str, Any]]) -> None:
        self.out = out
        self.earlier = {(e.get("path"), e.get("class")): e for e in earlier if e.get("overlay")}
        self.taken = {p.name for p in out.iterdir()}  # an earlier overlay is reused by its entry only
        self.new: list[dict[str, Any]] = []

    def add(self, item: Explained) -> dict[str, Any]:
        previous = self.earlier.pop((item.path, item.class_name), None)
        name = previous["overlay"] if previous else overlay_name(item.path, item.class_name, self.taken)
        self.taken.add(name)
        write_overlay(self.out, name, item)
        entry = item.record(name)
        self.new.append(entry)
        return entry

    def close(self) -> None:
        kept = [e for e in self.earlier.values() if (self.out / e["overlay"]).is_file()]
        if self.new or kept:
            write_explain_json(self.out, kept + self.new)
