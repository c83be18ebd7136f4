"""The index folder on its own: a trained model kept inside it, searches without write access, bounded history."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from pathlib import Path

import pytest

from prvr_cli.errors import ExitCode

from tests.helpers import as_another_user


def _checkpoint(path):
    from prvr_cli.nets.factory import create_model, save_checkpoint

    save_checkpoint(path, create_model("protoprvr_anet", video_dim=32, text_dim=32), feature_source={"layout": "test"})
    return path


def _hits(out: str) -> list[tuple[str, float]]:
    return [(h["path"], h["score"]) for h in json.loads(out)["results"]]


def test_an_index_built_with_a_model_moves_without_the_checkpoint(cli, videos, tmp_path):
    (tmp_path / "models").mkdir()
    ckpt = _checkpoint(tmp_path / "models" / "best.pt")
    code, _, err = cli("ingest", videos, "--quiet", "--model", ckpt, tiny=True)
    assert code == 0, err
    assert (cli.index / "model.pt").read_bytes() == ckpt.read_bytes()
    code, before, err = cli("search", "a red screen", "-k", "4", "--json")
    assert code == 0, err

    shutil.rmtree(tmp_path / "models")                     # the checkpoint is gone
    moved = tmp_path / "shared" / "library-index"
    shutil.move(str(cli.index), moved)                     # and the index moved
    code, after, err = cli("search", "a red screen", "-k", "4", "--json", "--index", moved, index=False)
    assert code == 0, err
    assert _hits(after) == _hits(before)
    # the moved index still takes new videos with its own model
    (videos / "blue.mp4").rename(videos / "blue2.mp4")
    shutil.copy(videos / "red_green.mp4", videos / "copy.mp4")
    code, out, err = cli("ingest", videos, "--json", "--quiet", "--index", moved, index=False, tiny=True)
    assert code == 0 and json.loads(out)["new"] == 1 and json.loads(out)["moved"] == 1, err
    code, out, _ = cli("info", "--json", "--index", moved, index=False)
    assert json.loads(out)["builder"]["stored"] == "model.pt"
    # back to zero-shot: the copy goes
    assert cli("reindex", "--model", "zero-shot", "--index", moved, index=False)[0] == 0
    assert not (moved / "model.pt").exists()


def test_a_read_only_index_can_be_searched(cli, videos, open_dir):
    index = open_dir / "index"
    code, _, err = cli("ingest", videos, "--quiet", "--index", index, index=False, tiny=True)
    assert code == 0, err
    code, expected, _ = cli("search", "blue", "-k", "4", "--json", "--index", index, index=False)
    shutil.rmtree(index / "cache")                          # the owner's cache is gone too
    home = open_dir / "home"
    home.mkdir(mode=0o777)
    home.chmod(0o777)
    for p in [index, *index.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)

    def search(cache_home):
        return subprocess.run(as_another_user([sys.executable, "-m", "prvr_cli", "search", "blue", "-k", "4", "--json",
                                               "--index", str(index)]),
                              capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                              env={**os.environ, "XDG_CACHE_HOME": str(cache_home), "HOME": str(home),
                                   "XDG_CONFIG_HOME": str(home / "config"),
                                   "PYTHONPATH": str(Path(__file__).resolve().parents[2])})

    r = search(home / "cache")
    assert r.returncode == 0, r.stderr
    assert _hits(r.stdout) == _hits(expected)
    assert not (index / "cache").exists()
    assert list((home / "cache" / "prvr" / "indexes").glob("*/videos-v*"))   # kept in the user's cache
    r = search(index)                                       # nowhere to write at all: searched from memory
    assert r.returncode == 0, r.stderr
    assert _hits(r.stdout) == _hits(expected)


def _versions(index) -> int:
    import lancedb

    db = lancedb.connect(str(index / "db"))
    return sum(len(db.open_table(name).list_versions()) for name in ("videos", "frames"))


def test_writers_prune_superseded_versions_and_compact_keeps_one(cli, videos, monkeypatch):
    import prvr_cli.index.store as store

    assert cli.ingest(videos)[0] == 0
    monkeypatch.setattr(store, "VERSION_GRACE", 3600.0)     # nothing is old enough yet: everything stays
    for _ in range(3):
        assert cli("reindex", "--model", "zero-shot")[0] == 0
    kept = _versions(cli.index)
    assert kept > 10
    monkeypatch.setattr(store, "VERSION_GRACE", 0.0)        # no search can be reading: the next writer prunes
    for _ in range(3):
        assert cli("reindex", "--model", "zero-shot")[0] == 0
    assert _versions(cli.index) <= 4
    code, out, err = cli("compact", "--json")
    assert code == 0, err
    sizes = json.loads(out)
    assert sizes["bytes_after"] <= sizes["bytes_before"]
    assert _versions(cli.index) == 2                        # one per table
    code, out, _ = cli("search", "blue", "--jsonl")
    assert code == 0 and len(out.splitlines()) == 4


def test_a_superseded_version_within_the_grace_stays_readable(cli, videos):
    """A search that opened the table before a writer finished still reads its version's files."""
    from prvr_cli.index.store import Index

    assert cli.ingest(videos)[0] == 0
    reader = Index.open(cli.index)
    paths = reader.search_matrices().paths                # pins the version a search would read
    assert cli("reindex", "--model", "zero-shot")[0] == 0   # a writer commits and prunes with the default grace
    rows = reader.rows(paths, ["timestamps", "attn_clip"])
    assert set(rows) == set(paths)


def test_compact_needs_an_index(cli):
    code, _, err = cli("compact")
    assert code == ExitCode.NO_INDEX and "prvr ingest" in err


def test_a_table_being_created_reads_as_not_yet_written(cli, videos):
    """A search during the first ingest may see a table folder with no committed version yet: while a writer holds
    the lock that is an empty index, not a damaged one; with no writer it is damage."""

    from prvr_cli.errors import CorruptError
    from prvr_cli.index.store import Index

    assert cli.ingest(videos)[0] == 0
    shutil.rmtree(cli.index / "db" / "videos.lance" / "_versions")          # data files, no version: mid-creation
    reader = Index.open(cli.index)
    assert not reader.writer_active()
    with pytest.raises(CorruptError):
        reader.videos
    with Index.open(cli.index).lock():
        assert reader.writer_active() and reader.videos is None
