"""`resnext cache list|clear`: what the backbone-feature cache holds, and emptying it.

Only entries resnext can prove it wrote (the marker in the cache root, a sidecar naming each
entry and its size) are ever deleted; anything else in the folder is listed as not resnext's and
left alone, so that `RESNEXT_CACHE` pointing at a folder of yours never costs you a file.
"""

from __future__ import annotations

import datetime
import json
import time

from rich.table import Table

from resnext_cli import ui
from resnext_cli.config import CacheConfig
from resnext_cli.files import printable
from resnext_cli.model.features import (
    CacheContents,
    CacheEntry,
    cache_contents,
    cache_limit_bytes,
    cache_root,
    looks_like_entry,
    remove_entry,
    stale_temporary,
)


def list_cache(cfg: CacheConfig) -> None:
    contents = cache_contents()
    entries = contents.entries
    total = sum(e.size for e in entries)
    if cfg.json:
        print(json.dumps({"folder": str(cache_root()), "bytes": total, "limit_bytes": cache_limit_bytes(),
                          "entries": [{"file": str(e.path), "bytes": e.size, "last_used": e.last_used,
                                       **e.about} for e in entries],
                          "foreign": [str(p) for p in contents.foreign]}, indent=2))  # fmt: skip
        return
    table = Table("entry", "data", "arch", "size px", "view", "images", "MB", "last used", box=None)
    for e in reversed(entries):  # most recently used first
        used = datetime.datetime.fromtimestamp(e.last_used).strftime("%Y-%m-%d %H:%M")
        table.add_row(e.path.stem[:12], printable(str(e.about.get("data", "?"))),
                      str(e.about.get("arch", "?")), str(e.about.get("img_size", "?")), view_name(e),
                      str(e.about.get("images", "?")), f"{e.size / 1e6:.1f}", used)  # fmt: skip
    if entries:
        ui.show(table)
    ui.info(f"{len(entries)} entries, {total / 1e6:.1f} MB in {cache_root()} (limit "
            f"{cache_limit_bytes() / 1e9:g} GB: $RESNEXT_CACHE_MAX_GB; least recently used go first).")
    _tell_foreign(contents)


def view_name(entry: CacheEntry) -> str:
    """Which view of the images an entry holds: view 0 is the plain one (with the val images),
    views 1..K-1 augmented crops (`--feature-views`), "repeats" the balanced sampler's repeated draws."""
    view = entry.about.get("view")
    if view == 0:
        return "plain+val"
    if view == "repeats":  # the balanced sampler's repeated draws, each its own augmentation
        return "repeats"
    return f"aug {view}" if isinstance(view, int) else "?"


def clear_cache(cfg: CacheConfig) -> None:
    cutoff = time.time() - cfg.older_than * 86400 if cfg.older_than is not None else None
    contents = cache_contents()
    removed = [e for e in contents.entries if cutoff is None or e.last_used < cutoff]
    for entry in removed:
        remove_entry(entry)
    for path in stale_temporary(contents):  # left by a writer that was killed
        path.unlink(missing_ok=True)
    ui.info(f"Removed {len(removed)} cache entries ({sum(e.size for e in removed) / 1e6:.1f} MB) "
            f"from {cache_root()}.")
    _tell_foreign(contents)


def _tell_foreign(contents: CacheContents) -> None:
    """Files in the cache folder that resnext cannot prove it wrote: named, never deleted."""
    if not contents.foreign:
        return
    names = [printable(p.name) + ("/" if p.is_dir() else "") for p in contents.foreign]
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    earlier = any(looks_like_entry(p) for p in contents.foreign)
    ui.note(f"{len(names)} file(s) in {cache_root()} are not cache entries resnext can tell it "
            f"wrote, so they are left alone: {shown}."
            + (" Entries of an earlier resnext among them are taken over when a run reuses them."
               if earlier else ""))  # fmt: skip
