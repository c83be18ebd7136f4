"""Approximate candidates for large libraries: an inverted file over every prototype, then exact scoring.

Each branch's prototypes are clustered by k-means (trained on a sample), and each prototype's residual
from its centroid is product-quantised (IVFADC, as in FAISS's IVF-PQ): `SUBSPACES` bytes per prototype.
A query scores the centroids and probes its best few per branch. The probed prototypes' scores are
approximated as centroid score + residual score (table lookups), and a video's branch score as the max
over its probed prototypes. A video probed in one branch only is first given, for the other, the
max of its prototypes' centroid scores (cheap: the centroid interaction of PLAID); the
`SHORTLIST` x `depth` best by that total then get the centroid + residual approximation over all
their prototypes in that branch instead. The `depth` best videos by
the approximate total are then scored exactly from the stored prototypes, so every reported score is
exact and only the candidate set is approximate.

Files, beside the prototype matrices of a cache folder (per branch b):

    ann_b_centroids.npy   [C, D] float32
    ann_b_codes.npy       [N, Lp] uint16: each prototype's centroid
    ann_b_offsets.npy     [C + 1] int64: where each centroid's list starts
    ann_b_rows.npy        [N * Lp] int32: the lists, concatenated: prototype rows (video * Lp + slot)
    ann_b_pq.npy          [N * Lp, S] uint8: the residual codes, by prototype row
    ann_b_codebooks.npy   [S, 256, D / S] float32
    ann.json              the layout's parameters; written last, it marks the layout complete
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UsageError

BRANCHES = ("clip", "frame")
MARKER = "ann.json"
ANN_MIN_VIDEOS = 50_000     # `auto` uses the candidates from this size up (docs/scaling.md: where a scan of every
                            # video passes 100 ms on a 2-core CPU and the candidates still find 0.98 of the top ten)
SAMPLE_PER_CENTROID = 64    # k-means trains on at most this many prototypes per centroid
KMEANS_ROUNDS = 10
ASSIGN_ROWS = 1 << 14       # prototypes assigned per matrix product
SUBSPACES = 32              # product-quantisation bytes per prototype
PQ_CODES = 256
PQ_SAMPLE = 65536           # residuals the codebooks train on
PQ_ROUNDS = 6
SHORTLIST = 4               # times depth: candidates whose unprobed branch is refined with residuals


@dataclass(frozen=True)
class AnnSettings:
    """How many centroids are probed per branch and how many candidates are scored exactly, per query."""

    probe: int = 32      # docs/scaling.md: at 100k videos, depth 1024 keeps recall@10 at 0.97 for 85 ms
    depth: int = 1024


def centroid_count(n_prototypes: int) -> int:
    """A power of two near sqrt(prototypes), from 64 to 16384 (a code fits uint16)."""
    target = np.sqrt(max(n_prototypes, 1))
    return int(min(16384, max(64, 2 ** round(np.log2(target)))))


def _assign(rows: np.ndarray, centroids: np.ndarray, half_norms: np.ndarray) -> np.ndarray:
    """Nearest centroid (Euclidean) of each row: argmax of x.c - |c|^2 / 2."""
    return np.argmax(rows @ centroids.T - half_norms, axis=1)


def _assign_all(rows: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    half_norms = 0.5 * (centroids ** 2).sum(1)
    return np.concatenate([_assign(rows[i:i + ASSIGN_ROWS], centroids, half_norms)
                           for i in range(0, len(rows), ASSIGN_ROWS)])


def subspaces(dim: int) -> int:
    """Product-quantisation subspaces for vectors of `dim`: 32 when it divides, else the largest divisor below."""
    return next(s for s in range(min(SUBSPACES, dim), 0, -1) if dim % s == 0)


def kmeans(sample: np.ndarray, n_centroids: int, rng: np.random.Generator, rounds: int = KMEANS_ROUNDS) -> np.ndarray:
    """Lloyd's k-means on `sample` [S, D] float32 from random distinct rows; an emptied centroid restarts at a
    random row."""
    n_centroids = min(n_centroids, len(sample))
    centroids = sample[rng.choice(len(sample), n_centroids, replace=False)].copy()
    for _ in range(rounds):
        codes = _assign_all(sample, centroids)
        counts = np.bincount(codes, minlength=n_centroids)
        sums = np.zeros_like(centroids)
        np.add.at(sums, codes, sample)
        empty = counts == 0
        centroids[~empty] = sums[~empty] / counts[~empty, None]
        centroids[empty] = sample[rng.choice(len(sample), int(empty.sum()), replace=False)]
    return centroids.astype(np.float32)


def _pq_encode(residuals: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """Product-quantisation codes [n, S] uint8 of residuals [n, D]."""
    width = codebooks.shape[2]
    return np.stack([_assign(residuals[:, i * width:(i + 1) * width], book, 0.5 * (book ** 2).sum(1))
                     for i, book in enumerate(codebooks)], axis=1).astype(np.uint8)


def build_branch(protos, folder: Path, branch: str, trained: tuple | None, rng: np.random.Generator) -> int:
    """Write branch `branch`'s layout for `protos` ([N, Lp, D], an array or a `matrices.PrototypeFile`) into
    `folder`, training centroids and codebooks unless `trained` gives them. Returns the number of centroids."""
    n, lp, d = protos.shape
    if trained is None:
        n_centroids = centroid_count(n * lp)
        videos = np.sort(rng.choice(n, min(n, max(1, SAMPLE_PER_CENTROID * n_centroids // lp)), replace=False))
        sample = np.asarray(protos[videos], dtype=np.float32).reshape(-1, d)
        centroids = kmeans(sample, n_centroids, rng)
        residuals = sample - centroids[_assign_all(sample, centroids)]
        residuals = residuals[rng.choice(len(residuals), min(len(residuals), PQ_SAMPLE), replace=False)]
        width = d // subspaces(d)
        codebooks = np.stack([kmeans(residuals[:, i * width:(i + 1) * width], PQ_CODES, rng, PQ_ROUNDS)
                              for i in range(subspaces(d))])
    else:
        centroids, codebooks = trained
    codes = np.empty((n, lp), dtype=np.uint16)
    pq = np.empty((n * lp, codebooks.shape[0]), dtype=np.uint8)
    per_block = max(1, ASSIGN_ROWS // lp)
    for v0 in range(0, n, per_block):
        block = np.asarray(protos[v0:min(n, v0 + per_block)], dtype=np.float32).reshape(-1, d)
        assigned = _assign_all(block, centroids)
        codes[v0:v0 + per_block] = assigned.reshape(-1, lp)
        pq[v0 * lp:v0 * lp + len(block)] = _pq_encode(block - centroids[assigned], codebooks)
    order = np.argsort(codes.ravel(), kind="stable")
    np.save(folder / f"ann_{branch}_codes.npy", codes)
    np.save(folder / f"ann_{branch}_rows.npy", order.astype(np.int32))
    np.save(folder / f"ann_{branch}_pq.npy", pq)
    np.save(folder / f"ann_{branch}_offsets.npy",
            np.searchsorted(codes.ravel()[order], np.arange(len(centroids) + 1)).astype(np.int64))
    np.save(folder / f"ann_{branch}_codebooks.npy", codebooks.astype(np.float32))
    np.save(folder / f"ann_{branch}_centroids.npy", centroids)
    return len(centroids)


def build(folder: Path, clip, frame, previous: Path | None = None, seed: int = 0) -> dict:
    """Write both branches' layouts into `folder`, reusing the centroids of `previous` (an older cache folder's
    layout of the same width) instead of training new ones. Returns what ann.json records."""
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    info = {"videos": int(clip.shape[0]), "prototypes": int(clip.shape[1]), "centroids": {},
            "trained": previous is None}
    for branch, protos in zip(BRANCHES, (clip, frame)):
        reused = None
        if previous is not None:
            reused = (np.load(previous / f"ann_{branch}_centroids.npy"),
                      np.load(previous / f"ann_{branch}_codebooks.npy"))
            if reused[0].shape[1] != protos.shape[2]:
                reused, info["trained"] = None, True
        info["centroids"][branch] = build_branch(protos, folder, branch, reused, rng)
    info["seconds"] = round(time.perf_counter() - start, 2)
    (folder / MARKER).write_text(json.dumps(info))
    return info


class AnnCandidates:
    """A cache folder's layout, memory-mapped: the candidates of a query."""

    def __init__(self, folder: Path):
        self.info = json.loads((folder / MARKER).read_text())
        self.n_videos, self.lp = int(self.info["videos"]), int(self.info["prototypes"])
        self.parts = {b: {part: np.load(folder / f"ann_{b}_{part}.npy", mmap_mode="r" if part in ("codes", "rows", "pq")
                                        else None)
                          for part in ("centroids", "codes", "offsets", "rows", "pq", "codebooks")} for b in BRANCHES}

    @classmethod
    def open(cls, folder: Path) -> "AnnCandidates | None":
        """The layout of a cache folder, or None if it has none (or a damaged one)."""
        if not (folder / MARKER).is_file():
            return None
        try:
            return cls(folder)
        except (OSError, ValueError, KeyError):
            return None

    def _probed(self, branch: str, query: np.ndarray, probe: int) -> tuple[tuple, np.ndarray]:
        """(the query's centroid scores and residual tables, approximate branch score per video [N], -inf where
        none of its prototypes was probed)."""
        p = self.parts[branch]
        scores = p["centroids"] @ query
        width = p["codebooks"].shape[2]
        tables = np.einsum("swd,sd->sw", p["codebooks"], query.reshape(len(p["codebooks"]), width))  # [S, 256]
        probe = min(probe, len(scores))
        lists = [np.asarray(p["rows"][p["offsets"][c]:p["offsets"][c + 1]])
                 for c in np.argpartition(-scores, probe - 1)[:probe]]
        rows = np.sort(np.concatenate(lists))
        best = np.full(self.n_videos, -np.inf, dtype=np.float32)
        np.maximum.at(best, rows // self.lp, self._approx(branch, (scores, tables), rows))
        return (scores, tables), best

    def _approx(self, branch: str, query_tables: tuple, rows: np.ndarray) -> np.ndarray:
        """Approximate scores of prototype rows (ascending): centroid score + residual score."""
        p, (scores, tables) = self.parts[branch], query_tables
        codes = p["codes"].reshape(-1)
        residual = tables[np.arange(len(tables)), np.asarray(p["pq"][rows])].sum(1)
        return (scores[codes[rows]] + residual).astype(np.float32)

    def candidates(self, q_clip: np.ndarray, q_frame: np.ndarray, weights: tuple[float, float],
                   settings: AnnSettings, excluded: np.ndarray | None = None) -> np.ndarray:
        """The videos (ascending) among the `settings.depth` best by approximate total score for one query
        (vectors [D] per branch); `excluded` (per video) never counts."""
        probed = {b: self._probed(b, np.asarray(q, dtype=np.float32), settings.probe)
                  for b, q in zip(BRANCHES, (q_clip, q_frame))}
        seen = np.isfinite(probed["clip"][1]) | np.isfinite(probed["frame"][1])
        if excluded is not None:
            seen &= ~excluded
        videos = np.flatnonzero(seen)
        if len(videos) <= settings.depth:
            return videos
        branches = {b: probed[b][1][videos] for b in BRANCHES}
        for b in BRANCHES:   # unprobed branches: the centroid scores of the video's prototypes, for now
            missing = np.flatnonzero(~np.isfinite(branches[b]))
            codes = np.asarray(self.parts[b]["codes"][videos[missing]])
            branches[b][missing] = probed[b][0][0][codes].max(-1)
        total = sum(w * branches[b] for w, b in zip(weights, BRANCHES))
        keep = min(len(videos), SHORTLIST * settings.depth)
        short = np.argpartition(-total, keep - 1)[:keep]
        videos, total = videos[short], np.zeros(keep, dtype=np.float32)
        for w, b in zip(weights, BRANCHES):
            query_tables, best = probed[b]
            branch = best[videos]
            missing = np.flatnonzero(~np.isfinite(branch))
            if len(missing):   # none of these videos' prototypes was probed here: approximate all of them
                rows = (videos[missing, None] * self.lp + np.arange(self.lp)).reshape(-1)
                branch[missing] = self._approx(b, query_tables, rows).reshape(-1, self.lp).max(-1)
            total += w * branch
        return np.sort(videos[np.argpartition(-total, settings.depth - 1)[:settings.depth]])


MODES = ("auto", "ann", "exact")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UsageError(f"--candidates {mode!r}: use auto, ann or exact")
    return mode


def previous_layout(cache: Path) -> Path | None:
    """The newest other cache folder beside `cache` that holds a complete layout (its centroids are reused)."""
    newest, when = None, -1.0
    for folder in cache.parent.glob("videos-v*"):
        try:    # another process may remove a folder at any moment
            mtime = (folder / MARKER).stat().st_mtime if folder != cache else -1.0
        except OSError:
            continue
        if mtime > when:
            newest, when = folder, mtime
    return newest


def for_search(mode: str, cache: Path | None, clip, frame) -> "AnnCandidates | None":
    """The candidates a search uses: none for `exact`; the cache's layout, if it has one, for `auto`; for `ann`,
    the layout, built now into the cache folder if it has none."""
    if check_mode(mode) == "exact":
        return None
    layout = AnnCandidates.open(cache) if cache is not None else None
    if layout is not None or mode == "auto":
        return layout
    if cache is None:
        raise UsageError("--candidates ann needs a search cache, and this index has no folder to hold one "
                         "(a read-only index without a user cache folder); search with --candidates exact")
    rebuild(cache, clip, frame, previous_layout(cache))
    return AnnCandidates.open(cache)


def rebuild(cache: Path, clip, frame, previous: Path | None = None) -> dict:
    """(Re)write the layout of a published cache folder: built aside, then moved in with its marker last, so a
    search sees the old layout or the new one, or (for a moment between the files) none."""
    (cache / MARKER).unlink(missing_ok=True)
    tmp = cache / f"ann.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        info = build(tmp, clip, frame, previous)
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == MARKER):   # the marker last
            os.replace(f, cache / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info
