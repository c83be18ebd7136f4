"""Thumbnails of hits (one decoded frame, cached as JPEG) and contact sheets of them.

The page of `prvr serve` and `prvr search --preview` use the same thumbnails: a frame at the middle of a
hit's best highlight, its short side 240 px, cached under the user's cache folder by file identity and time.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

from .decode import decode_still

SHORT_SIDE = 240


def highlight_time(hit: dict) -> float:
    """Seconds of the frame that stands for a hit: the middle of its best highlight (0 without one)."""
    best = hit["highlights"][0] if hit.get("highlights") else None
    return round((best["start"] + best["end"]) / 2, 1) if best else 0.0


def thumbnail(path: str | Path, seconds: float, cache: Path) -> Path:
    """A JPEG of the frame at `seconds` into `path` (decoded once, then read from `cache`)."""
    from PIL import Image

    path = Path(path)
    stat = path.stat()
    key = hashlib.sha1(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{seconds:.1f}|{SHORT_SIDE}".encode()).hexdigest()
    cached = Path(cache) / f"{key}.jpg"
    if not cached.is_file():
        buffer = io.BytesIO()
        Image.fromarray(decode_still(path, seconds, SHORT_SIDE)).save(buffer, format="JPEG", quality=80)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, cached)
    return cached


def contact_sheet(hits: list[dict], cache: Path, target: Path, columns: int = 4, width: int = 320) -> Path:
    """A PNG grid of the hits' thumbnails, each labelled with rank, score, file name and its best time range.
    A hit whose frame cannot be decoded gets a grey tile with its label."""
    from PIL import Image, ImageDraw, ImageFont

    from ..errors import DecodeError

    height, label = width * 9 // 16, 34
    rows = max(1, -(-len(hits) // columns))
    sheet = Image.new("RGB", (columns * width, rows * (height + label)), (24, 24, 24))
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for i, hit in enumerate(hits):
        x, y = (i % columns) * width, (i // columns) * (height + label)
        try:
            tile = Image.open(thumbnail(hit["path"], highlight_time(hit), cache)).convert("RGB")
            tile.thumbnail((width, height))
            sheet.paste(tile, (x + (width - tile.width) // 2, y + (height - tile.height) // 2))
        except (DecodeError, OSError):
            draw.rectangle([x, y, x + width - 1, y + height - 1], fill=(70, 70, 70))
        best = hit["highlights"][0] if hit.get("highlights") else None
        span = f"{best['start']:.1f}-{best['end']:.1f}s" if best else "-"
        draw.text((x + 4, y + height + 3), f"#{hit['rank']}  {hit['score']:.3f}  {span}", fill=(240, 240, 240), font=font)
        draw.text((x + 4, y + height + 18), Path(hit["path"]).name[:48], fill=(180, 180, 180), font=font)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(target, format="PNG")
    return target
