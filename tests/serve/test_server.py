"""`prvr serve`: the API against the in-process search, `prvr search` through it, what it refuses, faults."""
import json
import signal
import subprocess
import sys
import time
import urllib.parse

from prvr_cli.serve.client import served_search, socket_path
from tests.helpers import make_video


def q(**params) -> str:
    return urllib.parse.urlencode(params)


def test_api_and_cli_answers_equal_the_in_process_search(served_index):
    server = served_index()
    before = server.cli("search", "a red screen", "-k", "3", "--json")      # server running: answered by it
    status, body = server.json("/api/search?" + q(q="a red screen", k=3))
    assert status == 200 and body["query"] == "a red screen" and len(body["results"]) == 3
    assert json.loads(before.stdout) == {"query": body["query"], "results": body["results"]}
    for mode in ("exact", "ann"):   # the candidate mode is applied and echoed, for the client to check
        status, forced = server.json("/api/search?" + q(q="a red screen", k=3, candidates=mode))
        assert status == 200 and forced["candidates"] == mode and forced["results"] == body["results"]
    assert json.loads(server.cli("search", "a red screen", "-k", "3", "--json", "--candidates", "exact").stdout) == \
        json.loads(before.stdout)
    tsv = server.cli("search", "a red screen", "-k", "3")
    server.stop()
    assert not socket_path(server.home / "run" / "prvr", server.index.resolve()).exists()   # removed on exit
    alone = server.cli("search", "a red screen", "-k", "3")                 # no server: in process
    assert tsv.returncode == alone.returncode == 0 and tsv.stdout == alone.stdout and len(tsv.stdout.splitlines()) == 3
    assert json.loads(server.cli("search", "a red screen", "-k", "3", "--json").stdout) == json.loads(before.stdout)


def test_bad_parameters_get_a_json_error_not_a_traceback(served_index):
    server = served_index()
    for params, status in ((q(q=""), 400), (q(q="x", k="abc"), 400), (q(q="x", k=0), 400), (q(q="x", k=10 ** 6), 400),
                           (q(q="x" * 2001), 400), (q(q="x", duplicates=5), 400), (q(q="x", candidates="fast"), 400)):
        code, body, headers = server.get("/api/search?" + params)
        assert code == status and "error" in json.loads(body) and "Traceback" not in body.decode(), params
    code, body, _ = server.get("/api/search?" + "q=" + "x" * 20000)       # over the request line limit
    assert 400 <= code < 500 or code == 431


def test_only_indexed_files_are_served_with_ranges(served_index, videos, tmp_path):
    server = served_index()
    path = str((videos / "blue.mp4").resolve())
    data = (videos / "blue.mp4").read_bytes()
    code, body, headers = server.get("/api/video?" + q(path=path), {"Range": "bytes=10-29"})
    headers = {k.lower(): v for k, v in headers.items()}
    assert code == 206 and body == data[10:30] and headers["content-range"] == f"bytes 10-29/{len(data)}"
    code, body, headers = server.get("/api/thumb?" + q(path=path, t=0.5))
    assert code == 200 and body[:2] == b"\xff\xd8" and {k.lower(): v for k, v in headers.items()}["content-type"] == "image/jpeg"
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    for bad in (str(videos / "sub" / ".." / "blue.mp4"), "/etc/passwd", str(outside), "blue.mp4",
                path.replace("/", "%2F"), "../" * 8 + "etc/passwd"):
        for route in ("/api/video?", "/api/thumb?"):
            code, body, _ = server.get(route + q(path=bad))
            assert code == 404 and b"secret" not in body, (route, bad)
    code, _, _ = server.get("/api/video?path=" + urllib.parse.quote(path, safe=""))   # encoded slashes: same path
    assert code == 200
    # an indexed file replaced by a symlink leading out of the library is refused
    target = videos / "blue.mp4"
    target.rename(tmp_path / "moved.mp4")
    target.symlink_to(outside)
    code, body, _ = server.get("/api/video?" + q(path=path))
    assert code == 404 and b"secret" not in body


def test_listening_beyond_loopback_needs_the_token(served_index):
    server = served_index("--host", "0.0.0.0")
    token = server.suffix.removeprefix("?token=")
    assert len(token) >= 20
    assert server.get("/api/search?" + q(q="red"))[0] == 401
    assert server.get("/api/search?" + q(q="red", token="wrong"))[0] == 401
    assert server.get("/api/search?" + q(q="red", token=token))[0] == 200
    assert server.get("/api/search?" + q(q="red"), {"Authorization": f"Bearer {token}"})[0] == 200
    assert server.cli("search", "red").returncode == 0          # the private socket needs no token


def test_a_killed_server_leaves_no_socket_that_blocks(served_index):
    server = served_index()
    sock = socket_path(server.home / "run" / "prvr", server.index.resolve())
    assert sock.exists()
    server.stop(signal.SIGKILL)
    assert sock.exists()                                          # stale: nobody listens
    start = time.perf_counter()
    assert served_search(sock, "red", 3, False) is None and time.perf_counter() - start < 1.0
    done = server.cli("search", "red", "-k", "2", "--paths-only")
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 2
    again = served_index()                                        # a new server replaces the stale socket
    assert again.json("/api/health")[1]["videos"] == 4


def test_a_second_server_for_the_same_index_is_refused(served_index):
    first = served_index()
    done = first.cli("serve", "--port", "0")
    assert done.returncode == 2 and "already running" in done.stderr


def test_the_server_sees_an_ingest_made_while_it_runs(served_index, cli, videos):
    server = served_index()
    assert server.json("/api/health")[1]["videos"] == 4
    make_video(videos / "white.mp4", [(255, 255, 255)] * 2)
    assert cli.ingest(videos)[0] == 0
    status, body = server.json("/api/search?" + q(q="white", k=10))
    assert status == 200 and len(body["results"]) == 5
    assert server.json("/api/health")[1]["videos"] == 5


def test_stdin_batches_stream_through_the_server(served_index):
    server = served_index()
    done = subprocess.run([sys.executable, "-m", "prvr_cli", "search", "-", "-k", "2", "--index", str(server.index)],
                          input="red\nblue\n", capture_output=True, text=True, env=server.env, timeout=120)
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and len(lines) == 4 and {line.split("\t")[0] for line in lines} == {"red", "blue"}
