"""Cutting hits into clips: frame-accurate re-encoding, keyframe copies, names, and `prvr export` / `--export`."""
from pathlib import Path

import av
import pytest

from prvr_cli.errors import ExitCode
from prvr_cli.pipeline.cut import clip_name, cut
from tests.helpers import PALETTE, make_video


def frame_times(path: Path) -> list[float]:
    with av.open(str(path)) as c:
        return [f.time for f in c.decode(c.streams.video[0])]


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_reencoded_clip_is_frame_accurate(tmp_path, codec):
    src = make_video(tmp_path / f"src_{codec}.mp4", [PALETTE[i % 6] for i in range(6)], fps=10, codec=codec)
    for start, end in ((2.0, 4.0), (0.0, 1.25), (2.05, 3.5), (4.5, 6.0)):
        times = frame_times(cut(src, start, end, tmp_path / "out.mp4"))
        wanted = [t / 10 for t in range(60) if start - 1e-6 <= t / 10 < end - 1e-6]
        assert abs(len(times) - len(wanted)) <= 1, (start, end, len(times), len(wanted))


def test_copied_clip_starts_at_the_keyframe_before(tmp_path):
    src = make_video(tmp_path / "src.mp4", [PALETTE[i % 6] for i in range(6)], fps=10, codec="mpeg4")
    with av.open(str(src)) as c:
        keyframes = [float(p.pts * p.time_base) for p in c.demux(c.streams.video[0]) if p.is_keyframe and p.pts is not None]
    start, end = 2.35, 3.5
    before = max(k for k in keyframes if k <= start)
    times = frame_times(cut(src, start, end, tmp_path / "copy.mp4", copy=True))
    assert abs(len(times) - round((end - before) * 10)) <= 1


def test_names_and_bad_ranges(tmp_path):
    assert clip_name(3, "/a/b/my clip.mkv", 1.0, 2.5) == "03_my clip_1.00-2.50.mp4"
    src = make_video(tmp_path / "src.mp4", [PALETTE[0]], fps=10)
    with pytest.raises(ValueError):
        cut(src, 2.0, 1.0, tmp_path / "x.mp4")
    assert not list(tmp_path.glob(".x.mp4.tmp*"))


def test_export_prints_one_clip_per_hit(cli, videos, tmp_path):
    assert cli.ingest(videos)[0] == 0
    out_dir = tmp_path / "clips"
    code, out, err = cli("export", "a red screen", "-o", out_dir, "-k", "2", "--pad", "0.2")
    assert code == 0, err
    written = [Path(p) for p in out.splitlines()]
    assert len(written) == 2 and all(p.parent == out_dir and p.exists() for p in written)
    assert written[0].name.startswith("01_") and written[1].name.startswith("02_")
    code, out, err = cli("search", "a red screen", "-k", "1", "--export", tmp_path / "c2", "--copy")
    assert code == 0 and len(out.splitlines()) == 1, err
    code, _, err = cli("search", "a red screen", "--export", tmp_path / "c3", "--pad", "-1")
    assert code == ExitCode.USAGE and "--pad" in err


def test_cuts_of_the_real_clips_are_frame_accurate(shared_videos, tmp_path):
    for path in sorted(shared_videos.iterdir()):
        with av.open(str(path)) as c:
            rate = float(c.streams.video[0].average_rate)
        start, end = 2.0, 4.5
        times = frame_times(cut(path, start, end, tmp_path / f"{path.stem}.mp4"))
        assert abs(len(times) - (end - start) * rate) <= 1.5, (path.name, len(times), rate)
        copied = frame_times(cut(path, start, end, tmp_path / f"{path.stem}_copy.mp4", copy=True))
        assert (end - start) * rate - 1.5 <= len(copied), path.name       # from the keyframe before the start
