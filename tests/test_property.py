"""Random folder trees: train and batch-predict never crash and account for every file."""

from __future__ import annotations

import csv
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import CLASS_COLOURS, TINY_TRAIN, draw_image, invoke

KINDS = ("good", "good", "good", "broken", "empty", "stray", "folder")
EXTENSIONS = (".png", ".JPG", ".jpeg", ".webp", ".Bmp")
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}

entries = st.lists(
    st.tuples(
        st.sampled_from(("train", "val")),
        st.sampled_from(tuple(CLASS_COLOURS)[:2]),
        st.sampled_from(KINDS),
        st.sampled_from(EXTENSIONS),
    ),
    max_size=16,
)


def build_tree(root: Path, spec: list[tuple[str, str, str, str]]) -> dict[str, set[str]]:
    """Writes the files; returns, per split, the image-named entries and the broken ones."""
    rng = random.Random(len(spec))
    expected: dict[str, set[str]] = {"train": set(), "val": set(), "broken": set()}
    for i, (split, label, kind, ext) in enumerate(spec):
        folder = root / split / label
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"f{i:02d}{ext if kind != 'stray' else '.txt'}"
        if kind == "good":
            draw_image(CLASS_COLOURS[label], rng).save(path, format=FORMATS[ext.lower()])
        elif kind == "broken":
            path.write_bytes(os.urandom(64))
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "folder":
            path.mkdir()
        else:
            path.write_text("a note, not an image")
        if kind != "stray":
            expected[split].add(str(path))
            if kind != "good":
                expected["broken"].add(path.name)
    return expected


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(spec=entries)
def test_random_trees_never_crash_and_account_for_every_file(spec, trained_run):
    root = Path(tempfile.mkdtemp(prefix="prop_"))
    try:
        expected = build_tree(root / "ds", spec)
        result = invoke(["train", "--data", root / "ds", *TINY_TRAIN, "--weights", "none", "--epochs", "1",
                         "--seed", "0", "--out", root / "run"])
        assert result.exit_code in (0, 1, 2), result.stderr
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        if result.exit_code != 0:
            assert re.search(r"^Error: ", result.stderr, re.M) and "Traceback" not in result.stderr
        else:
            counts = re.search(r"(\d+) train / (\d+) val images", result.stdout)
            found = (int(counts[1]), int(counts[2]))
            if (root / "ds" / "val").is_dir():
                assert found == (len(expected["train"]), len(expected["val"]))
            else:  # a lone train/ folder: a share of it is held out for validation
                assert sum(found) == len(expected["train"]) and found[1] > 0
            for name in expected["broken"]:
                assert name in result.stderr, name

        flat = root / "flat"
        flat.mkdir()
        for split in ("train", "val"):
            for entry in (root / "ds" / split).glob("*/*") if (root / "ds" / split).exists() else []:
                shutil.move(str(entry), flat / entry.name)
        out = root / "preds.csv"
        result = invoke(["batch-predict", flat, "--checkpoint", trained_run / "best.pt", "--workers", "0",
                         "--batch-size", "3", "--output", out])
        image_names = {Path(p).name for p in expected["train"] | expected["val"]}
        good = image_names - expected["broken"]
        assert result.exit_code == (0 if good else 1), result.stderr
        if image_names:
            rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open())}
            assert set(rows) == image_names
            assert {n for n, r in rows.items() if r["error"]} == expected["broken"]
    finally:
        shutil.rmtree(root, ignore_errors=True)
