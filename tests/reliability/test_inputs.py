"""Reliability, in process: bad input files, bad arguments and data, a stuck decoder, a full disk, a long video.

Each fault is injected for real where the machine allows it (files written with
PyAV, a small tmpfs for the full disk when it can be mounted) and through a hook
otherwise; see docs/reliability.md for what each test shows.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from prvr_cli.errors import ExitCode

from tests.helpers import PALETTE, make_video


def no_traceback(err: str) -> None:
    assert "Traceback" not in err and "internal error" not in err, err


def one_error_line(err: str, name: str) -> str:
    lines = [line for line in err.splitlines() if name in line]
    assert len(lines) == 1, (name, err)
    return lines[0]


def listed(cli) -> list[str]:
    code, out, err = cli("list", "--json")
    assert code == 0, err
    return [json.loads(line)["path"] for line in out.splitlines()]


# ----- bad files -----------------------------------------------------------------------------


def _audio_only(path: Path) -> Path:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=16000)
        for i in range(10):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate, f.pts = 16000, i * 1024
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def _still_image(path: Path) -> Path:
    import av

    with av.open(str(path), "w", format="image2") as c:
        s = c.add_stream("png", rate=1)
        s.width, s.height, s.pix_fmt = 64, 48, "rgb24"
        for p in s.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 128, np.uint8), format="rgb24")):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def _vfr(path: Path) -> Path:
    """20 frames 50 ms apart, then 20 frames 200 ms apart (4.8 s)."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=1000)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        t = 0
        for i in range(40):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), (i * 6) % 255, np.uint8), format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            t += 50 if i < 20 else 200
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def _rotated(path: Path) -> Path:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.metadata["rotate"] = "90"
        for i in range(20):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 10 * i, np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def _long(path: Path, seconds: int, size: int = 32) -> Path:
    """`seconds` of 1 fps video at size x size (a keyframe every 10 min): hours in a few seconds of encoding."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=1)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        s.codec_context.gop_size = 600
        img = np.zeros((size, size, 3), np.uint8)
        for i in range(seconds):
            img[:] = (i * 7) % 255
            img[:, (i % size):(i % size) + 2] = 255
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def test_bad_files_each_get_one_line_and_good_ones_are_indexed(cli, tmp_path):
    root = tmp_path / "lib"
    good = {
        "plain.mp4": make_video(root / "plain.mp4", [PALETTE[0], PALETTE[1]]),
        "vfr.mp4": _vfr(root / "vfr.mp4"),
        "rotated.mp4": _rotated(root / "rotated.mp4"),
        "hires.mp4": make_video(root / "hires.mp4", [PALETTE[2]], seconds_per_color=0.3, size=(3840, 2160)),
        "ünïcødé name with spaces 東京.mp4": make_video(root / "ünïcødé name with spaces 東京.mp4", [PALETTE[3]]),
    }
    whole = make_video(tmp_path / "whole.mp4", [PALETTE[4]] * 3).read_bytes()
    bad = {"empty.mp4": "empty file", "truncated.mp4": "cannot decode", "text.mp4": "cannot decode",
           "audio.mp4": "no video stream", "still.png": "still image"}
    (root / "empty.mp4").write_bytes(b"")
    (root / "truncated.mp4").write_bytes(whole[:len(whole) // 2])
    (root / "text.mp4").write_text("this is not a video\n" * 50)
    _audio_only(root / "audio.mp4")
    _still_image(root / "still.png")
    # a file cut mid-stream whose header survives (Matroska): indexed up to the cut, or reported, never a crash
    mkv = make_video(tmp_path / "cut.mkv", [PALETTE[5], PALETTE[0], PALETTE[1]])
    data = mkv.read_bytes()
    (root / "cut_midstream.mkv").write_bytes(data[:int(len(data) * 0.6)])
    os.mkfifo(root / "fifo.mp4")  # reading it would block forever: discovery must skip it

    paths = [root, root / "still.png"]  # a still image only counts when named explicitly
    code, summary, err = cli.ingest(*paths)
    no_traceback(err)
    assert code == ExitCode.PARTIAL, err
    errors = {Path(e["path"]).name: e["error"] for e in summary["errors"]}
    for name, words in bad.items():
        assert words in errors[name], (name, errors[name])
        assert words in one_error_line(err, name)
    indexed = {Path(p).name for p in listed(cli)}
    assert set(good) <= indexed, indexed
    assert "fifo.mp4" not in indexed and "fifo.mp4" not in errors
    cut_ok = "cut_midstream.mkv" in indexed
    assert cut_ok != ("cut_midstream.mkv" in errors)
    assert summary["failed"] == len(errors) == len(bad) + (not cut_ok)
    assert summary["new"] == len(indexed)
    assert f"{summary['failed']} failed" in err
    code, out, err = cli("search", "東京", "-k", "20", "--paths-only")
    assert code == 0 and len(out.splitlines()) == len(indexed), err


def test_unreadable_file_is_reported(cli, tmp_path, monkeypatch):
    root = tmp_path / "lib"
    make_video(root / "ok.mp4", [PALETTE[0]])
    locked = make_video(root / "locked.mp4", [PALETTE[1]])
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads anything: make open() fail as it would for a user
        # (tests/test_reliability_processes.py also runs this for real as an unprivileged user)
        real_open = open

        def guarded(file, *a, **k):
            if str(file) == str(locked):
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return real_open(file, *a, **k)

        monkeypatch.setattr("builtins.open", guarded)
    try:
        code, summary, err = cli.ingest(root)
    finally:
        locked.chmod(0o644)
    no_traceback(err)
    assert code == ExitCode.PARTIAL and summary["new"] == 1 and summary["failed"] == 1
    assert "Permission denied" in one_error_line(err, "locked.mp4")


def test_stuck_decoder_is_abandoned_and_the_run_finishes(cli, tmp_path, monkeypatch):
    """A decoder that never returns (as decord can, inside C++) is abandoned after its time limit."""
    import prvr_cli.pipeline.ingest as ingest

    root = tmp_path / "lib"
    for i in range(3):
        make_video(root / f"v{i}.mp4", [PALETTE[i]])
    make_video(root / "hangs.mp4", [PALETTE[4]])
    release = threading.Event()
    real = ingest.decode_frames

    def decode(path, *args, **kwargs):
        if path.name == "hangs.mp4":
            release.wait()  # blocks its thread like a stuck native call: nothing can interrupt it
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ingest, "decode_frames", decode)
    started = time.monotonic()
    try:
        code, summary, err = cli.ingest(root, extra=["--decode-timeout", "1", "--workers", "2"])
    finally:
        release.set()
    took = time.monotonic() - started
    no_traceback(err)
    assert code == ExitCode.PARTIAL and summary["new"] == 3 and summary["failed"] == 1
    assert "did not finish within 1s" in one_error_line(err, "hangs.mp4")
    assert took < 30
    # a file stuck mid-stream (after some chunks) is caught too
    real_chunks = ingest.decode_frames

    def decode_mid(path, *args, **kwargs):
        info, chunks = real_chunks(path, *args, **kwargs)

        def stuck():
            yield from chunks
            release.wait()

        return info, stuck() if path.name == "hangs.mp4" else chunks

    release.clear()
    monkeypatch.setattr(ingest, "decode_frames", decode_mid)
    monkeypatch.setattr(ingest, "DECODE_SECONDS_PER_SECOND", 0.01)  # else each chunk adds 4 s per second of video
    try:
        code, summary, err = cli.ingest(root, extra=["--decode-timeout", "1"])
    finally:
        release.set()
    assert code == ExitCode.PARTIAL and summary["failed"] == 1 and summary["unchanged"] == 3


def test_long_video_streams_with_bounded_memory(tmp_path):
    """Two hours of video: decoding streams it chunk by chunk, and peak memory stays flat."""
    from prvr_cli.pipeline.decode import decode_frames

    path = _long(tmp_path / "two_hours.mp4", 2 * 3600)

    def peak_kb() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to measure peak memory")
    info, chunks = decode_frames(path, 1.0, 32, chunk=32)  # probe (reads the whole index of frames) first
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set size
    base = peak_kb()
    n, last = 0, -1.0
    for c in chunks:
        n += len(c.frames)
        assert c.timestamps[0] > last
        last = float(c.timestamps[-1])
    grew_mb = (peak_kb() - base) / 1024
    assert info.duration == pytest.approx(7200, abs=2) and n == 7200
    assert grew_mb < 64, f"peak RSS grew by {grew_mb:.0f} MB while decoding"


def test_long_video_ingests(cli, tmp_path):
    path = _long(tmp_path / "lib" / "one_hour.mp4", 3600)
    code, summary, err = cli.ingest(path, extra=["--fps", "0.5"])
    assert code == 0, err
    assert summary["new"] == 1 and summary["frames"] == 1800


# ----- bad arguments and data ----------------------------------------------------------------


def test_missing_and_corrupt_index(cli, tmp_path, videos):
    for command in (["search", "x"], ["list"], ["info"]):
        code, _, err = cli(*command)
        assert code == ExitCode.NO_INDEX and "prvr ingest" in err, err
        no_traceback(err)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    code, _, err = cli("search", "x", "--index", a_file, index=False)
    assert code == ExitCode.CORRUPT and "not a prvr index folder" in err, err
    other = tmp_path / "other"
    other.mkdir()
    (other / "photo.jpg").write_bytes(b"\xff\xd8")
    code, _, err = cli("list", "--index", other, index=False)
    assert code == ExitCode.CORRUPT and "not a prvr index" in err
    code, _, err = cli("ingest", videos, "--index", other, "--quiet", index=False, tiny=True)
    assert code == ExitCode.CORRUPT and "choose another --index" in err

    assert cli.ingest(videos)[0] == 0
    meta_path = cli.index / "index.json"
    meta = json.loads(meta_path.read_text())
    for damage, expect in ((b"{not json", "unreadable"), (os.urandom(64), "unreadable"),
                           (b"[1, 2]", "not a prvr index description"),
                           (json.dumps({**meta, "format": 99}).encode(), "newer prvr")):
        meta_path.write_bytes(damage)
        for command in (["search", "x"], ["list"], ["info"], ["ingest", videos, "--quiet"]):
            code, _, err = cli(*command, tiny=command[0] == "ingest")
            assert code == ExitCode.CORRUPT and expect in err, (command, err)
            no_traceback(err)
    meta_path.write_text(json.dumps(meta))
    assert len(listed(cli)) == 4


def test_damaged_tables_are_reported(cli, videos):
    assert cli.ingest(videos)[0] == 0
    data_files = sorted((cli.index / "db" / "videos.lance" / "data").glob("*.lance"))
    for f in data_files:
        f.write_bytes(b"\x00" * 64)
    shutil.rmtree(cli.index / "cache", ignore_errors=True)
    for command in (["search", "x"], ["list"], ["info"], ["info", "--json"]):
        code, out, err = cli(*command)
        no_traceback(err)
        assert code == ExitCode.CORRUPT and "re-ingest" in err, (command, code, err)
        assert ".cargo" not in err and "/rustc" not in err and out == ""
    shutil.rmtree(cli.index / "db" / "videos.lance" / "_versions")
    for command in (["search", "x"], ["list"], ["info"]):
        code, _, err = cli(*command)
        no_traceback(err)
        assert code == ExitCode.CORRUPT and "videos table is damaged" in err, (command, err)


def _checkpoint(path: Path, dim: int) -> Path:
    import torch

    from prvr_cli.nets.factory import create_model, load_config

    config = load_config("protoprvr_anet")
    model = create_model(config, video_dim=dim, text_dim=dim)
    torch.save({"format": 1, "method": config["method"], "config": config, "dims": {"video": dim, "text": dim},
                "feature_source": {}, "metrics": {}, "state_dict": model.state_dict()}, path)
    return path


def test_bad_checkpoints(cli, tmp_path, videos):
    assert cli.ingest(videos)[0] == 0
    wrong_dim = _checkpoint(tmp_path / "wrong_dim.pt", 16)  # the tiny CLIP gives 32
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(wrong_dim.read_bytes()[:1000])
    newer = tmp_path / "newer.pt"
    import torch
    payload = torch.load(wrong_dim, weights_only=False)
    torch.save({**payload, "format": 99}, newer)
    cases = [(wrong_dim, ExitCode.MISMATCH, "dim"), (truncated, ExitCode.CORRUPT, "unreadable"),
             (newer, ExitCode.CORRUPT, "newer"), (tmp_path / "absent.pt", ExitCode.USAGE, "not found")]
    for ckpt, expect, words in cases:
        for command in (["search", "x", "--model", ckpt], ["reindex", "--model", ckpt],
                        ["ingest", videos, "--model", ckpt, "--quiet"]):
            code, _, err = cli(*command, tiny=command[0] == "ingest")
            no_traceback(err)
            assert code == expect and words in err, (ckpt.name, command[0], code, err)
    assert len(listed(cli)) == 4
    code, _, err = cli("search", "red")
    assert code == 0, err


def test_bad_queries(cli, videos, monkeypatch):
    import io

    assert cli.ingest(videos)[0] == 0
    for query in ("", "   ", "\t\n"):
        code, _, err = cli("search", query)
        assert code == ExitCode.USAGE and "empty query" in err
    code, _, err = cli("search", "word " * 100000)
    assert code == ExitCode.USAGE and "too long" in err
    monkeypatch.setattr("sys.stdin", io.StringIO("fine\n" + "y" * 3000 + "\n"))
    code, _, err = cli("search", "-")
    assert code == ExitCode.USAGE and "too long" in err
    monkeypatch.setattr("sys.stdin", io.StringIO("\n\n"))
    code, _, err = cli("search", "-")
    assert code == ExitCode.USAGE and "no queries" in err
    code, out, err = cli("search", "\x00\x01 ünïcødé 東京 🎥 " + "a" * 1900, "--json")
    assert code == 0 and json.loads(out)["results"], err  # long but allowed: truncated to CLIP's context
    for flags in (["--fps", "0"], ["--fps", "1000"], ["--workers", "0"], ["--decode-timeout", "-1"]):
        code, _, err = cli("ingest", videos, *flags, tiny=True)
        assert code == ExitCode.USAGE, (flags, err)
    code, _, err = cli("ingest", videos / "nope", tiny=True)
    assert code == ExitCode.USAGE and "no such file" in err


def test_malformed_training_data(cli, tmp_path, videos):
    assert cli.ingest(videos)[0] == 0
    out = tmp_path / "run"
    cases = {
        "not_json.jsonl": ('{"video": "a.mp4", "caption": "x"}\n{oops\n', "not valid JSON"),
        "wrong_keys.jsonl": ('{"file": "a.mp4"}\n', "expected"),
        "empty.jsonl": ("", "no captions"),
        "unknown_video.jsonl": (json.dumps({"video": str(tmp_path / "nowhere.mp4"), "caption": "x"}) + "\n",
                                "not in index"),
        "binary.jsonl": (os.urandom(200).decode("latin-1"), ""),
    }
    for name, (text, words) in cases.items():
        f = tmp_path / name
        f.write_text(text, encoding="latin-1" if name == "binary.jsonl" else "utf-8")
        code, _, err = cli("train", "--out", out, "--index", cli.index, "--captions", f, index=False)
        no_traceback(err)
        assert code == ExitCode.DATA and words in err, (name, code, err)
    code, _, err = cli("train", "--out", out, "--index", cli.index, "--captions", tmp_path / "absent.jsonl",
                       index=False)
    no_traceback(err)
    assert code in (ExitCode.DATA, ExitCode.USAGE), err
    # pre-extracted features: a corrupt h5 file and a binary feature file of the wrong size
    data = tmp_path / "data" / "coll"
    (data / "TextData").mkdir(parents=True)
    (data / "TextData" / "coll.caption.txt").write_text("v1#enc#0 a caption\n")
    for split in ("train", "val", "test"):
        (data / "TextData" / f"coll{split}.caption.txt").write_text("v1#enc#0 a person runs\nv2#enc#0 a dog\n")
    (data / "FeatureData" / "cg").mkdir(parents=True)
    (data / "FeatureData" / "cg" / "feature.bin").write_bytes(b"\x00" * 10)
    (data / "FeatureData" / "cg" / "shape.txt").write_text("2 4\n")
    (data / "FeatureData" / "cg" / "id.txt").write_text("v1_0 v2_0\n")
    (data / "coll_cg.hdf5").write_bytes(b"not an hdf5 file")
    for feature in ("cg", "nothing"):
        code, _, err = cli("train", "--out", out, "--data", tmp_path / "data", "--collection", "coll",
                           "--feature", feature, index=False)
        no_traceback(err)
        assert code == ExitCode.DATA, (feature, code, err)


# ----- disk full ------------------------------------------------------------------------------


def test_disk_full_through_a_write_hook(cli, tmp_path, monkeypatch):
    """Lance reports a full disk as an error carrying the OS message; the Nth write raises it."""
    from lancedb.table import LanceTable

    root = tmp_path / "lib"
    for i in range(6):
        make_video(root / f"v{i}.mp4", [PALETTE[i]])
    real_add = LanceTable.add
    calls = {"n": 0}

    def add(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("LanceError(IO): Generic LocalFileSystem error: No space left on device (os error 28)")
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(LanceTable, "add", add)
    code, summary, err = cli.ingest(root, extra=["--workers", "1"])
    no_traceback(err)
    assert code == ExitCode.DISK and "no space left" in err and "videos already indexed are kept" in err
    assert len(listed(cli)) == 3
    code, out, err = cli("search", "x", "--paths-only")
    assert code == 0 and len(out.splitlines()) == 3, err
    # index.json, outside lance, failing the same way
    monkeypatch.setattr(LanceTable, "add", real_add)
    import prvr_cli.index.store as store

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(cli.index / "index.json.tmp"))

    monkeypatch.setattr(store, "write_meta", full)
    code, _, err = cli("reindex", "--model", "zero-shot")
    no_traceback(err)
    assert code == ExitCode.DISK and "no space left" in err
    monkeypatch.undo()
    code, summary, err = cli.ingest(root)
    assert code == 0 and summary["new"] == 3 and summary["unchanged"] == 3, err


@pytest.fixture
def small_fs(tmp_path):
    """A 16 MiB tmpfs, if this machine lets us mount one (root in a permissive sandbox); skip otherwise."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root; the write-hook test covers a full disk")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_on_a_real_small_filesystem(cli, tmp_path, small_fs):
    root = tmp_path / "lib"
    for i in range(12):
        make_video(root / f"v{i:02d}.mp4", [PALETTE[i % 6], PALETTE[(i + 1) % 6]])
    index = small_fs / "index"
    ballast = small_fs / "ballast"
    free = shutil.disk_usage(small_fs).free
    with open(ballast, "wb") as f:  # leave about 300 KB: room for the index's first few videos
        f.write(b"\0" * (free - 300 * 1024))
    cli.index = index
    code, summary, err = cli.ingest(root, extra=["--workers", "1"])
    no_traceback(err)
    assert code == ExitCode.DISK and "no space left" in err, (code, err)
    kept = listed(cli)
    assert 0 < len(kept) < 12
    code, out, err = cli("search", "red", "-k", "20", "--paths-only")  # the cache cannot be written: from memory
    assert code == 0 and len(out.splitlines()) == len(kept), err
    ballast.unlink()
    code, summary, err = cli.ingest(root)
    assert code == 0, err
    assert summary["unchanged"] == len(kept) and summary["new"] == 12 - len(kept)
    assert len(listed(cli)) == 12
