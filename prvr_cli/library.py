"""The library: one video index with its encoder and prototype model, and what can be done with it.

`Library.open(path)` gives ingest, search, reindex, list, info and compact. The command line,
the benchmarks and a server all call this; it runs the pipeline stages
(discover -> decode -> encode -> prototypes -> store) and the index (store, search).
It takes settings already resolved (flag > PRVR_* > config file): a value of None means
"what the index was built with, else the default".
"""
from __future__ import annotations

import logging
import os

import numpy as np
from dataclasses import dataclass
from pathlib import Path

from .errors import IndexMissingError, MismatchError, UsageError
from .index import ann
from .index.search import HitFilter, SearchResults, attach_highlights, rank, rerank
from .index.matrices import published
from .index.meta import META_FILE, describe_builder, read_text_config
from .index.remote import RemoteIndex, is_remote, local_folder
from .index.store import Index
from .pipeline.discover import Discovered, discover
from .devices import resolve_device
from .pipeline.encode import FrameTextEncoder, describe, fingerprint
from .pipeline.ingest import DECODE_TIMEOUT, Summary, make_plan, rebuild_rows, run_ingest
from .pipeline.on_ray import Recipe, connect
from .query.searcher import Searcher

log = logging.getLogger("prvr")

DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED = "ViT-B-32", "openai"


@dataclass
class IngestReport:
    """What an ingest found and did (summary is None when nothing was found to do)."""

    found: Discovered
    summary: Summary | None = None
    index: str | None = None     # the folder, or the s3:// address

    @property
    def complete(self) -> bool:
        """No input failed or was skipped, and there was something to ingest."""
        return bool(self.found.files) and not self.found.skipped and not (self.summary and self.summary.failed)


class Library:
    """An index folder (or an index on object storage, `s3://...`, through its local mirror folder) and the user's
    cache folder (CLIP weights; search matrices of read-only indexes; mirrors of remote indexes)."""

    def __init__(self, root: str | Path, cache: Path, device: str = "auto"):
        self.cache, self.device = Path(cache), device
        self.remote = RemoteIndex.at(str(root), self.cache) if is_remote(root) else None
        self.root = local_folder(root, self.cache)
        self._pulled = False

    @classmethod
    def open(cls, root: str | Path, cache: str | Path, device: str = "auto") -> "Library":
        return cls(root, Path(cache), device)

    @property
    def location(self) -> str:
        """The index's folder, or its s3:// address."""
        return self.remote.uri if self.remote else str(self.root)

    def index(self, create: bool = False) -> Index:
        self._pulled = self.remote is not None
        return Index.open(self.root, create=create, cache_dir=self.cache / "indexes", remote=self.remote)

    def _pull_once(self) -> None:
        """Bring a remote index's mirror up to date before reading it without opening its tables."""
        if self.remote is not None and not self._pulled:
            self.remote.pull()
            self._pulled = True

    def filled_index(self) -> Index:
        """The index, which must hold videos."""
        idx = self.index()
        if idx.encoder_spec is None or idx.count() == 0:
            raise IndexMissingError(f"index {idx.location} is empty; add videos with `prvr ingest PATH`")
        return idx

    # ----- ingest and reindex --------------------------------------------------------------

    def ingest(self, paths: list[Path], *, glob: str | None = None, fps: float = 3.0, workers: int = 2,
               batch_size: int = 64, prune: bool = False, decode_timeout: float | None = None, decoder: str = "auto",
               clip_model: str | None = None, clip_pretrained: str | None = None, model: str | None = None,
               ray: str | None = None, wait=None, progress=None) -> IngestReport:
        """Index the videos under `paths`; `wait(root, pid)` waits for another writer instead of failing.

        With `ray` (a Ray address, or `local`), files are decoded and encoded on Ray actors (`pipeline.on_ray`)."""
        found = discover(paths, glob)
        if not found.files and not prune:
            return IngestReport(found)  # nothing to do: no index is made, no encoder loaded
        if ray:
            connect(ray, workers)      # before anything is written: a cluster that is not there is a usage error
        device, encoder, builder = resolve_device(self.device), None, None
        self._pull_once()
        if not (self.root / META_FILE).is_file():  # a new index: made only once its encoder and model have loaded
            encoder = FrameTextEncoder.load(clip_model or DEFAULT_CLIP_MODEL, clip_pretrained or
                                            DEFAULT_CLIP_PRETRAINED, device, cache_dir=str(self.cache / "clip"))
            builder = self._builder(model, encoder.spec(), device)
        idx = self.index(create=True)
        with idx.lock(wait=wait):
            encoder_source = self._encoder_source(idx, clip_model, clip_pretrained, default_weights=True)
            model = model if model is not None else idx.recorded_model()
            idx.repair()
            plan = make_plan(found.files, idx.file_states(), prune, workers)
            if encoder is None and (plan.encode or not idx.encoder_spec):
                encoder = FrameTextEncoder.load(*encoder_source, device, cache_dir=str(self.cache / "clip"))
            enc_spec = encoder.spec() if encoder else idx.encoder_spec
            self._check_encoder(idx, enc_spec)
            if builder is None or idx.builder_spec is not None:  # another process made the index meanwhile
                builder = self._builder(model, enc_spec, device)
            self._check_builder(idx, builder.spec())
            if idx.encoder_spec is None:
                idx.bind(enc_spec, builder.spec(), builder.output_dim(enc_spec["dim"]))
            idx.keep_model_copy(builder.spec())
            if progress is not None:
                progress.begin(len(plan.encode))
            recipe = Recipe(*encoder_source, model if builder.spec().get("kind") == "trained" else None, self.device,
                            str(self.cache / "clip")) if ray else None
            summary = run_ingest(idx, plan, encoder, builder, fps=fps, workers=workers, batch_size=batch_size,
                                 progress=progress, decode_timeout=DECODE_TIMEOUT if decode_timeout is None
                                 else decode_timeout, decoder=decoder, ray_address=ray, recipe=recipe)
            if summary.new or summary.changed or summary.moved or summary.pruned:
                idx.optimize()
            self._export_query_side(idx, encoder, builder)   # after the videos: they come first on a full disk
        return IngestReport(found, summary, idx.location)

    def reindex(self, model: str, progress=None) -> dict:
        """Rebuild every video's prototypes with `model` (a checkpoint or zero-shot) from stored frame features."""
        idx = self.filled_index()
        with idx.lock():
            builder = self._builder(model, idx.encoder_spec, resolve_device(self.device))
            if progress is not None:
                progress.begin(idx.count())
            rows = rebuild_rows(idx, builder, progress)
            idx.rebind_builder(builder.spec(), builder.output_dim(idx.encoder_spec["dim"]))
            self._export_query_side(idx, None, builder)
            idx.recreate_videos_table(rows)
            idx.optimize()
        return {"videos": len(rows), "builder": builder.spec()["fingerprint"]}

    # ----- search --------------------------------------------------------------------------

    def search(self, queries: list[str], k: int = 10, *, keep_duplicates: bool = False,
               clip_model: str | None = None, clip_pretrained: str | None = None,
               model: str | None = None, rerank_depth: int = 0, torch_free: bool = True,
               hit_filter: HitFilter = HitFilter(), candidates: str = "auto") -> SearchResults:
        """The k best videos for each query, with highlights; identical copies are one hit unless kept apart.

        With `rerank_depth` K, the first stage's top K are reordered by the model's text-proxy head.
        An index searched with its own encoder and model is searched without torch or LanceDB when its
        exported query side and current search cache are there (`prvr_cli.query`); otherwise, or with
        `torch_free=False`, the encoder and model are loaded, and the query side is exported for next time.
        `hit_filter` keeps only hits under a path glob (before the top k is taken) and above a score.
        `candidates`: auto, ann or exact: whether the videos scored are approximate candidates (`index.ann`).
        """
        ann.check_mode(candidates)
        if torch_free and not (clip_model or clip_pretrained or model or rerank_depth):
            self._pull_once()
            searcher = Searcher.open(self.root, self.cache / "indexes")
            if searcher is not None:
                return searcher.search(queries, k, keep_duplicates, hit_filter, candidates)
        idx = self.filled_index()
        source = self._encoder_source(idx, clip_model, clip_pretrained, default_weights=False)
        for value, flag in zip(source, ("--clip-model", "--clip-pretrained")):
            if value != "none" and (value.endswith(".json") or os.path.isabs(value)) and not os.path.exists(value):
                raise UsageError(f"index {idx.root} was built with the local CLIP file {value}, which is gone; pass "
                                 f"{flag} PATH with its new place")
        encoder = FrameTextEncoder.load(*source, self.device, cache_dir=str(self.cache / "clip"))
        builder = self._builder(model or idx.recorded_model(), encoder.spec(), encoder.device)
        self._check_builder(idx, builder.spec(), hint="search without --model or run `prvr reindex --model`")
        if not (clip_model or clip_pretrained or model):
            self._export_query_side(idx, encoder, builder)
        m = idx.search_matrices()
        q_clip, q_frame = builder.encode_queries(encoder, queries)
        weights = tuple(idx.builder_spec["branch_weights"])
        if rerank_depth:
            scorer = builder.proxy_scorer()      # refuses a model without a proxy head before any scoring
        ranked = rank(m.paths, m.clip, m.frame, q_clip, q_frame, weights, max(k, rerank_depth),
                      copy_of=None if keep_duplicates else m.copy_of, allowed=hit_filter.allowed(m.paths),
                      ann=ann.for_search(candidates, m.folder, m.clip, m.frame), ann_settings=ann.AnnSettings())
        if rerank_depth:
            for qi, hits in enumerate(ranked):
                videos = np.array([h.video for h in hits[:rerank_depth]], dtype=np.int64)
                extra = scorer(q_clip[qi], q_frame[qi], m.clip[videos], m.frame[videos])
                ranked[qi] = rerank(hits, rerank_depth, extra, scorer.gamma)
        ranked = [hit_filter.keep(hits[:k]) for hits in ranked]
        rows = idx.rows(sorted({h.path for hits in ranked for h in hits}),
                        ["timestamps", "attn_clip", "attn_frame", "duration", "fps"])
        for hits in ranked:
            attach_highlights(hits, rows, weights)
        cut = {q: n for q in queries if (n := encoder.cut_tokens(q))}
        return SearchResults(queries, ranked, cut)

    def forget(self, paths: list[str | Path]) -> tuple[list[str], list[str]]:
        """Drop the indexed videos at these paths (a file, or every video under a folder); they need not exist on
        disk any more. Returns (the indexed paths dropped, the given paths that matched none)."""
        idx = self.filled_index()
        with idx.lock():
            indexed = [r["path"] for r in self.videos()]
            dropped, unmatched = {}, []   # dict: each indexed path once, in the order found
            for given in paths:
                target = os.path.abspath(os.path.expanduser(str(given)))
                real = os.path.realpath(target)
                hits = [p for p in indexed if p in (target, real) or p.startswith(target.rstrip(os.sep) + os.sep)
                        or p.startswith(real.rstrip(os.sep) + os.sep)]
                if not hits:
                    unmatched.append(str(given))
                dropped.update(dict.fromkeys(hits))
            if dropped:
                idx.remove(list(dropped))
                idx.optimize()
        return list(dropped), unmatched

    # ----- what is there -------------------------------------------------------------------

    def videos(self) -> list[dict]:
        """One record per indexed video, by path."""
        table = self.index().videos
        if table is None:
            return []
        columns = ["path", "duration", "n_frames", "size", "ingested_at"]
        return sorted(table.to_arrow().select(columns).to_pylist(), key=lambda r: r["path"])

    def info(self) -> dict:
        """Where the index is, what built it, its size and table versions (its tables are read through first), and
        the approximate search candidates of its current search cache (None: searches score every video)."""
        idx = self.index()
        idx.verify()
        cache = published(self.root, self.cache / "indexes")
        layout = ann.AnnCandidates.open(cache) if cache is not None else None
        return {"index": idx.location, "format": idx.meta["format"], "videos": idx.count(),
                "disk_bytes": self.usage(), "encoder": idx.encoder_spec or {},
                "builder": idx.builder_spec or {}, "table_versions": idx.versions(),
                "candidates": layout.info if layout is not None else None}

    def compact(self) -> tuple[int, int]:
        """Merge small table files and drop every old table version; returns the folder's bytes before and after."""
        idx = self.index()
        before = self.usage()
        with idx.lock():
            idx.optimize(grace=0)
        return before, self.usage()

    def usage(self) -> int:
        """Bytes the index takes where it lives (the folder, or the objects at its s3:// address)."""
        return self.remote.disk_usage() if self.remote else disk_usage(self.root)

    def optimize(self) -> dict:
        """Compact the tables (as `compact`), then retrain the approximate candidates of a library that has them or
        is large enough to (`index.ann`) on its current prototypes. Returns what was done."""
        idx = self.index()
        before = self.usage()
        with idx.lock():
            idx.optimize(grace=0)
            m = idx.search_matrices(retrain=True)  # a new version's cache trains its candidates here, once
            layout = ann.AnnCandidates.open(m.folder) if m.folder is not None else None
            if m.folder is None or (layout is None and len(m.paths) < ann.ANN_MIN_VIDEOS):
                info = None
            elif layout is not None and layout.info.get("trained"):
                info = layout.info     # trained afresh on exactly these prototypes
            else:
                info = ann.rebuild(m.folder, m.clip, m.frame)
        return {"bytes_before": before, "bytes_after": self.usage(), "videos": len(m.paths), "candidates": info}

    # ----- identity ------------------------------------------------------------------------

    @staticmethod
    def _encoder_source(idx: Index, clip_model: str | None, clip_pretrained: str | None,
                        default_weights: bool) -> tuple[str, str]:
        """(model, weights) to load: given values, else the index's, else the defaults; checked against the index."""
        recorded = idx.encoder_spec["source"] if idx.encoder_spec else {}
        name = clip_model or recorded.get("clip_model") or DEFAULT_CLIP_MODEL
        weights = clip_pretrained or (recorded.get("clip_pretrained") or "none" if recorded else
                                      DEFAULT_CLIP_PRETRAINED if default_weights else "none")
        if idx.encoder_spec and (clip_model or clip_pretrained):
            identity, _ = describe(name, weights)
            Library._check_encoder(idx, {**identity, "fingerprint": fingerprint(identity)})
        return name, weights

    @staticmethod
    def _check_encoder(idx: Index, spec: dict) -> None:
        old = idx.encoder_spec
        if old is not None and old["fingerprint"] != spec["fingerprint"]:
            raise MismatchError(f"index {idx.root} holds features of CLIP {old['clip_model']}/{old['clip_pretrained']}, "
                                f"not {spec['clip_model']}/{spec['clip_pretrained']}; use the same --clip-model/"
                                "--clip-pretrained or another --index")

    @staticmethod
    def _check_builder(idx: Index, spec: dict, hint: str = "pass the same --model, or rebuild them with "
                                                            "`prvr reindex --model CKPT`") -> None:
        old = idx.builder_spec
        if old is not None and old["fingerprint"] != spec["fingerprint"]:
            raise MismatchError(f"index {idx.root} holds prototypes from {describe_builder(old)}, not "
                                f"{describe_builder(spec)}; {hint}")

    @staticmethod
    def _export_query_side(idx: Index, encoder, builder) -> None:
        """Export what a torch-free search of `idx` needs and is missing or stale (`pipeline.text_side`); a read-only
        or full disk only costs the next search its speed."""
        from .pipeline.text_side import export_query_branch, export_text_tower

        try:
            if encoder is not None:
                export_text_tower(encoder, idx.root)
            found = read_text_config(idx.root, "query_branch")
            if (found or {}).get("builder") != builder.spec()["fingerprint"]:
                export_query_branch(builder, idx.root)
        except Exception as e:  # noqa: BLE001 - an optimisation: any failure leaves the full path, never a lost write
            log.warning("the query side was not exported to %s (%s); searches load the encoder with torch",
                        idx.root, str(e).splitlines()[0][:160] if str(e) else type(e).__name__)

    @staticmethod
    def _builder(model: str | None, encoder_spec: dict, device: str):
        """The prototype builder: a trained ProtoPRVR checkpoint, or zero-shot CLIP prototypes."""
        from .pipeline.prototypes import load_builder

        return load_builder(model, encoder_spec, device)


def disk_usage(root: Path) -> int:
    """Bytes of all files under `root`."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
