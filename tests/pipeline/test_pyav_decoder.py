"""The PyAV decoder against decord: same frame counts, sampled times and (nearly) the same pixels; the fallback."""
import sys

import numpy as np
import pytest

from prvr_cli.errors import DecodeError, UsageError
from prvr_cli.pipeline.decode import decode_frames, resolve_decoder
from tests.helpers import PALETTE, make_video


def both(path, fps=3.0, size=32):
    pytest.importorskip("decord", reason="decord is not installed here (PyAV decodes alone)")
    out = []
    for decoder in ("decord", "pyav"):
        info, chunks = decode_frames(path, fps, size, chunk=7, decoder=decoder)
        chunks = list(chunks)
        out.append((info, np.concatenate([c.frames for c in chunks]), np.concatenate([c.timestamps for c in chunks])))
    return out


@pytest.mark.parametrize("codec", ["mpeg4", "libx264", "libvpx-vp9"])
def test_same_frames_as_decord_on_synthesized_clips(tmp_path, codec):
    ext = ".webm" if "vpx" in codec else ".mp4"
    src = make_video(tmp_path / f"clip{ext}", [PALETTE[i % 6] for i in range(5)], fps=10, codec=codec, size=(128, 64))
    (a_info, a, ta), (b_info, b, tb) = both(src)
    assert a_info.n_frames == b_info.n_frames and abs(a_info.duration - b_info.duration) < 0.05
    assert a.shape == b.shape and (ta == tb).all()
    assert np.abs(a.astype(float) - b).mean() < 6


def test_same_frames_as_decord_on_the_real_clips(shared_videos):
    for path in sorted(shared_videos.iterdir()):
        (a_info, a, ta), (b_info, b, tb) = both(path, size=64)
        assert a_info.n_frames == b_info.n_frames and a.shape == b.shape and (ta == tb).all(), path.name
        assert np.abs(a.astype(float) - b).mean() < 8, path.name


def test_a_size_decord_cannot_scale_is_decoded_by_pyav(tmp_path):
    """decord fails to scale 96x64 to 48x32 ("size must exactly match"); the file is decoded by PyAV instead."""
    pytest.importorskip("decord", reason="decord is not installed here (PyAV decodes alone)")
    src = make_video(tmp_path / "small.mp4", [PALETTE[0], PALETTE[3]], fps=10, size=(96, 64))
    info, chunks = decode_frames(src, 3.0, 32, decoder="decord")
    frames = np.concatenate([c.frames for c in chunks])
    assert frames.shape == (6, 32, 32, 3)
    assert np.abs(frames[0, 10:20, 20:30].mean((0, 1)) - PALETTE[0]).max() < 40


def test_auto_falls_back_to_pyav_without_decord(monkeypatch, tmp_path):
    try:
        import decord  # noqa: F401
        assert resolve_decoder("auto") == "decord"
    except ImportError:
        assert resolve_decoder("auto") == "pyav"
    monkeypatch.setitem(sys.modules, "decord", None)          # `import decord` now fails
    assert resolve_decoder("auto") == "pyav"
    src = make_video(tmp_path / "a.mp4", [PALETTE[0], PALETTE[1]], fps=10)
    info, chunks = decode_frames(src, 3.0, 32)
    assert sum(len(c.frames) for c in chunks) == 6
    with pytest.raises(UsageError, match="--decoder"):
        resolve_decoder("ffmpeg")


def test_bad_files_are_one_line_errors_with_pyav(tmp_path):
    import av

    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("not a video")
    with av.open(str(tmp_path / "audio.mp4"), "w") as c:
        s = c.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    for name, words in (("empty.mp4", "empty file"), ("text.mp4", "cannot decode"), ("audio.mp4", "no video stream")):
        with pytest.raises(DecodeError) as e:
            info, chunks = decode_frames(tmp_path / name, 3.0, 32, decoder="pyav")
            list(chunks)
        assert words in str(e.value) and "\n" not in str(e.value) and name in str(e.value)
