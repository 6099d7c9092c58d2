"""`resnext audit`: planted label flips, near-copies across classes and train/val leaks are found
on tiny synthetic photos; a clean set yields (almost) nothing; bad input fails clearly."""

from __future__ import annotations

import csv
import json
import random
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from tests.conftest import invoke

COLOURS = {"red": (210, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 210), "yellow": (220, 200, 40)}
# a random resnet18 is the backbone here (no downloads in tests): fp32 and a fixed seed keep its
# features the same on every machine
AUDIT = ["--weights", "none", "--arch", "resnet18", "--img-size", "48", "--device", "cpu",
         "--precision", "fp32", "--workers", "0", "--similarity", "0.97", "--seed", "0"]  # fmt: skip
FLIPS = [("red", 3, "green"), ("green", 5, "blue"), ("blue", 7, "yellow")]


def scene(colour: tuple[int, int, int], rng: random.Random, size: int = 48) -> Image.Image:
    """Each image its own: grey clutter on a random background; its class is a colour square."""
    img = Image.new("RGB", (size, size), (rng.randint(90, 150),) * 3)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 4)):
        grey, x, y = rng.randint(30, 230), rng.randint(0, size - 8), rng.randint(0, size - 8)
        draw.rectangle([x, y, x + rng.randint(3, 9), y + rng.randint(3, 9)], fill=(grey,) * 3)
    shade = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in colour)
    w = rng.randint(size // 2 - 4, size // 2 + 8)
    x, y = rng.randint(0, size - w), rng.randint(0, size - w)
    draw.rectangle([x, y, x + w, y + w], fill=shade)
    return img


def photos(root: Path, per_class: int = 16, val: int = 5, seed: int = 0) -> Path:
    rng = random.Random(seed)
    for split, count in (("train", per_class), ("val", val)):
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                scene(colour, rng).save(folder / f"{name}_{i:02d}.jpg", quality=92)
    return root


def plant(root: Path) -> dict[str, object]:
    """Three label flips, a re-encoded resized copy of a yellow image among the reds, and a copy
    of a train image in val."""
    flipped = []
    for source, i, target in FLIPS:
        moved = root / "train" / target / f"flip_{source}_{i:02d}.jpg"
        (root / "train" / source / f"{source}_{i:02d}.jpg").rename(moved)
        flipped.append(str(moved))
    copy = root / "train" / "red" / "copy_of_yellow_10.jpg"
    Image.open(root / "train" / "yellow" / "yellow_10.jpg").resize((52, 52)).save(copy, quality=80)
    leak = root / "val" / "blue" / "copy_of_blue_12.jpg"
    Image.open(root / "train" / "blue" / "blue_12.jpg").resize((44, 44)).save(leak, quality=85)
    return {"flips": flipped, "copy": (str(root / "train" / "yellow" / "yellow_10.jpg"), str(copy)),
            "leak": (str(root / "train" / "blue" / "blue_12.jpg"), str(leak))}


def rows(out: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((out / "audit.csv").open()))


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("RESNEXT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_planted_problems_are_found_and_nothing_is_touched(tmp_path: Path, cache: Path):
    root = photos(tmp_path / "ds")
    planted = plant(root)
    before = snapshot(root)
    result = invoke(["audit", root, *AUDIT, "--out", tmp_path / "audit"])
    assert result.exit_code == 0, result.stderr
    assert snapshot(root) == before  # never moves, renames, deletes or rewrites a file
    found = rows(tmp_path / "audit")
    assert list(found[0]) == ["path", "given", "suggested", "confidence", "issue", "related_path"]
    labels = {r["path"]: r for r in found if r["issue"] == "label"}
    for (source, _, _), path in zip(FLIPS, planted["flips"]):
        assert path in labels, f"missed the flip {path}"
        assert labels[path]["suggested"] == source
    pairs = {(r["issue"], frozenset((r["path"], r["related_path"]))) for r in found if r["related_path"]}
    assert ("duplicate", frozenset(planted["copy"])) in pairs
    assert ("leak", frozenset(planted["leak"])) in pairs
    assert len(labels) <= 8  # 3 flips (and the misfiled copy) among 86 images: few false alarms
    summary = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert summary["counts"]["leak"] >= 1 and summary["counts"]["duplicate_across_classes"] >= 1
    assert set(summary["per_class"]) == set(COLOURS)
    assert all(0 <= c["estimated_noise"] <= 1 for c in summary["per_class"].values())
    assert "likely label errors" in result.stdout


def test_a_clean_set_yields_few_findings(tmp_path: Path, cache: Path):
    root = photos(tmp_path / "ds", seed=1)
    result = invoke(["audit", root, *AUDIT, "--out", tmp_path / "audit", "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)  # stdout holds the JSON alone
    assert summary["counts"]["duplicate"] == 0 and summary["counts"]["leak"] == 0
    assert summary["counts"]["label"] <= 3  # of 84
    assert summary["out_of_fold_accuracy"] >= 0.85
    assert len(summary["findings"]) == summary["counts"]["label"]


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources, self.ids, self.scripts, self.links = [], set(), 0, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.sources.append(attrs.get("src", ""))
        if tag == "script":
            self.scripts += 1
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag in ("a", "link") and attrs.get("href"):
            self.links.append(attrs["href"])


def test_audit_html_is_self_contained_and_shows_the_findings(tmp_path: Path, cache: Path):
    root = photos(tmp_path / "ds")
    plant(root)
    assert invoke(["audit", root, *AUDIT, "--out", tmp_path / "audit"]).exit_code == 0
    page = Page()
    page.feed((tmp_path / "audit" / "audit.html").read_text())
    assert {"labels", "leaks", "duplicates", "classes"} <= page.ids
    assert page.sources and all(s.startswith("data:image/jpeg;base64,") for s in page.sources)
    assert page.scripts == 0 and not page.links
    # each label finding: the image, 3 typical images of its given and of its suggested class
    labels = sum(r["issue"] == "label" for r in rows(tmp_path / "audit"))
    pairs = sum(r["issue"] in ("leak", "duplicate") for r in rows(tmp_path / "audit"))
    assert len(page.sources) == labels * 7 + pairs * 2


def test_a_second_audit_and_a_cached_training_reuse_the_features(tmp_path: Path, cache: Path):
    root = photos(tmp_path / "ds", per_class=6, val=2)
    first = invoke(["audit", root, *AUDIT, "--out", tmp_path / "a1"])
    assert first.exit_code == 0 and "cached in" in first.stdout
    second = invoke(["audit", root, *AUDIT, "--out", tmp_path / "a2"])
    assert second.exit_code == 0 and "reusing the cache" in second.stdout
    trained = invoke(["train", root, "--arch", "resnet18", "--weights", "none", "--freeze",
                      "--cache-features", "--img-size", "48", "--device", "cpu", "--precision", "fp32",
                      "--workers", "0", "--seed", "0", "--epochs", "1", "--no-report",
                      "--out", tmp_path / "run"])  # fmt: skip
    assert trained.exit_code == 0, trained.stderr
    assert "reusing the cache" in trained.stdout  # view 0 and val: what the audit computed
    assert len(list(cache.glob("*.pt"))) == 4  # + the 3 augmented views of train's default


def test_unreadable_files_are_reported_and_left_out(tmp_path: Path, cache: Path):
    root = photos(tmp_path / "ds", per_class=8, val=2)
    (root / "train" / "red" / "broken.jpg").write_bytes(b"not an image")
    result = invoke(["audit", root, *AUDIT, "--out", tmp_path / "audit"])
    assert result.exit_code == 0, result.stderr
    assert "broken.jpg" in result.stderr
    summary = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert [u["path"] for u in summary["unreadable"]] == [str(root / "train" / "red" / "broken.jpg")]
    assert summary["images"] == 4 * 10


@pytest.mark.parametrize("case,message", [("empty", "at least 2 class folders"),
                                          ("one_class", "at least 2 class folders"),
                                          ("missing", "does not exist")])
def test_bad_input_is_a_clear_error(tmp_path: Path, cache: Path, case: str, message: str):
    root = tmp_path / "ds"
    if case == "empty":
        root.mkdir()
    elif case == "one_class":
        photos(root, per_class=3, val=1)
        for name in ("green", "blue", "yellow"):
            for split in ("train", "val"):
                for f in (root / split / name).iterdir():
                    f.unlink()
                (root / split / name).rmdir()
    result = invoke(["audit", root, *AUDIT, "--out", tmp_path / "audit"])
    assert result.exit_code == 2 and result.stderr.startswith("Error:")
    assert message in result.stderr and "Traceback" not in result.stderr


def test_without_cleanlab_it_says_what_to_install(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "cleanlab.filter", None)  # import now raises ImportError
    result = invoke(["audit", photos(tmp_path / "ds", per_class=2, val=1), *AUDIT])
    assert result.exit_code == 2 and "pip install 'resnext-cli[audit]'" in result.stderr
