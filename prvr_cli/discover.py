"""Stage 1: find the video files under the paths a user gives, and tell files apart by their content."""
from __future__ import annotations

import fnmatch
import hashlib
import os
from pathlib import Path

from .errors import UsageError

VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".wmv", ".flv", ".ts",
                    ".mts", ".m2ts", ".3gp", ".ogv"}


def discover(paths: list[str | Path], glob: str | None = None) -> list[Path]:
    """Video files named by `paths` (files, or folders searched recursively), sorted, absolute, unique.

    A file named explicitly is kept whatever its extension (so a bad one gets a
    clear decode error); inside folders only the usual video extensions count.
    `glob` (e.g. "*.mp4" or "**/2024/*") narrows by file name or relative path.
    """
    found: dict[str, Path] = {}
    for raw in paths:
        root = Path(raw).expanduser()
        if not root.exists():
            raise UsageError(f"{raw}: no such file or folder")
        if root.is_file():
            found[str(root.resolve())] = root.resolve()
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                if name.startswith(".") or Path(name).suffix.lower() not in VIDEO_EXTENSIONS:
                    continue
                path = Path(dirpath) / name
                if not path.is_file():
                    continue  # a FIFO, socket or device: reading it could block forever
                rel = path.relative_to(root).as_posix()
                if glob and not (fnmatch.fnmatch(name, glob) or fnmatch.fnmatch(rel, glob)):
                    continue
                found[str(path.resolve())] = path.resolve()
    return [found[k] for k in sorted(found)]


def content_hash(path: Path) -> str:
    """BLAKE2b of the whole file: recognises a moved, copied or touched file without decoding it."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
