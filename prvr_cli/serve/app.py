"""The server: one index kept warm (`ServedIndex`), a JSON API and a page over it (Starlette, run by uvicorn).

    GET /                      the page (page.html): a query box, hits as cards, a player
    GET /api/search?q=&k=      {"query", "results": [hits as `prvr search --json`], "cut_tokens"}; also
                               duplicates=1, path_glob=, min_score=, candidates= as the flags of `prvr search`
    GET /api/thumb?path=&t=    a JPEG of the frame at t seconds (decoded once, then cached)
    GET /api/video?path=       the video file, with HTTP range requests so the browser can seek
    GET /api/health            the index, its videos and the cache version searched

Only files in the index are served, by their exact stored path, and only while that path is still
the file itself (not a symlink put in its place). With a token, every TCP request carries it
(`?token=` or `Authorization: Bearer`); the Unix socket, for `prvr search`, is private to its user.
"""
from __future__ import annotations

import hmac
import os
import threading
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.routing import Route

from ..errors import PrvrError
from ..library import Library
from ..index.ann import MODES
from ..index.matrices import published
from ..index.search import HitFilter
from ..query.searcher import Searcher

MAX_QUERY_CHARS = 2000
MAX_K = 200
PAGE = Path(__file__).with_name("page.html")


class ServedIndex:
    """An index's searcher kept in memory, reopened when a write publishes a newer version of its table."""

    def __init__(self, library: Library):
        self.library = library
        self.user_cache = library.cache / "indexes"
        self._searcher: Searcher | None = None
        self._lock = threading.Lock()

    def searcher(self) -> Searcher | None:
        """The searcher of the newest published version (None: this index needs the full path)."""
        with self._lock:
            current = published(self.library.root, self.user_cache)
            if self._searcher is None or current is None or self._searcher.cache != current:
                if self.library.remote is not None:   # another machine may have written: its query side too
                    self.library.remote.pull()
                if current is None:   # the full path builds the cache and the export, then we load them
                    self.library.search(["warm up"], 1, torch_free=False)
                self._searcher = Searcher.open(self.library.root, self.user_cache, in_memory=True)
            return self._searcher

    def search(self, query: str, k: int, keep_duplicates: bool, hit_filter: HitFilter = HitFilter(),
               candidates: str = "auto"):
        searcher = self.searcher()
        if searcher is None:
            return self.library.search([query], k, keep_duplicates=keep_duplicates, hit_filter=hit_filter,
                                       candidates=candidates)
        return searcher.search([query], k, keep_duplicates, hit_filter, candidates)

    def indexed_file(self, path: str) -> Path | None:
        """`path` if it is a video of the index and still that file (its real path), else None."""
        searcher = self.searcher()
        paths = searcher.path_set if searcher is not None else {v["path"] for v in self.library.videos()}
        if path not in paths or os.path.realpath(path) != path or not os.path.isfile(path):
            return None
        return Path(path)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _int(request: Request, name: str, default: int, low: int, high: int) -> int:
    value = request.query_params.get(name, str(default))
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name}={value[:20]!r} is not a whole number") from None
    if not low <= number <= high:
        raise ValueError(f"{name}={number} is outside {low}..{high}")
    return number


def create_app(served: ServedIndex, token: str | None = None, thumbs: Path | None = None) -> Starlette:
    """The Starlette app over `served`; with `token`, every request must carry it."""
    thumbs = Path(thumbs) if thumbs else served.library.cache / "thumbs"

    async def page(request: Request):
        return HTMLResponse(PAGE.read_text())

    def search(request: Request):
        q = request.query_params.get("q", "")
        try:
            k = _int(request, "k", 10, 1, MAX_K)
            keep = _int(request, "duplicates", 0, 0, 1) == 1
        except ValueError as e:
            return _error(400, str(e))
        if not q.strip():
            return _error(400, "q is empty: describe the moment you are looking for")
        if len(q) > MAX_QUERY_CHARS:
            return _error(400, f"q has {len(q)} characters; at most {MAX_QUERY_CHARS}")
        glob, floor = request.query_params.get("path_glob") or None, request.query_params.get("min_score")
        if glob is not None and len(glob) > MAX_QUERY_CHARS:
            return _error(400, f"path_glob has {len(glob)} characters; at most {MAX_QUERY_CHARS}")
        try:
            floor = None if floor in (None, "") else float(floor)
        except ValueError:
            return _error(400, f"min_score={floor[:20]!r} is not a number")
        candidates = request.query_params.get("candidates") or "auto"
        if candidates not in MODES:
            return _error(400, f"candidates={candidates[:20]!r}: use auto, ann or exact")
        results = served.search(q.strip(), k, keep, HitFilter(glob, floor), candidates)
        return JSONResponse({"query": results.queries[0], "results": [h.as_dict() for h in results.hits[0]],
                             "cut_tokens": results.cut_tokens.get(results.queries[0], 0),
                             "path_glob": glob, "min_score": floor,   # what was applied, for the client to check
                             "candidates": candidates})

    def thumb(request: Request):
        from ..pipeline.thumbs import thumbnail

        path = served.indexed_file(request.query_params.get("path", ""))
        if path is None:
            return _error(404, "no such video in the index")
        try:
            t = round(float(request.query_params.get("t", "0")), 1)
        except ValueError:
            return _error(400, "t is not a number of seconds")
        if not 0 <= t < 1e7:
            return _error(400, "t is outside the video")
        return FileResponse(thumbnail(path, t, thumbs), media_type="image/jpeg")

    def video(request: Request):
        path = served.indexed_file(request.query_params.get("path", ""))
        if path is None:
            return _error(404, "no such video in the index")
        return FileResponse(path)

    def health(request: Request):
        searcher = served.searcher()
        return JSONResponse({"index": served.library.location, "videos": len(searcher.paths) if searcher else None,
                             "cache": searcher.cache.name if searcher else None})

    async def failure(request: Request, exc: Exception):
        if isinstance(exc, PrvrError):
            return _error(409, str(exc))
        return _error(500, f"internal error: {type(exc).__name__}")

    class TokenCheck:
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            over_unix_socket = (scope.get("server") or ("", 0))[1] is None   # private to the user by its mode
            if scope["type"] == "http" and token is not None and not over_unix_socket:
                request = Request(scope)
                given = request.query_params.get("token") or \
                    request.headers.get("authorization", "").removeprefix("Bearer ").strip()
                if not hmac.compare_digest(given.encode(), token.encode()):
                    await _error(401, "missing or wrong token (printed when the server started)")(scope, receive, send)
                    return
            await self.app(scope, receive, send)

    routes = [Route("/", page), Route("/api/search", search), Route("/api/thumb", thumb),
              Route("/api/video", video), Route("/api/health", health)]
    return Starlette(routes=routes, middleware=[Middleware(TokenCheck)],
                     exception_handlers={Exception: failure, PrvrError: failure})
