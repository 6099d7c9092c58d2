"""PNG figures for runs and evaluations: matplotlib's object API on the Agg canvas, so no
window, no display and no global pyplot state, whatever backend the user has configured."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from resnext_cli.errors import UserError
from resnext_cli.files import atomic_write, printable
from resnext_cli.outputs.metrics import ReliabilityBin, row_normalised

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def training_curves_png(rows: Sequence[dict[str, Any]], best_by: str = "val_acc") -> bytes:
    """Loss, accuracy and learning rate per epoch, from metrics.csv's rows; the val balanced
    accuracy too where it differs (imbalanced val); `best_by`: the column that picks best.pt."""
    figure = _figure(13.5, 3.8)
    epochs = [int(r["epoch"]) for r in rows]
    loss, accuracy, rate = figure.subplots(1, 3)
    marker = "o" if len(epochs) <= 30 else None
    loss.plot(epochs, [float(r["train_loss"]) for r in rows], marker=marker, label="train")
    loss.plot(epochs, [float(r["val_loss"]) for r in rows], marker=marker, label="val")
    loss.set_title("loss")
    accuracy.plot(epochs, [100 * float(r["train_acc"]) for r in rows], marker=marker, label="train")
    accuracy.plot(epochs, [100 * float(r["val_acc"]) for r in rows], marker=marker, label="val")
    balanced = [100 * float(r.get("val_balanced_acc") or r["val_acc"]) for r in rows]
    if balanced != [100 * float(r["val_acc"]) for r in rows]:
        accuracy.plot(epochs, balanced, marker=marker, label="val balanced")
    best_by = best_by if all(r.get(best_by) not in (None, "") for r in rows) else "val_acc"
    best = max(range(len(rows)), key=lambda i: float(rows[i][best_by]))
    accuracy.scatter([epochs[best]], [100 * float(rows[best][best_by])], s=120,
                     facecolors="none", edgecolors="black", zorder=3, label="best")  # fmt: skip
    accuracy.set_title("accuracy (%)")
    rate.plot(epochs, [float(r["lr"]) for r in rows], marker=marker, color="tab:green")
    rate.set_title("learning rate (head)")
    for axes in (loss, accuracy, rate):
        axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    loss.legend()
    accuracy.legend()
    return _png(figure)


def compared_curves_png(runs: Sequence[tuple[str, Sequence[dict[str, Any]]]]) -> bytes:
    """Several runs' loss, accuracy and learning rate per epoch on shared axes (metrics.csv's
    rows): one colour per run, val solid, train dashed; for `report --compare`."""
    figure = _figure(13.5, 4.2)
    loss, accuracy, rate = figure.subplots(1, 3)
    longest = max((len(rows) for _, rows in runs), default=0)
    marker = "o" if longest <= 30 else None
    for index, (name, rows) in enumerate(runs):
        colour, epochs = f"C{index}", [int(r["epoch"]) for r in rows]
        for axes, metric, scale in ((loss, "loss", 1.0), (accuracy, "acc", 100.0)):
            for split, style in (("val", "-"), ("train", "--")):
                axes.plot(epochs, [scale * float(r[f"{split}_{metric}"]) for r in rows], color=colour,
                          linestyle=style, marker=marker, markersize=4, label=f"{name} {split}")  # fmt: skip
        rate.plot(epochs, [float(r["lr"]) for r in rows], color=colour, marker=marker, markersize=4,
                  label=name)  # fmt: skip
    for axes, title in ((loss, "loss"), (accuracy, "accuracy (%)"), (rate, "learning rate (head)")):
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.legend(fontsize=8)
    return _png(figure)


def confusion_matrix_png(matrix: list[list[int]], classes: Sequence[str], title: str = "") -> bytes:
    """Raw counts beside row-normalised fractions. Cells carry numbers up to 30 classes; the
    figure and its fonts scale so that ~100 class names stay readable."""
    n = len(classes)
    classes = [printable(name) for name in classes]  # a non-UTF-8 folder name cannot be drawn
    side = min(28.0, max(4.5, 0.24 * n + 2.5))
    font = 10 if n <= 15 else max(5.0, 10 - (n - 15) / 15)
    figure = _figure(2 * side + 1.5, side + 1.2)
    normalised = row_normalised(matrix)
    for axes, values, name, fmt in zip(
        figure.subplots(1, 2),
        (matrix, normalised),
        ("counts", "row-normalised (recall on the diagonal)"),
        ("{:d}", "{:.2f}"),
    ):
        image = axes.imshow(values, cmap="Blues", vmin=0, interpolation="nearest")
        figure.colorbar(image, ax=axes, fraction=0.046, pad=0.03)
        axes.set_title(name, fontsize=font + 2)
        axes.set_xlabel("predicted", fontsize=font + 1)
        axes.set_ylabel("true", fontsize=font + 1)
        axes.set_xticks(range(n), labels=list(classes), rotation=90, fontsize=font)
        axes.set_yticks(range(n), labels=list(classes), fontsize=font)
        if n <= 30:
            top = max((max(row) for row in values), default=0) or 1
            for i, row in enumerate(values):
                for j, value in enumerate(row):
                    colour = "white" if value > top / 2 else "black"
                    axes.text(j, i, fmt.format(value), ha="center", va="center",
                              fontsize=font - 1, color=colour)  # fmt: skip
    if title:
        figure.suptitle(title)
    return _png(figure)


def reliability_png(before: Sequence[ReliabilityBin], after: Sequence[ReliabilityBin], temperature: float) -> bytes:
    """Reliability diagrams (Guo et al. 2017) of the raw and the calibrated probabilities: per
    confidence bin, the accuracy against the mean confidence (the diagonal is perfect), with
    the share of images in each bin below."""
    figure = _figure(10.5, 5.2)
    grid = figure.add_gridspec(2, 2, height_ratios=[3, 1])
    for column, (bins, name) in enumerate(((before, "raw softmax (temperature 1)"),
                                           (after, f"calibrated (temperature {temperature:.3g})"))):  # fmt: skip
        axes, counts = figure.add_subplot(grid[0, column]), figure.add_subplot(grid[1, column])
        total = sum(b.count for b in bins) or 1
        centres = [(b.low + b.high) / 2 for b in bins]
        width = bins[0].high - bins[0].low if bins else 1.0
        filled = [b for b in bins if b.count]
        axes.bar([(b.low + b.high) / 2 for b in filled], [b.accuracy for b in filled], width=width * 0.9,
                 color="tab:blue", alpha=0.8, label="accuracy")  # fmt: skip
        axes.plot([b.confidence for b in filled], [b.confidence for b in filled], "o", color="tab:red",
                  markersize=4, label="mean confidence")  # fmt: skip
        axes.plot([0, 1], [0, 1], "--", color="grey", linewidth=1)
        ece = sum(b.count / total * abs(b.accuracy - b.confidence) for b in filled)
        axes.set_title(f"{name}\nECE {ece:.3f}")
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1)
        axes.set_ylabel("accuracy")
        axes.legend(loc="upper left", fontsize=8)
        counts.bar(centres, [b.count / total for b in bins], width=width * 0.9, color="tab:grey")
        counts.set_xlim(0, 1)
        counts.set_xlabel("confidence (top probability)")
        counts.set_ylabel("share")
    return _png(figure)


def plot_format(path: str | Path) -> str:
    """The file format a plot path asks for, by its extension: any format matplotlib writes."""
    from matplotlib.backend_bases import FigureCanvasBase

    supported = FigureCanvasBase.get_supported_filetypes()
    extension = Path(path).suffix.lower().lstrip(".")
    if extension not in supported:
        names = ", ".join(f".{ext}" for ext in sorted(supported))
        raise UserError(f"Cannot save a plot as {path}: its extension names no image format "
                        f"matplotlib writes. Use one of {names}.")  # fmt: skip
    return extension


def predictions_figure(pictures: Sequence[Any], titles: Sequence[str]) -> Figure:
    """The images side by side, each under its title line."""
    figure = _figure(3.2 * len(pictures), 3.6)
    for axes, picture, title in zip(figure.subplots(1, len(pictures), squeeze=False)[0],
                                    pictures, titles):  # fmt: skip
        axes.imshow(picture)
        axes.set_title(printable(title), fontsize=13)
        axes.set_axis_off()
    return figure


def explained_predictions_figure(
    pictures: Sequence[Any], overlays: Sequence[Any], rankings: Sequence[Sequence[tuple[str, float]]],
    titles: Sequence[str],
) -> Figure:  # fmt: skip
    """A row per image: the photo, its heatmap for the predicted class (where the model looked),
    and the probabilities of the top classes."""
    figure = _figure(13.0, 3.7 * len(pictures))
    rows = figure.subplots(len(pictures), 3, squeeze=False, width_ratios=[1, 1, 1.25])
    for (photo, heat, bars), picture, overlay, ranked, title in zip(rows, pictures, overlays,
                                                                    rankings, titles):  # fmt: skip
        photo.imshow(picture)
        photo.set_title(Path(title).name, fontsize=11)
        heat.imshow(overlay)
        heat.set_title(f"where it saw {ranked[0][0]} (Grad-CAM)", fontsize=11)
        for axes in (photo, heat):
            axes.set_axis_off()
        names, values = [c for c, _ in ranked][::-1], [100 * p for _, p in ranked][::-1]
        colours = ["tab:blue"] * (len(names) - 1) + ["tab:orange"]
        drawn = bars.barh(range(len(names)), values, color=colours)
        bars.set_yticks(range(len(names)), labels=names)
        bars.bar_label(drawn, labels=[f"{v:.1f}%" for v in values], padding=3, fontsize=9)
        bars.set_xlim(0, 118)
        bars.set_xlabel("probability (%)")
        bars.set_title(f"top {len(names)}", fontsize=11)
        bars.spines[["top", "right"]].set_visible(False)
    return figure


def save_figure(path: Path, figure: Figure, fmt: str) -> None:
    atomic_write(path, lambda handle: figure.savefig(handle, format=fmt, dpi=100))


def write_png(path: Path, png: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(png))


def _figure(width: float, height: float) -> Figure:
    # matplotlib (~0.6 s to import) loads on first use, which in `train` is the plot thread,
    # so neither start-up nor the first epoch waits for it
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _png(figure: Figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


class BackgroundWriter:
    """Renders and writes PNGs on one helper thread, at most `duty` of the time.

    Requests are keyed by file: if a file's previous request has not started yet, the newer one
    replaces it. After a drawing that took t seconds the thread rests t * (1/duty - 1) seconds,
    so drawing can never cost an epoch more than ~`duty` of its time (on a CPU-bound machine a
    drawing competes with training for cores and the GIL): with epochs of several seconds every
    epoch is drawn, with sub-second epochs (cached features) every few epochs. `close()` draws
    whatever is pending at once. A failure is kept as a message: plots are never worth a
    failed run.
    """

    def __init__(self, duty: float = 0.05) -> None:
        self.rest_factor = 1 / duty - 1
        self._pending: dict[Path, Callable[[], bytes]] = {}
        self._condition = threading.Condition()
        self._closing = False
        self._thread: Any = None
        self.errors: list[str] = []

    def submit(self, path: Path, render: Callable[[], bytes]) -> None:
        with self._condition:
            self._pending[Path(path)] = render
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="resnext-plots", daemon=True)
                self._thread.start()
            self._condition.notify()

    def close(self) -> None:
        """Wait until every pending file is written."""
        with self._condition:
            self._closing = True
            self._condition.notify()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._pending and not self._closing:
                    self._condition.wait()
                if not self._pending:
                    return
                path = next(iter(self._pending))
                render = self._pending.pop(path)
            started = time.perf_counter()
            try:
                write_png(path, render())
            except Exception as exc:  # noqa: BLE001 - reported by the caller, never fatal
                self.errors.append(f"{path.name}: {type(exc).__name__}: {exc}")
            rest = (time.perf_counter() - started) * self.rest_factor
            with self._condition:
                self._condition.wait_for(lambda: self._closing, timeout=rest)
