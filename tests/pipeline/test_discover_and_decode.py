"""Decoding: sampling times, resizing, and the real sample clips when ../shared is present."""
from __future__ import annotations

import numpy as np
import pytest

from prvr_cli.pipeline.decode import decode_frames, probe, resize_dims, sample_times
from prvr_cli.pipeline.discover import discover
from prvr_cli.errors import DecodeError, UsageError

from tests.helpers import PALETTE, SHARED_VIDEOS, make_video

# seconds per clip, from ../shared/data/videos/README.md
REAL_DURATIONS = {"mmaction2_basketball.mp4": 10.0, "mmaction2_demo_arm_wrestling.mp4": 10.0,
                  "mmaction2_test_eye_makeup.avi": 6.6, "mmaction2_test_pool_cleaning.mp4": 10.0,
                  "video8105.mp4": 18.0, "video9149.mp4": 13.0, "video9462.mp4": 10.0, "video9818.mp4": 14.0}


def test_sample_times_are_window_centres():
    assert np.allclose(sample_times(2.0, 3.0), (np.arange(6) + 0.5) / 3)
    assert len(sample_times(0.1, 3.0)) == 1


def test_resize_keeps_aspect():
    assert resize_dims(320, 240, 224) == (299, 224)
    assert resize_dims(240, 320, 32) == (32, 43)


def test_decode_synthesized_video(tmp_path):
    path = make_video(tmp_path / "v.mp4", [PALETTE[0], PALETTE[2]], seconds_per_color=2.0)
    info, chunks = decode_frames(path, fps=3.0, size=32, chunk=4)
    chunks = list(chunks)
    frames = np.concatenate([c.frames for c in chunks])
    times = np.concatenate([c.timestamps for c in chunks])
    assert abs(info.duration - 4.0) < 0.2 and frames.shape[1:] == (32, 32, 3) and len(frames) == 12
    assert np.all(np.diff(times) > 0)
    # the first half is red, the second blue
    assert frames[0, ..., 0].mean() > frames[0, ..., 2].mean()
    assert frames[-1, ..., 2].mean() > frames[-1, ..., 0].mean()


@pytest.mark.parametrize("content", [b"", b"hello, not a video\n"])
def test_bad_files_raise_decode_error_naming_them(tmp_path, content):
    if content:
        pytest.importorskip("decord", reason="decord is not installed here (PyAV decodes alone)")
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with pytest.raises(DecodeError, match="bad.mp4"):
        probe(path)


def test_discover_filters(tmp_path):
    make_video(tmp_path / "a" / "one.mp4", [PALETTE[0]])
    make_video(tmp_path / "b" / "two.avi", [PALETTE[1]])
    (tmp_path / "b" / "notes.txt").write_text("x")
    (tmp_path / ".hidden").mkdir()
    make_video(tmp_path / ".hidden" / "three.mp4", [PALETTE[2]])
    assert [p.name for p in discover([tmp_path]).files] == ["one.mp4", "two.avi"]
    assert [p.name for p in discover([tmp_path], glob="*.avi").files] == ["two.avi"]
    assert [p.name for p in discover([tmp_path / "b" / "notes.txt"]).files] == ["notes.txt"]  # explicit files are kept
    with pytest.raises(UsageError, match="nope"):
        discover([tmp_path / "nope"])


@pytest.mark.skipif(not SHARED_VIDEOS.is_dir(), reason="../shared/data/videos is absent")
@pytest.mark.parametrize("name", sorted(REAL_DURATIONS))
def test_real_clip_decodes(name):
    info, chunks = decode_frames(SHARED_VIDEOS / name, fps=3.0, size=32)
    frames = np.concatenate([c.frames for c in chunks])
    assert abs(info.duration - REAL_DURATIONS[name]) < 0.5
    assert abs(len(frames) - 3 * REAL_DURATIONS[name]) <= 2
    assert frames.dtype == np.uint8 and frames.shape[1:] == (32, 32, 3)
    assert frames.std() > 5  # real content, not blank frames
