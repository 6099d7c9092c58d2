"""Where messages go: results to stdout, warnings and progress to stderr."""

from __future__ import annotations

import functools
import sys
from typing import Any

from rich.console import Console
from tqdm import tqdm

_silenced = False


def silence() -> None:
    """For the non-main processes of a torchrun job: rank 0 alone talks."""
    global _silenced
    _silenced = True


@functools.lru_cache(maxsize=None)
def console(stderr: bool = False) -> Any:
    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def info(message: str) -> None:
    if not _silenced:
        console().print(message, markup=False)


def note(message: str) -> None:
    """What the tool chose for the user (a default run, data folder...): on stderr, so that
    stdout stays the result."""
    if not _silenced:
        console(stderr=True).print(message, markup=False)


def show(renderable: Any) -> None:
    """A rich table or other renderable on stdout."""
    if not _silenced:
        console().print(renderable)


def warn(message: str) -> None:
    """A warning that may interrupt a progress bar without breaking it."""
    if not _silenced:
        tqdm.write(f"Warning: {message}", file=sys.stderr)


def progress(iterable: Any = None, **kwargs: Any) -> Any:
    """A tqdm bar on stderr that stays quiet when stderr is not a terminal (CI, pipes)."""
    disable = True if _silenced else None
    return tqdm(iterable, file=sys.stderr, disable=disable, dynamic_ncols=True, leave=False, **kwargs)
