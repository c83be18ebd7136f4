"""Efficiency benchmarks: search latency against corpus size, ingest throughput, storage types.

Every number is measured by these functions; nothing is assumed. Search latency is
measured on synthetic, L2-normalised stored vectors of each method's real shape per
video (what the index would hold), because the cost of exact scoring depends only
on those shapes, not on the values. It says nothing about retrieval accuracy.

- ProtoPRVR: 30 clip + 30 frame prototypes (dim 384), scored by
  `prvr_cli.search.rank` -> `branch_scores`, the code path of `prvr search`.
- MS-SL: 528 span proposals + F frame tokens (F = 64 by default: the average
  frame-token count of a realistic corpus; the model caps it at 128). The clip
  score is the max over spans (the same `branch_scores` kernel); the frame score
  is the key-clip-guided attention of mssl.MSSL.branch_scores. Its two linear maps
  (guide_key, guide_value) act on the stored frame tokens only, so an index would
  apply them once at ingest: the benchmark stores keys and values per frame token
  (2 x F vectors) and does the per-query work exactly (gather the key span,
  softmax over F logits, weighted sum of F values, cosine with the query).
- GMMFormer: max over 32 clip vectors + the cosine with 1 pooled frame vector.

Corpora that do not fit in the memory budget are streamed: a resident pool of
distinct synthetic videos is scored repeatedly until N videos are covered, so the
compute (and the memory traffic: the pool is far larger than the CPU caches) is that of
N videos; this is reported per cell.
"""
from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import quantize
from ..index.search import branch_scores, rank

DIM = 384
METHODS = ("protoprvr", "mssl", "gmmformer")
WEIGHTS = (0.7, 0.3)  # clip / frame branch weights of all three methods' defaults
TOP_K = 10
BLOCK_VIDEOS = 2048   # videos per scoring / generation block of the streamed kernels


# ------------------------------------------------------------------------------------------ shapes

def stored_layout(method: str, frames: int = 64) -> dict[str, int]:
    """Vectors per video of each stored array, as the benchmark scores them."""
    if method == "protoprvr":
        return {"clip": 30, "frame": 30}
    if method == "mssl":
        return {"spans": 528, "frame_keys": frames, "frame_values": frames}
    if method == "gmmformer":
        return {"clip": 32, "frame": 1}
    raise ValueError(method)


def model_vectors(method: str, frames: int = 64) -> int:
    """Vectors per video the model itself outputs (VideoEncoding), before any search-time precomputation."""
    return {"protoprvr": 60, "mssl": 528 + frames, "gmmformer": 33}[method]


def bytes_per_video(method: str, kind: str = "float16", dim: int = DIM, frames: int = 64,
                    as_scored: bool = False) -> int:
    n = sum(stored_layout(method, frames).values()) if as_scored else model_vectors(method, frames)
    return n * quantize.bytes_per_vector(dim, kind)


def matching_flops(method: str, clip_vectors: float, frame_vectors: float, dim: int = DIM) -> float:
    """FLOPs to score one query against one video's stored vectors (a multiply-add counts 2).

    ProtoPRVR and GMMFormer: one dot product per stored vector (the max is not counted).
    MS-SL: one dot product per span, then key-clip-guided attention over the frame tokens
    (a logit and a weighted value per token, keys and values precomputed at ingest) and a cosine.
    """
    if method == "mssl":
        return 2 * dim * clip_vectors + 4 * dim * frame_vectors + 2 * dim
    return 2 * dim * (clip_vectors + frame_vectors)


def random_unit(shape: tuple[int, ...], rng: np.random.Generator, dtype=np.float16) -> np.ndarray:
    """L2-normalised Gaussian vectors (last axis), generated in blocks to bound float32 temporaries."""
    out = np.empty(shape, dtype=dtype)
    flat = out.reshape(-1, shape[-1])
    step = 1 << 18
    for lo in range(0, len(flat), step):
        x = rng.standard_normal((min(step, len(flat) - lo), shape[-1]), dtype=np.float32)
        x /= np.linalg.norm(x, axis=-1, keepdims=True)
        flat[lo:lo + len(x)] = x
    return out


SCAN_DTYPE = np.float32  # what `prvr search` scans: its cache holds float32 copies of the stored fp16 vectors


def synthetic_store(method: str, n_videos: int, rng: np.random.Generator, frames: int = 64) -> dict[str, np.ndarray]:
    """Unit vectors of each stored kind, as held in memory for an exact scan (float32, like prvr search)."""
    return {name: random_unit((n_videos, rows, DIM), rng, SCAN_DTYPE)
            for name, rows in stored_layout(method, frames).items()}


# ------------------------------------------------------------------------------------------ kernels

def top_k(total: np.ndarray, k: int) -> np.ndarray:
    """Indices [Q, k] of the k best videos per query, best first (as search.rank)."""
    k = min(k, total.shape[1])
    top = np.argpartition(-total, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(total, top, 1), axis=1, kind="stable")
    return np.take_along_axis(top, order, 1)


def mssl_scores(spans: np.ndarray, keys: np.ndarray, values: np.ndarray, queries: np.ndarray,
                weights=WEIGHTS) -> np.ndarray:
    """MS-SL's score [Q, N] on stored spans [N, P, D], frame keys/values [N, F, D] (guide maps applied).

    clip = max_p cos(q, span_p) (spans are unit vectors); key = argmax; frame =
    cos(q, softmax(span_key . keys) @ values). Equals mssl.MSSL.branch_scores with
    keys = guide_key(tokens), values = guide_value(tokens), for unit-norm proposals.
    """
    import torch

    q = np.ascontiguousarray(queries, dtype=np.float32)
    qn = q / np.linalg.norm(q, axis=-1, keepdims=True)
    n = spans.shape[0]
    out = np.empty((q.shape[0], n), dtype=np.float32)
    qt = torch.from_numpy(qn)
    for lo in range(0, n, BLOCK_VIDEOS):
        hi = min(n, lo + BLOCK_VIDEOS)
        best, key = branch_scores(spans[lo:hi], qn)                                   # [Q, b]
        sp = torch.from_numpy(np.asarray(spans[lo:hi]))
        b = hi - lo
        guide = sp[torch.arange(b).view(1, -1), torch.from_numpy(key.astype(np.int64))].float()   # [Q, b, D]
        k = torch.from_numpy(np.asarray(keys[lo:hi], dtype=np.float32))             # [b, F, D]
        v = torch.from_numpy(np.asarray(values[lo:hi], dtype=np.float32))
        logits = torch.bmm(guide.transpose(0, 1), k.transpose(1, 2))                 # [b, Q, F]
        feat = torch.bmm(torch.softmax(logits, -1), v)                               # [b, Q, D]
        feat = torch.nn.functional.normalize(feat, dim=-1)
        frame = (feat * qt.unsqueeze(0)).sum(-1).T.numpy()                          # [Q, b]
        out[:, lo:hi] = weights[0] * best + weights[1] * frame
    return out


def two_branch_scores(clip: np.ndarray, frame: np.ndarray, queries: np.ndarray, weights=WEIGHTS) -> np.ndarray:
    """weights . (max-over-vectors score per branch) [Q, N]: ProtoPRVR's and GMMFormer's score."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    return weights[0] * branch_scores(clip, q)[0] + weights[1] * branch_scores(frame, q)[0]


def score_method(method: str, store: dict[str, np.ndarray], queries: np.ndarray) -> np.ndarray:
    if method == "mssl":
        return mssl_scores(store["spans"], store["frame_keys"], store["frame_values"], queries)
    return two_branch_scores(store["clip"], store["frame"], queries)


def search_once(method: str, store: dict[str, np.ndarray], queries: np.ndarray, n_videos: int,
                paths: list[str] | None = None):
    """Top-k [Q, k] over n_videos; the store holds P <= n_videos distinct videos, scored ceil(N / P) times.

    For ProtoPRVR with the whole corpus resident, this is `prvr search`'s `rank` itself.
    """
    pool = next(iter(store.values())).shape[0]
    if method == "protoprvr" and pool == n_videos and paths is not None:
        return rank(paths, store["clip"], store["frame"], queries, queries, WEIGHTS, TOP_K)
    total = np.empty((queries.shape[0], n_videos), dtype=np.float32)
    for lo in range(0, n_videos, pool):
        hi = min(n_videos, lo + pool)
        part = {k: v[:hi - lo] for k, v in store.items()}
        total[:, lo:hi] = score_method(method, part, queries)
    return top_k(total, TOP_K)


# ------------------------------------------------------------------------------------------ timing

def timed_runs(fn, repeats: int, budget_s: float) -> tuple[list[float], int]:
    """Wall seconds of up to `repeats` runs after one warm-up; fewer when one run is long (budget per cell)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    runs = max(1, min(repeats, int(budget_s // max(first, 1e-9))))
    times = []
    if runs < repeats and first * 2 > budget_s:
        times.append(first)  # a long cell: the warm-up is a run of its own (caches cannot help at this size)
        runs = max(0, runs - 1)
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times, len(times)


@dataclass
class Cell:
    method: str
    engine: str            # "in-process" or "lancedb"
    n_videos: int
    queries: int           # 1 or the batch size
    median_s: float
    runs: int
    resident_videos: int   # distinct videos held in memory (< n_videos when streamed)
    note: str = ""
    load: list = None      # 1/5/15-minute load average right after the cell

    def as_dict(self) -> dict:
        return {"method": self.method, "engine": self.engine, "n_videos": self.n_videos, "queries": self.queries,
                "median_ms": round(self.median_s * 1e3, 3),
                "per_query_ms": round(self.median_s * 1e3 / self.queries, 3), "runs": self.runs,
                "resident_videos": self.resident_videos, "streamed": self.resident_videos < self.n_videos,
                "note": self.note, "load_average": self.load if self.load is not None else load_average()}


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict:
    import platform

    import torch

    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def bench_search(sizes: list[int], methods: list[str], n_queries: int = 32, repeats: int = 7,
                 lancedb: bool = True, frames: int = 64, mem_gib: float = 6.0, cell_budget_s: float = 60.0,
                 lancedb_max: int | None = None, seed: int = 0, progress=None) -> dict:
    """Median latency per (method, corpus size, 1 query / a batch), plus LanceDB's flat multivector search."""
    rng = np.random.default_rng(seed)
    budget = int(mem_gib * (1 << 30))
    q_all = random_unit((max(1, n_queries), DIM), rng, np.float32)
    cells: list[Cell] = []
    checks = []
    for method in methods:
        per_video = bytes_per_video(method, "float32", frames=frames, as_scored=True)  # scanned as float32
        for n in sorted(sizes):
            pool = n if n * per_video <= budget else max(1, budget // per_video)
            if pool < n and pool > BLOCK_VIDEOS:
                pool = pool // BLOCK_VIDEOS * BLOCK_VIDEOS  # whole scoring blocks
            note = "" if pool == n else (f"{n * per_video / (1 << 30):.1f} GiB does not fit the {mem_gib:g} GiB "
                                         f"budget: streamed over {pool} resident videos")
            if progress:
                progress(f"{method}: generating {pool} synthetic videos ({pool * per_video / (1 << 30):.2f} GiB)")
            store = synthetic_store(method, pool, rng, frames)
            paths = [f"v{i}" for i in range(n)] if pool == n else None
            for nq in sorted({1, n_queries}):
                q = q_all[:nq]
                if progress:
                    progress(f"{method}: {n} videos, {nq} quer{'y' if nq == 1 else 'ies'}")
                times, runs = timed_runs(lambda: search_once(method, store, q, n, paths), repeats, cell_budget_s)
                cells.append(Cell(method, "in-process", n, nq, statistics.median(times), runs, pool, note,
                                  load_average()))
            if method == "protoprvr":
                # the clip branch alone, for a like-for-like comparison with LanceDB (one multivector column)
                qc = q_all[:1]
                fn = lambda: top_k(branch_scores(store["clip"], qc)[0], TOP_K)  # noqa: E731
                times, runs = timed_runs(fn, repeats, cell_budget_s)
                cells.append(Cell("protoprvr-clip", "in-process", n, 1, statistics.median(times), runs, pool, note,
                                  load_average()))
                if lancedb and pool == n and (lancedb_max is None or n <= lancedb_max):
                    cell, check = _lancedb_cell(store["clip"], q_all, n, repeats, cell_budget_s, progress)
                    cells.append(cell)
                    checks.append(check)
            del store
    return {"cells": [c.as_dict() for c in cells], "ratios": _ratios(cells), "lancedb_checks": checks,
            "bytes_per_video": {m: {"model_vectors": model_vectors(m, frames),
                                    "model_bytes_fp16": bytes_per_video(m, "float16", frames=frames),
                                    "scored_vectors": sum(stored_layout(m, frames).values()),
                                    "scored_bytes_fp16": bytes_per_video(m, "float16", frames=frames, as_scored=True)}
                                for m in methods},
            "settings": {"sizes": sorted(sizes), "methods": methods, "queries": n_queries, "repeats": repeats,
                         "dim": DIM, "mssl_frames": frames, "mem_gib": mem_gib, "cell_budget_s": cell_budget_s,
                         "top_k": TOP_K, "seed": seed},
            "machine": machine(), "load_average": load_average()}


def _lancedb_cell(clip: np.ndarray, q_all: np.ndarray, n: int, repeats: int, budget_s: float, progress):
    import pyarrow as pa

    os.environ.setdefault("LANCE_LOG", "error")
    import lancedb

    with tempfile.TemporaryDirectory(prefix="prvr-bench-") as tmp:
        db = lancedb.connect(tmp)
        lp, d = clip.shape[1], clip.shape[2]
        schema = pa.schema([("id", pa.int64()), ("proto_clip", pa.list_(pa.list_(pa.float16(), d)))])

        def batches():
            for lo in range(0, n, 4096):
                block = np.ascontiguousarray(clip[lo:lo + 4096], dtype=np.float16)  # stored as fp16
                child = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), d)
                offsets = pa.array(np.arange(0, len(block) * lp + 1, lp, dtype=np.int32))
                yield pa.record_batch([pa.array(np.arange(lo, lo + len(block), dtype=np.int64)),
                                       pa.ListArray.from_arrays(offsets, child)], schema=schema)

        if progress:
            progress(f"lancedb: writing {n} videos")
        t0 = time.perf_counter()
        table = db.create_table("videos", data=pa.RecordBatchReader.from_batches(schema, batches()), schema=schema)
        write_s = time.perf_counter() - t0
        q = q_all[0]

        def search():
            return (table.search(q, vector_column_name="proto_clip").distance_type("cosine").limit(TOP_K)
                    .select(["id", "_distance"]).to_arrow())

        if progress:
            progress(f"lancedb: {n} videos, 1 query")
        times, runs = timed_runs(search, repeats, budget_s)
        got = search()
        # agreement with the exact in-process max-cosine top-k (same data, same query)
        exact = top_k(branch_scores(clip, q[None])[0], TOP_K)[0]
        check = {"n_videos": n, "top10_overlap": len(set(got["id"].to_pylist()) & set(exact.tolist())) / len(exact),
                 "max_abs_score_diff": float(np.max(np.abs(
                     (1 - np.asarray(got["_distance"].to_pylist())) -
                     (clip[np.asarray(got["id"].to_pylist())].astype(np.float32) @ q).max(-1)))),
                 "write_s": round(write_s, 2)}
        cell = Cell("protoprvr-clip", "lancedb", n, 1, statistics.median(times), runs, n,
                    "flat multivector search, no ANN index, cosine", load_average())
        return cell, check


def _ratios(cells: list[Cell]) -> list[dict]:
    """Latency of each method relative to ProtoPRVR, and LanceDB relative to in-process, from the same run."""
    by = {(c.method, c.engine, c.n_videos, c.queries): c.median_s for c in cells}
    out = []
    for (m, e, n, nq), s in sorted(by.items()):
        base = by.get(("protoprvr", "in-process", n, nq))
        if e == "in-process" and m in ("mssl", "gmmformer") and base:
            out.append({"what": f"{m} / protoprvr", "n_videos": n, "queries": nq, "ratio": round(s / base, 2)})
        if e == "lancedb":
            ref = by.get(("protoprvr-clip", "in-process", n, nq))
            if ref:
                out.append({"what": "lancedb / in-process (clip branch)", "n_videos": n, "queries": nq,
                            "ratio": round(s / ref, 2)})
    return out


def plot_search(result: dict, path: str | Path, queries: int = 1) -> Path:
    """Log-log latency vs corpus size, one line per method and engine, for single-query cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    series: dict[str, list[tuple[int, float]]] = {}
    for c in result["cells"]:
        if c["queries"] == queries:
            label = c["method"] if c["engine"] == "in-process" else f"{c['method']} (LanceDB)"
            series.setdefault(label, []).append((c["n_videos"], c["median_ms"]))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("videos in the index")
    ax.set_ylabel(f"median latency, {queries} quer{'y' if queries == 1 else 'ies'} (ms)")
    m = result.get("machine", {})
    ax.set_title(f"exact search latency ({m.get('cores', '?')}-core CPU, synthetic vectors)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ ingest

def _decode_all(files: list[Path], fps: float, size: int, workers: int, batch_size: int, keep: bool):
    """Decode with the ingest's own worker threads and queue; returns (frames, seconds, decoded arrays or None)."""
    import queue
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from ..pipeline import ingest

    def no_limit():
        # the ingest's per-file watch (when this version has one), with no time limit
        return ingest._Watch(None) if hasattr(ingest, "_Watch") else None

    out: queue.Queue = queue.Queue(maxsize=max(4, 2 * workers))
    stop = threading.Event()
    kept: list[np.ndarray] = []
    frames, remaining, errors = 0, len(files), []
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="decode") as pool:
        for i, p in enumerate(files):
            pool.submit(ingest._decode_worker, i, p, fps, size, out, stop, max(8, batch_size // 2), no_limit())
        while remaining:
            kind, i, payload = out.get()
            if kind == "chunk":
                frames += len(payload.frames)
                if keep:
                    kept.append(payload.frames)
            elif kind in ("done", "error"):
                remaining -= 1
                if kind == "error":
                    errors.append(payload)
    seconds = time.perf_counter() - t0
    return frames, seconds, (np.concatenate(kept) if keep and kept else None), errors


def bench_ingest(path: str | Path, clip_model: str = "ViT-B-32", clip_pretrained: str = "none", device: str = "cpu",
                 fps: float = 3.0, workers: int = 2, batch_size: int = 64, profile: bool = False,
                 progress=None) -> dict:
    """Frames/s of decoding alone, the CLIP image encoder alone (pre-decoded frames) and the full ingest."""
    import warnings

    import torch

    from ..pipeline.discover import discover
    from ..pipeline.encode import ClipEncoder
    from ..errors import UsageError
    from ..pipeline.ingest import make_plan, run_ingest
    from ..pipeline.prototypes import ZeroShotPrototypes
    from ..index.store import Index

    files = discover([Path(path)], None).files
    if not files:
        raise UsageError(f"{path}: no video files found; pass a folder or file of videos")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = ClipEncoder.load(clip_model, clip_pretrained, device)
    say = progress or (lambda s: None)

    # 1. decoding alone (twice: the first run warms the file cache, the second is reported)
    say("decode alone")
    _decode_all(files, fps, encoder.image_size, workers, batch_size, keep=False)
    n_dec, dec_s, _, errors = _decode_all(files, fps, encoder.image_size, workers, batch_size, keep=False)
    _, _, frames, _ = _decode_all(files, fps, encoder.image_size, workers, batch_size, keep=True)

    # 2. the encoder alone on pre-decoded frames, same batch size (one warm-up batch first)
    say(f"encoder alone on {len(frames)} frames")
    encoder.encode_images(frames[:batch_size])
    t0 = time.perf_counter()
    for lo in range(0, len(frames), batch_size):
        encoder.encode_images(frames[lo:lo + batch_size])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    enc_s = time.perf_counter() - t0

    # 3. the full ingest into a temporary index (decode threads + encoder + prototypes + LanceDB)
    say("full ingest")
    builder = ZeroShotPrototypes()
    stats = None
    with tempfile.TemporaryDirectory(prefix="prvr-bench-ingest-") as tmp:
        idx = Index.open(Path(tmp) / "index", create=True)
        with idx.lock():
            enc_spec = encoder.spec()
            proto_dim = int(builder.build(np.zeros((2, enc_spec["dim"]), np.float32)).clip.shape[1])
            idx.bind(enc_spec, builder.spec(), proto_dim)
            plan = make_plan(files, idx.file_states(), False, workers)
            t0 = time.perf_counter()
            if profile:
                import cProfile
                import io
                import pstats

                prof = cProfile.Profile()
                prof.enable()
            summary = run_ingest(idx, plan, encoder, builder, fps=fps, workers=workers, batch_size=batch_size)
            full_s = time.perf_counter() - t0
            if profile:
                prof.disable()
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(25)
                stats = buf.getvalue()
            t0 = time.perf_counter()
            idx.optimize()
            optimize_s = time.perf_counter() - t0
    n_full = summary.frames
    res = {
        "files": len(files), "failed": summary.failed, "frames": n_full,
        "decode": {"frames": n_dec, "seconds": round(dec_s, 3), "frames_per_s": round(n_dec / dec_s, 2)},
        "encoder": {"frames": int(len(frames)), "seconds": round(enc_s, 3), "frames_per_s": round(len(frames) / enc_s, 2)},
        "full_ingest": {"frames": n_full, "seconds": round(full_s, 3), "frames_per_s": round(n_full / full_s, 2),
                        "optimize_seconds": round(optimize_s, 3)},
        "ratio_full_over_encoder_time": round((full_s / max(n_full, 1)) / (enc_s / len(frames)), 3),
        "settings": {"clip_model": clip_model, "clip_pretrained": clip_pretrained, "device": encoder.device,
                     "fps": fps, "workers": workers, "batch_size": batch_size, "builder": "zero-shot"},
        "decode_errors": errors, "machine": machine(), "load_average": load_average(),
    }
    if stats:
        res["profile"] = stats
    return res


# ------------------------------------------------------------------------------------------ storage

def _agreement(exact: np.ndarray, approx: np.ndarray, k: int = 10) -> dict:
    """Max abs score error, mean top-k overlap and top-1 agreement of two [Q, N] score matrices."""
    k = min(k, exact.shape[1])
    te, ta = top_k(exact, k), top_k(approx, k)
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(te, ta)])
    return {"max_abs_score_error": float(np.max(np.abs(exact - approx))),
            f"recall@{k}_overlap": round(float(overlap), 4),
            "top1_agreement": round(float(np.mean(te[:, 0] == ta[:, 0])), 4)}


def storage_effect(vectors: dict[str, np.ndarray], queries: np.ndarray, weights=WEIGHTS) -> dict:
    """Effect of each storage type on a max-over-vectors two-branch score (ProtoPRVR / GMMFormer style).

    vectors: {"clip": [N, L, D], "frame": [N, L', D]} float32 (any norm); queries [Q, D].
    The int8 scores come from `quantize.int8_branch_scores` (scoring on int8 directly).
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    exact = sum(w * branch_scores(vectors[b].astype(np.float32), q)[0] for w, b in zip(weights, ("clip", "frame")))
    out = {}
    for kind in quantize.KINDS:
        stored = {b: quantize.encode(v, kind) for b, v in vectors.items()}
        kernel = quantize.int8_branch_scores if kind == "int8" else branch_scores

        def score(qs):
            return sum(w * kernel(stored[b], qs)[0] for w, b in zip(weights, ("clip", "frame")))

        s = score(q)
        times, _ = timed_runs(lambda: score(q[:1]), 3, 30.0)  # one query: the storage type's scan speed
        n = next(iter(vectors.values())).shape[0]
        out[kind] = {"bytes_per_video": sum(quantize.stored_nbytes(v) for v in stored.values()) // n,
                     **_agreement(exact, s), "one_query_ms": round(statistics.median(times) * 1e3, 2)}
    return out


def bench_storage_synthetic(n_videos: int = 10000, n_queries: int = 256, seed: int = 0, frames: int = 64) -> dict:
    """Bytes per video for every method and storage type; score effect on synthetic ProtoPRVR prototypes.

    Synthetic unit vectors are near-orthogonal, so their score gaps are smaller
    than a trained model's: a harsh case for rank agreement, not a real-data estimate.
    """
    rng = np.random.default_rng(seed)
    sizes = {m: {k: bytes_per_video(m, k, frames=frames) for k in quantize.KINDS} for m in METHODS}
    vectors = {"clip": random_unit((n_videos, 30, DIM), rng, np.float32),
               "frame": random_unit((n_videos, 30, DIM), rng, np.float32)}
    queries = random_unit((n_queries, DIM), rng, np.float32)
    return {"bytes_per_video": sizes, "mssl_frames": frames, "dim": DIM,
            "synthetic_protoprvr": {"n_videos": n_videos, "queries": n_queries,
                                    "effect": storage_effect(vectors, queries)}}


def bench_storage_real(checkpoint: str, data_root: str, collection: str, feature: str, split: str = "test",
                       device: str = "cpu", progress=None) -> dict:
    """Real model outputs: bytes per video, score error and rank agreement per storage type, and SumR per type."""
    from ..training.datasets import load_features
    from ..errors import UsageError
    from ..nets.factory import load_checkpoint

    model, meta = load_checkpoint(checkpoint, map_location=device)
    data = load_features(Path(data_root), collection, feature)
    if split not in data.splits:
        raise UsageError(f"--split {split}: the data has {', '.join(data.splits)}; choose one of them")
    sp = data.splits[split]
    if progress:
        progress(f"encoding {sp.n_videos} videos and {sp.n_queries} queries of {split} with {meta['method']}")
    return {"method": meta["method"], "checkpoint": str(checkpoint), "split": split, "n_videos": sp.n_videos,
            "n_queries": sp.n_queries, "kinds": storage_metrics(model, sp, device)}


def storage_metrics(model, split, device: str = "cpu") -> dict:
    """Per storage type: the split's R@K/SumR, stored vectors and bytes per video, and agreement with float32.

    Videos and queries are encoded once; each storage type round-trips the stored vectors and
    rescores every query against every video with the model's own `score`.
    """
    import torch

    from ..training import evaluate

    with torch.no_grad():
        chunks = []
        for idx in evaluate._chunks(split.frames.lengths, 256):
            frames, mask = split.frames.batch(idx)
            chunks.append((idx, model.encode_videos(frames.to(device), mask.to(device))))
        queries = []
        for q_idx in evaluate._chunks(split.tokens.lengths, 1024):
            tokens, mask = split.tokens.batch(q_idx)
            queries.append((q_idx, model.encode_queries(tokens.to(device), mask.to(device))))
        out, exact = {}, None
        for kind in quantize.KINDS:
            scores = torch.empty(split.n_queries, split.n_videos)
            stored_bytes, n_vec = 0, {"clip": 0, "frame": 0}
            encs = [(v_idx, quantize.quantize_encoding(enc, kind)) for v_idx, enc in chunks]
            for v_idx, enc in chunks:
                for branch, t, m in (("clip", enc.clip, enc.clip_mask), ("frame", enc.frame, enc.frame_mask)):
                    n_valid = int(m.sum())
                    n_vec[branch] += n_valid
                    stored_bytes += n_valid * quantize.bytes_per_vector(t.shape[-1], kind)
            v_all = torch.cat([i for i, _ in encs])
            for q_idx, qenc in queries:
                block = torch.cat([model.score(qenc, enc) for _, enc in encs], 1).float().cpu()
                scores[q_idx.unsqueeze(1), v_all.unsqueeze(0)] = block
            metrics = evaluate.recall_metrics(evaluate.gt_ranks(scores, split.query_video))
            s = scores.numpy()
            if exact is None:
                exact = s
            out[kind] = {"bytes_per_video": stored_bytes // split.n_videos,
                         "vectors_per_video": round(sum(n_vec.values()) / split.n_videos, 1),
                         **{f"{b}_vectors_per_video": round(n / split.n_videos, 1) for b, n in n_vec.items()},
                         **_agreement(exact, s), "metrics": {k: round(v, 2) for k, v in metrics.items()}}
    return out
