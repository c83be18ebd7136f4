"""Everything the CLI prints: results on stdout (table, TSV, JSON, JSON Lines, paths), progress and logs on stderr."""
from __future__ import annotations

import contextlib
import json
import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .plain import print_hits, tsv_line, write_line

stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def stdout_console() -> Console:
    return Console(highlight=False, soft_wrap=False)


def fmt_time(seconds: float) -> str:
    m, s = divmod(max(0.0, seconds), 60)
    return f"{int(m)}:{s:04.1f}"


def fmt_ranges(ranges: list[dict]) -> str:
    return ", ".join(f"{fmt_time(r['start'])}-{fmt_time(r['end'])}" for r in ranges)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@contextlib.contextmanager
def native_stderr_silenced():
    """Hide what C libraries (ffmpeg, decord) print straight to file descriptor 2; our own stderr stays.

    Only when sys.stderr is the process's real stderr (not under a test's capture).
    """
    try:
        if sys.stderr.fileno() != 2:
            raise OSError
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, AttributeError, ValueError):
        yield
        return
    ours = os.fdopen(saved, "w", buffering=1, encoding=sys.stderr.encoding, errors="replace")
    previous = sys.stderr
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    sys.stderr = ours
    try:
        yield
    finally:
        ours.flush()
        os.dup2(saved, 2)
        sys.stderr = previous
        ours.close()


def print_search(results: list[tuple[str, list]], fmt: str, nul: bool = False, with_query: bool | None = None) -> None:
    """results: [(query, [Hit, ...]), ...] in the order asked; `with_query` (default: more than one query) puts
    the query first on each TSV line."""
    with_query = len(results) > 1 if with_query is None else with_query
    if fmt != "table":
        print_hits([(q, [h.as_dict() for h in hits]) for q, hits in results], fmt, nul, with_query)
        return
    console = stdout_console()
    for q, hits in results:
        table = Table(title=Text(q, style="bold"), title_justify="left", show_lines=False)
        table.add_column("#", justify="right", style="dim")
        table.add_column("score", justify="right")
        table.add_column("video", overflow="fold")
        table.add_column("highlights (m:ss)", overflow="fold", style="cyan")
        for h in hits:
            video = Text("\n".join([h.path, *(f"= {c}" for c in h.copies)]))  # Text: no markup in paths
            table.add_row(str(h.rank), f"{h.score:.4f}", video, fmt_ranges(h.highlights))
        console.print(table)


def print_videos(rows: list[dict], as_json: bool) -> None:
    """`prvr list`: JSON Lines, a table on a terminal, else tab-separated path, duration, frames, size."""
    if as_json:
        for r in rows:
            write_line(json.dumps({"path": r["path"], "duration": round(r["duration"], 3), "frames": r["n_frames"],
                                   "size": r["size"], "ingested_at": r["ingested_at"]}, ensure_ascii=False))
    elif sys.stdout.isatty():
        table = Table()
        for col, just in (("video", "left"), ("duration", "right"), ("frames", "right"), ("size", "right")):
            table.add_column(col, justify=just, overflow="fold")
        for r in rows:
            table.add_row(Text(r["path"]), fmt_time(r["duration"]), str(r["n_frames"]), fmt_bytes(r["size"]))
        stdout_console().print(table)
    else:
        for r in rows:
            write_line(tsv_line([r["path"], f"{r['duration']:.2f}", r["n_frames"], r["size"]]))


class IngestProgress:
    """A rich progress bar on stderr (videos done, frames encoded, frames per second) and errors as they come.

    The library calls `begin(total)` once it knows how many videos it will encode; with none, or when
    disabled, no bar is drawn and errors are still printed.
    """

    def __init__(self, enabled: bool = True):
        self.enabled, self.progress, self.frames = enabled, None, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def begin(self, total_videos: int) -> None:
        if not self.enabled or not total_videos:
            return
        self.progress = Progress(
            TextColumn("[bold]ingest[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("videos"),
            TextColumn("{task.fields[frames]} frames"), TextColumn("{task.fields[rate]:.1f} frames/s"),
            TimeElapsedColumn(), console=stderr, transient=False)
        self.progress.__enter__()
        self.task = self.progress.add_task("ingest", total=total_videos, frames=0, rate=0.0)

    def frames_done(self, n: int) -> None:
        self.frames += n
        if self.progress is not None:
            elapsed = self.progress.tasks[0].elapsed or 1e-9
            self.progress.update(self.task, frames=self.frames, rate=self.frames / elapsed)

    def video_done(self) -> None:
        if self.progress is not None:
            self.progress.advance(self.task)

    def error(self, message: str) -> None:
        console = self.progress.console if self.progress is not None else stderr
        console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True,
                      style="red" if console.is_terminal else None)
