"""Edge cases a new user hits: odd paths, odd inputs, long queries, query batches and identical copies."""
from __future__ import annotations

import io
import json
import os
import shutil

from prvr_cli.errors import ExitCode

from tests.helpers import PALETTE, make_video


def test_tabs_and_newlines_in_paths_are_escaped_in_tsv(cli, tmp_path):
    lib = tmp_path / "lib"
    odd = make_video(lib / "tab\there" / "new\nline.mp4", [PALETTE[0]])
    make_video(lib / "back\\slash.mp4", [PALETTE[1]])
    assert cli.ingest(lib)[0] == 0
    code, out, err = cli("search", "red", "-k", "2")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 and all(len(line.split("\t")) == 4 for line in lines)
    escaped = str(odd).replace("\t", "\\t").replace("\n", "\\n")
    assert escaped in [line.split("\t")[2] for line in lines]
    assert "\\\\slash.mp4" in out
    code, out, err = cli("list")
    assert code == 0 and len(out.splitlines()) == 2 and escaped in out
    code, out, _ = cli("search", "red", "-k", "2", "--json")   # JSON carries the raw path
    assert str(odd) in [h["path"] for h in json.loads(out)["results"]]


def test_a_folder_named_like_a_video_and_a_fifo_are_named_with_the_reason(cli, tmp_path):
    folder = tmp_path / "foo.mp4"
    folder.mkdir()
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    code, out, err = cli("ingest", folder, fifo, "--quiet", tiny=True)
    assert code == ExitCode.PARTIAL, err
    assert f"{folder}: a folder with no video files in it" in err
    assert f"{fifo}: a named pipe (FIFO), not a video file; skipped" in err
    assert "no video files found" in err
    assert not cli.index.exists()                             # nothing to ingest: no index made, no CLIP loaded
    # a good file beside them is ingested; the run still says something was skipped
    good = make_video(tmp_path / "good.mp4", [PALETTE[2]])
    code, summary, err = cli.ingest(good, fifo)
    assert code == ExitCode.PARTIAL and summary["new"] == 1 and "pipe.mp4" in err


def test_symlink_loops_and_broken_links_say_so(cli, tmp_path):
    loop = tmp_path / "loop.mp4"
    loop.symlink_to(loop)
    code, _, err = cli("ingest", loop, "--quiet", tiny=True)
    assert code == ExitCode.USAGE and "a symbolic link loop" in err and "no such file" not in err
    broken = tmp_path / "broken.mp4"
    broken.symlink_to(tmp_path / "gone.mp4")
    code, _, err = cli("ingest", broken, "--quiet", tiny=True)
    assert code == ExitCode.USAGE and "a broken symbolic link" in err and "gone.mp4" in err


def test_a_query_longer_than_the_text_context_is_warned(cli, videos):
    assert cli.ingest(videos)[0] == 0
    code, out, err = cli("search", "a red screen turns green and " * 20, "-k", "1")
    assert code == 0 and out
    assert "tokens are ignored" in err
    code, out, err = cli("search", "a red screen", "-k", "1")
    assert code == 0 and "ignored" not in err


def test_a_bad_line_in_a_batch_is_reported_and_the_rest_answered(cli, videos, monkeypatch):
    assert cli.ingest(videos)[0] == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("red\n" + "y" * 3000 + "\n\nblue\n"))
    code, out, err = cli("search", "-", "-k", "1", "--jsonl")
    assert code == ExitCode.USAGE
    assert "stdin line 2: query of 3000 characters is too long" in err
    assert [json.loads(line)["query"] for line in out.splitlines()] == ["red", "blue"]


def test_identical_copies_are_one_hit_unless_asked(cli, videos):
    shutil.copy(videos / "blue.mp4", videos / "blue copy.mp4")
    shutil.copy(videos / "blue.mp4", videos / "sub" / "blue again.mp4")
    assert cli.ingest(videos)[0] == 0
    code, out, err = cli("search", "blue", "-k", "10", "--json")
    assert code == 0, err
    hits = json.loads(out)["results"]
    assert len(hits) == 4 and [h["rank"] for h in hits] == [1, 2, 3, 4]
    blue = next(h for h in hits if h["copies"])
    assert sorted([blue["path"], *blue["copies"]]) == sorted(
        str(p) for p in (videos / "blue.mp4", videos / "blue copy.mp4", videos / "sub" / "blue again.mp4"))
    assert all(not h["copies"] for h in hits if h is not blue)
    code, out, _ = cli("search", "blue", "-k", "10", "--json", "--keep-duplicates")
    apart = json.loads(out)["results"]
    assert len(apart) == 6 and not any(h["copies"] for h in apart)
    scores = [h["score"] for h in apart if "blue" in os.path.basename(h["path"])]
    assert len(set(scores)) == 1                                 # the copies score the same
    code, out, _ = cli("search", "blue", "-k", "2", "--jsonl")   # -k counts collapsed hits
    assert len(out.splitlines()) == 2


def test_an_encoder_that_cannot_load_leaves_no_index_behind(cli, videos, monkeypatch):
    """No CLIP weights (exit 8) on a first ingest: no empty index is left to confuse the next command."""
    from prvr_cli.errors import WeightsError
    from prvr_cli.pipeline.encode import FrameTextEncoder

    def no_weights(*args, **kwargs):
        raise WeightsError("CLIP weights ViT-B-32/openai are not cached and could not be downloaded (no network?)")

    monkeypatch.setattr(FrameTextEncoder, "load", no_weights)
    code, _, err = cli("ingest", videos, "--quiet")
    assert code == ExitCode.WEIGHTS and "not cached" in err
    assert not cli.index.exists()
    code, _, err = cli("info")
    assert code == ExitCode.NO_INDEX
