"""Stage 1: find the video files under the paths a user gives, and tell files apart by their content."""
from __future__ import annotations

import errno
import fnmatch
import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError

VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".wmv", ".flv", ".ts",
                    ".mts", ".m2ts", ".3gp", ".ogv"}


@dataclass
class Discovered:
    """The video files found, and each path named on the command line that gave none, with why."""

    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (path as given, reason)


def discover(paths: list[str | Path], glob: str | None = None) -> Discovered:
    """Video files named by `paths` (files, or folders searched recursively), sorted, absolute, unique.

    A file named explicitly is kept whatever its extension (so a bad one gets a
    clear decode error); inside folders only the usual video extensions count.
    `glob` (e.g. "*.mp4" or "**/2024/*") narrows by file name or relative path.
    A path that does not exist (or is a broken or looping symbolic link) is a usage error.
    """
    found: dict[str, Path] = {}
    skipped: list[tuple[str, str]] = []
    for raw in paths:
        root = Path(raw).expanduser()
        kind = _kind(root, str(raw))
        if kind == "file":
            found[str(root.resolve())] = root.resolve()
            continue
        if kind != "folder":
            skipped.append((str(raw), f"{kind}, not a video file; skipped"))
            continue
        before = len(found)
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
        if len(found) == before:
            why = f"no file in it matches --glob {glob!r}" if glob else \
                f"a folder with no video files in it ({', '.join(sorted(VIDEO_EXTENSIONS))})"
            skipped.append((str(raw), why))
    return Discovered([found[k] for k in sorted(found)], skipped)


def _kind(path: Path, raw: str) -> str:
    """'file', 'folder', or what else `path` is; UsageError when there is nothing to read there."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UsageError(f"{raw}: a symbolic link loop; point it at a real file or folder") from None
        if path.is_symlink():
            raise UsageError(f"{raw}: a broken symbolic link (to {os.readlink(path)}); fix or remove it") from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise UsageError(f"{raw}: permission denied") from None
        raise UsageError(f"{raw}: no such file or folder") from None
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    return {stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
            stat.S_IFBLK: "a block device"}.get(stat.S_IFMT(mode), "not a regular file")


def hash_file(path: Path, hasher, sample: int | None = None) -> str:
    """The hex digest of `hasher` (a hashlib object) fed the file: whole, or with `sample` its first and last
    `sample` bytes only (for multi-GB weights, where size plus head and tail identify the file)."""
    with open(path, "rb") as f:
        if sample is None:
            for block in iter(lambda: f.read(1 << 22), b""):
                hasher.update(block)
        else:
            size = os.fstat(f.fileno()).st_size
            hasher.update(f.read(sample))
            if size > sample:
                f.seek(max(size - sample, sample))
                hasher.update(f.read(sample))
    return hasher.hexdigest()


def content_hash(path: Path) -> str:
    """BLAKE2b of the whole file: recognises a moved, copied or touched file without decoding it."""
    return hash_file(path, hashlib.blake2b(digest_size=16))
