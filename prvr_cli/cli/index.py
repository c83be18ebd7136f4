"""`prvr list`, `prvr info` and `prvr compact`: what an index holds, what built it, and keeping it small."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .. import settings
from ..errors import UsageError
from ..index import ann
from ..index.meta import describe_builder
from .options import IndexOpt, JsonOpt, open_library
from .output import fmt_bytes, fmt_time, print_videos, stderr, write_line


def list_videos(
    index: Optional[str] = IndexOpt,
    as_json: bool = typer.Option(False, "--json", help="JSON Lines, one object per video."),
):
    """What is indexed: one line per video, then totals on stderr."""
    library = open_library(index)
    rows = library.videos()
    print_videos(rows, as_json)
    stderr.print(f"{len(rows)} videos, {fmt_time(sum(r['duration'] for r in rows))} of video, "
                 f"{sum(r['n_frames'] for r in rows)} frames, {fmt_bytes(sum(r['size'] for r in rows))} of files; "
                 f"index uses {fmt_bytes(library.usage())}", markup=False)


def info(index: Optional[str] = IndexOpt, as_json: bool = JsonOpt):
    """Where the index is, what built it, and its table versions."""
    data = {**open_library(index).info(), "config_file": str(settings.config_path()),
            "cache": str(settings.cache_home())}
    if as_json:
        write_line(json.dumps(data))
        return
    enc, builder = data["encoder"], data["builder"]
    for label, value in (
            ("index", data["index"]), ("format", data["format"]), ("videos", data["videos"]),
            ("disk", fmt_bytes(data["disk_bytes"])),
            ("encoder", f"{enc.get('clip_model', '-')} / {enc.get('clip_pretrained', '-')} (dim {enc.get('dim', '-')}, "
                        f"fingerprint {enc.get('fingerprint', '-')})"),
            ("model", f"{describe_builder(builder)}; {builder.get('n_prototypes', '-')} prototypes per branch, "
                      f"branch weights {builder.get('branch_weights', '-')}"),
            ("tables", ", ".join(f"{k} v{v}" for k, v in data["table_versions"].items())),
            ("search", "exact: every video is scored" if data["candidates"] is None else
                       f"approximate candidates, scored exactly: {data['candidates']['centroids']['clip']} "
                       f"centroids per branch over {data['candidates']['videos']} videos"),
            ("config", data["config_file"]), ("cache", data["cache"])):
        write_line(f"{label:<10} {value}")


def compact(index: Optional[str] = IndexOpt, as_json: bool = JsonOpt):
    """Merge the index's small table files and delete every old table version (not while a search runs)."""
    library = open_library(index)
    before, after = library.compact()
    if as_json:
        write_line(json.dumps({"index": library.location, "bytes_before": before, "bytes_after": after}))
    else:
        write_line(f"compacted {library.location}: {fmt_bytes(before)} -> {fmt_bytes(after)}")


def optimize(index: Optional[str] = IndexOpt, as_json: bool = JsonOpt):
    """Compact the index (as `prvr compact`) and retrain its approximate search candidates on the current
    prototypes (large libraries: ingest keeps them current, and this fits them to the library again)."""
    library = open_library(index)
    done = library.optimize()
    if as_json:
        write_line(json.dumps({"index": library.location, **done}))
        return
    write_line(f"compacted {library.location}: {fmt_bytes(done['bytes_before'])} -> {fmt_bytes(done['bytes_after'])}")
    c = done["candidates"]
    write_line(f"candidates: {done['videos']} videos, below {ann.ANN_MIN_VIDEOS}: every video is scored exactly"
               if c is None else f"candidates retrained: {c['centroids']['clip']} centroids per branch over "
               f"{c['videos']} videos in {c['seconds']} s")


def forget(
    paths: list[Path] = typer.Argument(..., metavar="PATH...", help="Indexed video files, or folders: every indexed "
                                       "video under them (the files need not exist any more)."),
    index: Optional[str] = IndexOpt,
):
    """Drop videos from the index: prints each dropped path; a PATH that names no indexed video is an error (2)."""
    dropped, unmatched = open_library(index).forget(paths)
    for path in dropped:
        write_line(path)
    stderr.print(f"{len(dropped)} video(s) dropped from the index", markup=False)
    if unmatched:
        raise UsageError(f"not in the index: {', '.join(unmatched)} (see `prvr list`)")
