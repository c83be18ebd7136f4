"""`prvr bench search`: query latency against corpus size for each method's exact scoring.

Latency is measured on synthetic, L2-normalised stored vectors of each method's real shape per
video (what the index would hold), because the cost of exact scoring depends only on those
shapes, not on the values. It says nothing about retrieval accuracy.

- ProtoPRVR: clip and frame prototypes, scored by `prvr_cli.index.search.rank`, the code path of
  `prvr search`.
- MS-SL: the span proposals + F frame tokens (F = 64 by default: the average frame-token count of a
  realistic corpus; the model caps it at 128). The clip score is the max over spans; the frame
  score is the key-clip-guided attention of `MSSL.branch_scores`. Its two linear maps act on the
  stored frame tokens only, so an index would apply them once at ingest: the benchmark stores keys
  and values per frame token (2 x F vectors) and does the per-query work exactly.
- GMMFormer: max over the clip vectors + the cosine with 1 pooled frame vector.

Corpora that do not fit in the memory budget are streamed: a resident pool of distinct synthetic
videos is scored repeatedly until N videos are covered, so the compute (and the memory traffic)
is that of N videos; this is reported per cell.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..index.search import max_prototype_scores, rank
from .common import (DIM, METHODS, TOP_K, WEIGHTS, bytes_per_video, load_average, machine, model_vectors, random_unit,
                     stored_layout, timed_runs, top_k)

BLOCK_VIDEOS = 2048   # videos per scoring / generation block of the streamed kernels

SCAN_DTYPE = np.float32  # what `prvr search` scans: its cache holds float32 copies of the stored fp16 vectors


def synthetic_store(method: str, n_videos: int, rng: np.random.Generator, frames: int = 64) -> dict[str, np.ndarray]:
    """Unit vectors of each stored kind, as held in memory for an exact scan (float32, like prvr search)."""
    return {name: random_unit((n_videos, rows, DIM), rng, SCAN_DTYPE)
            for name, rows in stored_layout(method, frames).items()}


# ------------------------------------------------------------------------------------------ kernels

def mssl_scores(spans: np.ndarray, keys: np.ndarray, values: np.ndarray, queries: np.ndarray,
                weights=WEIGHTS) -> np.ndarray:
    """MS-SL's score [Q, N] on stored spans [N, P, D], frame keys/values [N, F, D] (guide maps applied).

    clip = max_p cos(q, span_p) (spans are unit vectors); key = argmax; frame =
    cos(q, softmax(span_key . keys) @ values). Equals MSSL.branch_scores (prvr_cli.nets.mssl) with
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
        best, key = max_prototype_scores(spans[lo:hi], qn)                                   # [Q, b]
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


def two_branch_scores(clip: np.ndarray, frame: np.ndarray, queries: np.ndarray,
                      weights=WEIGHTS) -> np.ndarray:
    """weights . (max-over-vectors score per branch) [Q, N]: ProtoPRVR's and GMMFormer's score."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    return weights[0] * max_prototype_scores(clip, q)[0] + weights[1] * max_prototype_scores(frame, q)[0]


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


def bench_search(sizes: list[int], methods: list[str], n_queries: int = 32, repeats: int = 7,
                 lancedb: bool = True, frames: int = 64, mem_gib: float = 6.0, cell_budget_s: float = 60.0,
                 lancedb_max: int | None = None, seed: int = 0, progress=None) -> dict:
    """Median latency per (method, corpus size, 1 query / a batch), plus LanceDB's flat multivector search."""
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UsageError(f"--methods {','.join(methods)!r}: choose from {', '.join(METHODS)}")
    if n_queries < 1 or repeats < 1:
        raise UsageError(f"--queries {n_queries} / --repeats {repeats}: both must be at least 1")
    if not 1 <= frames <= 128:
        raise UsageError(f"--mssl-frames {frames}: MS-SL keeps 1 to 128 frame tokens per video")
    if mem_gib <= 0 or cell_budget_s <= 0:
        raise UsageError("--mem-gib and --cell-budget must be positive")
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
                fn = lambda: top_k(max_prototype_scores(store["clip"], qc)[0], TOP_K)  # noqa: E731
                times, runs = timed_runs(fn, repeats, cell_budget_s)
                cells.append(Cell("protoprvr-clip", "in-process", n, 1, statistics.median(times), runs, pool, note,
                                  load_average()))
                if lancedb and pool == n and (lancedb_max is None or n <= lancedb_max):
                    cell, check = _lancedb_cell(store["clip"], q_all, n, repeats, cell_budget_s, progress)
                    cells.append(cell)
                    checks.append(check)
            store = None  # free this corpus before the next one is generated
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
        exact = top_k(max_prototype_scores(clip, q[None])[0], TOP_K)[0]
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
