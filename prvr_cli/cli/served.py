"""`prvr search` answered by a running `prvr serve` before the rest of the CLI is imported.

Only the plain case takes this path: one query on the command line, output to a pipe or file (TSV,
--json, --jsonl, --paths-only), the index's own encoder and model, no re-ranking. Everything else,
and any doubt (an option it does not know, no server, a server that does not answer), returns None
and the full command line runs, which gives the same output (and also asks the server when one runs).
"""
from __future__ import annotations

import os
import sys

FLAGS = {"--json": "json", "--jsonl": "jsonl", "--paths-only": "paths", "-0": "nul", "--null": "nul",
         "--keep-duplicates": "keep"}
VALUED = {"-k": "k", "--top-k": "k", "--index": "index"}
MAX_QUERY_CHARS = 2000


def _parse(args: list[str]) -> dict | None:
    """The options of a plain search, or None when they are anything else."""
    found: dict = {"query": None}
    i = 0
    while i < len(args):
        a = args[i]
        name, eq, value = a.partition("=")
        if a in FLAGS:
            found[FLAGS[a]] = True
        elif name in VALUED:
            if not eq:
                i += 1
                if i == len(args):
                    return None
                value = args[i]
            found[VALUED[name]] = value
        elif a.startswith("-") or found["query"] is not None:
            return None
        else:
            found["query"] = a
        i += 1
    return found


def served_main(argv: list[str]) -> int | None:
    """Print a server's answer to `prvr search ...` and return 0, or None to run the full command line."""
    if not argv or argv[0] != "search" or sys.stdout.isatty():
        return None
    opts = _parse(argv[1:])
    if opts is None or not opts["query"] or not opts["query"].strip() or len(opts["query"]) > MAX_QUERY_CHARS:
        return None
    if sum(bool(opts.get(f)) for f in ("json", "jsonl", "paths")) > 1 or (opts.get("nul") and not opts.get("paths")):
        return None
    from .. import settings
    from ..errors import UsageError
    from ..index.remote import local_folder
    from ..serve.client import served_search, socket_path

    try:
        if any(settings.given(name) for name in ("clip_model", "clip_pretrained", "model")):
            return None
        k = int(opts["k"]) if "k" in opts else settings.resolve("top_k", None, int)
        candidates = settings.resolve("candidates")
        root = local_folder(settings.resolve("index", opts.get("index")), settings.cache_home())
    except (UsageError, ValueError, OSError):
        return None
    if not 1 <= k <= 10000:
        return None
    answer = served_search(socket_path(settings.runtime_dir(), root), opts["query"].strip(), k, bool(opts.get("keep")),
                           candidates=candidates)
    if answer is None:
        return None
    from .plain import StdoutClosed, cut_warning, print_hits, remember

    if answer.get("cut_tokens"):
        print(cut_warning(answer["query"], answer["cut_tokens"]), file=sys.stderr)
    fmt = "json" if opts.get("json") else "jsonl" if opts.get("jsonl") else "paths" if opts.get("paths") else "tsv"
    remember(settings.cache_home(), str(root), [(answer["query"], answer["results"])])
    try:
        print_hits([(answer["query"], answer["results"])], fmt, bool(opts.get("nul")))
        sys.stdout.flush()
    except (StdoutClosed, BrokenPipeError):
        pass
    try:   # stdout may be a closed pipe (`| head`): the interpreter's flush at exit must not complain
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
    return 0
