"""Start `prvr serve`: a TCP listener for the page and API, a Unix socket for `prvr search`, one uvicorn server."""
from __future__ import annotations

import os
import secrets
import signal
import socket
import sys
from pathlib import Path

from ..errors import UsageError
from .client import socket_path

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
BACKLOG = 128


def unix_listener(path: Path) -> socket.socket:
    """A listening socket at `path` (mode 600 in a folder of mode 700); a stale file from a killed server is
    replaced, a live server is refused."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(str(path))
            raise UsageError(f"a prvr server for this index is already running (socket {path}); stop it first")
        except (ConnectionRefusedError, FileNotFoundError, socket.timeout):
            path.unlink(missing_ok=True)   # left by a server that was killed
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(BACKLOG)     # clients queue from now on, while the index loads
    return sock


def tcp_listener(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port") from None
    sock.listen(BACKLOG)
    return sock


def serve(served, host: str, port: int, runtime: Path, thumbs: Path, say) -> None:
    """Serve until interrupted; the socket file is removed on the way out."""
    import uvicorn

    from .app import create_app

    token = None if host in LOCAL_HOSTS else secrets.token_urlsafe(24)
    tcp = tcp_listener(host, port)
    unix_path = socket_path(runtime, served.library.root)
    unix = unix_listener(unix_path)
    try:
        searcher = served.searcher()      # load before the first request
        port = tcp.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        say(f"serving {served.library.location} ({len(searcher.paths) if searcher else '?'} videos)")
        say(f"open http://{shown}:{port}/" + (f"?token={token}" if token else "") + "  (Ctrl-C stops)")
        # uvicorn re-raises the signal that stopped it once it has shut down: a SIGTERM then ends this process
        # through our handler, so the socket file is removed below (SIGINT already raises KeyboardInterrupt)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        config = uvicorn.Config(create_app(served, token, thumbs), log_level="warning", access_log=False,
                                h11_max_incomplete_event_size=16 * 1024, limit_concurrency=64)
        uvicorn.Server(config).run(sockets=[tcp, unix])
    finally:
        tcp.close()
        unix.close()
        unix_path.unlink(missing_ok=True)
