"""GMMFormer (Wang et al., AAAI 2024): Gaussian-mixture-constrained attention for partially relevant video retrieval.

Each encoder block runs several self-attention layers side by side, one unconstrained
and one per Gaussian width (0.5, 1.0, 5.0 by default), and averages their outputs. A
constrained layer multiplies its scaled attention logits by a Gaussian centred on the
attending token, so it only mixes nearby moments. Two such blocks encode the 32
clip tokens (stored as they are: 32 vectors per video) and the frame tokens (at most
128, attention-pooled into one vector per video). The query encoder is MS-SL's.

Score: `clip_weight * max_clip cos + frame_weight * cos(query, pooled frames)` (0.7 / 0.3).
Loss: triplet + InfoNCE on both branches (as MS-SL, with the frame branch on [Q, B])
plus the query-diverse loss that pushes queries of one video apart.

Deviation from the authors' code, on purpose: the frame-branch Gaussian is laid out
over each video's own token count rather than over the batch's padded length, so
a video encodes the same whatever batch it is in (identical for the clip branch).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import layers
from .mssl import MSSLConfig, QueryEncoder, SelfAttentionLayer, dot_and_cosine, init_weights, l2_rows, video_chunk_size
from .retrieval import QueryEncoding, TrainBatch, VideoEncoding, WeightedBranchModel
from .retrieval_losses import infonce_loss, query_diverse_loss, triplet_loss


def gaussian_weights(lengths: torch.Tensor, n_tokens: int, width: float) -> torch.Tensor:
    """Gaussian attention multipliers [B, n, n] for sequences of `lengths` valid tokens.

    Row i (the attending token) is a Gaussian over key positions j/(T-1) centred at i/T
    with standard deviation max(width, 0.01)/9, rescaled so its largest value over the
    valid keys is 1 (the authors' layout; padded keys get 0).
    """
    T = lengths.to(torch.float32).clamp(min=1).view(-1, 1, 1)
    i = torch.arange(n_tokens, device=lengths.device, dtype=torch.float32).view(1, -1, 1)
    j = torch.arange(n_tokens, device=lengths.device, dtype=torch.float32).view(1, 1, -1)
    sigma = max(float(width), 1e-2) / 9
    log_w = -((j / (T - 1).clamp(min=1) - i / T) ** 2) / (2 * sigma ** 2)     # [B, n, n]
    valid = j < T
    log_w = log_w.masked_fill(~valid, float("-inf"))
    weights = torch.exp(log_w - log_w.max(-1, keepdim=True).values)
    return weights


class GaussianMixtureBlock(nn.Module):
    """One unconstrained and one Gaussian-constrained attention layer per width; outputs averaged."""

    def __init__(self, dim: int, heads: int, dropout: float, n_widths: int):
        super().__init__()
        self.free = SelfAttentionLayer(dim, heads, dropout)
        self.constrained = nn.ModuleList(SelfAttentionLayer(dim, heads, dropout) for _ in range(n_widths))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, gaussians: list[torch.Tensor]) -> torch.Tensor:
        outs = [self.free(x, mask)] + [layer(x, mask, weight=g) for layer, g in zip(self.constrained, gaussians)]
        return torch.stack(outs, 0).mean(0)


@dataclass(frozen=True)
class GMMFormerConfig(MSSLConfig):
    """GMMFormer's model section (models/gmmformer_*.json), with the authors' defaults."""

    input_dropout: float = 0.2
    dropout: float = 0.2
    gauss_widths: list = field(default_factory=lambda: [0.5, 1.0, 5.0])   # one attention branch per width
    n_blocks: int = 2
    qdl_weight: float = 0.015               # query-diverse loss
    qdl_margin: float = 0.2
    qdl_alpha: float = 32.0


class GMMFormer(WeightedBranchModel):
    """GMMFormer: Gaussian-mixture attention on 32 clips and on frames pooled to one vector (see module docstring)."""

    method = "gmmformer"
    Config = GMMFormerConfig

    def __init__(self, video_dim: int, text_dim: int, cfg: GMMFormerConfig | dict | None = None):
        super().__init__(video_dim, text_dim, cfg)
        cfg = self.cfg
        D, drop, in_drop, heads = cfg.hidden_size, cfg.dropout, cfg.input_dropout, cfg.n_heads
        n_w = len(cfg.gauss_widths)
        self.query_encoder = QueryEncoder(text_dim, cfg)
        self.clip_proj = layers.InputProjection(video_dim, D, in_drop)
        self.clip_pos = layers.LearnedPositions(cfg.n_clips, D, in_drop)
        self.clip_blocks = nn.ModuleList(GaussianMixtureBlock(D, heads, drop, n_w) for _ in range(cfg.n_blocks))
        self.frame_proj = layers.InputProjection(video_dim, D, in_drop)
        self.frame_pos = layers.LearnedPositions(cfg.max_frames, D, in_drop)
        self.frame_blocks = nn.ModuleList(GaussianMixtureBlock(D, heads, drop, n_w) for _ in range(cfg.n_blocks))
        self.frame_pool = layers.AttentionPool(D)
        init_weights(self, cfg.init_std)

    # ---- encoding -------------------------------------------------------------------------
    def _run_blocks(self, blocks, x, mask, lengths):
        gaussians = [gaussian_weights(lengths, x.shape[1], w).to(x.dtype) for w in self.cfg.gauss_widths]
        for block in blocks:
            x = block(x, mask, gaussians)
        return x

    def _encode(self, frames: torch.Tensor, frame_mask: torch.Tensor):
        """Clip tokens [B, C, D], pooled frame vector [B, D], and the clip-bin and frame-pool maps over frames."""
        frame_mask = frame_mask.bool()
        lengths = frame_mask.sum(1)
        T = frames.shape[1]
        n_clips = self.cfg.n_clips
        bins = layers.uniform_bins(lengths, n_clips, T).to(frames.dtype)
        l2 = self.cfg.l2_inputs
        clips = self.clip_pos(self.clip_proj(l2_rows(bins @ frames, l2)))
        clips = self._run_blocks(self.clip_blocks, clips, None, torch.full_like(lengths, n_clips))
        down, token_mask = layers.downsample_frames(lengths, self.cfg.max_frames, T)
        tokens = self.frame_pos(self.frame_proj(l2_rows(down.to(frames.dtype) @ frames, l2)))
        tokens = self._run_blocks(self.frame_blocks, tokens, token_mask, token_mask.sum(1))
        pool = layers.masked_softmax(self.frame_pool.score(tokens).squeeze(-1), token_mask)   # [B, F]
        pooled = torch.einsum("bf,bfd->bd", pool, tokens)
        return clips, pooled, bins, pool.unsqueeze(1) @ down.to(pool.dtype)

    def encode_videos(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> VideoEncoding:
        clips, pooled, bins, frame_map = self._encode(frames, frame_mask)
        B, device = clips.shape[0], clips.device
        clip_mask = torch.ones(clips.shape[:2], dtype=torch.bool, device=device)
        frame_mask_out = torch.ones(B, 1, dtype=torch.bool, device=device)
        store = self.cfg.store_attn
        return VideoEncoding(clips, clip_mask, pooled.unsqueeze(1), frame_mask_out,
                             bins if store else None, frame_map if store else None)

    def encode_queries(self, tokens: torch.Tensor, token_mask: torch.Tensor) -> QueryEncoding:
        q = self.query_encoder(tokens, token_mask)
        return QueryEncoding(clip=q, frame=q)

    # ---- scoring --------------------------------------------------------------------------
    def branch_scores(self, queries: QueryEncoding, videos: VideoEncoding) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip-scale (best clip) and frame-scale (masked best stored frame vector) cosine scores, each [Q, B]."""
        qc, qf = F.normalize(queries.clip, dim=-1), F.normalize(queries.frame, dim=-1)
        Q, (B, C, _) = qc.shape[0], videos.clip.shape
        step = video_chunk_size(Q, B, C)
        clip_out = []
        for s in range(0, B, step):
            sim = torch.einsum("qd,bcd->qbc", qc, F.normalize(videos.clip[s:s + step], dim=-1))
            clip_out.append(sim.masked_fill(~videos.clip_mask[s:s + step].unsqueeze(0), float("-inf")).max(-1).values)
        frame = torch.einsum("qd,bfd->qbf", qf, F.normalize(videos.frame, dim=-1))
        frame = frame.masked_fill(~videos.frame_mask.unsqueeze(0), float("-inf")).max(-1).values
        return torch.cat(clip_out, 1), frame

    # ---- training -------------------------------------------------------------------------

    def forward(self, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        clips, pooled, _, _ = self._encode(batch.frames, batch.frame_mask)
        q = self.query_encoder(batch.tokens, batch.token_mask)                        # [Q, D]
        vid = batch.video_index.long()
        raw, cos = dot_and_cosine(q, clips)                                           # [Q, B, C] each
        clip_cos, clip_raw = cos.max(-1).values, raw.max(-1).values                   # [Q, B]
        frame_cos = F.normalize(q, dim=-1) @ F.normalize(pooled, dim=-1).t()
        frame_raw = q @ pooled.t()
        hard, pool, margin = self.hard_negatives(batch.epoch), cfg.hard_pool_size, cfg.margin
        terms = {
            "clip_nce": cfg.clip_nce_weight * infonce_loss(clip_raw, vid),
            "clip_trip": triplet_loss(clip_cos, vid, margin, hard, hard_pool=pool, v2t_hard_pool=1),
            "frame_nce": cfg.frame_nce_weight * infonce_loss(frame_raw, vid),
            "frame_trip": triplet_loss(frame_cos, vid, margin, hard, hard_pool=pool, v2t_hard_pool=1),
            "query_diverse": cfg.qdl_weight * query_diverse_loss(q, vid, cfg.qdl_margin, cfg.qdl_alpha),
        }
        loss = sum(terms.values())
        return loss, {k: v.item() for k, v in terms.items()}
