"""Run plots, `resnext report` and report.html: parsed always, rendered in Chromium when present."""

from __future__ import annotations

import base64
import html.parser
import io
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import yaml
from PIL import Image

from resnext_cli.outputs.plots import BackgroundWriter
from resnext_cli.outputs.run_report import RunFiles, render_html
from tests.conftest import invoke

PNG = b"\x89PNG\r\n\x1a\n"


class PageParser(html.parser.HTMLParser):
    """Tags, attributes and text of a page, as a browser would tokenise them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    parser.close()
    return parser


def test_train_writes_curves_and_confusion_matrix(trained_run: Path):
    for name in ("results.png", "confusion_matrix.png"):
        picture = Image.open(trained_run / name)
        assert picture.format == "PNG" and picture.width > 600, name
    assert not list(trained_run.glob(".*.tmp"))  # every plot written atomically and finished


def test_report_html_is_self_contained_and_complete(trained_run: Path):
    page = (trained_run / "report.html").read_text(encoding="utf-8")
    parsed = parse(page)
    tags = [tag for tag, _ in parsed.tags]
    assert not {"script", "link", "iframe", "object", "embed"} & set(tags)
    images = [attrs for tag, attrs in parsed.tags if tag == "img"]
    assert len(images) >= 2  # curves and confusion matrix (+ one per mistake)
    for attrs in images:
        assert attrs["src"].startswith("data:image/"), attrs["src"][:40]
        assert attrs.get("alt")
        payload = base64.b64decode(attrs["src"].split(",", 1)[1])
        Image.open(io.BytesIO(payload)).verify()  # a real picture, not a placeholder
    for tag, attrs in parsed.tags:
        for value in attrs.values():
            assert not re.match(r"(https?:)?//", value), (tag, value)
    assert "url(" not in page  # no stylesheet fetches either
    ids = {attrs.get("id") for _, attrs in parsed.tags}
    assert {"curves", "confusion", "per-class", "mistakes", "config"} <= ids
    text = " ".join(parsed.text)
    for name in ("alpha", "beta", "gamma", "macro avg", "weighted avg", "resnet18", "best val accuracy"):
        assert name in text, name


def test_report_gallery_shows_the_most_confident_mistakes(tmp_path: Path, trained_run: Path, dataset: Path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    data = tmp_path / "data"
    shutil.copytree(dataset / "val", data)
    for picture in sorted((data / "alpha").iterdir())[:5]:  # sure mistakes: alpha filed as gamma
        shutil.move(picture, data / "gamma" / picture.name)
    result = invoke(["report", run, "--data", data, "--gallery", "3", "--workers", "0"])
    assert result.exit_code == 0, result.stderr
    parsed = parse((run / "report.html").read_text(encoding="utf-8"))
    figures = sum(tag == "figure" for tag, _ in parsed.tags)
    missed = (run / "eval" / "misclassified.csv").read_text().splitlines()[1:]
    assert len(missed) >= 5 and figures == 3
    text = " ".join(parsed.text)
    assert f"and {len(missed) - 3} more" in text
    first = missed[0].split(",")
    assert Path(first[0]).name in text  # the most confident one is shown


def test_report_escapes_what_it_shows():
    evil = '<script>alert("x")</script>'
    run = RunFiles(
        run_dir=Path("runs/exp"),
        config={"data": evil, "arch": "resnet18"},
        metrics=[{"epoch": "1", "val_acc": "0.5", "seconds": "1.0"}],
        classes=[evil, "b"],
        curves_png=PNG,
        evaluation={"accuracy": 0.5, "n": 2, "macro_f1": 0.5, "macro_precision": 0.5,
                    "macro_recall": 0.5, "weighted_precision": 0.5, "weighted_recall": 0.5,
                    "weighted_f1": 0.5, "images": evil},
        per_class=[{"class": evil, "precision": "1", "recall": "0.5", "f1": "0.6", "support": "2"}],
        confusion_png=PNG,
        mistakes=[{"path": "/nonexistent/x.jpg", "true": evil, "predicted": "b", "prob": "0.9"}],
    )  # fmt: skip
    page = render_html(run, gallery=5)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "file no longer readable" in page  # a moved image loses its thumbnail, not the report


def test_report_without_its_data_still_shows_the_run(tmp_path: Path, trained_run: Path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.rmtree(run / "eval")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"] = str(tmp_path / "moved-away")
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    result = invoke(["report", run])
    assert result.exit_code == 0, result.stderr
    assert "moved-away" in result.stderr and "--data" in result.stderr
    page = (run / "report.html").read_text()
    assert "Not evaluated" in page and 'id="curves"' in page


def test_report_of_a_folder_that_is_not_a_run(tmp_path: Path):
    result = invoke(["report", tmp_path])
    assert result.exit_code == 2
    assert "not a finished run folder" in result.stderr and "Traceback" not in result.stderr


def test_background_writer_keeps_the_newest_request_and_reports_failures(tmp_path: Path):
    gate = threading.Event()
    calls: list[str] = []

    def render(tag: str, wait: bool = False):
        def draw() -> bytes:
            if wait:
                gate.wait(5)
            calls.append(tag)
            return tag.encode()

        return draw

    writer = BackgroundWriter()
    writer.submit(tmp_path / "a.png", render("first", wait=True))  # busy until the gate opens
    writer.submit(tmp_path / "b.png", render("stale"))
    writer.submit(tmp_path / "b.png", render("newest"))  # replaces the one not yet started
    writer.submit(tmp_path / "c.png", lambda: 1 / 0)  # type: ignore[arg-type, return-value]
    gate.set()
    writer.close()
    assert (tmp_path / "b.png").read_bytes() == b"newest" and "stale" not in calls
    assert (tmp_path / "a.png").read_bytes() == b"first"
    assert not (tmp_path / "c.png").exists() and "ZeroDivisionError" in writer.errors[0]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const drawn = images.filter((i) => i.complete && i.naturalWidth > 0).length;
  document.title = `drawn ${drawn} of ${images.length}`;
});
</script></body>"""


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path: Path, trained_run: Path):
    # a copy with a probe script: every embedded image must decode in a real browser, offline
    page = (trained_run / "report.html").read_text(encoding="utf-8").replace("</body>", PROBE)
    probe = tmp_path / "probe.html"
    probe.write_text(page, encoding="utf-8")
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=10000"]  # fmt: skip
    dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout  # fmt: skip
    match = re.search(r"<title>drawn (\d+) of (\d+)</title>", dom)
    assert match, dom[:500]
    drawn, total = map(int, match.groups())
    assert total >= 2 and drawn == total

    shot = tmp_path / "shot.png"
    subprocess.run([*flags, "--window-size=1280,2400", f"--screenshot={shot}",
                    (trained_run / "report.html").as_uri()], capture_output=True, timeout=120)  # fmt: skip
    pixels = Image.open(shot).convert("L")
    ink = sum(count for value, count in enumerate(pixels.histogram()) if value < 200)
    assert ink / (pixels.width * pixels.height) > 0.02  # text, curves and matrix on the page


def test_a_failed_report_does_not_fail_the_finished_run(tmp_path: Path, dataset: Path, monkeypatch):
    from resnext_cli.errors import UserError
    from resnext_cli.outputs import run_report as report

    def broken(cfg):
        raise UserError("Cannot write report.html: No space left on device.")

    monkeypatch.setattr(report, "write_report", broken)
    result = invoke(["train", "--data", dataset, "--arch", "resnet18", "--img-size", "32",
                     "--workers", "0", "--weights", "none", "--epochs", "1", "--out", tmp_path / "run"])
    assert result.exit_code == 0, result.stderr
    assert "report.html was not written" in result.stderr and "resnext report" in result.stderr
    assert (tmp_path / "run" / "best.pt").exists()
