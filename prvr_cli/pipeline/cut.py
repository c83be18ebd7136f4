"""Cut a time range out of a video into its own MP4 with PyAV (no ffmpeg program needed).

- re-encode (default): decode from the keyframe before `start`, keep the frames whose time lies in
  [start, end), encode them with H.264 (MPEG-4 part 2 where the PyAV build has no libx264): frame-accurate.
- copy (`copy=True`): copy the compressed packets from the keyframe at or before `start` up to `end`
  without decoding: fast, exact to the keyframes (the clip may start up to one group of pictures early).

Only the video stream is written.
"""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

from ..errors import DecodeError


def clip_name(rank: int, path: str, start: float, end: float) -> str:
    """RANK_STEM_START-END.mp4 (rank zero-padded to two digits, times in seconds with two decimals)."""
    return f"{rank:02d}_{Path(path).stem}_{start:.2f}-{end:.2f}.mp4"


def _encoder_name() -> str:
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def cut(src: str | Path, start: float, end: float, dst: str | Path, copy: bool = False) -> Path:
    """Write [start, end) seconds of `src` to `dst` (written to a temporary name, then renamed)."""
    import av

    src, dst = Path(src), Path(dst)
    if not end > start >= 0:
        raise ValueError(f"cannot cut {start:.2f}-{end:.2f} s: the end must come after the start")
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    try:
        with av.open(str(src)) as source:
            if not source.streams.video:
                raise DecodeError(f"{src}: no video stream to cut")
            stream = source.streams.video[0]
            base = stream.time_base
            source.seek(int(start / base) if base else int(start * av.time_base), stream=stream, backward=True)
            with av.open(str(tmp), mode="w", format="mp4") as target:
                if copy:
                    _copy_packets(source, stream, target, start, end)
                else:
                    _reencode(source, stream, target, start, end)
        os.replace(tmp, dst)
    except av.FFmpegError as e:
        raise DecodeError(f"{src}: cannot cut {start:.2f}-{end:.2f} s ({e})") from e
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def _reencode(source, stream, target, start: float, end: float) -> None:
    from av.video.frame import PictureType

    rate = stream.average_rate or stream.guessed_rate or Fraction(25)
    out = target.add_stream(_encoder_name(), rate=rate)
    out.width, out.height = stream.codec_context.width - stream.codec_context.width % 2, \
        stream.codec_context.height - stream.codec_context.height % 2
    out.pix_fmt = "yuv420p"
    step = 1 / Fraction(rate)
    index = 0
    for frame in source.decode(stream):
        if frame.time is None:
            continue
        if frame.time >= end - 1e-6:
            break
        if frame.time < start - 1e-6:
            continue
        picture = frame.reformat(width=out.width, height=out.height, format="yuv420p")
        picture.pts, picture.time_base = index, step
        picture.pict_type = PictureType.NONE   # the source's I/P/B types would force the encoder's frame order
        index += 1
        for packet in out.encode(picture):
            target.mux(packet)
    for packet in out.encode():
        target.mux(packet)


def _copy_packets(source, stream, target, start: float, end: float) -> None:
    out = target.add_stream_from_template(stream)
    first = None
    for packet in source.demux(stream):
        if packet.dts is None or packet.pts is None:
            continue
        t = float(packet.pts * stream.time_base)
        if t >= end - 1e-6:
            break
        if first is None:
            if not packet.is_keyframe:
                continue
            first = packet.pts
        packet.pts -= first
        packet.dts -= first
        packet.stream = out
        target.mux(packet)


def export_hits(hits, folder: str | Path, pad: float = 0.0, copy: bool = False, on_error=None) -> list[Path]:
    """One clip per hit (its best highlight, widened by `pad` seconds within the video) in `folder`; returns the
    written paths in rank order. A hit that cannot be cut is passed to `on_error(hit, message)` and skipped."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for hit in hits:
        if not hit.highlights:
            if on_error:
                on_error(hit, "no highlight to cut")
            continue
        best = hit.highlights[0]
        start, end = max(0.0, best["start"] - pad), min(hit.duration or best["end"] + pad, best["end"] + pad)
        try:
            written.append(cut(hit.path, start, end, folder / clip_name(hit.rank, hit.path, start, end), copy))
        except (DecodeError, OSError, ValueError) as e:
            if on_error:
                on_error(hit, str(e))
    return written
