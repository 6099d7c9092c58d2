"""audit.html: one self-contained page (thumbnails inlined, no script, no network) to go
through an audit's findings: each suspected label error beside typical images of its given and
suggested class, and each near-duplicate or leaking pair side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from resnext_cli.outputs.html_parts import BASE_STYLE, escape, thumbnail_tag

STYLE = BASE_STYLE + """
.finding { display: flex; gap: 1.2rem; align-items: flex-start; padding: .8rem 0;
           border-bottom: 1px solid #eee; }
.finding .main figure { width: 172px; }
.strip { display: flex; gap: .3rem; }
.strip img, .strip div { width: 80px; height: 80px; object-fit: cover; }
.strip-label { font-size: .8rem; color: #555; margin: .2rem 0; }
.pair { display: flex; gap: .8rem; align-items: center; }
.sim { font-size: 1.1rem; font-weight: 600; }
"""


def render_audit_html(summary: dict[str, Any], findings: list[Any], typical: dict[str, list[str]],
                      gallery: int) -> str:  # fmt: skip
    labels = [f for f in findings if f.issue == "label"]
    leaks = [f for f in findings if f.issue == "leak"]
    duplicates = [f for f in findings if f.issue == "duplicate"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>resnext audit of {escape(summary['data'])}</title><style>{STYLE}</style></head><body>",
        f"<h1>Audit of {escape(summary['data'])}</h1>",
        _cards(summary),
        '<h2 id="labels">Likely label errors</h2>',
        '<p class="muted">Each image beside the images its out-of-fold model found most typical of '
        "its given class and of the class it suggests. Ranked by how sure the suggestion is.</p>",
        _label_section(labels, typical, gallery),
        '<h2 id="leaks">Train/val leaks</h2>',
        '<p class="muted">Near-copies on both sides of the split inflate val accuracy.</p>',
        _pair_section(leaks, gallery),
        '<h2 id="duplicates">Near-duplicates</h2>',
        '<p class="muted">Near-copies within a split; pairs in different classes first.</p>',
        _pair_section(duplicates, gallery),
        '<h2 id="classes">Per class</h2>',
        _class_table(summary["per_class"]),
        "</body></html>\n",
    ]
    return "\n".join(parts)


def _cards(summary: dict[str, Any]) -> str:
    counts = summary["counts"]
    cards = [("images", summary["images"]), ("likely label errors", counts["label"]),
             ("train/val leaks", counts["leak"]), ("near-duplicate pairs", counts["duplicate"]),
             ("out-of-fold accuracy", f"{summary['out_of_fold_accuracy']:.1%}"),
             ("unreadable", len(summary["unreadable"]))]  # fmt: skip
    body = "".join(f'<div class="card">{escape(k)}<b>{escape(v)}</b></div>' for k, v in cards)
    return f'<div class="cards">{body}</div>'


def _figure(path: str, caption: str) -> str:
    return (f"<figure>{thumbnail_tag(path, caption)}<figcaption>{caption}<br>"
            f'<span class="muted file">{escape(Path(path).name)}</span></figcaption></figure>')  # fmt: skip


def _strip(label: str, paths: list[str]) -> str:
    thumbs = "".join(thumbnail_tag(p, label) for p in paths)
    return f'<div class="strip-label">{escape(label)}</div><div class="strip">{thumbs}</div>'


def _label_section(labels: list[Any], typical: dict[str, list[str]], limit: int) -> str:
    if not labels:
        return '<p class="muted">None found.</p>'
    blocks = []
    for f in labels[:limit]:
        caption = (f"given <b>{escape(f.given)}</b><br>suggested "
                   f'<span class="wrong">{escape(f.suggested)}</span> {f.confidence:.0%}')  # fmt: skip
        given = [p for p in typical.get(f.given, []) if p != f.path][:3]
        suggested = [p for p in typical.get(f.suggested, []) if p != f.path][:3]
        blocks.append(
            f'<div class="finding"><div class="main gallery">{_figure(f.path, caption)}</div><div>'
            f"{_strip(f'typical {f.given} (given)', given)}"
            f"{_strip(f'typical {f.suggested} (suggested)', suggested)}</div></div>"
        )
    return "".join(blocks) + _more(len(labels), limit)


def _pair_section(pairs: list[Any], limit: int) -> str:
    if not pairs:
        return '<p class="muted">None found.</p>'
    blocks = [
        f'<div class="finding pair gallery">{_figure(f.path, escape(f.given))}'
        f'<div class="sim">{f.confidence:.3f}</div>{_figure(f.related_path, escape(f.suggested))}</div>'
        for f in pairs[:limit]
    ]
    return "".join(blocks) + _more(len(pairs), limit)


def _more(total: int, limit: int) -> str:
    return f'<p class="muted">... and {total - limit} more in audit.csv.</p>' if total > limit else ""


def _class_table(per_class: dict[str, dict[str, Any]]) -> str:
    head = "<tr><th>class</th><th>images</th><th>flagged</th><th>estimated noise</th></tr>"
    rows = "".join(
        f"<tr><td>{escape(name)}</td><td>{c['images']}</td><td>{c['flagged']}</td>"
        f"<td>{c['estimated_noise']:.1%}</td></tr>"
        for name, c in per_class.items()
    )
    return f"<table>{head}{rows}</table>"
