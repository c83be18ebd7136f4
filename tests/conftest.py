"""Fixtures: a folder of synthesized videos, an in-process CLI on a fresh index, the real clips, a shared folder."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.helpers import CLI, PALETTE, SHARED_VIDEOS, make_video

@pytest.fixture
def videos(tmp_path) -> Path:
    """A folder of four short distinct videos, one in a subfolder."""
    root = tmp_path / "videos"
    make_video(root / "red_green.mp4", [PALETTE[0], PALETTE[1]])
    make_video(root / "blue.mp4", [PALETTE[2]] * 2)
    make_video(root / "sub" / "yellow_magenta.avi", [PALETTE[3], PALETTE[4], PALETTE[3]])
    make_video(root / "cyan red.mp4", [PALETTE[5], PALETTE[0]])
    return root


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
    path = Path(tempfile.mkdtemp(prefix="prvr-test-"))
    path.chmod(0o755)
    yield path
    for p in [path, *path.rglob("*")]:
        if not p.is_symlink():
            p.chmod(0o755 if p.is_dir() else 0o644)
    shutil.rmtree(path, ignore_errors=True)
