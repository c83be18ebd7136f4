"""`prvr search`: rank indexed videos for a query (or a batch of queries from stdin), with highlights."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .. import settings
from ..errors import ExitCode, PrvrError, UsageError
from .options import (ClipModelOpt, ClipPretrainedOpt, DeviceOpt, IndexOpt, ModelOpt, encoder_choice,
                      open_library)
from ..index.ann import check_mode
from ..index.search import Hit, HitFilter, SearchResults
from ..serve.client import served_search, socket_path
from .output import print_search, stderr, write_line
from .plain import cut_warning, remember

MAX_QUERY_CHARS = 2000


def search(
    query: str = typer.Argument(..., metavar="QUERY",
                                help="What happens in the moment you look for; - reads one query per line from stdin."),
    index: Optional[str] = IndexOpt,
    top_k: Optional[int] = typer.Option(None, "-k", "--top-k", help="Number of videos to return [default 10]."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
    as_jsonl: bool = typer.Option(False, "--jsonl", help="One JSON object per hit (with its query) per line."),
    paths_only: bool = typer.Option(False, "--paths-only", help="Only the video paths, best first."),
    nul: bool = typer.Option(False, "-0", "--null", help="With --paths-only: separate paths with NUL, not newline."),
    clip_model: Optional[str] = ClipModelOpt,
    clip_pretrained: Optional[str] = ClipPretrainedOpt,
    model: Optional[str] = ModelOpt,
    device: Optional[str] = DeviceOpt,
    keep_duplicates: bool = typer.Option(False, "--keep-duplicates", help="List identical copies of a file as "
                                         "separate hits (by default they are one hit, with the others as copies)."),
    rerank: int = typer.Option(0, "--rerank", metavar="K", help="Reorder the first stage's top K with the model's "
                               "text-proxy head (an index built with a `prvr train --proxy-head` checkpoint)."),
    path_glob: Optional[str] = typer.Option(None, "--path-glob", metavar="GLOB", help="Only videos whose path "
                                            "matches, e.g. '*/holiday/*' (* also crosses folders)."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Drop hits scoring below this."),
    candidates: Optional[str] = typer.Option(None, "--candidates", help="auto, ann or exact: score only approximate "
                                             "candidates (exactly) or every video; auto uses candidates where the "
                                             "library is large enough to have them [env PRVR_CANDIDATES; default "
                                             "auto]."),
    export: Optional[Path] = typer.Option(None, "--export", metavar="DIR", help="Cut each hit's best highlight "
                                          "into DIR as RANK_STEM_START-END.mp4 and print those paths instead."),
    pad: float = typer.Option(0.0, "--pad", help="With --export: seconds added before and after the highlight."),
    copy: bool = typer.Option(False, "--copy", help="With --export: copy from the keyframe before the start "
                              "instead of re-encoding (fast; may start up to one keyframe interval early)."),
    preview: Optional[Path] = typer.Option(None, "--preview", metavar="PNG", help="Also write a contact sheet: a "
                                           "frame at each hit's best highlight, labelled with rank, score, name, time."),
    open_hit: Optional[int] = typer.Option(None, "--open", metavar="N", help="Also play hit N in mpv, VLC or the "
                                           "system player, from its best highlight."),
):
    """Rank indexed videos for a query, with the time ranges that match it."""
    fmt = _format(as_json, as_jsonl, paths_only, nul)
    k = settings.resolve("top_k", top_k, int)
    if not 1 <= k <= 10000:
        raise UsageError(f"-k {k}: ask for between 1 and 10000 results")
    if not 0 <= rerank <= 10000:
        raise UsageError(f"--rerank {rerank}: re-rank between 1 and 10000 candidates (0 turns it off)")
    queries, refused = _read_queries(query)
    hit_filter = HitFilter(path_glob or None, min_score)
    candidates = check_mode(settings.resolve("candidates", candidates))
    library = open_library(index, device)
    choice = encoder_choice(clip_model, clip_pretrained, model)
    served = None if rerank or any(choice.values()) else socket_path(settings.runtime_dir(), library.root)
    if preview is not None and (len(queries) > 1 or preview.suffix.lower() != ".png"):
        raise UsageError(f"--preview {preview}: give a .png file, for one query on the command line")
    if export is not None:
        if len(queries) > 1:
            raise UsageError("--export cuts the hits of one query; give the query on the command line")
        if pad < 0:
            raise UsageError(f"--pad {pad}: give seconds >= 0")
        batch = next(_answers(library, served, queries, k, keep_duplicates, rerank, choice, hit_filter, candidates))
        export_clips(batch.hits[0], export, pad, copy)
        return
    answered = []
    for batch in _answers(library, served, queries, k, keep_duplicates, rerank, choice, hit_filter, candidates):
        for q, cut in batch.cut_tokens.items():
            stderr.print(cut_warning(q, cut), markup=False, soft_wrap=True)
        answered += zip(batch.queries, batch.hits)
        if fmt != "json":   # one JSON document waits for every answer; the other formats print each as it comes
            print_search(answered[-len(batch.queries):], fmt, nul, with_query=len(queries) > 1)
    if fmt == "json":
        print_search(answered, fmt, nul)
    as_dicts = [(q, [h.as_dict() for h in hits]) for q, hits in answered]
    remember(settings.cache_home(), str(library.root), as_dicts)
    if open_hit is not None:
        play_hit(open_hit, as_dicts[0][1], print_only=False)
    if preview is not None:
        from ..pipeline.thumbs import contact_sheet

        contact_sheet(as_dicts[0][1], settings.cache_home() / "thumbs", preview)
        stderr.print(f"contact sheet of {len(as_dicts[0][1])} hits written to {preview}", markup=False)
    if refused:
        raise PrvrError(f"{refused} stdin line(s) were not answered (see above)", ExitCode.USAGE)


def export_clips(hits, folder: Path, pad: float, copy: bool) -> None:
    """Cut the hits into `folder`, print each written path; exit 3 when some could not be cut."""
    from ..pipeline.cut import export_hits

    failed = []

    def report(hit, message: str) -> None:
        failed.append(hit.path)
        stderr.print(f"prvr: error: {message}", markup=False, soft_wrap=True)

    for path in export_hits(hits, folder, pad, copy, on_error=report):
        write_line(str(path))
    if failed:
        raise PrvrError(f"{len(failed)} hit(s) could not be cut (see above)", ExitCode.PARTIAL)


def _answers(library, served, queries: list[str], k: int, keep_duplicates: bool, rerank: int, choice: dict,
             hit_filter: HitFilter, candidates: str):
    """Results as they come: from a running `prvr serve` one query at a time, the rest (all, with no server)
    in process."""
    done = 0
    if served is not None:
        for q in queries:
            answer = served_search(served, q, k, keep_duplicates, hit_filter, candidates)
            if answer is None:
                break   # no server, or it stopped: the rest in process
            cut = {answer["query"]: answer["cut_tokens"]} if answer.get("cut_tokens") else {}
            yield SearchResults([answer["query"]], [[Hit.from_dict(h) for h in answer["results"]]], cut)
            done += 1
    if done < len(queries):
        yield library.search(queries[done:], k, keep_duplicates=keep_duplicates, rerank_depth=rerank,
                             hit_filter=hit_filter, candidates=candidates, **choice)


def _format(as_json: bool, as_jsonl: bool, paths_only: bool, nul: bool) -> str:
    """The output format asked for: json, jsonl, paths, or table on a terminal and tsv in a pipe."""
    if sum([as_json, as_jsonl, paths_only]) > 1:
        raise UsageError("choose one of --json, --jsonl and --paths-only")
    if nul and not paths_only:
        raise UsageError("-0/--null goes with --paths-only")
    return "json" if as_json else "jsonl" if as_jsonl else "paths" if paths_only else \
        "table" if sys.stdout.isatty() else "tsv"


def _read_queries(query: str) -> tuple[list[str], int]:
    """The queries to answer, and how many stdin lines were refused (each reported with its line number)."""
    if query != "-":
        problem = _query_problem(query)
        if problem:
            raise UsageError(problem + ("; describe the moment you are looking for, e.g. prvr search \"a dog "
                                        "catches a frisbee\"" if not query.strip() else ""))
        return [query.strip()], 0
    if sys.stdin.isatty():
        stderr.print("reading queries from stdin, one per line (Ctrl-D to finish)")
    queries, refused = [], 0
    for n, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue  # blank lines separate queries
        problem = _query_problem(line.rstrip("\n"))
        if problem:
            stderr.print(f"prvr: error: stdin line {n}: {problem}; skipped", markup=False, soft_wrap=True)
            refused += 1
        else:
            queries.append(line.strip())
    if not queries:
        raise UsageError("no queries on stdin; give one query per line")
    return queries, refused


def _query_problem(query: str) -> str | None:
    if not query.strip():
        return "empty query"
    if len(query) > MAX_QUERY_CHARS:
        return f"query of {len(query)} characters is too long (at most {MAX_QUERY_CHARS}); describe one moment"
    return None


def export(
    query: str = typer.Argument(..., metavar="QUERY", help="What happens in the moment you look for."),
    output: Path = typer.Option(..., "-o", "--output", metavar="DIR", help="Folder for the clips (made if absent)."),
    top_k: Optional[int] = typer.Option(None, "-k", "--top-k", help="Number of hits to cut [default 10]."),
    pad: float = typer.Option(0.0, "--pad", help="Seconds added before and after each highlight."),
    copy: bool = typer.Option(False, "--copy", help="Copy from the keyframe before the start instead of "
                              "re-encoding (fast; may start up to one keyframe interval early)."),
    path_glob: Optional[str] = typer.Option(None, "--path-glob", metavar="GLOB", help="Only videos whose path matches."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Drop hits scoring below this."),
    index: Optional[str] = IndexOpt,
    device: Optional[str] = DeviceOpt,
):
    """Cut the best highlight of each hit into DIR (RANK_STEM_START-END.mp4) and print the written paths."""
    search(query=query, index=index, top_k=top_k, as_json=False, as_jsonl=False, paths_only=False, nul=False,
           clip_model=None, clip_pretrained=None, model=None, device=device, keep_duplicates=False, rerank=0,
           path_glob=path_glob, min_score=min_score, export=output, pad=pad, copy=copy, preview=None,
           open_hit=None, candidates=None)


def play_hit(n: int, hits: list[dict], print_only: bool) -> None:
    """Play hit `n` (1-based) from its best highlight, or print the command line that would."""
    import shlex

    from ..player import launch, player_command

    if not 1 <= n <= len(hits):
        raise UsageError(f"hit {n}: the search has {len(hits)} hit(s); choose 1 to {len(hits)}")
    hit = hits[n - 1]
    start = hit["highlights"][0]["start"] if hit.get("highlights") else 0.0
    try:
        command = player_command(hit["path"], start)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    if print_only:
        write_line(shlex.join(command))
    else:
        stderr.print(f"playing {hit['path']} from {start:.1f}s", markup=False, soft_wrap=True)
        launch(command)


def open_last(
    n: int = typer.Argument(1, metavar="N", help="Which hit of the last search (1 = best)."),
    print_only: bool = typer.Option(False, "--print", help="Print the player's command line instead of running it."),
):
    """Play hit N of the last `prvr search` in mpv, VLC or the system player, from its best highlight."""
    import json

    try:
        last = json.loads((settings.cache_home() / "last_search.json").read_text())
    except (OSError, ValueError):
        raise UsageError("no search to open a hit from: run `prvr search \"...\"` first") from None
    if len(last["results"]) != 1:
        raise UsageError("the last search had several queries; search one and open its hit")
    play_hit(n, last["results"][0]["hits"], print_only)
