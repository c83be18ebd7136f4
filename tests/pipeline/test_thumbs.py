"""Stills at a time, thumbnails and the contact sheet of `prvr search --preview`."""
import numpy as np
from PIL import Image

from prvr_cli.pipeline.decode import decode_still
from prvr_cli.pipeline.thumbs import contact_sheet, thumbnail
from tests.helpers import PALETTE, make_video


def test_still_is_the_frame_at_that_time_even_between_keyframes(tmp_path):
    colors = [PALETTE[i] for i in range(6)]
    for codec in ("libx264", "mpeg4"):
        src = make_video(tmp_path / f"six_{codec}.mp4", colors, fps=10, codec=codec, size=(64, 48))
        for second in range(6):
            frame = decode_still(src, second + 0.55, short_side=48)
            assert frame.shape == (48, 64, 3)
            centre = frame[20:28, 40:60].reshape(-1, 3).mean(0)      # away from the moving bar
            assert np.abs(centre - colors[second]).max() < 40, (codec, second, centre)


def test_contact_sheet_tiles_and_a_bad_file(tmp_path, cli):
    good = make_video(tmp_path / "good.mp4", [PALETTE[0], PALETTE[2]], fps=10, codec="libx264", size=(64, 48))
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    hits = [{"rank": 1, "score": 0.5, "path": str(good), "highlights": [{"start": 1.0, "end": 2.0}]},
            {"rank": 2, "score": 0.25, "path": str(bad), "highlights": []},
            {"rank": 3, "score": 0.1, "path": str(good), "highlights": [{"start": 0.0, "end": 0.5}]}]
    sheet = Image.open(contact_sheet(hits, tmp_path / "cache", tmp_path / "sheet.png", columns=2, width=160))
    assert sheet.size == (2 * 160, 2 * (90 + 34))
    first = np.asarray(sheet)[10:80, 40:120].reshape(-1, 3).mean(0)     # hit 1 at 1.5 s: blue
    third = np.asarray(sheet)[124 + 10:124 + 80, 40:120].reshape(-1, 3).mean(0)   # hit 3 at 0.2 s: red
    assert first[2] > 150 and third[0] > 150
    assert (np.asarray(sheet)[10:80, 200:280] == 70).all()             # the bad file: a grey tile
    assert np.asarray(sheet)[90:124].max() > 200                       # labels drawn under the tiles
    cached = thumbnail(good, 1.5, tmp_path / "cache")
    assert cached.exists() and thumbnail(good, 1.5, tmp_path / "cache") == cached


def test_search_preview_writes_the_sheet(cli, videos, tmp_path):
    assert cli.ingest(videos)[0] == 0
    code, out, err = cli("search", "red", "-k", "3", "--preview", tmp_path / "sheet.png", "--paths-only")
    assert code == 0 and len(out.splitlines()) == 3 and "contact sheet of 3 hits" in err
    assert Image.open(tmp_path / "sheet.png").size == (4 * 320, 1 * (180 + 34))
    code, _, err = cli("search", "red", "--preview", tmp_path / "sheet.jpg")
    assert code == 2 and "--preview" in err


def test_stills_of_the_real_clips_match_sequential_decoding(shared_videos):
    """decord's random access smeared some H.264 frames; a still must look like the frame decoded in order."""
    from prvr_cli.pipeline.decode import decode_frames

    for path in sorted(shared_videos.iterdir()):
        info, chunks = decode_frames(path, 1.0, 64)
        chunk = next(chunks)
        t = float(chunk.timestamps[min(3, len(chunk.timestamps) - 1)])
        reference = chunk.frames[min(3, len(chunk.frames) - 1)].astype(np.float32)
        still = decode_still(path, t, short_side=64)
        top, left = (still.shape[0] - 64) // 2, (still.shape[1] - 64) // 2
        still = still[top:top + 64, left:left + 64].astype(np.float32)
        assert np.abs(still - reference).mean() < 25, path.name
