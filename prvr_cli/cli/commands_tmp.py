"""The `prvr` command line: thin wrappers that resolve settings and call the pipeline stages.

Results go to stdout, progress and logs to stderr. Errors are one line on stderr
and a documented exit code (see prvr_cli.errors.ExitCode and the README).
"""
from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .. import settings
from ..errors import ExitCode, IndexMissingError, MismatchError, PrvrError, UsageError
from .output import (IngestProgress, StdoutClosed, fmt_bytes, fmt_time, native_stderr_silenced, print_search, stderr,
                     tsv_line, write_line)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Search a local video library with natural language (partially relevant video retrieval).")

IndexOpt = typer.Option(None, "--index", help="Index folder [env PRVR_INDEX; default $XDG_DATA_HOME/prvr/index].")
DeviceOpt = typer.Option(None, "--device", help="auto, cpu or cuda [env PRVR_DEVICE; default auto].")
ClipModelOpt = typer.Option(None, "--clip-model", help="open_clip model name or model-config .json "
                            "[env PRVR_CLIP_MODEL; default: the index's, else ViT-B-32].")
ClipPretrainedOpt = typer.Option(None, "--clip-pretrained", help="Pretrained tag, local checkpoint file, or none "
                                 "[env PRVR_CLIP_PRETRAINED; default: the index's, else openai].")
ModelOpt = typer.Option(None, "--model", help="Checkpoint from `prvr train` [env PRVR_MODEL; default: the index's, "
                        "else zero-shot CLIP prototypes].")


def _index_path(flag: Optional[Path]) -> Path:
    return Path(settings.resolve("index", str(flag) if flag else None)).expanduser()


def _builder(model: Optional[str], encoder_spec: dict, device: str):
    """The prototype builder: a trained checkpoint, or zero-shot CLIP prototypes."""
    from ..pipeline.prototypes import TrainedPrototypes, ZeroShotPrototypes

    if not model or model == "zero-shot":
        return ZeroShotPrototypes()
    builder = TrainedPrototypes.load(model, encoder_spec, device=device)
    if builder.meta["method"] != "protoprvr":
        raise UsageError(f"--model {model}: ingest stores prototypes, so it needs a ProtoPRVR checkpoint, "
                         f"not {builder.meta['method']}")
    return builder


@app.command()
def ingest(
    paths: List[Path] = typer.Argument(..., metavar="PATH", help="Video files or folders (searched recursively)."),
    index: Optional[Path] = IndexOpt,
    glob: Optional[str] = typer.Option(None, "--glob", help="Only files whose name or relative path matches."),
    fps: Optional[float] = typer.Option(None, "--fps", help="Frames sampled per second [default 3]."),
    clip_model: Optional[str] = ClipModelOpt,
    clip_pretrained: Optional[str] = ClipPretrainedOpt,
    model: Optional[str] = ModelOpt,
    device: Optional[str] = DeviceOpt,
    workers: Optional[int] = typer.Option(None, "--workers", help="Decoding threads [default min(4, cores)]."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Frames per encoder batch [default 64]."),
    prune: bool = typer.Option(False, "--prune", help="Forget indexed videos whose files are gone."),
    decode_timeout: Optional[float] = typer.Option(None, "--decode-timeout",
                                                   help="Give up on a file whose decoding takes longer than this many "
                                                   "seconds plus 4 s per second of video; 0: no limit [default 60]."),
    wait: bool = typer.Option(False, "--wait", help="If another prvr process is writing the index, wait for it "
                              "instead of exiting with code 6."),
    as_json: bool = typer.Option(False, "--json", help="Print the run summary as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Index videos: decode, encode frames with CLIP, build prototypes, store them."""
    import numpy as np

    from ..pipeline.discover import discover
    from ..pipeline.encode import ClipEncoder, describe, fingerprint, pick_device
    from ..pipeline.ingest import DECODE_TIMEOUT, make_plan, run_ingest
    from ..index.store import Index

    fps = settings.resolve("fps", fps, float)
    workers = settings.resolve("workers", workers, int)
    batch_size = settings.resolve("batch_size", batch_size, int)
    if not 0 < fps <= 60:
        raise UsageError(f"--fps {fps}: use a rate between 0 and 60 frames per second")
    if workers < 1 or batch_size < 1:
        raise UsageError("--workers and --batch-size must be at least 1")
    if decode_timeout is not None and decode_timeout < 0:
        raise UsageError(f"--decode-timeout {decode_timeout}: use a number of seconds, or 0 for no limit")
    found = discover(paths, glob)
    files = found.files
    for path, why in found.skipped:
        stderr.print(f"error: {path}: {why}", markup=False, soft_wrap=True)
    if not files:
        stderr.print(f"error: no video files found under {', '.join(map(str, paths))}", markup=False, soft_wrap=True)
        if not prune:
            raise typer.Exit(ExitCode.PARTIAL)  # nothing to do: the index is left as it was
    idx = Index.open(_index_path(index), create=True)
    with idx.lock(wait=_waiting_message if wait else None):
        # flag > PRVR_* > config file > what the index was built with > built-in default
        recorded = idx.encoder_spec["source"] if idx.encoder_spec else {}
        model_name = settings.resolve("clip_model", clip_model, default=recorded.get("clip_model"))
        pretrained = settings.resolve("clip_pretrained", clip_pretrained,
                                      default=(recorded.get("clip_pretrained") or "none") if recorded else None)
        identity, _ = describe(model_name, pretrained)
        if idx.encoder_spec and fingerprint(identity) != idx.encoder_spec["fingerprint"]:
            old = idx.encoder_spec
            raise MismatchError(f"index {idx.root} holds features of CLIP {old['clip_model']}/{old['clip_pretrained']}, "
                                f"not {identity['clip_model']}/{identity['clip_pretrained']}; use the same encoder "
                                "or another --index")
        model = settings.resolve("model", model, default=idx.recorded_model())
        device = pick_device(settings.resolve("device", device))
        idx.repair()
        plan = make_plan(files, idx.file_states(), prune, workers)
        encoder = None
        if plan.encode or not idx.encoder_spec:
            encoder = ClipEncoder.load(model_name, pretrained, device, cache_dir=str(settings.cache_home() / "clip"))
        enc_spec = encoder.spec() if encoder else idx.encoder_spec
        builder = _builder(model, enc_spec, device)
        if encoder is not None or idx.builder_spec is None:
            proto_dim = int(builder.build(np.zeros((2, enc_spec["dim"]), np.float32)).clip.shape[1])
            idx.bind(enc_spec, builder.spec(), proto_dim)
        elif idx.builder_spec["fingerprint"] != builder.spec()["fingerprint"]:
            idx.bind(enc_spec, builder.spec(), idx.meta["proto_dim"])  # raises the mismatch message
        show = not quiet and stderr.is_terminal
        with IngestProgress(len(plan.encode), enabled=show and bool(plan.encode)) as progress:
            with native_stderr_silenced():
                summary = run_ingest(idx, plan, encoder, builder, fps=fps, workers=workers, batch_size=batch_size,
                                     progress=progress,
                                     decode_timeout=DECODE_TIMEOUT if decode_timeout is None else decode_timeout)
        if summary.new or summary.changed or summary.moved or summary.pruned:
            idx.optimize()
    stderr.print(summary.line(), markup=False)
    if as_json:
        write_line(json.dumps({"index": str(idx.root), **summary.as_dict()}))
    if summary.failed or found.skipped or not files:
        raise typer.Exit(ExitCode.PARTIAL)


def _waiting_message(root, holder: str) -> None:
    stderr.print(f"prvr: index {root} is being written by another prvr process (pid {holder}); waiting for it "
                 "to finish (Ctrl-C to stop)", markup=False, soft_wrap=True)


MAX_QUERY_CHARS = 2000


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


@app.command()
def search(
    query: str = typer.Argument(..., metavar="QUERY",
                               help="What happens in the moment you look for; - reads one query per line from stdin."),
    index: Optional[Path] = IndexOpt,
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
):
    """Rank indexed videos for a query, with the time ranges that match it."""
    from ..pipeline.encode import ClipEncoder, describe, fingerprint
    from ..index.search import attach_highlights, rank
    from ..index.store import Index

    if sum([as_json, as_jsonl, paths_only]) > 1:
        raise UsageError("choose one of --json, --jsonl and --paths-only")
    if nul and not paths_only:
        raise UsageError("-0/--null goes with --paths-only")
    k = settings.resolve("top_k", top_k, int)
    if not 1 <= k <= 10000:
        raise UsageError(f"-k {k}: ask for between 1 and 10000 results")
    queries, refused = _read_queries(query)
    idx = Index.open(_index_path(index))
    if idx.count() == 0 or idx.encoder_spec is None:
        raise IndexMissingError(f"index {idx.root} is empty; add videos with `prvr ingest PATH`")
    enc_spec, builder_spec = idx.encoder_spec, idx.builder_spec
    if clip_model or clip_pretrained:
        identity, _ = describe(clip_model or enc_spec["source"]["clip_model"],
                               clip_pretrained or enc_spec["source"]["clip_pretrained"] or "none")
        if fingerprint(identity) != enc_spec["fingerprint"]:
            raise MismatchError(f"index {idx.root} was built with CLIP {enc_spec['clip_model']}/"
                                f"{enc_spec['clip_pretrained']}, not {identity['clip_model']}/{identity['clip_pretrained']}; "
                                "search it without --clip-model/--clip-pretrained or use another --index")
    dev = settings.resolve("device", device)
    # a matching --clip-model/--clip-pretrained may point at where a local config or checkpoint lives now
    source = {"clip_model": clip_model or enc_spec["source"]["clip_model"],
              "clip_pretrained": clip_pretrained or enc_spec["source"]["clip_pretrained"] or "none"}
    for key, value in source.items():
        if value != "none" and (value.endswith(".json") or os.path.isabs(value)) and not os.path.exists(value):
            raise UsageError(f"index {idx.root} was built with the local CLIP file {value}, which is gone; pass "
                             f"--{key.replace('_', '-')} PATH with its new place")
    encoder = ClipEncoder.load(source["clip_model"], source["clip_pretrained"], dev,
                               cache_dir=str(settings.cache_home() / "clip"))
    requested = settings.resolve("model", model)
    builder = _builder(requested or idx.recorded_model(), encoder.spec(), encoder.device)
    if builder.spec()["fingerprint"] != builder_spec["fingerprint"]:
        from ..index.store import describe_builder
        raise MismatchError(f"index {idx.root} holds prototypes from {describe_builder(builder_spec)}, not "
                            f"{describe_builder(builder.spec())}; search without --model or run `prvr reindex --model`")
    for q in queries:
        if cut := encoder.cut_tokens(q):
            stderr.print(f"prvr: warning: query {q[:40]!r}... is longer than the text encoder reads: its last {cut} "
                         "tokens are ignored; describe one moment", markup=False, soft_wrap=True)
    m = idx.search_matrices()
    q_clip, q_frame = builder.encode_queries(encoder, queries)
    weights = tuple(builder_spec["branch_weights"])
    ranked = rank(m.paths, m.clip, m.frame, q_clip, q_frame, weights, k, hashes=None if keep_duplicates else m.hashes)
    rows = idx.rows(sorted({h.path for hits in ranked for h in hits}),
                    ["timestamps", "attn_clip", "attn_frame", "duration", "fps"])
    for hits in ranked:
        attach_highlights(hits, rows, weights)
    fmt = "json" if as_json else "jsonl" if as_jsonl else "paths" if paths_only else \
        "table" if sys.stdout.isatty() else "tsv"
    print_search(list(zip(queries, ranked)), fmt, nul)
    if refused:
        raise PrvrError(f"{refused} stdin line(s) were not answered (see above)", ExitCode.USAGE)


@app.command("list")
def list_videos(
    index: Optional[Path] = IndexOpt,
    as_json: bool = typer.Option(False, "--json", help="JSON Lines, one object per video."),
):
    """What is indexed: one line per video, then totals on stderr."""
    from ..index.store import Index

    idx = Index.open(_index_path(index))
    table = idx.videos
    if table is None:
        rows = []
    else:
        rows = table.to_arrow().select(["path", "duration", "n_frames", "size", "ingested_at"]).to_pylist()
    rows.sort(key=lambda r: r["path"])
    if as_json:
        for r in rows:
            write_line(json.dumps({"path": r["path"], "duration": round(r["duration"], 3), "frames": r["n_frames"],
                                   "size": r["size"], "ingested_at": r["ingested_at"]}, ensure_ascii=False))
    elif sys.stdout.isatty():
        from rich.table import Table
        from rich.text import Text

        from .output import stdout_console
        t = Table()
        for col, just in (("video", "left"), ("duration", "right"), ("frames", "right"), ("size", "right")):
            t.add_column(col, justify=just, overflow="fold")
        for r in rows:
            t.add_row(Text(r["path"]), fmt_time(r["duration"]), str(r["n_frames"]), fmt_bytes(r["size"]))
        stdout_console().print(t)
    else:
        for r in rows:
            write_line(tsv_line([r["path"], f"{r['duration']:.2f}", r["n_frames"], r["size"]]))
    total = sum(r["duration"] for r in rows)
    stderr.print(f"{len(rows)} videos, {fmt_time(total)} of video, {sum(r['n_frames'] for r in rows)} frames, "
                 f"{fmt_bytes(sum(r['size'] for r in rows))} of files; index uses {fmt_bytes(_du(idx.root))}",
                 markup=False)


def _du(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


@app.command()
def info(
    index: Optional[Path] = IndexOpt,
    as_json: bool = typer.Option(False, "--json", help="As one JSON object."),
):
    """Where the index is, what built it, and its table versions."""
    from ..index.store import Index, describe_builder

    idx = Index.open(_index_path(index))
    idx.verify()
    enc, builder = idx.encoder_spec or {}, idx.builder_spec or {}
    data = {"index": str(idx.root), "format": idx.meta["format"], "videos": idx.count(),
            "disk_bytes": _du(idx.root), "encoder": enc, "builder": builder, "table_versions": idx.versions(),
            "config_file": str(settings.config_path()), "cache": str(settings.cache_home())}
    if as_json:
        write_line(json.dumps(data))
        return
    write_line(f"index      {data['index']}")
    write_line(f"format     {data['format']}")
    write_line(f"videos     {data['videos']}")
    write_line(f"disk       {fmt_bytes(data['disk_bytes'])}")
    write_line(f"encoder    {enc.get('clip_model', '-')} / {enc.get('clip_pretrained', '-')} "
               f"(dim {enc.get('dim', '-')}, fingerprint {enc.get('fingerprint', '-')})")
    write_line(f"model      {describe_builder(builder)}; {builder.get('n_prototypes', '-')} prototypes per branch, "
               f"branch weights {builder.get('branch_weights', '-')}")
    write_line(f"tables     " + ", ".join(f"{k} v{v}" for k, v in data["table_versions"].items()))
    write_line(f"config     {data['config_file']}")
    write_line(f"cache      {data['cache']}")


@app.command()
def reindex(
    model: str = typer.Option(..., "--model", help="Checkpoint from `prvr train`, or zero-shot."),
    index: Optional[Path] = IndexOpt,
    device: Optional[str] = DeviceOpt,
):
    """Rebuild every video's prototypes with another model, from stored frame features (no decoding)."""
    from ..pipeline.encode import pick_device
    from ..pipeline.ingest import reindex as rebuild
    from ..index.store import Index

    idx = Index.open(_index_path(index))
    if idx.encoder_spec is None or idx.count() == 0:
        raise IndexMissingError(f"index {idx.root} is empty; add videos with `prvr ingest PATH`")
    with idx.lock():
        builder = _builder(model, idx.encoder_spec, pick_device(settings.resolve("device", device)))
        n = idx.count()
        with IngestProgress(n, enabled=stderr.is_terminal) as progress:
            rows = rebuild(idx, builder, progress)
        proto_dim = int(rows[0]["proto_clip"].shape[1])
        idx.rebind_builder(builder.spec(), proto_dim)
        idx.recreate_videos_table(rows)
        idx.optimize()
    stderr.print(f"rebuilt prototypes of {len(rows)} videos with {builder.spec()['fingerprint']}", markup=False)


@app.command()
def compact(
    index: Optional[Path] = IndexOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the sizes as JSON on stdout."),
):
    """Merge the index's small table files and delete every old table version (not while a search runs)."""
    from ..index.store import Index

    idx = Index.open(_index_path(index))
    before = _du(idx.root)
    with idx.lock():
        idx.optimize(grace=0)
    after = _du(idx.root)
    if as_json:
        write_line(json.dumps({"index": str(idx.root), "bytes_before": before, "bytes_after": after}))
    else:
        write_line(f"compacted {idx.root}: {fmt_bytes(before)} -> {fmt_bytes(after)}")


def _register_optional_commands() -> None:
    """Commands that live in their own modules (training and benchmarks)."""
    from .train import train_command

    app.command("train")(train_command)
    try:
        from .bench import bench_app
    except ImportError:  # until the benchmark module lands
        return
    app.add_typer(bench_app, name="bench")


_register_optional_commands()


# OS errors a user can act on (from writes outside the store's own guard, e.g. index.json or the cache)
_IO_ERRORS = {errno.ENOSPC: ("no space left on the device; free space and run again", ExitCode.DISK),
              errno.EDQUOT: ("disk quota exceeded; free space and run again", ExitCode.DISK),
              errno.EROFS: ("cannot write to a read-only file system", ExitCode.DISK),
              errno.EIO: ("input/output error", ExitCode.DISK),
              errno.EACCES: ("permission denied", ExitCode.USAGE),
              errno.EPERM: ("operation not permitted", ExitCode.USAGE)}

# typer < 0.26 raises click's exceptions; typer >= 0.26 vendors click and raises its own copies. Both are found
# from typer's public names, so usage errors exit 2 whichever typer is installed.
CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

# What Ctrl-C leaves behind, per command (the first word of the command line).
_INTERRUPTED = {"ingest": "interrupted; finished videos are kept",
                "reindex": "interrupted; the index keeps its previous prototypes",
                "train": "interrupted; last.pt holds the last finished epoch, continue with --resume",
                "bench": "interrupted; finished runs are kept and reused by the next run"}


def _report(e: Exception) -> int:
    """One line on stderr for an exception the commands did not handle; returns the exit code."""
    if isinstance(e, OSError) and e.errno in _IO_ERRORS:
        where = f" ({e.filename})" if e.filename else ""
        stderr.print(f"prvr: error: {_IO_ERRORS[e.errno][0]}{where}", markup=False, soft_wrap=True)
        return _IO_ERRORS[e.errno][1]
    if _is_lance_error(e):  # the tables' files are damaged or unreadable
        if os.environ.get("PRVR_DEBUG"):
            raise e
        stderr.print("prvr: error: the index's tables are damaged or unreadable; restore the index folder from "
                     "a backup or re-ingest into a new one (PRVR_DEBUG=1 shows the storage engine's message)",
                     markup=False, soft_wrap=True)
        return ExitCode.CORRUPT
    if os.environ.get("PRVR_DEBUG"):
        raise e
    stderr.print(f"prvr: internal error: {type(e).__name__}: {e} (set PRVR_DEBUG=1 for the traceback and "
                 "report it)", markup=False, soft_wrap=True)
    return ExitCode.INTERNAL


def _is_lance_error(e: Exception) -> bool:
    text = str(e)
    return "LanceError" in text or "lance error" in text or type(e).__module__.split(".")[0] in ("lance", "lancedb")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turn known errors into one line and an exit code."""
    import warnings

    warnings.showwarning = lambda message, *args, **kwargs: stderr.print(f"prvr: warning: {message}", markup=False)
    args = sys.argv[1:] if argv is None else list(argv)
    command = typer.main.get_command(app)
    try:
        code = command.main(args=args, prog_name="prvr", standalone_mode=False) or 0
    except PrvrError as e:
        if os.environ.get("PRVR_DEBUG") and e.__cause__ is not None:
            raise
        stderr.print(f"prvr: error: {e}", markup=False, highlight=False, soft_wrap=True)
        code = e.exit_code
    except typer.Exit as e:
        code = e.exit_code
    except CLICK_ERROR as e:  # usage errors: missing argument, unknown option or command, bad value
        e.show(file=sys.stderr)
        code = ExitCode.USAGE
    except (KeyboardInterrupt, typer.Abort):
        code = ExitCode.INTERRUPTED
    except (BrokenPipeError, StdoutClosed):
        code = 0
    except Exception as e:
        code = _report(e)
    if code == ExitCode.INTERRUPTED:  # typer turns Ctrl-C into a silent exit 130
        verb = next((a for a in args if not a.startswith("-")), "")
        stderr.print(f"prvr: {_INTERRUPTED.get(verb, 'interrupted')}", markup=False)
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        pass
    finally:
        # stdout may be a closed pipe (`prvr search ... | head`): silence the final flush at exit
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
    return code


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
