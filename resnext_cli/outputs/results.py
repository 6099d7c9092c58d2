"""Outputs -> files: batch-predict's results file (CSV or JSONL, the columns of the README's
"batch-predict output"), written one whole batch at a time, and read back to resume."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Optional

from resnext_cli.errors import UserError
from resnext_cli.files import make_folder

Ranked = list[tuple[str, float]]  # (class, probability), most probable first
# path, ranked classes (None if unreadable), error, unknown_score and known (None: no detector)
Row = tuple[str, Optional[Ranked], str, Optional[float], Optional[bool]]
TRUST_COLUMNS = ["unknown_score", "known"]  # after every other column (issue 25)


class ResultWriter:
    """Streams rows to `<output>.partial` one whole batch per write, renamed into place when the
    run ends: a reader never sees half a line, and an earlier file survives a failed run."""

    def __init__(self, output: str, topk: int, resume: bool = False, reject_unknown: bool = False) -> None:
        self.path = Path(output)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.jsonl = self.path.suffix.lower() == ".jsonl"
        self.topk = topk
        self.reject_unknown = reject_unknown  # `class` left empty where `known` is false
        self.done: dict[str, bool] = {}  # path -> predicted (not an error), from an earlier run
        make_folder(self.path.parent)
        header = ["path", "class", "prob", "error"]
        for k in range(2, topk + 1):
            header += [f"class_{k}", f"prob_{k}"]
        header += TRUST_COLUMNS
        try:
            earlier = self._earlier_lines(header) if resume else None
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise UserError(
                f"Cannot resume {output}: it is not an output of batch-predict ({exc}). Write to "
                "a new --output instead."
            ) from None
        try:
            self.handle = open(self.partial, "w", encoding="utf-8", newline="")
        except OSError as exc:
            raise UserError(f"Cannot write {self.partial}: {exc.strerror}.") from None
        if earlier:
            self.handle.write(earlier)
        elif not self.jsonl:
            self._write([header])

    def _earlier_lines(self, header: list[str]) -> str:
        """The complete lines of an interrupted (`.partial`) or finished earlier output; a torn
        last line is dropped, so its image is predicted again."""
        source = next((p for p in (self.partial, self.path) if p.is_file()), None)
        if source is None:
            return ""
        text = source.read_text(encoding="utf-8")
        text = text[: text.rfind("\n") + 1]
        lines = text.splitlines()
        if self.jsonl:
            for line in lines:
                record = json.loads(line)
                self.done[record["path"]] = not record["error"]
            return text
        if lines and next(csv.reader([lines[0]])) != header:
            raise UserError(
                f"{source} has other columns than this run would write (was --topk different?); "
                "resume with the same options, or write to a new --output."
            )
        for row in csv.reader(lines[1:]):
            self.done[row[0]] = not row[3]
        return text

    def add(self, rows: list[Row]) -> None:
        if self.jsonl:
            lines = [
                json.dumps(
                    {
                        "path": path,
                        "class": self._class(ranked, known),
                        "prob": round(ranked[0][1], 6) if ranked else None,
                        "topk": [{"class": c, "prob": round(p, 6)} for c, p in ranked or []],
                        "error": error,
                        "unknown_score": score,
                        "known": known,
                    },
                    ensure_ascii=False,
                )
                + "\n"
                for path, ranked, error, score, known in rows
            ]
            self.handle.write("".join(lines))
        else:
            records = []
            for path, ranked, error, score, known in rows:
                cells = [path, "", "", error]
                if ranked:
                    cells[1:3] = [self._class(ranked, known) or "", f"{ranked[0][1]:.6f}"]
                for k in range(1, self.topk):
                    if ranked and k < len(ranked):
                        cells += [ranked[k][0], f"{ranked[k][1]:.6f}"]
                    else:
                        cells += ["", ""]
                cells += ["" if score is None else f"{score:.6f}", "" if known is None else str(known).lower()]
                records.append(cells)
            self._write(records)
        self.handle.flush()

    def _class(self, ranked: Optional[Ranked], known: Optional[bool]) -> Optional[str]:
        """The top class; none for an unreadable file, or an unknown with --reject-unknown."""
        if not ranked or (self.reject_unknown and known is False):
            return None
        return ranked[0][0]

    def _write(self, records: list[list[str]]) -> None:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(records)
        self.handle.write(buffer.getvalue())

    def close(self, keep: bool) -> None:
        self.handle.close()
        if keep:
            os.replace(self.partial, self.path)
