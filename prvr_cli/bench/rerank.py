"""`prvr bench rerank`: what text-proxy re-ranking of the top K adds, in accuracy and in time per query.

The checkpoint's base model scores the test split (first stage); the proxy head then reorders each query's top K
with the gamma chosen on val at training time. Time is the proxy scoring of K candidates for one query at a
time, as `prvr search --rerank K` runs it (median over the timed queries).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from .common import load_average
from ..nets.factory import load_checkpoint
from ..nets.text_proxy import load_proxy_head
from ..training.evaluate import gt_ranks, recall_metrics
from ..training.proxy import proxy_pair_scores, rerank_proxy_scores, reranked_ranks, split_vectors


def bench_rerank(checkpoint: Path, data, depths: list[int], device: str = "cpu", timed_queries: int = 200) -> dict:
    model, meta = load_checkpoint(checkpoint)
    model = model.to(device)
    head, gamma = load_proxy_head(meta, int(model.output_dim))
    weights = (float(model.cfg.clip_weight), float(model.cfg.frame_weight))
    test = data.splits["test"]
    vectors = split_vectors(model, test, device)
    gt = test.query_video
    rows = [{"k": 0, "gamma": 0.0, **recall_metrics(gt_ranks(vectors["first"], gt)), "ms_per_query": 0.0}]
    for k in depths:
        top, proxy = rerank_proxy_scores(head, weights, vectors, k)
        times = []
        with torch.no_grad():
            for qi in range(min(timed_queries, top.shape[0])):
                started = time.perf_counter()
                proxy_pair_scores(head, weights, vectors, torch.full((top.shape[1],), qi), top[qi])
                times.append(1000 * (time.perf_counter() - started))
        rows.append({"k": k, "gamma": gamma, **recall_metrics(reranked_ranks(vectors["first"], top, proxy, gamma, gt)),
                     "ms_per_query": round(statistics.median(times), 2)})
    return {"checkpoint": str(checkpoint), "method": meta["config"]["method"], "gamma": gamma,
            "val_sumr": meta["proxy"].get("val_sumr"), "epoch": meta["proxy"].get("epoch"),
            "queries": test.n_queries, "videos": test.n_videos,
            "device": device, "torch_threads": torch.get_num_threads(), "load_average": load_average(), "rows": rows}
