"""Where messages go: results to stdout, warnings and progress to stderr."""

from __future__ import annotations

import contextlib
import errno
import functools
import sys
from typing import Any, Iterator

from rich.console import Console
from tqdm import tqdm

_silenced = False
_results_only = False  # stdout carries a machine-readable result (--json): messages go to stderr


@contextlib.contextmanager
def stdout_for_results(enabled: bool = True) -> Iterator[None]:
    """With --json, stdout holds the JSON alone: inside this block every message goes to stderr."""
    global _results_only
    previous, _results_only = _results_only, enabled
    try:
        yield
    finally:
        _results_only = previous


def silence() -> None:
    """For the non-main processes of a torchrun job: rank 0 alone talks."""
    global _silenced
    _silenced = True


@functools.lru_cache(maxsize=None)
def console(stderr: bool = False) -> Any:
    made = Console(stderr=stderr, highlight=False, soft_wrap=True)
    made.on_broken_pipe = _closed_pipe  # rich would exit(1) on its own, past every cleanup
    return made


def _closed_pipe() -> None:
    """A closed stdout (`| head` ended) raised as what print() raises, so that one handler deals
    with both: a run stops resumable, and the command ends quietly (`cli.run_command`)."""
    raise BrokenPipeError(errno.EPIPE, "the reader of the output went away")


def info(message: str) -> None:
    if not _silenced:
        console(stderr=_results_only).print(message, markup=False)


def note(message: str) -> None:
    """What the tool chose for the user (a default run, data folder...): on stderr, so that
    stdout stays the result."""
    if not _silenced:
        console(stderr=True).print(message, markup=False)


def show(renderable: Any) -> None:
    """A rich table or other renderable on stdout."""
    if not _silenced:
        console(stderr=_results_only).print(renderable)


def warn(message: str) -> None:
    """A warning that may interrupt a progress bar without breaking it."""
    if not _silenced:
        tqdm.write(f"Warning: {message}", file=sys.stderr)


def progress(iterable: Any = None, **kwargs: Any) -> Any:
    """A tqdm bar on stderr that stays quiet when stderr is not a terminal (CI, pipes)."""
    disable = True if _silenced else None
    return tqdm(iterable, file=sys.stderr, disable=disable, dynamic_ncols=True, leave=False, **kwargs)
