"""`prvr serve`: keep an index warm for `prvr search` and serve a page to look at the hits."""
from __future__ import annotations

from typing import Optional

import typer

from .. import settings
from ..errors import UsageError
from .options import DeviceOpt, IndexOpt, open_library
from .output import stderr


def serve(
    index: Optional[str] = IndexOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; anything but this machine's "
                             "loopback needs the token printed at start on every request."),
    port: int = typer.Option(8765, "--port", help="TCP port of the page and API (0: any free port)."),
    device: Optional[str] = DeviceOpt,
):
    """Serve the index: `prvr search` uses it while it runs, and a page at http://127.0.0.1:PORT/ shows the hits."""
    from ..serve.app import ServedIndex
    from ..serve.run import serve as run_server

    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port}: use 0 to 65535")
    library = open_library(index, device)
    library.filled_index()      # a missing or empty index is a one-line error before anything listens
    run_server(ServedIndex(library), host, port, settings.runtime_dir(), settings.cache_home() / "thumbs",
               lambda line: stderr.print(line, markup=False, soft_wrap=True))
