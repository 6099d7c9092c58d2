"""Heatmaps on the photos they explain, for `resnext explain`, `predict --explain` and the
mistakes in evaluate's folder and report.html.

A class-activation map (`model/cam.py`) lives on the model's input crop. Here it is taken back
through the eval transform (the shorter side resized, then the centre crop) onto the whole
upright photo (after its EXIF orientation): `peak`, the heatmap's maximum, is in the photo's own
pixels, and what lies outside the crop, which the model never saw, is greyed out on the overlay.
The map is interpolated bicubically between its cells' centres (the receptive-field centres of
the last stage), so the peak can fall between two cells where both saw the evidence.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from resnext_cli.data.batches import get_batch
from resnext_cli.data.images import describe_failure, load_rgb, read_header
from resnext_cli.data.loaders import make_loader
from resnext_cli.data.transforms import Box, Preprocessing, centre_crop_box
from resnext_cli.files import atomic_write, atomic_write_text
from resnext_cli.model.cam import activation_maps
from resnext_cli.model.engines import InferenceModel

DISPLAY_MIN, DISPLAY_MAX = 384, 1024  # an overlay's longer side: small photos grow, large shrink
COLORMAP = "turbo"
EXPLAIN_JSON = "explain.json"


@dataclass(frozen=True)
class PhotoFrame:
    """Where the model's input crop lies in the upright photo, in the photo's pixels."""

    size: tuple[int, int]  # the upright photo's width and height
    box: Box  # x0, y0, x1, y1 (pixel edges) of the centre crop the model saw
    crop: int  # the crop's side in the model's input pixels


def photo_frame(path: str, preprocessing: Preprocessing) -> PhotoFrame:
    """The eval transform's crop, as the loader takes it: from the picture Pillow decodes (at a
    reduced scale for large JPEGs), scaled to the full upright photo."""
    header = read_header(path, preprocessing.decode_min_size)
    width, height = header.draft_size
    x0, y0, x1, y1 = centre_crop_box(width, height, preprocessing.img_size, preprocessing.resize_size)
    sx, sy = header.size[0] / width, header.size[1] / height
    return PhotoFrame(header.size, (x0 * sx, y0 * sy, x1 * sx, y1 * sy), preprocessing.img_size)


@dataclass
class Explained:
    """One image's heatmap for one class."""

    path: str
    class_name: str
    prob: float  # of that class, as predict computes it
    method: str
    frame: PhotoFrame
    cells: torch.Tensor  # h x w, >= 0
    stride: float
    offset: float

    def sample(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """The heatmap at photo coordinates xs (columns) and ys (rows), pixel-edge convention,
        scaled to 0-1 over what is sampled; NaN outside the crop."""
        heat = self._interpolate(xs, ys)
        top = float(torch.nan_to_num(heat, nan=0).max())
        return (heat / top if top > 0 else heat).clamp(0, 1)  # NaN stays NaN

    def _interpolate(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """Bicubic between the cells' centres (constant beyond the outer ones), its values unclamped: a
        clamp would flatten the top into a plateau whose first pixel is not the peak."""
        x0, y0, x1, y1 = self.frame.box
        fx = ((xs - x0) * self.frame.crop / (x1 - x0) - self.offset) / self.stride
        fy = ((ys - y0) * self.frame.crop / (y1 - y0) - self.offset) / self.stride
        h, w = self.cells.shape
        # clamped here: grid_sample's border padding clamps bicubic's taps, not the position, so
        # beyond the last centre it would overshoot (a false peak a third of a cell outside it)
        fx, fy = fx.clamp(0, max(w - 1, 0)), fy.clamp(0, max(h - 1, 0))
        gx = 2 * fx / (w - 1) - 1 if w > 1 else torch.zeros_like(fx)
        gy = 2 * fy / (h - 1) - 1 if h > 1 else torch.zeros_like(fy)
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None].float()
        cells = self.cells[None, None].float()
        heat = F.grid_sample(cells, grid, mode="bicubic", padding_mode="border", align_corners=True)[0, 0]
        heat[:, (xs < x0) | (xs > x1)] = float("nan")
        heat[(ys < y0) | (ys > y1), :] = float("nan")
        return heat

    @property
    def peak(self) -> tuple[int, int] | None:
        """The heatmap's maximum as the pixel (x, y) of the upright photo; None when the map
        holds no evidence for the class at all. Found on the model's input grid, the finest the
        map can be told on."""
        if float(self.cells.max()) <= 0:
            return None
        x0, y0, x1, y1 = self.frame.box
        centres = torch.arange(self.frame.crop, dtype=torch.float64) + 0.5
        xs = x0 + centres * (x1 - x0) / self.frame.crop
        ys = y0 + centres * (y1 - y0) / self.frame.crop
        heat = self._interpolate(xs, ys)
        row, col = divmod(int(torch.nan_to_num(heat, nan=-1).argmax()), heat.shape[1])
        width, height = self.frame.size
        return min(int(xs[col]), width - 1), min(int(ys[row]), height - 1)

    def record(self, overlay: str | None = None) -> dict[str, Any]:
        """Its entry in explain.json."""
        peak = self.peak
        entry = {"path": self.path, "class": self.class_name, "prob": round(self.prob, 6),
                 "method": self.method, "peak": list(peak) if peak else None}  # fmt: skip
        if overlay is not None:
            entry["overlay"] = overlay
        return entry


def explain_images(
    engine: InferenceModel, samples: list[tuple[str, list[int] | None]], method: str,
    batch_size: int, workers: int | None,
) -> Iterator[tuple[list[Explained], list[tuple[str, str]]]]:  # fmt: skip
    """Per batch: the heatmaps of each image for the class indices asked for (None: the
    predicted class), and the files that could not be read, with the reason."""
    paths = [path for path, _ in samples]
    loader = make_loader(engine.dataset([(path, -1) for path in paths]), batch_size=batch_size,
                         workers=engine.decode_workers(paths, workers),
                         pin_memory=engine.pin_memory)  # fmt: skip
    for loaded in loader:
        batch = get_batch(loaded, engine.spec)
        failures = [(paths[i], reason) for i, reason in batch.failures]
        if batch.inputs is None:
            yield [], failures
            continue
        probs = engine.probabilities(batch.inputs)
        pairs = [(row, cls) for row, index in enumerate(batch.indices)
                 for cls in samples[index][1] or [int(probs[row].argmax())]]  # fmt: skip
        rows, classes = [row for row, _ in pairs], [cls for _, cls in pairs]
        maps = activation_maps(engine.model, engine.arch, batch.inputs[rows], torch.tensor(classes), method)
        frames = _frames([paths[i] for i in batch.indices], engine.preprocessing, failures)
        explained = [
            Explained(path, engine.classes[cls], float(probs[row, cls]), method, frames[path],
                      maps.maps[k], maps.stride, maps.offset)
            for k, (row, cls) in enumerate(pairs)
            if (path := paths[batch.indices[row]]) in frames
        ]  # fmt: skip
        yield explained, failures


def _frames(
    paths: list[str], preprocessing: Preprocessing, failures: list[tuple[str, str]]
) -> dict[str, PhotoFrame]:
    """Each photo's frame; one that can no longer be read (changed since it was decoded) is
    added to `failures`."""
    frames = {}
    for path in paths:
        try:
            frames[path] = photo_frame(path, preprocessing)
        except Exception as exc:  # noqa: BLE001 - reported like any unreadable file
            failures.append((path, describe_failure(exc)))
    return frames


# ---------------------------------------------------------------- overlays


def display_size(size: tuple[int, int]) -> tuple[int, int]:
    """The overlay's size: the photo's, scaled so its longer side is within DISPLAY_MIN..MAX."""
    longer = max(size)
    scale = min(1.0, DISPLAY_MAX / longer) if longer >= DISPLAY_MIN else DISPLAY_MIN / longer
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def overlay_image(explained: Explained, label: str | None = None) -> Image.Image:
    """The photo with the heatmap over the part the model saw, the rest greyed out (with the
    crop's outline), the peak ringed, and `label` (default: class and probability) in the
    top-left corner."""
    width, height = display_size(explained.frame.size)
    photo = load_rgb(explained.path, max(width, height)).resize((width, height), Image.BICUBIC)
    sx, sy = explained.frame.size[0] / width, explained.frame.size[1] / height
    heat = explained.sample((torch.arange(width) + 0.5) * sx, (torch.arange(height) + 0.5) * sy).numpy()
    rgb = np.asarray(photo, dtype=np.float32) / 255
    inside = ~np.isnan(heat)
    level = np.nan_to_num(heat)[..., None]
    colours = _colormap()(level[..., 0])[..., :3]
    alpha = 0.25 + 0.45 * level  # cold parts stay visible through a light tint
    grey = rgb.mean(axis=2, keepdims=True) * 0.5 + 0.15  # outside the crop: not seen by the model
    out = np.where(inside[..., None], rgb * (1 - alpha) + colours * alpha, grey)
    picture = Image.fromarray((out.clip(0, 1) * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    x0, y0, x1, y1 = explained.frame.box
    draw.rectangle((x0 / sx, y0 / sy, x1 / sx - 1, y1 / sy - 1), outline=(255, 255, 255), width=1)
    _ring_peak(draw, explained.peak, sx, sy, width)
    _corner_label(draw, label or f"{explained.class_name} {explained.prob:.1%}", width)
    return picture


def _colormap() -> Any:
    from matplotlib import colormaps  # ~0.5 s to import: only when an overlay is drawn

    return colormaps[COLORMAP]


def _ring_peak(draw: ImageDraw.ImageDraw, peak: tuple[int, int] | None, sx: float, sy: float,
               width: int) -> None:  # fmt: skip
    if peak is None:
        return
    x, y, r = (peak[0] + 0.5) / sx, (peak[1] + 0.5) / sy, max(4, width // 60)
    draw.ellipse((x - r, y - r, x + r, y + r), outline=(0, 0, 0), width=3)
    draw.ellipse((x - r, y - r, x + r, y + r), outline=(255, 255, 255), width=1)


def _corner_label(draw: ImageDraw.ImageDraw, text: str, width: int) -> None:
    size = max(12, width // 24)
    try:
        font: Any = ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or without FreeType: the bitmap font
        font = ImageFont.load_default()
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(3, size // 4)
    draw.rectangle((0, 0, right - left + 2 * pad, bottom - top + 2 * pad), fill=(0, 0, 0))
    draw.text((pad - left, pad - top), text, fill=(255, 255, 255), font=font)


def overlay_png(explained: Explained, label: str | None = None) -> bytes:
    buffer = io.BytesIO()
    overlay_image(explained, label).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- files


def overlay_name(path: str, class_name: str, taken: set[str], prefix: str = "") -> str:
    """`<stem>_<class>.png` (characters a file name should not hold replaced by `_`), made
    unique among `taken` with -2, -3... after the stem; added to `taken`."""
    stem, cls = _safe(Path(path).stem), _safe(class_name)
    name, n = f"{prefix}{stem}_{cls}.png", 2
    while name in taken:
        name, n = f"{prefix}{stem}-{n}_{cls}.png", n + 1
    taken.add(name)
    return name


def _safe(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text).strip(".") or "_"


def write_overlay(folder: Path, name: str, explained: Explained, label: str | None = None) -> None:
    png = overlay_png(explained, label)
    atomic_write(folder / name, lambda handle: handle.write(png))


def write_explain_json(folder: Path, entries: list[dict[str, Any]]) -> None:
    atomic_write_text(folder / EXPLAIN_JSON, json.dumps(entries, indent=2, ensure_ascii=False) + "\n")


def read_explain_json(folder: Path) -> list[dict[str, Any]]:
    """explain.json of a folder, [] when there is none or it is not one of ours."""
    try:
        entries = json.loads((folder / EXPLAIN_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    ok = isinstance(entries, list) and all(isinstance(e, dict) and "path" in e for e in entries)
    return entries if ok else []
