"""`prvr bench storage`: bytes per video and the effect on scores and ranks of float32, float16 and int8 storage."""
from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..index.search import max_prototype_scores
from . import quantize
from .common import DIM, METHODS, N_PROTOTYPES, WEIGHTS, bytes_per_video, random_unit, timed_runs, top_k


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
    The int8 scores come from `quantize.int8_max_prototype_scores` (scoring on int8 directly).
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    exact = sum(w * max_prototype_scores(vectors[b].astype(np.float32), q)[0]
                for w, b in zip(weights, ("clip", "frame")))
    out = {}
    for kind in quantize.KINDS:
        stored = {b: quantize.encode(v, kind) for b, v in vectors.items()}
        kernel = quantize.int8_max_prototype_scores if kind == "int8" else max_prototype_scores

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
    if n_videos < 10 or n_queries < 1:
        raise UsageError(f"--videos {n_videos} / --queries {n_queries}: use at least 10 videos and 1 query")
    rng = np.random.default_rng(seed)
    sizes = {m: {k: bytes_per_video(m, k, frames=frames) for k in quantize.KINDS} for m in METHODS}
    vectors = {"clip": random_unit((n_videos, N_PROTOTYPES, DIM), rng, np.float32),
               "frame": random_unit((n_videos, N_PROTOTYPES, DIM), rng, np.float32)}
    queries = random_unit((n_queries, DIM), rng, np.float32)
    return {"bytes_per_video": sizes, "mssl_frames": frames, "dim": DIM,
            "synthetic_protoprvr": {"n_videos": n_videos, "queries": n_queries,
                                    "effect": storage_effect(vectors, queries)}}


def bench_storage_real(checkpoint: str, data_root: str, collection: str, feature: str, split: str = "test",
                       device: str = "cpu", progress=None) -> dict:
    """Real model outputs: bytes per video, score error and rank agreement per storage type, and SumR per type."""
    from ..training.feature_layouts import load_features
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
    from ..training.evaluate import encode_split, gt_ranks, recall_metrics, score_encoded

    model.eval()
    videos, queries = encode_split(model, split, device)
    out, exact = {}, None
    for kind in quantize.KINDS:
        stored_bytes, n_vec = 0, {"clip": 0, "frame": 0}
        for _, enc in videos:
            for branch, t, m in (("clip", enc.clip, enc.clip_mask), ("frame", enc.frame, enc.frame_mask)):
                n_valid = int(m.sum())
                n_vec[branch] += n_valid
                stored_bytes += n_valid * quantize.bytes_per_vector(t.shape[-1], kind)
        stored = [(idx, quantize.quantize_encoding(enc, kind)) for idx, enc in videos]
        scores = score_encoded(model, stored, queries, split.n_queries, split.n_videos)
        metrics = recall_metrics(gt_ranks(scores, split.query_video))
        s = scores.numpy()
        exact = s if exact is None else exact
        out[kind] = {"bytes_per_video": stored_bytes // split.n_videos,
                     "vectors_per_video": round(sum(n_vec.values()) / split.n_videos, 1),
                     **{f"{b}_vectors_per_video": round(n / split.n_videos, 1) for b, n in n_vec.items()},
                     **_agreement(exact, s), "metrics": {k: round(v, 2) for k, v in metrics.items()}}
    return out
