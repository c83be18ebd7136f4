"""The ingest pipeline: discover -> decode -> encode -> prototypes -> store.

Decoding runs in worker threads (decord releases the GIL) that feed a bounded
queue of frame chunks; the main thread batches chunks across videos for the
encoder, so it is never idle waiting on one video. Each finished video is built
into prototypes and committed on its own: an interrupted run keeps everything it
finished, and the next run resumes with the rest.
"""
from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .decode import VideoInfo, decode_frames
from .errors import DecodeError, PrvrError
from .store import Index, VideoRecord


@dataclass
class FileState:
    path: Path
    size: int
    mtime: float
    content_hash: str | None = None


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


def content_hash(path: Path) -> str:
    """BLAKE2b of the whole file: recognises a moved or touched file without decoding it."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


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
        except OSError:
            state.content_hash = None  # unreadable: the decoder will report it
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


def _decode_worker(job: int, path: Path, fps: float, size: int, out: queue.Queue, stop: threading.Event,
                   chunk: int, time_limit: float | None) -> None:
    """Push ("info", job, VideoInfo), then ("chunk", job, FrameChunk)..., then ("done", job, None) or ("error", ...)."""

    def put(item):
        while not stop.is_set():
            try:
                out.put(item, timeout=0.2)
                return
            except queue.Full:
                continue
        raise _Stop

    started = time.monotonic()
    try:
        info, chunks = decode_frames(path, fps, size, chunk)
        put(("info", job, info))
        for c in chunks:
            put(("chunk", job, c))
            if time_limit and time.monotonic() - started > time_limit:
                raise DecodeError(f"{path}: decoding took longer than {time_limit:.0f}s; skipped "
                                  "(raise --decode-timeout for very long videos)")
        put(("done", job, None))
    except _Stop:
        return
    except DecodeError as e:
        _try_put(out, ("error", job, str(e)), stop)
    except Exception as e:  # any other failure of one file must not stop the run
        _try_put(out, ("error", job, f"{path}: cannot decode ({type(e).__name__}: {str(e)[:120]})"), stop)


def _try_put(out: queue.Queue, item, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            out.put(item, timeout=0.2)
            return
        except queue.Full:
            continue


@dataclass
class _Job:
    state: FileState
    reason: str
    info: VideoInfo | None = None
    features: list = field(default_factory=list)
    timestamps: list = field(default_factory=list)
    done: bool = False


def run_ingest(index: Index, plan: Plan, encoder, builder, *, fps: float, workers: int, batch_size: int,
               progress=None, decode_timeout: float | None = None) -> Summary:
    """Carry out `plan` on `index` (which the caller has locked and bound to encoder and builder)."""
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
    if plan.encode:
        _encode_all(index, plan, encoder, builder, summary, fps=fps, workers=workers, batch_size=batch_size,
                    progress=progress, decode_timeout=decode_timeout)
    summary.seconds = time.monotonic() - started
    return summary


def _encode_all(index, plan, encoder, builder, summary, *, fps, workers, batch_size, progress, decode_timeout):
    jobs = [_Job(state, reason) for state, reason in plan.encode]
    out: queue.Queue = queue.Queue(maxsize=max(4, 2 * workers))
    stop = threading.Event()
    remaining = len(jobs)
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="decode")
    try:
        for i, job in enumerate(jobs):
            pool.submit(_decode_worker, i, job.state.path, fps, encoder.image_size, out, stop,
                        max(8, batch_size // 2), decode_timeout)
        pending: list[tuple[int, object]] = []
        while remaining:
            items = [out.get()]
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
                if kind == "info":
                    jobs[i].info = payload
                elif kind == "chunk":
                    pending.append((i, payload))
                elif kind == "done":
                    finished.append(i)
                else:  # error
                    summary.failed += 1
                    summary.errors.append({"path": str(jobs[i].state.path), "error": payload})
                    if progress:
                        progress.error(payload)
                    jobs[i].features.clear()
                    jobs[i].done = True
                    remaining -= 1
                    pending = [(j, c) for j, c in pending if j != i]
            if pending:
                _encode_pending(encoder, jobs, pending, progress)
                pending = []
            for i in finished:
                _commit(index, jobs[i], builder, fps, summary)
                jobs[i] = None  # free its features
                remaining -= 1
                if progress:
                    progress.video_done()
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)


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
    stamps = np.concatenate(job.timestamps)
    protos = builder.build(feats.astype(np.float32))
    info = job.info
    record = VideoRecord(
        path=str(job.state.path), size=job.state.size, mtime=job.state.mtime, content_hash=job.state.content_hash,
        duration=info.duration, fps=fps, native_fps=info.native_fps, width=info.width, height=info.height,
        timestamps=stamps, proto_clip=protos.clip, proto_frame=protos.frame, attn_clip=protos.clip_attn,
        attn_frame=protos.frame_attn)
    index.add_video(record, feats)
    summary.frames += len(feats)
    if job.reason == "new":
        summary.new += 1
    else:
        summary.changed += 1


def reindex(index: Index, builder, progress=None) -> list[dict]:
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
