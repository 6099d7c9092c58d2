"""batch-predict's --output file: one writer at a time, nothing replaced unasked, odd and
non-UTF-8 names written and resumed, a full disk and a closed pipe handled, Parquet typed and
resumable, and the row schema that other features extend."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from resnext_cli.outputs import result_files, results
from resnext_cli.outputs.results import Column, Encoding, Journal, ResultRow, ResultSchema
from tests.conftest import invoke, same_predictions
from tests.test_predict import image_folder

HEADER = "path,class,prob,error,unknown_score,known\n"  # batch-predict's CSV header at --topk 1

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def predict(folder, trained_run: Path, out: Path, *extra, cwd: Path | None = None):
    return invoke(["batch-predict", folder, "--checkpoint", trained_run / "best.pt", "--workers", "0",
                   "--batch-size", "3", "--output", out, *extra], cwd=cwd)


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def record_ends(data: bytes, is_csv: bool) -> list[int]:
    """Byte offsets just after each record (the CSV header first); a CSV record may hold line
    breaks inside quotes."""
    def lines():
        nonlocal offset
        for line in data.split(b"\n")[:-1]:
            offset += len(line) + 1
            yield line.decode() + "\n"

    offset, ends = 0, []
    for _ in (csv.reader(lines()) if is_csv else lines()):
        ends.append(offset)
    return ends


def interrupted(out: Path, rows_kept: int, torn: bool = True) -> Path:
    """Turn a finished output into what a run killed after `rows_kept` rows leaves: its
    journal (`.partial`), with half of the next record written."""
    data = out.read_bytes()
    ends = [0, *record_ends(data, out.suffix == ".csv")]
    row = rows_kept + (out.suffix == ".csv")
    cut = ends[row]
    tail = data[cut: cut + (ends[row + 1] - cut) // 2] if torn else b""
    partial = out.with_name(out.name + ".partial")
    partial.write_bytes(data[:cut] + tail)
    out.unlink()
    return partial


# ---------------------------------------------------------------- one writer, nothing replaced


def test_a_second_writer_of_an_output_is_refused(tmp_path, trained_run):
    """Issue 24 item 4: two processes writing one --output made a CSV with NUL bytes; now the
    second is refused (exit 2, naming the holder) and the first one's file is untouched."""
    folder = image_folder(tmp_path / "imgs", ["a.png", "b.png"])
    out = tmp_path / "preds.csv"
    partial = out.with_name("preds.csv.partial")
    partial.write_text(HEADER)  # the first writer's rows so far
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom filelock import SoftFileLock\n"
         f"lock = SoftFileLock({str(out) + '.lock'!r}, timeout=0)\nlock.acquire()\nprint('held', flush=True)\n"
         "time.sleep(120)"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        result = predict(folder, trained_run, out, "--resume-output")
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("Error:") and "being written by another resnext process" in result.stderr
    assert f"pid {holder.pid}" in result.stderr
    assert partial.read_text() == HEADER and not out.exists()
    # the holder is gone (its lock is stale): the next run takes the lock over and finishes
    assert predict(folder, trained_run, out, "--resume-output").exit_code == 0
    assert len(csv_rows(out)) == 2 and not partial.exists() and not out.with_name("preds.csv.lock").exists()


def test_an_existing_output_is_replaced_only_when_asked(tmp_path, trained_run):
    """Issue 24 item 5: an existing --output is refused unless --overwrite or --resume-output."""
    folder = image_folder(tmp_path / "imgs", ["a.png", "b.png", "c.png"])
    out = tmp_path / "preds.csv"
    out.write_text("my own notes\n")
    refused = predict(folder, trained_run, out)
    assert refused.exit_code == 2 and "already exists" in refused.stderr and "--overwrite" in refused.stderr
    assert out.read_text() == "my own notes\n"
    both = predict(folder, trained_run, out, "--overwrite", "--resume-output")
    assert both.exit_code == 2 and "not both" in both.stderr
    replaced = predict(folder, trained_run, out, "--overwrite")
    assert replaced.exit_code == 0, replaced.stderr
    assert [Path(r["path"]).name for r in csv_rows(out)] == ["a.png", "b.png", "c.png"]
    # an interrupted run's journal is not thrown away either
    complete = out.read_text()
    interrupted(out, 1)
    assert predict(folder, trained_run, out).exit_code == 2
    again = predict(folder, trained_run, out)
    assert again.exit_code == 2 and "partial results of an interrupted run" in again.stderr
    resumed = predict(folder, trained_run, out, "--resume-output")
    assert resumed.exit_code == 0 and same_predictions(out.read_text(), complete)
    (tmp_path / "a_folder.csv").mkdir()
    folder_out = predict(folder, trained_run, tmp_path / "a_folder.csv")
    assert folder_out.exit_code == 2 and "is a folder" in folder_out.stderr


# ---------------------------------------------------------------- names


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS refuses file names that are not UTF-8")
def test_names_that_are_not_utf8_are_written_escaped(tmp_path, trained_run):
    """Issue 24 item 14: a file (or folder) name that is not UTF-8 lost every prediction; now
    it is written with \\xNN escapes and every other row is there, in CSV, JSONL and Parquet."""
    folder = image_folder(tmp_path / "imgs", ["a.png", "c.png"])
    raw = os.fsencode(folder)
    Path(os.fsdecode(raw + b"/caf\xe9.png")).write_bytes((folder / "a.png").read_bytes())
    sub = os.fsdecode(raw + b"/\xff\xfe")
    os.mkdir(sub)
    Path(sub, "d.png").write_bytes((folder / "c.png").read_bytes())
    Path(os.fsdecode(raw + b"/bad\xe9.jpg")).write_bytes(b"not a jpeg")
    expected = {"a.png", "c.png", "caf\\xe9.png", "\\xff\\xfe/d.png", "bad\\xe9.jpg"}
    for name in ("p.csv", "p.jsonl", "p.parquet"):
        out = tmp_path / name
        result = predict(folder, trained_run, out, "--recursive")
        assert result.exit_code == 0, result.stderr
        assert "caf\\xe9.png" in result.stdout and "Traceback" not in result.stderr
        if name.endswith(".csv"):
            rows = csv_rows(out)
        elif name.endswith(".jsonl"):
            rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        else:
            rows = pq.read_table(out).to_pylist()
        assert {os.path.relpath(r["path"], folder) for r in rows} == expected
        assert [bool(r["error"]) for r in rows].count(True) == 1  # only bad\xe9.jpg
    # resumed, an escaped name counts as done
    interrupted(tmp_path / "p.csv", 4)
    resumed = predict(folder, trained_run, tmp_path / "p.csv", "--recursive", "--resume-output")
    assert resumed.exit_code == 0 and "4 image(s) already there, 1 to go" in resumed.stderr


ODD_NAMES = ["carriage\rreturn.png", "line\u2028sep.png", "next\x85line.png", "form\x0cfeed.png",
             "new\nline.png", 'quote"comma,.png', "plain.png"]  # fmt: skip


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_odd_names_are_quoted_and_resumed(tmp_path, trained_run, suffix):
    """Issue 24 item 15: "\\r" was not quoted in the CSV, and "\\u2028", "\\x85" or "\\x0c" made
    --resume-output refuse the tool's own file. (--no-calibration: the unknown score's sixth
    decimal follows the batch's make-up in bf16, and a resume batches the images left
    differently; the probabilities do not.)"""
    folder = image_folder(tmp_path / "imgs", ODD_NAMES)
    out = tmp_path / f"preds{suffix}"
    assert predict(folder, trained_run, out, "--topk", "2", "--no-calibration").exit_code == 0
    complete = out.read_bytes()
    if suffix == ".csv":
        names = [Path(r["path"]).name for r in csv_rows(out)]
    else:
        names = [Path(json.loads(line)["path"]).name for line in complete.decode().split("\n")[:-1]]
    assert names == sorted(ODD_NAMES)
    for kept in range(len(ODD_NAMES)):  # interrupted after every possible row, torn or not
        interrupted(out, kept, torn=kept % 2 == 0)
        result = predict(folder, trained_run, out, "--topk", "2", "--no-calibration", "--resume-output")
        assert result.exit_code == 0, result.stderr
        assert f"{kept} image(s) already there" in result.stderr or kept == 0
        assert out.read_bytes() == complete


def test_resume_matches_the_folder_however_it_is_spelled(tmp_path, trained_run):
    """Issue 24 item 15: resuming with `../photos` where the first run said `/abs/photos`
    predicted every image twice; rows are matched by resolved path."""
    folder = image_folder(tmp_path / "photos", [f"{i:02d}.png" for i in range(8)])
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "preds.csv"
    assert predict(folder, trained_run, out).exit_code == 0
    straight = csv_rows(out)
    interrupted(out, 5)
    resumed = predict("../photos", trained_run, out, "--resume-output", cwd=work)
    assert resumed.exit_code == 0, resumed.stderr
    assert "5 image(s) already there, 3 to go" in resumed.stderr
    assert resumed.stdout.count("image: ") == 3
    rows = csv_rows(out)
    assert len(rows) == 8 and [r["class"] for r in rows] == [r["class"] for r in straight]
    # one spelling throughout, this run's: the rows found in the journal are spelled anew
    assert [r["path"] for r in rows] == [f"../photos/{i:02d}.png" for i in range(8)]
    assert [{**r, "path": ""} for r in rows] == [{**r, "path": ""} for r in straight]


# ---------------------------------------------------------------- full disk, closed pipe


class FillingDisk:
    """A file on a disk with `room` bytes left: a write that does not fit writes what fits,
    then fails as a full disk does."""

    def __init__(self, handle, room: int) -> None:
        self.handle, self.room = handle, room

    def write(self, data) -> int:
        if len(data) > self.room:
            self.handle.write(data[: self.room])
            self.handle.flush()
            self.room = 0
            raise OSError(28, "No space left on device")
        self.room -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __iter__(self):
        return iter(self.handle)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


def test_a_full_disk_stops_with_an_error_and_the_output_stays_resumable(tmp_path, trained_run, monkeypatch):
    """Issue 24 item 16: a full disk in batch-predict was "Unexpected failure"; now it is an
    `Error:` paragraph, and the rows written so far are resumed."""
    folder = image_folder(tmp_path / "imgs", [f"{i:02d}.png" for i in range(10)])
    out = tmp_path / "preds.csv"
    assert predict(folder, trained_run, tmp_path / "straight.csv").exit_code == 0
    monkeypatch.setattr(results, "open", lambda *a, **k: FillingDisk(open(*a, **k), room=300), raising=False)
    result = predict(folder, trained_run, out)
    monkeypatch.undo()
    assert result.exit_code == 1, result.stderr
    assert "\nError: Cannot write" in result.stderr and "No space left on device" in result.stderr
    assert "MB free there" in result.stderr and "--resume-output" in result.stderr
    assert "Unexpected failure" not in result.stderr and not out.exists()
    resumed = predict(folder, trained_run, out, "--resume-output")
    assert resumed.exit_code == 0, resumed.stderr
    assert same_predictions(out.read_text(), (tmp_path / "straight.csv").read_text())


def test_a_closed_pipe_stops_quietly(tmp_path, trained_run):
    """Issue 24 item 16: `batch-predict DIR | head` ended in "Unexpected failure ...
    BrokenPipeError"; now it stops quietly like other Unix tools (exit 141), and its --output
    can be resumed."""
    folder = image_folder(tmp_path / "imgs", [f"a_rather_long_file_name_{i:03d}.png" for i in range(150)])
    out = tmp_path / "preds.csv"
    args = ["batch-predict", folder, "--checkpoint", trained_run / "best.pt", "--workers", "0", "--output", out]
    process = subprocess.Popen([sys.executable, "-m", "resnext_cli", *map(str, args)], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    process.stdout.close()  # the reader is gone before the first line
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=300) == 141, stderr
    assert "Error" not in stderr and "Traceback" not in stderr and "Exception ignored" not in stderr
    resumed = invoke([*args, "--resume-output"])
    assert resumed.exit_code == 0 and len(csv_rows(out)) == 150


# ---------------------------------------------------------------- Parquet, --save-probs


def test_parquet_output_is_typed_and_resumable(tmp_path, trained_run):
    folder = image_folder(tmp_path / "imgs", [f"{i:02d}.png" for i in range(7)])
    (folder / "zz.jpg").write_bytes(b"broken")
    out = tmp_path / "preds.parquet"
    result = predict(folder, trained_run, out, "--topk", "2", "--save-probs")
    assert result.exit_code == 0, result.stderr
    table = pq.read_table(out)
    schema = table.schema
    assert schema.names == ["path", "class", "prob", "topk", "error", "unknown_score", "known", "probs"]
    assert schema.field("prob").type == pa.float32() and schema.field("path").type == pa.string()
    assert schema.field("topk").type == pa.list_(pa.struct([("class", pa.string()), ("prob", pa.float32())]))
    assert schema.field("probs").type.num_fields == 3
    about = json.loads(schema.metadata[b"resnext"])
    assert about["classes"] == ["alpha", "beta", "gamma"] and about["topk"] == 2
    rows = table.to_pylist()
    assert [Path(r["path"]).name for r in rows] == [*(f"{i:02d}.png" for i in range(7)), "zz.jpg"]
    first, broken = rows[0], rows[-1]
    assert first["error"] is None and first["class"] == first["topk"][0]["class"] and len(first["topk"]) == 2
    assert sum(first["probs"].values()) == pytest.approx(1.0, abs=1e-5)
    assert first["probs"][first["class"]] == first["prob"]
    assert broken["class"] is None and broken["prob"] is None and broken["error"]
    # the same predictions as the CSV, to its 6 decimals
    assert predict(folder, trained_run, tmp_path / "p.csv", "--topk", "2").exit_code == 0
    for row, line in zip(rows, csv_rows(tmp_path / "p.csv")):
        assert row["class"] == (line["class"] or None) and line["path"] == row["path"]
        assert line["prob"] == ("" if row["prob"] is None else f"{row['prob']:.6f}")
    # interrupted (its journal: exact JSON lines), then resumed: the same table
    journal = out.with_name("preds.parquet.partial")
    out.rename(tmp_path / "straight.parquet")
    exact = [{**r, "error": r["error"] or ""} for r in rows[:3]]
    journal.write_text("".join(json.dumps(r) + "\n" for r in exact) + '{"path": "torn')
    resumed = predict(folder, trained_run, out, "--topk", "2", "--save-probs", "--resume-output")
    assert resumed.exit_code == 0, resumed.stderr
    assert "3 image(s) already there, 5 to go" in resumed.stderr
    assert pq.read_table(out).equals(pq.read_table(tmp_path / "straight.parquet"))
    assert not journal.exists()
    # a finished Parquet file resumed with other options is refused, not rewritten
    other = predict(folder, trained_run, out, "--topk", "3", "--save-probs", "--resume-output")
    assert other.exit_code == 2 and "other columns" in other.stderr


def test_save_probs_in_jsonl_and_its_limits(tmp_path, trained_run, monkeypatch):
    folder = image_folder(tmp_path / "imgs", ["a.png", "b.png"])
    out = tmp_path / "p.jsonl"
    assert predict(folder, trained_run, out, "--save-probs").exit_code == 0
    record = json.loads(out.read_text().splitlines()[0])
    assert list(record) == ["path", "class", "prob", "topk", "error", "unknown_score", "known", "probs"]
    assert list(record["probs"]) == ["alpha", "beta", "gamma"]
    assert record["probs"][record["class"]] == record["prob"]
    as_csv = predict(folder, trained_run, tmp_path / "p.csv", "--save-probs")
    assert as_csv.exit_code == 2 and ".jsonl or FILE.parquet" in as_csv.stderr

    real = results.importlib.import_module
    monkeypatch.setattr(results.importlib, "import_module",
                        lambda name: (_ for _ in ()).throw(ImportError(name)) if name == "pyarrow" else real(name))
    missing = predict(folder, trained_run, tmp_path / "p.parquet")
    assert missing.exit_code == 2 and "pip install 'resnext-cli[parquet]'" in missing.stderr


# ---------------------------------------------------------------- the row schema other features extend


def test_extra_typed_columns_travel_through_every_format(tmp_path):
    """Contract 5: other features add columns (e.g. `unknown_score` float32, `known` bool) to the
    row record; CSV, JSONL and Parquet carry them typed, and journals read them back."""
    schema = ResultSchema(("cat", "dog"), topk=2, extra=(Column("unknown_score", "float32"),
                                                          Column("known", "bool")))  # fmt: skip
    rows = [ResultRow("x/a.jpg", [("dog", 0.75), ("cat", 0.25)], extra={"unknown_score": 1.5, "known": True}),
            ResultRow("x/b.jpg", None, "OSError: broken", extra={"unknown_score": None, "known": None}),
            ResultRow("x/c.jpg", [("cat", 0.5), ("dog", 0.5)], extra={"unknown_score": 9.25, "known": False})]
    text = Encoding(schema, csv=True).lines(rows).decode()
    assert schema.csv_header()[-2:] == ["unknown_score", "known"]
    assert text.splitlines()[0].endswith(",1.500000,true") and text.splitlines()[2].endswith(",9.250000,false")
    record = schema.record(rows[0], digits=6)
    assert record["unknown_score"] == 1.5 and record["known"] is True
    for fmt, suffix in (("csv", ".csv"), ("jsonl", ".jsonl"), ("parquet", ".parquet")):
        files = result_files.OutputFiles(str(tmp_path / f"out{suffix}"))
        journal = Journal(files.journal_path, files.encoding(schema), resume=False)
        journal.add(rows[:2])
        journal.close()
        again = Journal(files.journal_path, files.encoding(schema), resume=True)
        assert again.earlier == [("x/a.jpg", True), ("x/b.jpg", False)]
        again.add(rows[2:])
        again.close()
        files.finish(schema, ["x/a.jpg", "x/b.jpg", "x/c.jpg"], resumed=True)
        assert not files.journal_path.exists()
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.schema.field("unknown_score").type == pa.float32()
    assert table.schema.field("known").type == pa.bool_()
    assert table.column("known").to_pylist() == [True, None, False]
    assert [r["known"] for r in csv_rows(tmp_path / "out.csv")] == ["true", "", "false"]
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert [json.loads(line)["unknown_score"] for line in lines] == [1.5, None, 9.25]


def test_a_csv_row_with_a_carriage_return_is_quoted():
    text = Encoding.cells_text([["a\rb", "c"], ["d", "e"]])
    assert text == '"a\rb","c"\nd,e\n'
    assert list(csv.reader(io.StringIO(text, newline=""))) == [["a\rb", "c"], ["d", "e"]]


def test_parts_of_any_world_and_a_partial_merge_in_listing_order(tmp_path):
    """What rank 0 merges: this run's parts, a part of an earlier run with another world size and
    an earlier single process's journal; each image once, in listing order, spelled as listed."""
    schema = ResultSchema(("cat", "dog"))
    listing = [str(tmp_path / f"{i}.jpg") for i in range(8)]
    out = tmp_path / "preds.csv"

    def journal(files: result_files.OutputFiles, indices: list[int], spelling: str = "") -> None:
        written = Journal(files.journal_path, files.encoding(schema), resume=False)
        written.add([ResultRow(spelling + listing[i] if not spelling else f"{spelling}{i}.jpg",
                               [("cat", i / 10)]) for i in indices])  # fmt: skip
        written.close()

    journal(result_files.OutputFiles(str(out)), [0, 1], spelling=f"{tmp_path}/./")  # single, other spelling
    journal(result_files.OutputFiles(str(out), 0, 3), [2, 5])  # a dead 3-process run
    journal(result_files.OutputFiles(str(out), 0, 2), [3, 6, 7])  # this run's rank 0
    journal(result_files.OutputFiles(str(out), 1, 2), [4, 5])  # rank 1 redid 5
    files = result_files.OutputFiles(str(out), 0, 2)
    assert len(files.parts()) == 3
    files.finish(schema, listing, resumed=True)
    rows = csv_rows(out)
    assert [r["path"] for r in rows] == listing
    assert [r["prob"] for r in rows] == [f"{i / 10:.6f}" for i in range(8)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.csv"]


def test_resuming_a_finished_output_adds_only_new_images(tmp_path, trained_run):
    folder = image_folder(tmp_path / "imgs", ["b.png", "d.png"])
    out = tmp_path / "preds.jsonl"
    assert predict(folder, trained_run, out).exit_code == 0
    image_folder(folder, ["a.png", "c.png", "e.png"], seed=3)
    result = predict(folder, trained_run, out, "--resume-output")
    assert result.exit_code == 0 and "2 image(s) already there, 3 to go" in result.stderr
    names = [Path(json.loads(line)["path"]).name for line in out.read_text().splitlines()]
    assert names == ["a.png", "b.png", "c.png", "d.png", "e.png"]
