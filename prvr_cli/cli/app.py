"""The typer app: every `prvr` command, registered from the module that holds it."""
from __future__ import annotations

import typer

from . import bench, index, ingest, search, serve, train

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Search a local video library with natural language (partially relevant video retrieval).")

app.command("ingest")(ingest.ingest)
app.command("search")(search.search)
app.command("export")(search.export)
app.command("open")(search.open_last)
app.command("list")(index.list_videos)
app.command("info")(index.info)
app.command("reindex")(ingest.reindex)
app.command("compact")(index.compact)
app.command("forget")(index.forget)
app.command("optimize")(index.optimize)
app.command("serve")(serve.serve)
app.command("train")(train.train_command)
app.add_typer(bench.bench_app, name="bench")
