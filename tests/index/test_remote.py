"""An index on object storage: `--index s3://bucket/folder` against a local S3-compatible server (moto's server
mode, started here on 127.0.0.1), for ingest, search from a second machine's empty cache, the writer's lease
and the errors a user meets."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from prvr_cli.errors import ExitCode

pytest.importorskip("moto", reason="moto (test extra) runs the local S3 server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on a free local port, with one bucket; yields its address."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the local S3 server did not start")
    from pyarrow import fs

    fs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="test", secret_key="test",
                    region="us-east-1", allow_bucket_creation=True).create_dir("prvr-test")
    yield address
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def s3(s3_server, monkeypatch, request):
    """The AWS variables for the local server, and a fresh index address in its bucket."""
    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
                        "AWS_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(name, value)
    return f"s3://prvr-test/{request.node.name}"


def _bucket(s3_server):
    from pyarrow import fs

    return fs.S3FileSystem(endpoint_override=s3_server.split("://")[1], scheme="http", access_key="test",
                           secret_key="test", region="us-east-1")


def _ingest(cli, videos, s3):
    code, out, err = cli("ingest", videos, "--json", "--quiet", "--index", s3, index=False, tiny=True)
    return code, (json.loads(out) if out.strip() else None), err


def test_ingest_and_search_an_index_on_object_storage(cli, videos, s3, s3_server, tmp_path, monkeypatch):
    code, summary, err = _ingest(cli, videos, s3)
    assert code == 0 and summary["new"] == 4 and summary["index"] == s3, err
    listed = {i.path.split("/", 2)[2] for i in _bucket(s3_server).get_file_info(
        __import__("pyarrow.fs", fromlist=["FileSelector"]).FileSelector(s3.split("//")[1], recursive=True))}
    assert "index.json" in listed and any(p.startswith("db/videos.lance/_versions/") for p in listed)
    assert "writer.json" not in listed                      # the lease is dropped when the writer is done

    code, out, err = cli("search", "red", "--index", s3, "-k", "2", "--json", index=False)
    assert code == 0, err
    first = json.loads(out)["results"]
    assert len(first) == 2 and all(h["path"].startswith(str(videos)) for h in first)

    # another machine: nothing of this index in its cache; search pulls the small files and reads the tables
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other-machine"))
    code, out, err = cli("search", "red", "--index", s3, "-k", "2", "--json", index=False)
    assert code == 0, err
    assert [h["path"] for h in json.loads(out)["results"]] == [h["path"] for h in first]
    code, summary, err = _ingest(cli, videos, s3)
    assert code == 0 and summary["unchanged"] == 4 and summary["new"] == 0, err
    code, out, err = cli("info", "--index", s3, "--json", index=False)
    assert code == 0 and json.loads(out)["index"] == s3 and json.loads(out)["videos"] == 4


def test_another_machine_writing_is_refused_until_its_lease_is_gone(cli, videos, s3, s3_server):
    code, _, err = _ingest(cli, videos, s3)
    assert code == 0, err
    bucket, key = s3.split("//")[1], "writer.json"
    with _bucket(s3_server).open_output_stream(f"{bucket}/{key}") as f:
        f.write(json.dumps({"host": "render-node-7", "pid": 4242, "since": time.time()}).encode())
    code, out, err = cli("forget", str(videos / "blue.mp4"), "--index", s3, index=False)
    assert code == ExitCode.LOCKED and "render-node-7" in err and f"{s3}/writer.json" in err
    assert len(err.strip().splitlines()) == 1
    code, out, err = cli("search", "blue", "--index", s3, "-k", "4", "--json", index=False)
    assert code == 0 and len(json.loads(out)["results"]) == 4   # reading is not refused, and nothing was lost
    # a lease of this machine's own (a writer killed with -9): the local lock shows it is gone, so it is taken over
    with _bucket(s3_server).open_output_stream(f"{bucket}/{key}") as f:
        f.write(json.dumps({"host": socket.gethostname(), "pid": 4242, "since": time.time()}).encode())
    code, out, err = cli("forget", str(videos / "blue.mp4"), "--index", s3, index=False)
    assert code == 0, err
    with _bucket(s3_server).open_output_stream(f"{bucket}/{key}") as f:
        f.write(json.dumps({"host": "render-node-7", "pid": 4242, "since": time.time()}).encode())
    _bucket(s3_server).delete_file(f"{bucket}/{key}")
    code, out, err = cli("forget", str(videos / "red_green.mp4"), "--index", s3, index=False)
    assert code == 0, err


def test_unreachable_store_and_bad_addresses_are_one_line_errors(cli, s3, monkeypatch):
    code, out, err = cli("search", "red", "--index", "s3://just-a-bucket", index=False)
    assert code == ExitCode.USAGE and "give a bucket and a folder" in err
    code, out, err = cli("search", "red", "--index", s3, index=False)
    assert code == ExitCode.NO_INDEX and f"no index at {s3}" in err
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
    code, out, err = cli("search", "red", "--index", s3, index=False)
    assert code == ExitCode.REMOTE and s3 in err and "AWS_ENDPOINT_URL" in err
    assert len(err.strip().splitlines()) == 1 and out == ""
