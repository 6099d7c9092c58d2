"""Where messages go: results to stdout, warnings and progress to stderr."""

from __future__ import annotations

import functools
import sys
from typing import Any


@functools.lru_cache(maxsize=None)
def console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def info(message: str) -> None:
    console().print(message, markup=False)


def warn(message: str) -> None:
    console(stderr=True).print(f"Warning: {message}", markup=False, style="yellow")


def progress(iterable: Any = None, **kwargs: Any) -> Any:
    """A tqdm bar on stderr that stays quiet when stderr is not a terminal (CI, pipes)."""
    from tqdm import tqdm

    return tqdm(iterable, file=sys.stderr, disable=None, dynamic_ncols=True, leave=False, **kwargs)
