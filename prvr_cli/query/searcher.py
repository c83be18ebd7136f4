"""Search without torch or LanceDB: the exported text side and the published search matrices of an index.

`Searcher.open` returns None unless everything a search needs is there and current: the text
tower exported for the index's encoder, the query branch for its trained model (none for zero-shot),
and the search cache of the videos table's newest version. The caller then searches the full way.
Results equal the full path's: the same float32 weights, matrices, ranking and highlights.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from ..errors import random_weights_warning
from ..index import ann
from ..index.matrices import PrototypeFile, ResidentPrototypes, published
from ..index.meta import META_FILE, TEXT_FOLDER, read_meta, read_text_config
from ..index.search import HitFilter, SearchResults, attach_highlights, rank
from .tokenizer import Tokenizer
from .towers import QueryBranch, TextTower


class Searcher:
    """One index's query side and search matrices, loaded without torch."""

    def __init__(self, meta: dict, text: Path, cache: Path, trained: bool, in_memory: bool = False):
        import pyarrow as pa

        self.tower = TextTower(text)
        self.tokenizer = Tokenizer(text / "vocab.txt.gz", self.tower.config["context_length"])
        self.branch = QueryBranch(text) if trained else None
        self.weights = tuple(meta["builder"]["branch_weights"])
        self.paths = json.loads((cache / "videos.json").read_text())["paths"]
        self.path_set = frozenset(self.paths)
        self.copy_of = np.load(cache / "copy_of.npy")
        self.cache = cache
        self.clip, self.frame = PrototypeFile(cache / "proto_clip.npy"), PrototypeFile(cache / "proto_frame.npy")
        if in_memory:   # a server: bfloat16 in memory, scored by torch (which a server can afford to import)
            self.clip, self.frame = ResidentPrototypes(self.clip), ResidentPrototypes(self.frame)
        self.layouts: dict = {}      # candidate mode -> the approximate candidates it uses (None: scan)
        self.rows = pa.ipc.open_file(pa.memory_map(str(cache / "rows.arrow"))).read_all()

    @classmethod
    def open(cls, root: Path, user_cache: Path | None = None, in_memory: bool = False) -> "Searcher | None":
        """The index's torch-free searcher, or None when it lacks a current export or cache.

        A damaged index.json raises the same CorruptError as the full path; anything else unexpected
        returns None, and the full path reports it.
        """
        if not (root / META_FILE).is_file():
            return None
        meta = read_meta(root)
        try:
            text = root / TEXT_FOLDER
            encoder, builder = meta["encoder"], meta["builder"]
            clip_text = read_text_config(root, "clip_text") or {}
            if clip_text.get("encoder") != encoder["fingerprint"]:
                return None
            trained = builder.get("kind") == "trained"
            if trained and (read_text_config(root, "query_branch") or {}).get("builder") != builder["fingerprint"]:
                return None
            cache = published(root, user_cache)
            if cache is None:
                return None
            if encoder.get("clip_pretrained") == "none":
                warnings.warn(random_weights_warning(encoder.get("clip_model")), stacklevel=2)
            return cls(meta, text, cache, trained, in_memory)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None  # a damaged export or cache, or an unfinished index: the full path deals with it

    def encode(self, queries: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Query vectors per branch [Q, D] (the pooled CLIP feature for zero-shot indexes)."""
        ids = self.tokenizer(queries)
        if self.branch is None:
            q = self.tower.pooled(ids)
            return q, q
        vectors = [self.branch(tokens) for tokens in self.tower.per_token(ids)]
        return np.stack([v[0] for v in vectors]), np.stack([v[1] for v in vectors])

    def search(self, queries: list[str], k: int, keep_duplicates: bool = False,
               hit_filter: HitFilter = HitFilter(), candidates: str = "auto") -> SearchResults:
        """`candidates`: auto (approximate candidates where the cache has them), ann or exact (see index.ann)."""
        layout = self.layouts.get(candidates)
        if candidates not in self.layouts:
            layout = self.layouts[candidates] = ann.for_search(candidates, self.cache, self.clip, self.frame)
        q_clip, q_frame = self.encode(queries)
        ranked = rank(self.paths, self.clip, self.frame, q_clip, q_frame, self.weights, k,
                      copy_of=None if keep_duplicates else self.copy_of, allowed=hit_filter.allowed(self.paths),
                      ann=layout, ann_settings=ann.AnnSettings())
        ranked = [hit_filter.keep(hits) for hits in ranked]
        wanted = sorted({h.video for hits in ranked for h in hits})
        # one zero-copy slice per hit: `take` on the memory-mapped table gathered its chunks into memory first
        # (1.4 GB at 100k videos)
        rows = {row["path"]: row for i in wanted for row in self.rows.slice(i, 1).to_pylist()}
        for hits in ranked:
            attach_highlights(hits, rows, self.weights)
        return SearchResults(queries, ranked, {q: n for q in queries if (n := self.tokenizer.cut_tokens(q))})
