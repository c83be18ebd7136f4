"""Stage 6: rank indexed videos for a query and read highlights from the best prototype's attention.

A video's score per branch is the max cosine between the query vector and that
video's Lp prototypes; the final score is the weighted sum of the two branches.
All prototypes of the index sit in one [N * Lp, D] matrix per branch, so scoring
is one matrix product per branch (taken in large blocks to bound memory).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import re

import numpy as np

EXACT_MARGIN = 1e-5  # scores a scan may round differently from the video-by-video rescoring (float32 ulps)
BLOCK_ROWS = 1 << 14  # prototype rows per matrix-product block (a cache file widens each to float32: 32 MiB at D 512)


def _float32_blocks(protos, rows: int):
    """(first video, float32 block [n, Lp, D]) over prototypes: a cache file streams its own; an array is sliced
    (float32 in place, other dtypes converted block by block)."""
    if hasattr(protos, "blocks"):
        yield from protos.blocks(rows)
        return
    per_block = max(1, rows // protos.shape[1])
    for v0 in range(0, protos.shape[0], per_block):
        yield v0, np.asarray(protos[v0:v0 + per_block], dtype=np.float32)


def max_prototype_scores(protos, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """protos [N, Lp, D] (an array, a `matrices.PrototypeFile`, or prototypes that score themselves),
    queries [Q, D] -> (max score [Q, N], argmax prototype [Q, N])."""
    if hasattr(protos, "max_scores"):
        return protos.max_scores(queries)
    n, lp, d = protos.shape
    q = np.ascontiguousarray(queries, dtype=np.float32).T
    best = np.empty((queries.shape[0], n), dtype=np.float32)
    arg = np.empty((queries.shape[0], n), dtype=np.int32)
    for v0, block in _float32_blocks(protos, BLOCK_ROWS):
        scores = (block.reshape(-1, d) @ q).T.reshape(queries.shape[0], -1, lp)        # [Q, videos, Lp]
        best[:, v0:v0 + scores.shape[1]] = scores.max(-1)
        arg[:, v0:v0 + scores.shape[1]] = scores.argmax(-1)
    return best, arg


@dataclass
class Hit:
    rank: int
    score: float
    path: str
    clip_score: float
    frame_score: float
    clip_prototype: int
    frame_prototype: int
    duration: float = 0.0
    highlights: list[dict] = field(default_factory=list)
    copies: list[str] = field(default_factory=list)  # other paths of the same file content
    video: int = -1                                   # row of the search matrices (not printed)

    @classmethod
    def from_dict(cls, d: dict) -> "Hit":
        """The hit `as_dict` describes (as a server sends it)."""
        return cls(d["rank"], d["score"], d["path"], d["branch_scores"]["clip"], d["branch_scores"]["frame"],
                   d["prototypes"]["clip"], d["prototypes"]["frame"], d["duration"], d["highlights"], d["copies"])

    def as_dict(self) -> dict:
        return {"rank": self.rank, "score": round(self.score, 6), "path": self.path, "copies": self.copies,
                "duration": round(self.duration, 3), "highlights": self.highlights,
                "branch_scores": {"clip": round(self.clip_score, 6), "frame": round(self.frame_score, 6)},
                "prototypes": {"clip": self.clip_prototype, "frame": self.frame_prototype}}


@dataclass
class SearchResults:
    """Hits per query, best first, and how many tokens of each overlong query the text encoder ignored."""

    queries: list[str]
    hits: list[list[Hit]]
    cut_tokens: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class HitFilter:
    """Which hits a search keeps: paths matching a glob (`*` crosses folders), scores at least a minimum."""

    path_glob: str | None = None
    min_score: float | None = None

    def allowed(self, paths: list[str]) -> np.ndarray | None:
        """Per video, whether its path may be a hit (None: all)."""
        if not self.path_glob:
            return None
        import fnmatch

        pattern = re.compile(fnmatch.translate(self.path_glob))
        return np.fromiter((pattern.match(p) is not None for p in paths), dtype=bool, count=len(paths))

    def keep(self, hits: list[Hit]) -> list[Hit]:
        return hits if self.min_score is None else [h for h in hits if h.score >= self.min_score]


def rank(paths: list[str], clip: np.ndarray, frame: np.ndarray, q_clip: np.ndarray, q_frame: np.ndarray,
         weights: tuple[float, float], k: int, copy_of: np.ndarray | None = None,
         allowed: np.ndarray | None = None, ann=None, ann_settings=None) -> list[list[Hit]]:
    """Top-k hits for each query (best first).

    With `copy_of` (per video, the first video with the same content), identical copies of one file are one
    hit: the first of their paths is scored, and the others are listed as its copies. With `allowed` (per
    video), only those videos can be hits. With `ann` (an `ann.AnnCandidates`), only its candidates are
    scored (exactly), instead of every video; a query with fewer than k candidates scans them all.
    """
    copies: dict[int, list[str]] = {}
    excluded = np.zeros(len(paths), dtype=bool)
    if copy_of is not None:
        duplicates = np.flatnonzero(copy_of != np.arange(len(copy_of)))
        excluded[duplicates] = True
        for v in duplicates.tolist():
            copies.setdefault(int(copy_of[v]), []).append(paths[v])
    if allowed is not None:
        excluded |= ~allowed
    scored = None
    if ann is not None:
        scored = _candidate_scores(ann, ann_settings, (clip, q_clip), (frame, q_frame), weights, k, excluded)
    if scored is None:
        scored = _scan_scores((clip, q_clip), (frame, q_frame), weights, k, excluded)
    s_clip, a_clip, s_frame, a_frame, total = scored
    k = min(k, int(np.isfinite(total[0]).sum()) if len(total) else 0)
    results = []
    for qi in range(total.shape[0]):
        if k == 0:
            results.append([])
            continue
        top = np.argpartition(-total[qi], k - 1)[:k]
        top = top[np.argsort(-total[qi, top], kind="stable")]
        results.append([Hit(r + 1, float(total[qi, v]), paths[v], float(s_clip[qi, v]), float(s_frame[qi, v]),
                            int(a_clip[qi, v]), int(a_frame[qi, v]), copies=copies.get(int(v), []), video=int(v))
                        for r, v in enumerate(top)])
    return results


def _scan_scores(clip_side, frame_side, weights, k: int, excluded: np.ndarray):
    """Every video scored: (clip score, clip argmax, frame score, frame argmax, total) [Q, N]; -inf where excluded."""
    (clip, q_clip), (frame, q_frame) = clip_side, frame_side
    s_clip, a_clip = max_prototype_scores(clip, q_clip)
    s_frame, a_frame = max_prototype_scores(frame, q_frame)
    total = weights[0] * s_clip + weights[1] * s_frame                                  # [Q, N]
    total[:, excluded] = -np.inf
    # Every video that could be in the top k is rescored one by one, so the reported scores and prototypes do
    # not depend on how the scan was blocked or on its precision: the streamed, in-memory and resident scans
    # (approximate by their `score_error`) print the same hits. EXACT_MARGIN keeps exact ties in.
    error = weights[0] * getattr(clip, "score_error", 0.0) + weights[1] * getattr(frame, "score_error", 0.0)
    _rescore_candidates(total, (s_clip, a_clip, clip, q_clip), (s_frame, a_frame, frame, q_frame), weights, k,
                        error + EXACT_MARGIN)
    return s_clip, a_clip, s_frame, a_frame, total


def _candidate_scores(ann, settings, clip_side, frame_side, weights, k: int, excluded: np.ndarray):
    """As `_scan_scores`, but only each query's approximate candidates are scored (exactly) and the rest are -inf;
    None when a query has fewer than k candidates (a narrow filter), for the caller to scan instead."""
    (clip, q_clip), (frame, q_frame) = clip_side, frame_side
    n_queries, n = len(q_clip), len(excluded)
    s_clip, s_frame = np.full((n_queries, n), -np.inf, np.float32), np.full((n_queries, n), -np.inf, np.float32)
    a_clip, a_frame = np.zeros((n_queries, n), np.int32), np.zeros((n_queries, n), np.int32)
    total = np.full((n_queries, n), -np.inf, np.float32)
    for qi in range(n_queries):
        videos = ann.candidates(q_clip[qi], q_frame[qi], weights, settings, excluded)
        if len(videos) < min(k, int((~excluded).sum())):
            return None
        for protos in (clip, frame):   # a library larger than memory: start every candidate's read at once
            getattr(protos, "prefetch", lambda videos: None)(videos)
        s_clip[qi, videos], a_clip[qi, videos] = exact_scores(clip, videos, q_clip[qi])
        s_frame[qi, videos], a_frame[qi, videos] = exact_scores(frame, videos, q_frame[qi])
        total[qi, videos] = weights[0] * s_clip[qi, videos] + weights[1] * s_frame[qi, videos]
    return s_clip, a_clip, s_frame, a_frame, total


def exact_scores(protos, videos: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max score, argmax prototype) of the given videos for one query [D]: float32 products taken video by
    video, the same whatever else was scored."""
    widened = np.ascontiguousarray(protos[videos], dtype=np.float32)                # [C, Lp, D]
    q = np.ascontiguousarray(query, dtype=np.float32)
    block = np.stack([np.dot(video, q) for video in widened]) if len(widened) else widened[:, :, 0]
    return block.max(-1), block.argmax(-1)


def _rescore_candidates(total, clip_side, frame_side, weights, k: int, error: float) -> None:
    """In place: for each query, scores recomputed video by video (the same float32 products whatever the
    scan was) for the videos within 2 x `error` of its k-th total, and -inf for the others (none of which can
    reach the top k)."""
    kk = min(k, total.shape[1])
    for qi in range(total.shape[0]):
        kth = np.partition(total[qi], -kk)[-kk]
        floor = kth - 2 * error if np.isfinite(kth) else -np.inf
        candidates = np.flatnonzero(np.isfinite(total[qi]) & (total[qi] >= floor))   # duplicates (-inf) stay out
        exact = np.zeros(len(candidates), dtype=np.float32)
        for w, (scores, arg, protos, queries) in zip(weights, (clip_side, frame_side)):
            scores[qi, candidates], arg[qi, candidates] = exact_scores(protos, candidates, queries[qi])
            exact += w * scores[qi, candidates]
        total[qi] = -np.inf
        total[qi, candidates] = exact


def rerank(hits: list[Hit], depth: int, proxy: np.ndarray, gamma: float) -> list[Hit]:
    """The first `depth` hits reordered by score + gamma * proxy (their new score); the rest kept, in order.

    `proxy` holds one proxy score per hit among the first `depth`; ranks are renumbered from 1.
    """
    head, tail = hits[:depth], hits[depth:]
    for hit, extra in zip(head, proxy):
        hit.score = float(hit.score + gamma * float(extra))
    head = sorted(head, key=lambda h: -h.score)
    for r, hit in enumerate(head + tail, 1):
        hit.rank = r
    return head + tail


def highlight_ranges(attention: np.ndarray, timestamps: np.ndarray, duration: float, fps: float,
                     mass: float = 0.5, max_ranges: int = 3) -> list[dict]:
    """Time ranges of the frames that carry the top `mass` of `attention` [T], merged, strongest first.

    Each frame stands for the 1/fps window around its timestamp; neighbouring
    selected frames merge into one range. Ranges lie inside [0, duration].
    """
    attention = np.asarray(attention, dtype=np.float64)
    total = attention.sum()
    if total <= 0 or len(attention) == 0:
        return []
    attention = attention / total
    order = np.argsort(-attention, kind="stable")
    n_pick = int(np.searchsorted(np.cumsum(attention[order]), mass - 1e-9) + 1)
    picked = np.zeros(len(attention), dtype=bool)
    picked[order[:n_pick]] = True
    half = 0.5 / fps
    ranges, start = [], None
    for i in range(len(attention) + 1):
        if i < len(attention) and picked[i]:
            start = i if start is None else start
        elif start is not None:
            lo, hi = start, i - 1
            ranges.append({"start": round(max(0.0, float(timestamps[lo]) - half), 3),
                           "end": round(min(duration, float(timestamps[hi]) + half), 3),
                           "weight": round(float(attention[lo:hi + 1].sum()), 4)})
            start = None
    ranges.sort(key=lambda r: -r["weight"])
    return ranges[:max_ranges]


def attach_highlights(hits: list[Hit], rows: dict[str, dict], weights: tuple[float, float]) -> None:
    """Fill each hit's highlights from the attention of its best clip and frame prototypes (weighted)."""
    for hit in hits:
        row = rows.get(hit.path)
        if row is None:
            continue
        stamps = np.asarray(row["timestamps"], dtype=np.float32)
        T = len(stamps)
        clip_attn = np.asarray(row["attn_clip"], dtype=np.float32).reshape(-1, T)[hit.clip_prototype]
        frame_attn = np.asarray(row["attn_frame"], dtype=np.float32).reshape(-1, T)[hit.frame_prototype]
        attention = weights[0] * clip_attn + weights[1] * frame_attn
        hit.duration = float(row["duration"])
        hit.highlights = highlight_ranges(attention, stamps, hit.duration, float(row["fps"]))
