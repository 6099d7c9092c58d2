"""Pieces of the self-contained HTML pages (report.html, audit.html): escaping, images inlined
as data: URIs, JPEG thumbnails of a user's files. No script, no external reference."""

from __future__ import annotations

import base64
import html
import io

from PIL import Image

from resnext_cli.data.images import load_rgb

THUMBNAIL_PX = 160
BASE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222;
       padding: 0 1rem; }
h1 { margin-bottom: .2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
.muted { color: #666; }
.cards { display: flex; flex-wrap: wrap; gap: 1rem; margin: 1rem 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: .6rem 1rem; min-width: 9rem; }
.card b { display: block; font-size: 1.4rem; }
table { border-collapse: collapse; font-size: .9rem; }
th, td { padding: .25rem .7rem; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.gallery { display: flex; flex-wrap: wrap; gap: .8rem; }
.gallery figure { margin: 0; width: 172px; font-size: .8rem; }
.gallery img { width: 160px; height: 160px; object-fit: contain; background: #f4f4f4;
               border: 1px solid #ddd; }
.gallery .file { word-break: break-all; }
.wrong { color: #b00020; font-weight: 600; }
"""


def escape(text: object) -> str:
    return html.escape(str(text), quote=True)


def image_tag(data: bytes, kind: str, alt: str, css_class: str = "figure") -> str:
    encoded = base64.b64encode(data).decode("ascii")
    cls = f' class="{css_class}"' if css_class else ""
    return f'<img{cls} alt="{escape(alt)}" src="data:image/{kind};base64,{encoded}">'


def thumbnail(path: str, px: int = THUMBNAIL_PX) -> bytes | None:
    """A JPEG of the file, at most px x px and at least 1 px a side whatever its aspect ratio
    (a 10000x3 image gives 160x1); None when it cannot be read or made (moved, broken): a
    thumbnail never costs the page."""
    try:
        picture = load_rgb(path, px)
        scale = min(px / picture.width, px / picture.height)
        size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        buffer = io.BytesIO()
        picture.resize(size, Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=85)
    except Exception:  # noqa: BLE001 - a moved or broken file only loses its thumbnail
        return None
    return buffer.getvalue()


def thumbnail_tag(path: str, alt: str) -> str:
    data = thumbnail(path)
    if data is None:
        return '<div class="muted">(file no longer readable)</div>'
    return image_tag(data, "jpeg", alt, "")
