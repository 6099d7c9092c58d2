"""`resnext cache list|clear`: what the backbone-feature cache holds, and emptying it."""

from __future__ import annotations

import datetime
import json
import time

from rich.table import Table

from resnext_cli import ui
from resnext_cli.config import CacheConfig
from resnext_cli.model.features import cache_entries, cache_limit_bytes, cache_root, remove_entry


def list_cache(cfg: CacheConfig) -> None:
    entries = cache_entries()
    total = sum(e.size for e in entries)
    if cfg.json:
        print(json.dumps({"folder": str(cache_root()), "bytes": total, "limit_bytes": cache_limit_bytes(),
                          "entries": [{"file": str(e.path), "bytes": e.size, "last_used": e.last_used,
                                       **e.about} for e in entries]}, indent=2))  # fmt: skip
        return
    table = Table("entry", "data", "arch", "size px", "views", "images", "MB", "last used", box=None)
    for e in reversed(entries):  # most recently used first
        used = datetime.datetime.fromtimestamp(e.last_used).strftime("%Y-%m-%d %H:%M")
        table.add_row(e.path.stem[:12], str(e.about.get("data", "?")), str(e.about.get("arch", "?")),
                      str(e.about.get("img_size", "?")), str(e.about.get("views", "?")),
                      str(e.about.get("images", "?")), f"{e.size / 1e6:.1f}", used)  # fmt: skip
    if entries:
        ui.show(table)
    ui.info(f"{len(entries)} entries, {total / 1e6:.1f} MB in {cache_root()} (limit "
            f"{cache_limit_bytes() / 1e9:g} GB: $RESNEXT_CACHE_MAX_GB; least recently used go first).")


def clear_cache(cfg: CacheConfig) -> None:
    cutoff = time.time() - cfg.older_than * 86400 if cfg.older_than is not None else None
    removed = [e for e in cache_entries() if cutoff is None or e.last_used < cutoff]
    for entry in removed:
        remove_entry(entry)
    ui.info(f"Removed {len(removed)} cache entries ({sum(e.size for e in removed) / 1e6:.1f} MB) "
            f"from {cache_root()}.")
