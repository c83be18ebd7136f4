"""Ask a running `prvr serve` for search results over its Unix socket (standard library only).

A search looks for the socket of its index; no socket, a refused connection (a server killed
without cleaning up) or a server that does not answer in time means None, and the caller searches
in process instead.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import socket
import urllib.parse
from pathlib import Path

CONNECT_TIMEOUT = 1.0
ANSWER_TIMEOUT = 60.0


def socket_path(runtime: Path, index_root: Path) -> Path:
    """The socket of the server for `index_root` (by the index's resolved path)."""
    return Path(runtime) / f"{hashlib.sha1(str(index_root).encode()).hexdigest()[:16]}.sock"


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_file = str(path)

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        sock.connect(self.socket_file)
        sock.settimeout(self.timeout)
        self.sock = sock


def served_search(path: Path, query: str, k: int, keep_duplicates: bool, hit_filter=None,
                  candidates: str = "auto") -> dict | None:
    """The server's answer ({"query", "results", "cut_tokens"}) or None when no server answers."""
    if not path.exists():
        return None
    params = {"q": query, "k": k, "duplicates": int(keep_duplicates)}
    if hit_filter is not None and hit_filter.path_glob:
        params["path_glob"] = hit_filter.path_glob
    if hit_filter is not None and hit_filter.min_score is not None:
        params["min_score"] = repr(hit_filter.min_score)
    if candidates != "auto":
        params["candidates"] = candidates
    params = urllib.parse.urlencode(params)
    conn = UnixConnection(path, ANSWER_TIMEOUT)
    try:
        conn.request("GET", f"/api/search?{params}")
        response = conn.getresponse()
        if response.status != 200:
            return None
        answer = json.loads(response.read())
        wanted = (hit_filter.path_glob, hit_filter.min_score) if hit_filter is not None else (None, None)
        if (answer.get("path_glob"), answer.get("min_score")) != wanted or \
                answer.get("candidates", "auto") != candidates:
            return None     # a server of another prvr version that ignored a filter: search in process
        return answer
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        conn.close()
