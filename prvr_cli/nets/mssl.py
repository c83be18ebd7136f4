"""MS-SL (Dong et al., ACM MM 2022): multi-scale similarity learning for partially relevant video retrieval.

Clip branch: the video is averaged into 32 clip tokens, encoded by one self-attention
layer, and every contiguous span of clips is a proposal (mean pooling, 528 spans);
the clip score is the best cosine between the query and a proposal. Frame branch:
frame tokens (at most 128) go through their own self-attention layer; for each
query-video pair the best-matching proposal (the *key clip*) attends over the frames
and the frame score is the cosine between the query and that attention's output.
The final score is `clip_weight * clip + frame_weight * frame` (0.7 / 0.3).
As in the authors' data loader, pooled clip and frame features and query token
features are L2-normalised before the input projections (`l2_inputs`).

Training (per the authors' code): triplet ranking + InfoNCE on both branches,
random negatives before `hard_negative_start_epoch`, hard ones after. The frame
branch is trained on the [Q, Q] matrix of queries against the key-clip-guided
features of each query's own video (diagonal positives).

The building blocks (positional encoding, the attention layer, initialisation) are
shared with GMMFormer, which uses the same encoder style.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import layers
from ..errors import UsageError
from .config import BranchModelConfig
from .retrieval import QueryEncoding, TrainBatch, VideoEncoding, WeightedBranchModel
from .retrieval_losses import infonce_loss, paired_infonce_loss, triplet_loss

@dataclass(frozen=True)
class MSSLConfig(BranchModelConfig):
    """MS-SL's model section (models/mssl_*.json), with the authors' defaults."""

    input_dropout: float = 0.1
    init_std: float = 0.02
    clip_nce_weight: float = 0.02
    frame_nce_weight: float = 0.04
    l2_inputs: bool = True         # L2-normalise input features first
    store_attn: bool = True        # keep attention maps (for highlights) in the video encoding


# Element budget of one scoring block (queries x videos x max(proposals, frames, dim)).
SCORE_BLOCK_ELEMENTS = 1 << 25


def l2_rows(x: torch.Tensor, enabled: bool = True, eps: float = 1e-5) -> torch.Tensor:
    """Scale each feature vector to unit L2 norm (the authors' input normalisation); zero rows stay zero."""
    return x / (x.norm(dim=-1, keepdim=True) + eps) if enabled else x


class SelfAttentionLayer(nn.Module):
    """Multi-head self-attention, output projection, dropout and residual LayerNorm (no feed-forward).

    `weight` [B or 1, L, L], when given, multiplies the scaled attention logits before the
    softmax (GMMFormer's Gaussian constraint); `key_bias` [B, L] is then added to every query's
    logits (MSC's proportional attention: +log(size) of merged tokens); `mask` [B, L] hides padded keys.
    """

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise UsageError(f"hidden_size {dim} is not a multiple of n_heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.attn_dropout = nn.Dropout(dropout)
        self.out = nn.Linear(dim, dim)
        self.out_dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                weight: torch.Tensor | None = None, key_bias: torch.Tensor | None = None) -> torch.Tensor:
        B, L, D = x.shape
        split = lambda t: t.view(B, L, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731  [B, h, L, d]
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        logits = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)               # [B, h, L, L]
        if weight is not None:
            logits = logits * weight.unsqueeze(1)
        if key_bias is not None:
            logits = logits + key_bias.view(B, 1, 1, L)
        key_mask = None if mask is None else mask.view(B, 1, 1, L)
        attn = self.attn_dropout(layers.masked_softmax(logits, key_mask))
        context = (attn @ v).transpose(1, 2).reshape(B, L, D)
        return self.norm(x + self.out_dropout(self.out(context)))


def init_weights(module: nn.Module, std: float) -> None:
    """The authors' initialisation: normal(0, std) linear and embedding weights, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class QueryEncoder(nn.Module):
    """Tokens -> projection -> positions -> one attention layer -> attention pooling into one vector.

    `encoder` replaces the attention layer (called as `encoder(x, mask)`); the default is MS-SL's.
    """

    def __init__(self, text_dim: int, cfg: MSSLConfig, encoder: nn.Module | None = None):
        super().__init__()
        D = cfg.hidden_size
        self.max_tokens, self.l2 = cfg.max_query_tokens, cfg.l2_inputs
        self.proj = layers.InputProjection(text_dim, D, cfg.input_dropout)
        self.pos = layers.LearnedPositions(self.max_tokens, D, cfg.input_dropout)
        self.encoder = encoder if encoder is not None else SelfAttentionLayer(D, cfg.n_heads, cfg.dropout)
        self.pool = layers.AttentionPool(D)

    def forward(self, tokens: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        tokens, token_mask = tokens[:, :self.max_tokens], token_mask[:, :self.max_tokens].bool()
        x = self.encoder(self.pos(self.proj(l2_rows(tokens, self.l2))), token_mask)
        return self.pool(x, token_mask)


def dot_and_cosine(q: torch.Tensor, tokens: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw dot products and cosines [Q, B, N] of queries [Q, D] with tokens [B, N, D], from one product."""
    raw = torch.einsum("qd,bnd->qbn", q, tokens)
    norms = q.norm(dim=-1).clamp(min=eps).view(-1, 1, 1) * tokens.norm(dim=-1).clamp(min=eps).unsqueeze(0)
    return raw, raw / norms


def video_chunk_size(n_queries: int, n_videos: int, width: int) -> int:
    """How many videos one scoring block may hold so that it stays within SCORE_BLOCK_ELEMENTS."""
    return max(1, min(n_videos, SCORE_BLOCK_ELEMENTS // max(1, n_queries * width)))


class MSSL(WeightedBranchModel):
    """MS-SL: 528 clip-span proposals and key-clip-guided frame attention (see module docstring)."""

    method = "mssl"
    Config = MSSLConfig

    def __init__(self, video_dim: int, text_dim: int, cfg: MSSLConfig | dict | None = None):
        super().__init__(video_dim, text_dim, cfg)
        cfg = self.cfg
        D, drop, in_drop = cfg.hidden_size, cfg.dropout, cfg.input_dropout
        self.query_encoder = QueryEncoder(text_dim, cfg)
        self.clip_proj = layers.InputProjection(video_dim, D, in_drop)
        self.clip_pos = layers.LearnedPositions(cfg.n_clips, D, in_drop)
        self.clip_encoder = SelfAttentionLayer(D, cfg.n_heads, drop)
        self.frame_proj = layers.InputProjection(video_dim, D, in_drop)
        self.frame_pos = layers.LearnedPositions(cfg.max_frames, D, in_drop)
        self.frame_encoder = SelfAttentionLayer(D, cfg.n_heads, drop)
        # key-clip-guided attention: the key clip scores mapped frames, values are mapped frames
        self.guide_key = nn.Linear(D, D, bias=False)
        self.guide_value = nn.Linear(D, D, bias=False)
        self.register_buffer("span_to_clip", layers.span_to_token(cfg.n_clips), persistent=False)
        init_weights(self, cfg.init_std)

    # ---- encoding -------------------------------------------------------------------------
    def _encode(self, frames: torch.Tensor, frame_mask: torch.Tensor):
        """Proposals [B, P, D], frame tokens [B, F, D] with mask [B, F], clip bins and frame pooling matrices."""
        frame_mask = frame_mask.bool()
        lengths = frame_mask.sum(1)
        T = frames.shape[1]
        bins = layers.uniform_bins(lengths, self.cfg.n_clips, T).to(frames.dtype)
        down, token_mask = layers.downsample_frames(lengths, self.cfg.max_frames, T)
        l2 = self.cfg.l2_inputs
        clips = self.clip_encoder(self.clip_pos(self.clip_proj(l2_rows(bins @ frames, l2))))
        frame_in = l2_rows(down.to(frames.dtype) @ frames, l2)
        tokens = self.frame_encoder(self.frame_pos(self.frame_proj(frame_in)), token_mask)
        return layers.span_means(clips), tokens, token_mask, bins, down

    def encode_videos(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> VideoEncoding:
        proposals, tokens, token_mask, bins, down = self._encode(frames, frame_mask)
        clip_mask = torch.ones(proposals.shape[:2], dtype=torch.bool, device=proposals.device)
        clip_attn = frame_attn = None
        if self.cfg.store_attn:
            clip_attn = torch.einsum("pn,bnt->bpt", self.span_to_clip.to(bins.dtype), bins)
            frame_attn = down
        return VideoEncoding(proposals, clip_mask, tokens, token_mask, clip_attn, frame_attn)

    def encode_queries(self, tokens: torch.Tensor, token_mask: torch.Tensor) -> QueryEncoding:
        q = self.query_encoder(tokens, token_mask)
        return QueryEncoding(clip=q, frame=q)

    # ---- scoring --------------------------------------------------------------------------
    def _guided_features(self, guide: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Key-clip-guided attention: guide [..., D] attends over tokens [..., F, D] (mask [..., F])."""
        logits = torch.einsum("...d,...fd->...f", guide, self.guide_key(tokens))
        attn = layers.masked_softmax(logits, mask)
        return torch.einsum("...f,...fd->...d", attn, self.guide_value(tokens))

    def branch_scores(self, queries: QueryEncoding, videos: VideoEncoding) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip-scale and frame-scale cosine scores, each [Q, B]."""
        qc, qf = F.normalize(queries.clip, dim=-1), F.normalize(queries.frame, dim=-1)
        Q, (B, P, D), F_ = qc.shape[0], videos.clip.shape, videos.frame.shape[1]
        step = video_chunk_size(Q, B, max(P, F_, D))
        clip_out, frame_out = [], []
        for s in range(0, B, step):
            props, pmask = videos.clip[s:s + step], videos.clip_mask[s:s + step]
            tokens, tmask = videos.frame[s:s + step], videos.frame_mask[s:s + step]
            sim = torch.einsum("qd,bpd->qbp", qc, F.normalize(props, dim=-1))
            sim = sim.masked_fill(~pmask.unsqueeze(0), float("-inf"))
            best, key = sim.max(-1)                                                    # [Q, b]
            guide = props[torch.arange(props.shape[0], device=key.device).view(1, -1), key]  # [Q, b, D]
            logits = torch.einsum("qbd,bfd->qbf", guide, self.guide_key(tokens))
            attn = layers.masked_softmax(logits, tmask.unsqueeze(0))
            feat = torch.einsum("qbf,bfd->qbd", attn, self.guide_value(tokens))
            clip_out.append(best)
            frame_out.append(torch.einsum("qd,qbd->qb", qf, F.normalize(feat, dim=-1)))
        return torch.cat(clip_out, 1), torch.cat(frame_out, 1)

    # ---- training -------------------------------------------------------------------------

    def forward(self, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        proposals, tokens, token_mask, _, _ = self._encode(batch.frames, batch.frame_mask)
        q = self.query_encoder(batch.tokens, batch.token_mask)                        # [Q, D]
        vid = batch.video_index.long()
        Q = q.shape[0]
        # clip scale: best proposal per pair, cosine for ranking, raw dot product for NCE
        raw, cos = dot_and_cosine(q, proposals)                                       # [Q, B, P] each
        clip_cos, key = cos.max(-1)                                                   # [Q, B]
        clip_raw = raw.max(-1).values
        # frame scale: each query's key clip in its own video attends over that video's frames
        own_key = key.gather(1, vid.view(-1, 1)).squeeze(1)
        guide = proposals[vid, own_key]                                               # [Q, D]
        feat = self._guided_features(guide, tokens[vid], token_mask[vid])             # [Q, D]
        frame_cos = F.normalize(q, dim=-1) @ F.normalize(feat, dim=-1).t()            # [Q, Q]
        frame_raw = q @ feat.t()
        hard, pool, margin = self.hard_negatives(batch.epoch), cfg.hard_pool_size, cfg.margin
        diag = torch.arange(Q, device=q.device)
        terms = {
            "clip_nce": cfg.clip_nce_weight * infonce_loss(clip_raw, vid),
            "clip_trip": triplet_loss(clip_cos, vid, margin, hard, hard_pool=pool, v2t_hard_pool=1),
            "frame_nce": cfg.frame_nce_weight * paired_infonce_loss(frame_raw),
            "frame_trip": triplet_loss(frame_cos, diag, margin, hard, hard_pool=pool, v2t_hard_pool=pool),
        }
        loss = sum(terms.values())
        return loss, {k: v.item() for k, v in terms.items()}
