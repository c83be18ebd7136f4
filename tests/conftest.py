"""Shared fixtures: synthesized videos (PyAV), a tiny random CLIP config, and an in-process CLI runner."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
TINY_CLIP = str(FIXTURES / "prvr-tiny-clip.json")
SHARED_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos"


def make_video(path: Path, colors: list[tuple[int, int, int]], seconds_per_color: float = 1.0, fps: int = 10,
               size: tuple[int, int] = (64, 48), codec: str = "mpeg4") -> Path:
    """Write a video showing each color in turn (with a moving bar, so frames differ)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        n = int(seconds_per_color * fps)
        for c, color in enumerate(colors):
            for i in range(n):
                img = np.zeros((size[1], size[0], 3), dtype=np.uint8)
                img[:] = color
                x = (i * 5) % size[0]
                img[:, x:x + 4] = 255 - np.asarray(color, dtype=np.uint8)
                frame = av.VideoFrame.from_ndarray(img, format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


PALETTE = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 230, 40), (200, 40, 200), (40, 210, 210)]


@pytest.fixture
def videos(tmp_path) -> Path:
    """A folder of four short distinct videos, one in a subfolder."""
    root = tmp_path / "videos"
    make_video(root / "red_green.mp4", [PALETTE[0], PALETTE[1]])
    make_video(root / "blue.mp4", [PALETTE[2]] * 2)
    make_video(root / "sub" / "yellow_magenta.avi", [PALETTE[3], PALETTE[4], PALETTE[3]])
    make_video(root / "cyan red.mp4", [PALETTE[5], PALETTE[0]])
    return root


class CLI:
    """Runs `prvr` in-process (fast: torch and open_clip are imported once) and captures its output."""

    def __init__(self, capsys, index: Path):
        self.capsys, self.index = capsys, index

    def __call__(self, *args: str, index: bool = True, tiny: bool = False):
        from prvr_cli.cli.commands_tmp import main

        argv = [str(a) for a in args]
        if index:
            argv += ["--index", str(self.index)]
        if tiny:
            argv += ["--clip-model", TINY_CLIP, "--clip-pretrained", "none"]
        self.capsys.readouterr()
        code = main(argv)
        out, err = self.capsys.readouterr()
        return code, out, err

    def ingest(self, *paths, extra=(), tiny=True):
        code, out, err = self("ingest", *paths, "--json", "--quiet", *extra, tiny=tiny)
        summary = json.loads(out) if out.strip() else None
        return code, summary, err


@pytest.fixture
def cli(capsys, tmp_path, monkeypatch) -> CLI:
    for var in [v for v in os.environ if v.startswith("PRVR_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return CLI(capsys, tmp_path / "index")


@pytest.fixture
def shared_videos(tmp_path) -> Path:
    if not SHARED_VIDEOS.is_dir():
        pytest.skip("../shared/data/videos is absent")
    dst = tmp_path / "shared_videos"
    dst.mkdir()
    for p in SHARED_VIDEOS.iterdir():
        if p.suffix in (".mp4", ".avi"):
            shutil.copy(p, dst / p.name)
    return dst


@pytest.fixture
def open_dir():
    """A scratch folder under the system temp folder that another user can reach (pytest's own is private)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="prvr-test-"))
    path.chmod(0o755)
    yield path
    for p in [path, *path.rglob("*")]:
        if not p.is_symlink():
            p.chmod(0o755 if p.is_dir() else 0o644)
    shutil.rmtree(path, ignore_errors=True)


def as_another_user(command: list[str]) -> list[str]:
    """`command` run as a user without root's rights to read and write everything (nobody, when we are root)."""
    return (["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []) + command
