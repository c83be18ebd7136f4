"""Plain results on stdout (TSV, JSON, JSON Lines, paths) from hits as dictionaries (`Hit.as_dict`), with the
standard library only: `prvr search` answered by a running server prints through here without importing more."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

_TSV_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


class StdoutClosed(Exception):
    """The reader of stdout went away (`prvr search ... | head`): stop quietly."""


def tsv_field(text: str) -> str:
    """A value safe inside tab-separated output: backslash, tab, newline and carriage return escaped as \\ \\t \\n \\r."""
    return text.translate(_TSV_ESCAPES)


def tsv_line(fields) -> str:
    return "\t".join(tsv_field(str(f)) for f in fields)


def write_line(text: str = "", end: str = "\n") -> None:
    try:
        sys.stdout.write(text + end)
        if end == "\0" or not sys.stdout.isatty():
            return
        sys.stdout.flush()
    except BrokenPipeError:
        raise StdoutClosed from None


def cut_warning(query: str, cut: int) -> str:
    return (f"prvr: warning: query {query[:40]!r}... is longer than the text encoder reads: its last {cut} tokens are "
            "ignored; describe one moment")


def print_hits(results: list[tuple[str, list[dict]]], fmt: str, nul: bool = False, with_query: bool = False) -> None:
    """results: [(query, [hit dict, ...]), ...]; fmt one of json, jsonl, paths, tsv."""
    if fmt == "json":
        docs = [{"query": q, "results": hits} for q, hits in results]
        write_line(json.dumps(docs[0] if len(docs) == 1 else docs, ensure_ascii=False))
    elif fmt == "jsonl":
        for q, hits in results:
            for h in hits:
                write_line(json.dumps({"query": q, **h}, ensure_ascii=False))
    elif fmt == "paths":
        for _, hits in results:
            for h in hits:
                write_line(h["path"], end="\0" if nul else "\n")
    elif fmt == "tsv":
        for q, hits in results:
            for h in hits:
                ranges = ",".join(f"{r['start']:.2f}-{r['end']:.2f}" for r in h["highlights"])
                fields = [str(h["rank"]), f"{h['score']:.4f}", h["path"], ranges]
                write_line(tsv_line([q, *fields] if with_query else fields))
    else:
        raise ValueError(f"unknown plain format {fmt!r}")


def remember(cache: Path, index: str, results: list[tuple[str, list[dict]]]) -> None:
    """Keep the last search's hits (for `prvr open N`); a failure to write only loses that."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f"last_search.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps({"index": index, "results": [{"query": q, "hits": h} for q, h in results]}))
        os.replace(tmp, cache / "last_search.json")
    except OSError:
        pass
