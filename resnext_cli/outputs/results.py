"""Outputs -> files: batch-predict's result rows and the three formats they are written in.

One row record (`ResultRow`) and one typed schema (`ResultSchema`: path, class, prob, the top-k
classes, error, the columns other features add, and with --save-probs every class's
probability) shared by CSV, JSONL and Parquet. Rows stream into a journal (`Journal`), one whole
batch per write, so that a crash leaves at most a torn last line, which a resume drops. CSV and
JSONL journals are the output format itself; Parquet's journal is JSON lines with exact floats,
because a Parquet file cannot be read before its footer is written (so it could not be resumed);
the Parquet file is written from it in row groups, streaming (`write_results`). Which files an
`--output` owns, and how the journals become the finished file, is `outputs/result_files.py`.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, NamedTuple

from resnext_cli.errors import EXIT_FAILED, UserError
from resnext_cli.files import atomic_write, free_space, printable

Ranked = list[tuple[str, float]]  # (class, probability), most probable first
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}
PARQUET_EXTRA = "pip install 'resnext-cli[parquet]'  (pyarrow)"
FORMAT_VERSION = "resnext-batch-predict/1"  # in a Parquet file's metadata
ROW_GROUP_BYTES = 64 << 20  # a Parquet row group holds about this much, 4,096-65,536 rows
KINDS = ("string", "float32", "bool", "int64")  # the types an extra column may have


@dataclass(frozen=True)
class Column:
    """A column that another feature adds to every row (e.g. `unknown_score`, float32)."""

    name: str
    kind: str  # one of KINDS

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"column {self.name!r}: kind {self.kind!r} is not one of {KINDS}")


@dataclass
class ResultRow:
    """One image's result. `path` and `error` are printable (escaped where not UTF-8)."""

    path: str
    ranked: Ranked | None = None  # None: the file could not be read
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # values of ResultSchema.extra, by name
    probs: list[float] | None = None  # every class's probability, in class order (--save-probs)
    rejected: bool = False  # `class` left empty: an unknown under --reject-unknown (prob, topk kept)


@dataclass(frozen=True)
class ResultSchema:
    """The columns of one output; a journal written with other columns cannot be resumed."""

    classes: tuple[str, ...]  # the model's, in index order
    topk: int = 1
    save_probs: bool = False
    extra: tuple[Column, ...] = ()

    @property
    def ranked_length(self) -> int:
        return min(self.topk, len(self.classes))

    def csv_header(self) -> list[str]:
        header = ["path", "class", "prob", "error"]
        for k in range(2, self.topk + 1):
            header += [f"class_{k}", f"prob_{k}"]
        return header + [c.name for c in self.extra]

    def csv_cells(self, row: ResultRow) -> list[str]:
        cells = [row.path, "", "", row.error]
        ranked = row.ranked or []
        if ranked:
            cells[1:3] = ["" if row.rejected else ranked[0][0], f"{ranked[0][1]:.6f}"]
        for k in range(1, self.topk):
            cells += [ranked[k][0], f"{ranked[k][1]:.6f}"] if k < len(ranked) else ["", ""]
        return cells + [_csv_value(row.extra.get(c.name), c.kind) for c in self.extra]

    def record_keys(self) -> list[str]:
        keys = ["path", "class", "prob", "topk", "error", *(c.name for c in self.extra)]
        return keys + ["probs"] if self.save_probs else keys

    def record(self, row: ResultRow, digits: int | None) -> dict[str, Any]:
        """The row as a JSON object (JSONL's line); probabilities rounded to `digits` decimals,
        or exact (None: Parquet's journal)."""
        exact = (lambda p: p) if digits is None else (lambda p: round(p, digits))
        ranked = row.ranked or []
        record: dict[str, Any] = {
            "path": row.path,
            "class": ranked[0][0] if ranked and not row.rejected else None,
            "prob": exact(ranked[0][1]) if ranked else None,
            "topk": [{"class": c, "prob": exact(p)} for c, p in ranked],
            "error": row.error,
        }
        record.update((c.name, _json_value(row.extra.get(c.name), c.kind, exact)) for c in self.extra)
        if self.save_probs:
            record["probs"] = (dict(zip(self.classes, map(exact, row.probs)))
                               if row.probs is not None else None)  # fmt: skip
        return record

    def arrow_schema(self) -> Any:
        """Parquet's typed columns; the class list and top-k travel in its metadata."""
        pa = require_pyarrow()
        kinds = {"string": pa.string(), "float32": pa.float32(), "bool": pa.bool_(), "int64": pa.int64()}
        fields = [
            pa.field("path", pa.string(), nullable=False),
            pa.field("class", pa.string()),
            pa.field("prob", pa.float32()),
            pa.field("topk", pa.list_(pa.struct([("class", pa.string()), ("prob", pa.float32())]))),
            pa.field("error", pa.string()),
            *(pa.field(c.name, kinds[c.kind]) for c in self.extra),
        ]
        if self.save_probs:
            fields.append(pa.field("probs", pa.struct([(name, pa.float32()) for name in self.classes])))
        about = {"format": FORMAT_VERSION, "topk": self.topk, "classes": list(self.classes)}
        return pa.schema(fields, metadata={"resnext": json.dumps(about, ensure_ascii=False)})

    def rows_per_group(self) -> int:
        width = 200 + 40 * self.ranked_length + 16 * len(self.extra)
        width += 40 * len(self.classes) if self.save_probs else 0
        return max(4096, min(65536, ROW_GROUP_BYTES // width // 4096 * 4096))


def _csv_value(value: Any, kind: str) -> str:
    if value is None:
        return ""
    if kind == "bool":
        return "true" if value else "false"
    if kind == "float32":
        return f"{float(value):.6f}"
    return str(int(value)) if kind == "int64" else printable(str(value))


def _json_value(value: Any, kind: str, exact: Any) -> Any:
    if value is None:
        return None
    if kind == "float32":
        return exact(float(value))
    if kind == "bool":
        return bool(value)
    return int(value) if kind == "int64" else printable(str(value))


def require_pyarrow() -> Any:
    """pyarrow is an optional extra: say what to install instead of a traceback."""
    try:
        return importlib.import_module("pyarrow")
    except ImportError:
        raise UserError(f"Parquet output needs pyarrow: {PARQUET_EXTRA}.") from None


# ---------------------------------------------------------------- encodings


class Unit(NamedTuple):
    """A row read back from a file, as its format keeps it (CSV cells or a JSON object)."""

    path: str
    predicted: bool
    payload: Any
    end: int  # byte offset just after the row in its file


@dataclass(frozen=True)
class Encoding:
    """How rows become journal lines and are read back: CSV, or JSON objects (JSONL rounds
    probabilities to 6 decimals; Parquet's journal keeps them exact)."""

    schema: ResultSchema
    csv: bool
    digits: int | None = 6

    def header(self) -> bytes:
        return self.cells_text([self.schema.csv_header()]).encode("utf-8") if self.csv else b""

    def lines(self, rows: list[ResultRow]) -> bytes:
        if self.csv:
            return self.cells_text([self.schema.csv_cells(row) for row in rows]).encode("utf-8")
        return self.records_text([self.schema.record(row, self.digits) for row in rows]).encode("utf-8")

    @staticmethod
    def cells_text(rows: list[list[str]]) -> str:
        """CSV lines; a row with a carriage return in a cell is quoted in full (csv quotes only
        what holds its line terminator, "\\n" here, and a bare "\\r" would end the line for
        every reader)."""
        buffer = io.StringIO()
        minimal = csv.writer(buffer, lineterminator="\n")
        every = csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_ALL)
        for cells in rows:
            (every if any("\r" in cell for cell in cells) else minimal).writerow(cells)
        return buffer.getvalue()

    @staticmethod
    def records_text(records: Iterable[dict[str, Any]]) -> str:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)

    def read(self, handle: BinaryIO, source: Path) -> Iterator[Unit]:
        """The complete rows of a journal or finished file, in file order. Only "\\n" ends a
        line (names may hold "\\r", "\\x0c", "\\x85" or "\\u2028"); a torn last line is left
        out; other columns than this schema's are an error."""
        lines = _Lines(handle)
        try:
            yield from self._read_csv(lines, source) if self.csv else self._read_json(lines, source)
        except UnicodeDecodeError as exc:
            raise _not_ours(source, f"not UTF-8 text: {exc.reason}") from None

    def _read_csv(self, lines: _Lines, source: Path) -> Iterator[Unit]:
        header = self.schema.csv_header()
        reader = csv.reader(lines, strict=True)
        try:
            first = next(reader, None)
            if first is not None and first != header:
                raise _other_columns(source)
            for cells in reader:
                if len(cells) != len(header):
                    raise csv.Error(f"a row with {len(cells)} cells instead of {len(header)}")
                yield Unit(cells[0], not cells[3], cells, lines.offset)
        except csv.Error as exc:
            if lines.exhausted and "unexpected end of data" in str(exc):
                return  # a quoted name torn after one of its own line breaks
            raise _not_ours(source, f"line {reader.line_num}: {exc}") from None

    def _read_json(self, lines: _Lines, source: Path) -> Iterator[Unit]:
        keys = self.schema.record_keys()
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                path, error = record["path"], record["error"]
            except (ValueError, KeyError, TypeError) as exc:
                raise _not_ours(source, f"line {number}: {exc}") from None
            if list(record) != keys or (not error and len(record["topk"]) != self.schema.ranked_length):
                raise _other_columns(source)
            yield Unit(path, not error, record, lines.offset)


class _Lines:
    """A binary file's complete lines (ending in "\\n") as text, with the byte offset reached."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle, self.offset, self.exhausted = handle, handle.tell(), False

    def __iter__(self) -> Iterator[str]:
        for line in self.handle:
            if not line.endswith(b"\n"):
                break  # torn: the process died while writing it
            self.offset += len(line)
            yield line.decode("utf-8")
        self.exhausted = True


def _other_columns(source: Path) -> UserError:
    return UserError(
        f"{source} has other columns than this run would write (was --topk, --save-probs or the "
        "model different?); resume with the same options, or write to a new --output."
    )


def _not_ours(source: Path, detail: str) -> UserError:
    return UserError(
        f"Cannot resume {source}: it is not an output of batch-predict ({detail}). Write to a new "
        "--output instead."
    )


# ---------------------------------------------------------------- journals


class Journal:
    """Rows appended to a file one whole batch per write. Resumed, it keeps its complete rows
    (read once, streaming), cuts a torn last line off and appends after them."""

    def __init__(self, path: Path, encoding: Encoding, resume: bool) -> None:
        self.path, self.encoding = path, encoding
        self.earlier: list[tuple[str, bool]] = []  # (path, predicted) of the rows already there
        resuming = resume and path.is_file()
        try:
            self.handle = open(path, "r+b" if resuming else "wb")
        except OSError as exc:
            raise self._write_error(exc) from None
        try:
            if resuming:
                end = self._read_earlier()
                self.handle.truncate(end)
                self.handle.seek(end)
            else:
                self.handle.write(encoding.header())
        except OSError as exc:
            self.handle.close()
            raise self._write_error(exc) from None
        except UserError:
            self.handle.close()
            raise

    def _read_earlier(self) -> int:
        end = 0
        for unit in self.encoding.read(self.handle, self.path):
            self.earlier.append((unit.path, unit.predicted))
            end = unit.end
        if end == 0 and self.encoding.csv:  # no row: keep (or write) the header alone
            self.handle.seek(0)
            self.handle.truncate(0)
            self.handle.write(self.encoding.header())
            end = self.handle.tell()
        return end

    def add(self, rows: list[ResultRow]) -> None:
        try:
            self.handle.write(self.encoding.lines(rows))
            self.handle.flush()
        except OSError as exc:
            raise self._write_error(exc) from None

    def close(self) -> None:
        """Flush to disk and close; the file stays (the caller renames or merges it)."""
        if self.handle.closed:
            return
        try:
            self.handle.flush()
            os.fsync(self.handle.fileno())
        except OSError as exc:
            raise self._write_error(exc) from None
        finally:
            self.handle.close()

    def _write_error(self, exc: OSError) -> UserError:
        free = free_space(self.path.parent)
        return UserError(
            f"Cannot write {self.path}: {exc.strerror or exc}{free}. The rows written so far are "
            "kept there: make room (or fix the folder) and rerun the same command with "
            "--resume-output to predict only the images still missing.",
            EXIT_FAILED,
        )


# ---------------------------------------------------------------- finished files


def read_units(path: Path, fmt: str, encoding: Encoding, journal: bool) -> Iterator[Unit]:
    """The rows of a journal (CSV or JSON lines) or of a finished output file."""
    if fmt == "parquet" and not journal:
        yield from _parquet_units(path, encoding.schema)
        return
    with open(path, "rb") as handle:
        yield from encoding.read(handle, path)


def _parquet_units(path: Path, schema: ResultSchema) -> Iterator[Unit]:
    require_pyarrow()
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors: not a Parquet file
        raise _not_ours(path, str(exc)) from None
    expected = schema.arrow_schema()
    found = parquet.schema_arrow
    if found.remove_metadata() != expected.remove_metadata() or (found.metadata or {}).get(
        b"resnext"
    ) != expected.metadata[b"resnext"]:
        raise _other_columns(path)
    for batch in parquet.iter_batches():
        for record in batch.to_pylist():
            record["error"] = record["error"] or ""
            yield Unit(record["path"], not record["error"], record, 0)


def write_results(path: Path, fmt: str, schema: ResultSchema, payloads: Iterable[Any]) -> None:
    """The finished file, written atomically from rows as read back (`Unit.payload`): CSV
    cells, JSON objects (JSONL), or JSON objects written as Parquet row groups, streaming."""
    if fmt == "parquet":
        atomic_write(path, lambda handle: _write_parquet(handle, schema, payloads))
        return
    encoding = Encoding(schema, csv=fmt == "csv")

    def write(handle: BinaryIO) -> None:
        handle.write(encoding.header())
        chunk: list[Any] = []
        for payload in payloads:
            chunk.append(payload)
            if len(chunk) == 4096:
                handle.write(_text_of(encoding, chunk))
                chunk = []
        handle.write(_text_of(encoding, chunk))

    atomic_write(path, write)


def _text_of(encoding: Encoding, payloads: list[Any]) -> bytes:
    if encoding.csv:
        return encoding.cells_text(payloads).encode("utf-8")
    return encoding.records_text(payloads).encode("utf-8")


def _write_parquet(handle: BinaryIO, schema: ResultSchema, records: Iterable[dict[str, Any]]) -> None:
    """Row groups of `rows_per_group()` rows, gathered as Arrow batches of 4,096 rows (compact)
    rather than as Python objects, so that memory stays flat whatever the number of rows."""
    pa = require_pyarrow()
    import pyarrow.parquet as pq

    arrow = schema.arrow_schema()
    size = schema.rows_per_group()
    writer = pq.ParquetWriter(handle, arrow)
    group: list[Any] = []  # Arrow record batches
    rows: list[dict[str, Any]] = []
    for record in records:
        rows.append({**record, "error": record["error"] or None})
        if len(rows) == 4096:
            group.append(pa.RecordBatch.from_pylist(rows, schema=arrow))
            rows = []
            if len(group) * 4096 >= size:
                writer.write_table(pa.Table.from_batches(group), row_group_size=size)
                group = []
    if rows:
        group.append(pa.RecordBatch.from_pylist(rows, schema=arrow))
    if group:
        writer.write_table(pa.Table.from_batches(group), row_group_size=size)
    writer.close()
