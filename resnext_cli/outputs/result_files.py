"""Outputs -> files: the files one batch-predict `--output FILE` owns, and how they become FILE.

- `FILE`: the finished results, replaced only with --overwrite (or extended by --resume-output);
- `FILE.partial`: one process's journal while it runs (`results.Journal`);
- `FILE.part-<rank>-of-<world>`: each torchrun process's journal;
- `FILE.lock`: held by the writing process (rank 0 under torchrun): a second writer is refused.

At the end, one process's journal is renamed into place; otherwise (torchrun's parts, a resumed
run, Parquet) the journals are merged into FILE in listing order, duplicates dropped, and removed.
Rows are matched to images by resolved path (the folder resolved, the file name as it is), so a
resume that spells the folder differently (`../photos`, `/data/photos`) skips what is done.
"""

from __future__ import annotations

import functools
import heapq
import os
import re
from pathlib import Path
from typing import Any, ContextManager, Iterator

from resnext_cli.errors import UserError
from resnext_cli.files import exclusive_lock, printable
from resnext_cli.outputs.results import (
    FORMATS,
    Encoding,
    Journal,
    ResultSchema,
    Unit,
    read_units,
    require_pyarrow,
    write_results,
)

PART = re.compile(r"\.part-(\d+)-of-(\d+)$")


def path_key(path: str) -> str:
    """How a row's path is matched to an image: its folder resolved (symlinks, `..`, the working
    directory), its file name kept as it is (two links to one photo stay two images)."""
    folder, name = os.path.split(path)
    return os.path.join(_resolved(folder), name)


@functools.lru_cache(maxsize=4096)
def _resolved(folder: str) -> str:
    return os.path.realpath(folder or ".")


class OutputFiles:
    """FILE and its journals, for the process of `rank` among `world`."""

    def __init__(self, output: str, rank: int = 0, world: int = 1) -> None:
        self.path = Path(output)
        self.fmt = FORMATS[self.path.suffix.lower()]
        self.rank, self.world = rank, world
        self.partial = self._sibling(".partial")
        self.lock_path = self._sibling(".lock")

    def _sibling(self, suffix: str) -> Path:
        return self.path.with_name(self.path.name + suffix)

    def part(self, rank: int, world: int) -> Path:
        return self._sibling(f".part-{rank}-of-{world}")

    @property
    def journal_path(self) -> Path:
        return self.partial if self.world == 1 else self.part(self.rank, self.world)

    def parts(self) -> list[Path]:
        """Every FILE.part-R-of-W there, of this run or of an earlier one with another world."""
        prefix = self.path.name + ".part-"
        try:
            names = sorted(e.name for e in os.scandir(self.path.parent) if e.name.startswith(prefix))
        except OSError:
            return []
        return [self.path.parent / n for n in names if PART.search(n[len(self.path.name):])]

    def encoding(self, schema: ResultSchema) -> Encoding:
        """CSV as CSV; JSONL rounded to 6 decimals; Parquet's journal: exact JSON lines."""
        return Encoding(schema, csv=self.fmt == "csv", digits=None if self.fmt == "parquet" else 6)

    # ------------------------------------------------------------ before the work

    def lock(self) -> ContextManager[None]:
        return exclusive_lock(self.lock_path, f"The output {self.path}")

    def claim(self, resume: bool, overwrite: bool) -> None:
        """Under the lock (rank 0 alone): refuse to replace results unless told; --overwrite
        clears an interrupted run's journals (FILE itself stays until the new one is complete)."""
        if self.fmt == "parquet":
            require_pyarrow()
        if self.path.is_dir():
            raise UserError(f"--output {self.path} is a folder; give a file, e.g. {self.path / 'preds.csv'}.")
        pieces = [p for p in (self.partial, *self.parts()) if p.exists()]
        if overwrite:
            for piece in pieces:
                _remove(piece)
        elif not resume and self.path.exists():
            raise UserError(
                f"{self.path} already exists. Pass --overwrite to replace it (it stays as it is until "
                "the new results are complete), or --resume-output to predict only the images it "
                "lacks."
            )
        elif not resume and pieces:
            raise UserError(
                f"{self.path} has partial results of an interrupted run "
                f"({', '.join(p.name for p in pieces)}). Pass --resume-output to continue it, or "
                "--overwrite to start over."
            )

    def open_journal(self, schema: ResultSchema, resume: bool) -> Journal:
        return Journal(self.journal_path, self.encoding(schema), resume)

    def earlier_rows(self, schema: ResultSchema, journal: Journal, resume: bool) -> dict[str, bool]:
        """path_key -> predicted, for every row already written: this process's journal, and
        with --resume-output FILE, FILE.partial and parts of a run with another world size.
        (The other processes' parts of this world are theirs: their images are not ours.)"""
        done = {path_key(path): ok for path, ok in journal.earlier}
        if not resume:
            return done
        own_world = [self.part(r, self.world) for r in range(self.world)] if self.world > 1 else []
        for source in self._sources(include_final=True):
            if source != journal.path and source not in own_world:
                for unit in self._units(source, schema):
                    done[path_key(unit.path)] = unit.predicted
        return done

    def _sources(self, include_final: bool) -> list[Path]:
        found = [p for p in (self.partial, *self.parts()) if p.is_file()]
        return ([self.path] if include_final and self.path.is_file() else []) + found

    def _units(self, source: Path, schema: ResultSchema) -> Iterator[Unit]:
        return read_units(source, self.fmt, self.encoding(schema), journal=source != self.path)

    # ------------------------------------------------------------ after the work

    def finish(self, schema: ResultSchema, listing: list[str], resumed: bool) -> None:
        """All journals are closed: one fresh journal of a single process is renamed into place;
        anything else is merged into FILE in listing order. The journals go only once FILE is
        complete, so a failure here (a full disk) leaves everything resumable."""
        sources = self._sources(include_final=resumed)
        alone = sources == [self.partial] and not resumed  # in listing order already
        if alone and self.fmt != "parquet":
            os.replace(self.partial, self.path)
            return
        if alone:  # Parquet from its journal, streaming
            rows = (unit.payload for unit in self._units(self.partial, schema))
        else:
            rows = self._merged(sources, schema, listing)
        try:
            write_results(self.path, self.fmt, schema, rows)
        except UserError as exc:
            raise UserError(
                f"{exc} The partial results ({', '.join(s.name for s in sources if s != self.path)}) "
                "are kept: rerun with --resume-output to finish.",
                exc.exit_code,
            ) from None
        for source in sources:
            if source != self.path:
                _remove(source)

    def _merged(self, sources: list[Path], schema: ResultSchema, listing: list[str]) -> Iterator[Any]:
        """Rows of every source in listing order (rows of files no longer listed first, as
        found), each image once, its path spelled as in this run's listing."""
        names = [printable(p) for p in listing]
        index = {path_key(name): i for i, name in enumerate(names)}

        def keyed(number: int, source: Path) -> Iterator[tuple[int, int, Unit]]:
            for unit in self._units(source, schema):
                yield index.get(path_key(unit.path), -1), number, unit

        last = -1
        streams = [keyed(n, s) for n, s in enumerate(sources)]
        for position, _, unit in heapq.merge(*streams, key=lambda item: item[:2]):
            if position >= 0 and position == last:
                continue  # the same image in two sources
            last = position
            yield _respelled(unit.payload, names[position]) if position >= 0 else unit.payload


def _respelled(payload: Any, path: str) -> Any:
    if isinstance(payload, list):
        return [path, *payload[1:]]
    return {**payload, "path": path}


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise UserError(f"Cannot remove {path}: {exc.strerror or exc}.") from None
