"""A real `prvr serve` on a small index, in a subprocess, with its own runtime, cache and config folders."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest


class Server:
    def __init__(self, index: Path, home: Path, extra: tuple[str, ...] = ()):
        self.index, self.home = index, home
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PRVR_")}
        self.env.update(XDG_CACHE_HOME=str(home / "cache"), XDG_CONFIG_HOME=str(home / "config"),
                        XDG_RUNTIME_DIR=str(home / "run"), PYTHONWARNINGS="ignore")
        self.proc = subprocess.Popen([sys.executable, "-m", "prvr_cli", "serve", "--index", str(index), "--port", "0",
                                      *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=self.env)
        self.banner = []
        for line in self.proc.stderr:
            self.banner.append(line)
            found = re.search(r"http://(\S+?):(\d+)/(\S*)", line)
            if found:
                self.host, self.port, self.suffix = found.group(1), int(found.group(2)), found.group(3)
                break
        else:
            raise RuntimeError("prvr serve did not start: " + "".join(self.banner))

    def url(self, path: str) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "[::]") else self.host
        return f"http://{host}:{self.port}{path}"

    def get(self, path: str, headers: dict | None = None) -> tuple[int, bytes, dict]:
        request = urllib.request.Request(self.url(path), headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, r.read(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read(), dict(e.headers)

    def json(self, path: str) -> tuple[int, dict]:
        status, body, _ = self.get(path)
        return status, json.loads(body)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "prvr_cli", *args, "--index", str(self.index)],
                              capture_output=True, text=True, env=self.env, timeout=300, stdin=subprocess.DEVNULL)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)


@pytest.fixture
def served_index(cli, videos, tmp_path):
    assert cli.ingest(videos)[0] == 0
    servers = []

    def start(*extra: str) -> Server:
        servers.append(Server(cli.index, tmp_path / "home", extra))
        return servers[-1]

    yield start
    for s in servers:
        s.stop(signal.SIGKILL)
