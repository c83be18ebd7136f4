"""Stage 2: decode a video into frames sampled at a fixed rate, streamed in chunks.

Two decoders give the same frames (`decoder=`): decord, which resizes while decoding (short side
to the encoder's input size) so only small frames reach Python, and PyAV, which installs on every
platform (decord has no wheels for macOS arm64 or Linux aarch64). "auto" takes decord when it can
be imported, else PyAV. A center crop gives the square the encoder wants. Timestamps come from the
container (per-frame presentation times), so variable frame rate video is sampled at the right moments.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import DecodeError, UsageError


@dataclass
class VideoInfo:
    path: Path
    n_frames: int            # frames in the file
    native_fps: float
    duration: float          # seconds
    width: int
    height: int


@dataclass
class FrameChunk:
    """Consecutive sampled frames of one video: uint8 [n, size, size, 3] and their times in seconds."""

    frames: np.ndarray
    timestamps: np.ndarray


def _reader(path: Path, width: int = -1, height: int = -1):
    import decord

    decord.logging.set_level(decord.logging.QUIET)  # errors reach the user once, as our one-line message
    try:
        return decord.VideoReader(str(path), ctx=decord.cpu(0), width=width, height=height, num_threads=1)
    except Exception as e:  # decord raises its own DECORDError and RuntimeError for every kind of bad file
        raise DecodeError(f"{path}: cannot decode ({_reason(e)})") from e


def _reason(e: Exception) -> str:
    """The useful part of a decord/ffmpeg error, without paths, timestamps and source locations."""
    text = str(e).strip()
    if "cannot find video stream" in text:
        return "no video stream (audio only?)"
    if "Failed to measure duration/frame-count" in text:
        return "no frame count or duration (a still image, or broken metadata)"
    opening = re.search(r"ERROR opening: .*?, ([^\n]+)", text)
    if opening:
        return opening.group(1).strip()[:160]
    if text.startswith("Error reading"):
        return "not a readable video file"
    first = next((line for line in text.splitlines() if line.strip()), type(e).__name__)
    return re.sub(r"\[[0-9:]+\] \S+:\d+: ", "", first)[:160]


def probe(path: Path) -> tuple[VideoInfo, np.ndarray]:
    """Read the stream's metadata and per-frame start times without decoding the video."""
    if path.stat().st_size == 0:
        raise DecodeError(f"{path}: empty file (0 bytes)")
    vr = _reader(path)
    n = len(vr)
    if n == 0:
        raise DecodeError(f"{path}: no video frames")
    try:
        stamps = np.asarray(vr.get_frame_timestamp(np.arange(n)), dtype=np.float64)
        height, width = vr[0].shape[:2]
    except Exception as e:
        raise DecodeError(f"{path}: cannot decode ({_reason(e)})") from e
    starts = stamps[:, 0]
    fps = max(float(vr.get_avg_fps()), 1e-3)
    if not (np.isfinite(stamps).all() and (starts >= -1e-3).all() and (np.diff(starts) >= 0).all()):
        # containers without timestamps (AVI) give decord's "no timestamp" value (about -3.7e17) for most
        # frames: use the frame rate instead, as the frames were meant to be shown
        starts = np.arange(n, dtype=np.float64) / fps
        stamps = np.stack([starts, starts + 1 / fps], axis=1)
    duration = float(stamps[-1, 1]) if stamps[-1, 1] > stamps[-1, 0] else float(starts[-1] + 1 / fps)
    info = VideoInfo(path, n, float(vr.get_avg_fps()), max(duration, 1e-3), int(width), int(height))
    return info, starts


def sample_times(duration: float, fps: float) -> np.ndarray:
    """Sampling instants: the centres of consecutive 1/fps windows covering the video (at least one)."""
    n = max(1, int(math.floor(duration * fps + 1e-6)))
    return (np.arange(n) + 0.5) / fps


def resize_dims(width: int, height: int, short_side: int) -> tuple[int, int]:
    """Output width and height with the short side scaled to `short_side`, aspect kept."""
    scale = short_side / min(width, height)
    return max(short_side, round(width * scale)), max(short_side, round(height * scale))


DECODERS = ("auto", "decord", "pyav")


def resolve_decoder(name: str = "auto") -> str:
    """The decoder to use: decord or pyav ("auto": decord when it can be imported)."""
    if name not in DECODERS:
        raise UsageError(f"--decoder {name!r}: use one of {', '.join(DECODERS)}")
    if name != "auto":
        return name
    try:
        import decord  # noqa: F401
        return "decord"
    except ImportError:
        return "pyav"


def _center_crop(frames: np.ndarray, size: int) -> np.ndarray:
    top, left = (frames.shape[1] - size) // 2, (frames.shape[2] - size) // 2
    return np.ascontiguousarray(frames[:, top:top + size, left:left + size])


def decode_frames(path: Path, fps: float, size: int, chunk: int = 64,
                  decoder: str = "auto") -> tuple[VideoInfo, Iterator[FrameChunk]]:
    """Probe `path`, then stream its frames sampled at `fps`, center-cropped to size x size, in chunks.

    Memory stays bounded by one chunk whatever the video's length.
    """
    if resolve_decoder(decoder) == "pyav":
        return _decode_frames_pyav(path, fps, size, chunk)
    info, starts = probe(path)
    times = sample_times(info.duration, fps)
    indices = np.clip(np.searchsorted(starts, times, side="right") - 1, 0, info.n_frames - 1)

    def chunks() -> Iterator[FrameChunk]:
        w, h = resize_dims(info.width, info.height, size)
        vr = _reader(path, w, h)
        for lo in range(0, len(indices), chunk):
            idx = indices[lo:lo + chunk]
            try:
                batch = vr.get_batch(idx.tolist()).asnumpy()
            except Exception as e:
                if lo == 0:   # decord cannot scale some small or odd frame sizes at all: this file goes to PyAV
                    try:
                        yield from _decode_frames_pyav(path, fps, size, chunk)[1]
                        return
                    except DecodeError:
                        pass
                raise DecodeError(f"{path}: decoding failed near {times[lo]:.1f}s ({_reason(e)})") from e
            yield FrameChunk(_center_crop(batch, size), times[lo:lo + chunk].astype(np.float32))

    return info, chunks()


def probe_pyav(path: Path) -> tuple[VideoInfo, np.ndarray]:
    """Like `probe`, with PyAV: the frames' presentation times from the packets, without decoding."""
    import av

    if path.stat().st_size == 0:
        raise DecodeError(f"{path}: empty file (0 bytes)")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DecodeError(f"{path}: cannot decode (no video stream (audio only?))")
            stream = container.streams.video[0]
            pts = sorted(p.pts for p in container.demux(stream) if p.pts is not None and p.size > 0)
            rate = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
            width, height, base = stream.codec_context.width, stream.codec_context.height, stream.time_base
            first = stream.start_time if stream.start_time is not None else (pts[0] if pts else 0)
    except av.InvalidDataError as e:
        raise DecodeError(f"{path}: cannot decode (not a readable video file)") from e
    except av.FFmpegError as e:
        raise DecodeError(f"{path}: cannot decode ({str(e)[:160]})") from e
    if not pts:
        raise DecodeError(f"{path}: no video frames")
    starts = (np.asarray(pts, dtype=np.float64) - float(first)) * float(base) if base else \
        np.arange(len(pts)) / rate
    duration = float(starts[-1] + 1 / rate)
    return VideoInfo(path, len(pts), rate, max(duration, 1e-3), int(width), int(height)), starts


def _decode_frames_pyav(path: Path, fps: float, size: int, chunk: int) -> tuple[VideoInfo, Iterator[FrameChunk]]:
    """`decode_frames` with PyAV: decode in presentation order, keep the sampled frame indices, resize, crop."""
    import av

    info, starts = probe_pyav(path)
    times = sample_times(info.duration, fps)
    indices = np.clip(np.searchsorted(starts, times, side="right") - 1, 0, info.n_frames - 1)

    def chunks() -> Iterator[FrameChunk]:
        w, h = resize_dims(info.width, info.height, size)
        wanted = iter(enumerate(indices.tolist()))
        position, target = next(wanted, (None, None))
        frames, stamps = [], []
        try:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for index, frame in enumerate(container.decode(stream)):
                    while target is not None and target == index:   # one decoded frame may serve several samples
                        frames.append(frame.to_ndarray(width=w, height=h, format="rgb24"))
                        stamps.append(times[position])
                        if len(frames) == chunk:
                            yield FrameChunk(_center_crop(np.stack(frames), size), np.asarray(stamps, np.float32))
                            frames, stamps = [], []
                        position, target = next(wanted, (None, None))
                    if target is None:
                        break
        except av.FFmpegError as e:
            raise DecodeError(f"{path}: decoding failed ({str(e)[:160]})") from e
        if frames:
            yield FrameChunk(_center_crop(np.stack(frames), size), np.asarray(stamps, np.float32))

    return info, chunks()


def decode_still(path: Path, seconds: float, short_side: int = 240) -> np.ndarray:
    """One frame (uint8 [H, W, 3], short side `short_side`, aspect kept) at `seconds` into the video.

    Decoded with PyAV from the keyframe before `seconds` up to it: decord's random access returned
    smeared frames for some H.264 files (a frame decoded without its references).
    """
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DecodeError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if stream.time_base:
                container.seek(int(max(0.0, seconds) / stream.time_base), stream=stream, backward=True)
            chosen = None
            for frame in container.decode(stream):
                chosen = frame
                if frame.time is not None and frame.time + 1e-6 >= seconds:
                    break
            if chosen is None:
                raise DecodeError(f"{path}: no frame at {seconds:.1f}s")
            w, h = resize_dims(chosen.width, chosen.height, short_side)
            return chosen.to_ndarray(width=w, height=h, format="rgb24")
    except av.FFmpegError as e:
        raise DecodeError(f"{path}: cannot decode the frame at {seconds:.1f}s ({str(e)[:160]})") from e
