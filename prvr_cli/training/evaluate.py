"""PRVR evaluation: every query ranks every video of its split.

Protocol (as in MS-SL and its successors): a query's ground truth is the one video
it was written for; R@K is the percentage of queries whose ground-truth video is
among the K best-scored videos of the split, and SumR = R@1 + R@5 + R@10 + R@100.
Ties count against the model (a video scoring exactly as high as the ground truth
ranks ahead of it), so a constant scorer gets no credit.

Videos and queries are encoded in padded chunks, sorted by length to waste little
padding, and scored in [query chunk x video chunk] blocks.
"""
from __future__ import annotations

import torch

from .datasets import Split
from ..nets.retrieval import RetrievalModel

KS = (1, 5, 10, 100)


def length_chunks(lengths: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Index chunks of about `size`, with sequences of similar length together."""
    order = torch.argsort(lengths, stable=True)
    return [order[i:i + size] for i in range(0, len(order), size)]


@torch.no_grad()
def encode_split(model: RetrievalModel, split: Split, device="cpu", video_chunk: int = 256,
                 query_chunk: int = 1024) -> tuple[list, list]:
    """Every video and query of `split` encoded in chunks: ([(video indices, VideoEncoding)], [(query indices,
    QueryEncoding)])."""
    videos, queries = [], []
    for idx in length_chunks(split.frames.lengths, video_chunk):
        frames, mask = split.frames.batch(idx)
        videos.append((idx, model.encode_videos(frames.to(device), mask.to(device))))
    for idx in length_chunks(split.tokens.lengths, query_chunk):
        tokens, mask = split.tokens.batch(idx)
        queries.append((idx, model.encode_queries(tokens.to(device), mask.to(device))))
    return videos, queries


@torch.no_grad()
def score_encoded(model: RetrievalModel, videos: list, queries: list, n_queries: int, n_videos: int) -> torch.Tensor:
    """Similarity [Q, V] (on CPU) of chunked encodings from `encode_split`, placed by their indices."""
    scores = torch.empty(n_queries, n_videos)
    v_idx = torch.cat([idx for idx, _ in videos])
    for q_idx, encoded in queries:
        block = torch.cat([model.score(encoded, enc) for _, enc in videos], 1).float().cpu()
        scores[q_idx.unsqueeze(1), v_idx.unsqueeze(0)] = block
    return scores


def score_matrix(model: RetrievalModel, split: Split, device="cpu", video_chunk: int = 256,
                 query_chunk: int = 1024) -> torch.Tensor:
    """Similarity [Q, V] (on CPU) of every query of `split` with every video of it, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        videos, queries = encode_split(model, split, device, video_chunk, query_chunk)
        return score_encoded(model, videos, queries, split.n_queries, split.n_videos)
    finally:
        model.train(was_training)


def gt_ranks(scores: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """1-based rank [Q] of each query's ground-truth video (ties ranked ahead of it)."""
    gt_score = scores.gather(1, gt.view(-1, 1))
    return (scores >= gt_score).sum(1)


def recall_metrics(ranks: torch.Tensor, ks=KS) -> dict[str, float]:
    """R@K in percent for each K, and their sum."""
    metrics = {f"R@{k}": 100.0 * (ranks <= k).float().mean().item() for k in ks}
    metrics["SumR"] = sum(metrics.values())
    metrics["MedR"] = float(ranks.float().median().item())
    return metrics


def evaluate(model: RetrievalModel, split: Split, device="cpu", **chunks) -> dict[str, float]:
    """R@1/5/10/100, SumR and median rank of `model` on `split`."""
    scores = score_matrix(model, split, device, **chunks)
    return recall_metrics(gt_ranks(scores, split.query_video))


def ranking(model: RetrievalModel, split: Split, device="cpu", top_k: int | None = 100, **chunks) -> dict:
    """The full ranking of a split, for benchmarks and analysis.

    Returns video_ids, cap_ids, gt [Q] (ground-truth video index), ranks [Q] (1-based),
    top [Q, K] video indices best first and top_scores [Q, K] (K = all videos when top_k is None),
    and metrics.
    """
    scores = score_matrix(model, split, device, **chunks)
    ranks = gt_ranks(scores, split.query_video)
    k = split.n_videos if top_k is None else min(top_k, split.n_videos)
    top_scores, top = scores.topk(k, dim=1)
    return {"video_ids": split.video_ids, "cap_ids": split.cap_ids, "gt": split.query_video, "ranks": ranks,
            "top": top, "top_scores": top_scores, "metrics": recall_metrics(ranks)}
