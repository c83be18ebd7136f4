"""Retrieval losses shared by MS-SL, GMMFormer and ProtoPRVR.

Every loss takes a score matrix `scores` [Q, B] (query q against video b of the
batch) and `video_index` [Q] (the batch video each query describes). A video may
have several queries in the batch; every video column is expected to own at
least one query (columns without one are left out of the video-to-text terms).

Semantics follow the MS-SL / GMMFormer training code:

* `triplet_loss`: hinge `margin + s_neg - s_pos` in both directions, summed and
  divided by the number of queries (text-to-video) and of videos (video-to-text).
  Text-to-video: the positive is the query's own video, the negative one other
  video drawn uniformly at random, or, with `hard=True`, uniformly among the
  `hard_pool` highest-scoring other videos. Video-to-text: the positive is the
  mean score of the video's queries, the negative one query of another video,
  random or (hard) uniformly among the `v2t_hard_pool` highest (1 = the hardest).
* `infonce_loss`: text-to-video cross-entropy over the videos of the batch plus
  video-to-text cross-entropy over the queries where all the video's queries are
  positives (log-sum-exp of the positives against log-sum-exp of the column).
  MS-SL and GMMFormer apply it to raw dot products (no temperature).
* `paired_infonce_loss`: MS-SL's frame-level NCE on a square matrix whose
  diagonal holds the positives; one softmax per pair over its row and column.
* `query_diverse_loss`: GMMFormer's push-apart term between queries of one video.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def positive_mask(video_index: torch.Tensor, n_videos: int) -> torch.Tensor:
    """Bool [Q, B]: True where query q describes video b."""
    return video_index.view(-1, 1) == torch.arange(n_videos, device=video_index.device).view(1, -1)


def _sample_negatives(scores: torch.Tensor, negative: torch.Tensor, pool: torch.Tensor | None) -> torch.Tensor:
    """For each row pick one negative score: uniformly among the `pool` best negatives (None: all).

    scores, negative: [R, C]; pool: [R] long or None. Rows without a negative give -inf.
    """
    n_neg = negative.sum(1)                                                   # [R]
    key = scores.detach().masked_fill(~negative, float("-inf"))
    order = key.argsort(dim=1, descending=True)                               # negatives first, best first
    limit = n_neg if pool is None else torch.minimum(n_neg, pool)
    rank = (torch.rand(scores.shape[0], device=scores.device) * limit.clamp(min=1)).long()
    rank = torch.minimum(rank, (limit - 1).clamp(min=0))
    pick = order.gather(1, rank.view(-1, 1)).squeeze(1)
    picked = scores.gather(1, pick.view(-1, 1)).squeeze(1)
    return picked.masked_fill(n_neg == 0, float("-inf"))


def triplet_loss(scores: torch.Tensor, video_index: torch.Tensor, margin: float, hard: bool,
                 hard_pool: int = 20, v2t_hard_pool: int = 1) -> torch.Tensor:
    """Bidirectional hinge ranking loss with one sampled negative per query and per video (see module doc)."""
    Q, B = scores.shape
    pos = positive_mask(video_index, B)                                       # [Q, B]
    # text -> video
    s_pos = scores.gather(1, video_index.view(-1, 1)).squeeze(1)              # [Q]
    pool = torch.full((Q,), hard_pool, device=scores.device) if hard else None
    s_neg = _sample_negatives(scores, ~pos, pool)
    t2v = (margin + s_neg - s_pos).clamp(min=0)                               # -inf negatives give 0
    loss = t2v.sum() / Q
    # video -> text
    has_query = pos.any(0)                                                    # [B]
    s_pos_v = (scores * pos).sum(0) / pos.sum(0).clamp(min=1)                 # mean over the video's queries
    cols = scores.t()                                                         # [B, Q]
    pool_v = torch.full((B,), v2t_hard_pool, device=scores.device) if hard else None
    s_neg_v = _sample_negatives(cols, ~pos.t(), pool_v)
    v2t = torch.where(has_query, (margin + s_neg_v - s_pos_v).clamp(min=0), torch.zeros_like(s_pos_v))
    return loss + v2t.sum() / has_query.sum().clamp(min=1)


def infonce_loss(scores: torch.Tensor, video_index: torch.Tensor, temperature: float | None = None,
                 extra_negatives: torch.Tensor | None = None, video_to_text: bool = True) -> torch.Tensor:
    """Bidirectional InfoNCE; a video's queries are all positives in the video-to-text direction.
    `extra_negatives` [Q, M] (same scale as `scores`) join each query's text-to-video softmax only.
    `video_to_text=False` keeps the text-to-video term alone (the retrieval task's direction)."""
    if temperature is not None:
        scores = scores / temperature
        extra_negatives = None if extra_negatives is None else extra_negatives / temperature
    Q, B = scores.shape
    pos = positive_mask(video_index, B)
    row = scores if extra_negatives is None else torch.cat([scores, extra_negatives], dim=1)
    t2v = torch.logsumexp(row, dim=1) - scores.gather(1, video_index.view(-1, 1)).squeeze(1)
    if not video_to_text:
        return t2v.mean()
    has_query = pos.any(0)
    neg_inf = torch.finfo(scores.dtype).min
    v2t_pos = torch.logsumexp(scores.masked_fill(~pos, neg_inf), dim=0)       # [B]
    v2t = torch.where(has_query, torch.logsumexp(scores, dim=0) - v2t_pos, torch.zeros_like(v2t_pos))
    return t2v.mean() + v2t.sum() / has_query.sum().clamp(min=1)


def paired_infonce_loss(scores: torch.Tensor) -> torch.Tensor:
    """NCE on a square [N, N] matrix, positives on the diagonal; each pair's softmax spans its row and column."""
    diag = scores.diagonal()
    both = torch.cat([scores, scores.t()], dim=1)                              # row i and column i
    return (torch.logsumexp(both, dim=1) - diag).mean()


def query_diverse_loss(queries: torch.Tensor, video_index: torch.Tensor, margin: float, alpha: float) -> torch.Tensor:
    """GMMFormer's query-diverse loss: mean over queries of log(1 + sum exp(alpha (cos + margin))) over the
    other queries of the same video, which pushes a video's queries apart."""
    x = F.normalize(queries, dim=-1)
    cos = x @ x.t()                                                           # [Q, Q]
    same = video_index.view(-1, 1) == video_index.view(1, -1)
    same = same & ~torch.eye(len(video_index), dtype=torch.bool, device=queries.device)
    sims = torch.exp(alpha * (cos + margin)) * same
    return torch.log1p(sims.sum(0)).sum() / len(video_index)
