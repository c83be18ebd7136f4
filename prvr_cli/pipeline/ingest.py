"""The ingest pipeline: discover -> decode -> encode -> prototypes -> store.

Decoding runs in worker threads (decord releases the GIL) that feed a bounded
queue of frame chunks; the main thread batches chunks across videos for the
encoder, so it is never idle waiting on one video. Each finished video is built
into prototypes and committed on its own: an interrupted run keeps everything it
finished, and the next run resumes with the rest. The main thread also watches
each decoder's time and abandons one that is stuck, reporting its file.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .decode import VideoInfo, decode_frames
from .discover import content_hash
from ..errors import DecodeError
from ..index.rows import VideoRecord
from ..index.store import Index


@dataclass
class FileState:
    path: Path
    size: int
    mtime: float
    content_hash: str | None = None
    error: str | None = None        # why it could not be read, if it could not


@dataclass
class Plan:
    """What a run has to do, decided from file sizes, mtimes and content hashes."""

    encode: list[tuple[FileState, str]] = field(default_factory=list)   # (file, "new" | "changed")
    moves: list[tuple[str, FileState]] = field(default_factory=list)    # (old path, file)
    touches: list[FileState] = field(default_factory=list)
    unchanged: int = 0
    prune: list[str] = field(default_factory=list)


@dataclass
class Summary:
    new: int = 0
    changed: int = 0
    moved: int = 0
    unchanged: int = 0
    failed: int = 0
    pruned: int = 0
    frames: int = 0
    seconds: float = 0.0
    errors: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("new", "changed", "moved", "unchanged", "failed", "pruned", "frames")} | {
            "seconds": round(self.seconds, 2), "frames_per_second": round(self.frames / max(self.seconds, 1e-9), 2),
            "errors": self.errors}

    def line(self) -> str:
        parts = [f"{self.new} new", f"{self.changed} changed", f"{self.moved} moved", f"{self.unchanged} unchanged"]
        if self.pruned:
            parts.append(f"{self.pruned} pruned")
        if self.failed:
            parts.append(f"{self.failed} failed")
        rate = self.frames / max(self.seconds, 1e-9)
        return f"indexed {', '.join(parts)}; {self.frames} frames in {self.seconds:.1f}s ({rate:.1f} frames/s)"


def make_plan(files: list[Path], known: dict[str, tuple[int, float, str]], prune: bool, workers: int) -> Plan:
    """Decide per file: skip (same size and mtime), touch or move (same content), or encode."""
    plan = Plan()
    present = {str(p) for p in files}
    candidates = []
    for path in files:
        try:
            st = path.stat()
        except OSError:
            continue  # vanished between discovery and now; treated as absent
        state = FileState(path, st.st_size, st.st_mtime)
        old = known.get(str(path))
        if old is not None and old[0] == state.size and abs(old[1] - state.mtime) < 1e-6:
            plan.unchanged += 1
        else:
            candidates.append(state)

    def hash_one(state: FileState) -> FileState:
        try:
            state.content_hash = content_hash(state.path)
        except OSError as e:
            state.content_hash, state.error = None, e.strerror or str(e)  # reported when its turn comes
        return state

    with ThreadPoolExecutor(max(1, workers)) as pool:
        candidates = list(pool.map(hash_one, candidates))
    gone_by_hash = {h: p for p, (_, _, h) in known.items() if p not in present and not os.path.exists(p)}
    for state in candidates:
        old = known.get(str(state.path))
        if old is not None and state.content_hash == old[2]:
            plan.touches.append(state)
        elif old is None and state.content_hash in gone_by_hash:
            plan.moves.append((gone_by_hash.pop(state.content_hash), state))
        else:
            plan.encode.append((state, "changed" if old is not None else "new"))
    if prune:
        plan.prune = sorted(p for p in known if not os.path.exists(p) and p not in {o for o, _ in plan.moves})
    return plan


class _Stop(Exception):
    pass


DECODE_TIMEOUT = 60.0          # seconds a file may spend decoding, plus...
DECODE_SECONDS_PER_SECOND = 4.0  # ...this many per second of video decoded


class DecodeWatch:
    """Time one file's decoder has spent working (waits on a full queue excluded), against its allowance.

    The allowance is a constant plus a share of each stretch of video about to be
    decoded, so the main thread can tell a stuck decoder (one that never returns
    from a decord call) from a long video, and abandon it.
    """

    def __init__(self, base: float | None):
        self.base, self.allowance, self.spent = base, base or 0.0, 0.0
        self.since: float | None = None
        self.abandoned = False
        self._lock = threading.Lock()

    def start(self, video_seconds: float = 0.0) -> None:
        with self._lock:
            self.allowance += DECODE_SECONDS_PER_SECOND * video_seconds
            self.since = time.monotonic()

    def pause(self) -> None:
        with self._lock:
            if self.since is not None:
                self.spent += time.monotonic() - self.since
                self.since = None

    def overdue(self) -> bool:
        if not self.base:
            return False
        with self._lock:
            busy = self.spent + (time.monotonic() - self.since if self.since is not None else 0.0)
        return busy > self.allowance


def decode_worker(job: int, path: Path, fps: float, size: int, out: queue.Queue, stop: threading.Event,
                   chunk: int, watch: DecodeWatch, decoder: str = "auto") -> None:
    """Push ("info", job, VideoInfo), then ("chunk", job, FrameChunk)..., then ("done", job, None) or ("error", ...)."""

    def put(item):
        if not try_put_chunk(out, item, stop, watch):
            raise _Stop

    try:
        watch.start()
        info, chunks = decode_frames(path, fps, size, chunk, decoder)
        watch.pause()
        put(("info", job, info))
        chunks = iter(chunks)
        while True:
            watch.start(chunk / fps)
            c = next(chunks, None)
            watch.pause()
            if c is None:
                break
            put(("chunk", job, c))
        put(("done", job, None))
    except _Stop:
        return
    except DecodeError as e:
        try_put_chunk(out, ("error", job, str(e)), stop, watch)
    except Exception as e:  # any other failure of one file must not stop the run
        try_put_chunk(out, ("error", job, f"{path}: cannot decode ({type(e).__name__}: {str(e)[:120]})"), stop, watch)


def try_put_chunk(out: queue.Queue, item, stop: threading.Event, watch: DecodeWatch) -> bool:
    """Put `item` unless the run stops or this decoder is abandoned first; True when it was put."""
    while not stop.is_set() and not watch.abandoned:
        try:
            out.put(item, timeout=0.2)
            return True
        except queue.Full:
            continue
    return False


@dataclass
class _Job:
    state: FileState
    reason: str
    info: VideoInfo | None = None
    features: list = field(default_factory=list)
    timestamps: list = field(default_factory=list)
    done: bool = False


def run_ingest(index: Index, plan: Plan, encoder, builder, *, fps: float, workers: int, batch_size: int,
               progress=None, decode_timeout: float | None = DECODE_TIMEOUT, decoder: str = "auto",
               ray_address: str | None = None, recipe=None) -> Summary:
    """Carry out `plan` on `index` (which the caller has locked and bound to encoder and builder).

    `decode_timeout` (None or 0: no limit) gives each file that many seconds plus
    DECODE_SECONDS_PER_SECOND per second of video; a decoder past it is abandoned
    and the file reported as failed. With `ray_address`, the files are decoded and encoded on Ray
    actors (`on_ray`), each loading the encoder and builder from `recipe` (`on_ray.Recipe`).
    """
    summary = Summary(unchanged=plan.unchanged)
    started = time.monotonic()
    for state in plan.touches:
        index.touch(str(state.path), state.size, state.mtime)
        summary.unchanged += 1
    for old, state in plan.moves:
        index.move(old, str(state.path), state.size, state.mtime)
        summary.moved += 1
    if plan.prune:
        index.remove(plan.prune)
        summary.pruned = len(plan.prune)
    if plan.encode and ray_address:
        _encode_ray(index, plan, recipe, summary, address=ray_address, fps=fps, workers=workers,
                    batch_size=batch_size, progress=progress, decoder=decoder)
    elif plan.encode:
        _encode_all(index, plan, encoder, builder, summary, fps=fps, workers=workers, batch_size=batch_size,
                    progress=progress, decode_timeout=decode_timeout, decoder=decoder)
    summary.seconds = time.monotonic() - started
    return summary


def _report_failure(summary: Summary, progress, path: Path, message: str) -> None:
    summary.failed += 1
    summary.errors.append({"path": str(path), "error": message})
    if progress:
        progress.error(message)


def _encode_ray(index, plan, recipe, summary, *, address, fps, workers, batch_size, progress, decoder):
    """As `_encode_all`, with the decoding, encoding and prototypes on Ray actors and the commits here."""
    from .on_ray import encode_on_ray

    jobs = []
    for state, reason in plan.encode:
        if state.content_hash is None:  # could not even be read for hashing
            _report_failure(summary, progress, state.path, f"{state.path}: cannot read ({state.error or 'unreadable'})")
        else:
            jobs.append(_Job(state, reason))

    def commit(i: int, result: dict) -> None:
        job = jobs[i]
        commit_video(index, job.state, job.reason, result["info"], result["features"], result["timestamps"],
                     result["protos"], fps, summary)
        if progress:
            progress.frames_done(len(result["features"]))
            progress.video_done()

    if jobs:
        encode_on_ray(jobs, recipe, commit, lambda i, message: _report_failure(summary, progress, jobs[i].state.path,
                                                                                message),
                      address=address, workers=workers, fps=fps, batch_size=max(8, batch_size // 2), decoder=decoder)


def _encode_all(index, plan, encoder, builder, summary, *, fps, workers, batch_size, progress, decode_timeout,
                decoder):
    jobs = [_Job(state, reason) for state, reason in plan.encode]
    out: queue.Queue = queue.Queue(maxsize=max(4, 2 * workers))
    stop = threading.Event()
    remaining = len(jobs)
    chunk = max(8, batch_size // 2)
    running: dict[int, tuple[threading.Thread, DecodeWatch]] = {}  # decoding threads, at most `workers`
    waiting = list(range(len(jobs)))[::-1]
    pending: list[tuple[int, object]] = []

    def fail(i: int, message: str) -> None:
        nonlocal remaining, pending
        _report_failure(summary, progress, jobs[i].state.path, message)
        jobs[i].features.clear()
        jobs[i].done = True
        remaining -= 1
        pending = [(j, c) for j, c in pending if j != i]
        running.pop(i, None)

    def launch() -> None:
        while waiting and len(running) < max(1, workers):
            i = waiting.pop()
            state = jobs[i].state
            if state.content_hash is None:  # could not even be read for hashing
                fail(i, f"{state.path}: cannot read ({state.error or 'unreadable'})")
                continue
            watch = DecodeWatch(decode_timeout)
            thread = threading.Thread(target=decode_worker, name=f"decode-{i}", daemon=True,
                                      args=(i, state.path, fps, encoder.image_size, out, stop, chunk, watch, decoder))
            thread.start()
            running[i] = (thread, watch)  # after start: an interrupt in between must not leave one to join unstarted

    def watchdog() -> None:
        for i, (_, watch) in list(running.items()):
            if watch.overdue():
                watch.abandoned = True  # its thread may be stuck in native code: leave it, report the file
                fail(i, f"{jobs[i].state.path}: decoding did not finish within {watch.allowance:.0f}s; skipped "
                        "(a stuck or very slow decoder; raise --decode-timeout if the file is fine)")

    try:
        launch()
        while remaining:
            try:
                items = [out.get(timeout=0.25)]
            except queue.Empty:
                watchdog()
                launch()
                continue
            n_frames = sum(len(c.frames) for _, c in pending)
            while n_frames < batch_size:  # gather what is ready into one encoder batch
                try:
                    items.append(out.get_nowait())
                except queue.Empty:
                    break
                if items[-1][0] == "chunk":
                    n_frames += len(items[-1][2].frames)
            finished = []
            for kind, i, payload in items:
                if jobs[i] is None or jobs[i].done:
                    continue  # from a decoder already abandoned
                if kind == "info":
                    jobs[i].info = payload
                elif kind == "chunk":
                    pending.append((i, payload))
                elif kind == "done":
                    finished.append(i)
                else:  # error
                    fail(i, payload)
            if pending:
                _encode_pending(encoder, jobs, pending, progress)
                pending = []
            for i in finished:
                running.pop(i, None)
                _commit(index, jobs[i], builder, fps, summary)
                jobs[i] = None  # free its features
                remaining -= 1
                if progress:
                    progress.video_done()
            watchdog()
            launch()
    finally:
        stop.set()
        for thread, watch in running.values():
            if not watch.abandoned:
                thread.join(timeout=5)


def _encode_pending(encoder, jobs, pending, progress) -> None:
    frames = np.concatenate([c.frames for _, c in pending])
    feats = encoder.encode_images(frames)
    lo = 0
    for i, c in pending:
        n = len(c.frames)
        jobs[i].features.append(feats[lo:lo + n])
        jobs[i].timestamps.append(c.timestamps)
        lo += n
    if progress:
        progress.frames_done(len(frames))


def _commit(index: Index, job: _Job, builder, fps: float, summary: Summary) -> None:
    feats = np.concatenate(job.features)
    commit_video(index, job.state, job.reason, job.info, feats, np.concatenate(job.timestamps),
                 builder.build(feats.astype(np.float32)), fps, summary)


def commit_video(index: Index, state: FileState, reason: str, info: VideoInfo, feats: np.ndarray,
                 stamps: np.ndarray, protos, fps: float, summary: Summary) -> None:
    """Write one encoded video (its frame features and prototypes) in one commit, and count it."""
    record = VideoRecord(
        path=str(state.path), size=state.size, mtime=state.mtime, content_hash=state.content_hash,
        duration=info.duration, fps=fps, native_fps=info.native_fps, width=info.width, height=info.height,
        timestamps=stamps, proto_clip=protos.clip, proto_frame=protos.frame, attn_clip=protos.clip_attn,
        attn_frame=protos.frame_attn)
    index.add_video(record, feats)
    summary.frames += len(feats)
    if reason == "new":
        summary.new += 1
    else:
        summary.changed += 1


def rebuild_rows(index: Index, builder, progress=None) -> list[dict]:
    """Rebuild every video's prototypes from its stored frame features (no decoding, no CLIP).

    Returns complete video rows, ready to replace the videos table in one commit.
    """
    keep = [c for c in index.videos.schema.names if c not in ("proto_clip", "proto_frame", "attn_clip", "attn_frame")]
    old = {r["path"]: r for r in index.videos.to_arrow().select(keep).to_pylist()}
    fingerprint = builder.spec()["fingerprint"]
    rows = []
    for path, _, feats in index.iter_frame_features():
        p = builder.build(feats.astype(np.float32))
        rows.append({**old[path], "proto_clip": p.clip.astype(np.float16), "proto_frame": p.frame.astype(np.float16),
                     "attn_clip": p.clip_attn.astype(np.float16).ravel(),
                     "attn_frame": p.frame_attn.astype(np.float16).ravel(), "builder": fingerprint})
        if progress:
            progress.video_done()
    return rows


def decode_only(files: list[Path], fps: float, size: int, workers: int, chunk: int, on_chunk=None) -> tuple[int, list]:
    """Decode `files` with the ingest's own decoder threads and queue, and nothing else (for `prvr bench ingest`).

    Calls `on_chunk(frames)` for every chunk; returns (frames decoded, error messages).
    """
    from concurrent.futures import ThreadPoolExecutor

    out: queue.Queue = queue.Queue(maxsize=max(4, 2 * workers))
    stop = threading.Event()
    frames, remaining, errors = 0, len(files), []
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="decode") as pool:
        for i, path in enumerate(files):
            pool.submit(decode_worker, i, path, fps, size, out, stop, chunk, DecodeWatch(None))
        while remaining:
            kind, _, payload = out.get()
            if kind == "chunk":
                frames += len(payload.frames)
                if on_chunk is not None:
                    on_chunk(payload.frames)
            elif kind in ("done", "error"):
                remaining -= 1
                if kind == "error":
                    errors.append(payload)
    return frames, errors
