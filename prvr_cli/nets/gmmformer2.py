"""GMMFormer-v2 and MSC: dynamic Gaussian-mixture attention, and MSC's remedies for semantic collapse.

GMMFormer-v2 (Wang et al., 2024) encodes each branch with one *dynamic* GMM block: eight attention
layers side by side (one unconstrained, one per Gaussian width 0.5, 1, 5, 10, 3, 0.1, 8), each
followed by a feed-forward layer, and mixes their outputs per token with weights it predicts: a
learned weight token cross-attends to each layer's output, an MLP turns the eight results into one
logit per (layer, token), and a softmax over the layers with a temperature (`mix_temperature`,
0.09 on TVR, 0.6 elsewhere) gives the mix. The frame branch always sees `max_frames` (128) tokens,
the video's frames uniformly averaged (repeated when the video is shorter); the clip branch sees
`n_clips` (32) tokens. Both are stored: a video is 32 clip vectors plus 128 frame vectors, and a
query's score is `clip_weight * max_clip cos + frame_weight * max_frame cos` (0.4 / 0.6).
Training: triplet + InfoNCE on both branches, as MS-SL and GMMFormer.

MSC ("Mitigating Semantic Collapse in PRVR", NeurIPS 2025) is GMMFormer-v2 with four switches, each
a row of its ablation (all on in the `msc` presets):
    tcpl_*         text-correlation preservation: the pooled query vectors of a batch keep the
                   distances and angles of the frozen input features at the last valid token
                   (CLIP's end-of-text); weights 15 and 30; see `msc_losses`
    cbva_weight    cross-branch video alignment: frame tokens against the clip tokens of their own
                   video (positive: the clip holding the frame), through a training-only projection
    token_merge    clip tokens made from the 128 frame tokens by order-preserving merging of the most
                   similar adjacent pairs (128 -> 80 -> 52 -> 32), sizes entering attention as +log(size)
    cbva_adaptive  the alignment uses fewer, bipartite-merged clips for redundant videos: 5, 8, 12, 20
                   or 32 by the share of clip pairs linked above `redundancy_threshold`

Deviations from the authors' code, on purpose: every attention layer has an output projection
(the shared layer of MS-SL and GMMFormer; the authors' BertSelfAttention has none), and the angle term
of TCPL is averaged over at most `tcpl_angle_anchors` random anchors (all of them at the default
batch; the authors use every anchor, which is cubic in the batch's queries).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import layers
from .gmmformer import gaussian_weights
from .msc_losses import angle_distillation, cross_branch_alignment, distance_distillation, last_valid_token
from .protoprvr import max_cosine
from .mssl import MSSLConfig, QueryEncoder, SelfAttentionLayer, dot_and_cosine, init_weights, l2_rows
from .retrieval import QueryEncoding, TrainBatch, VideoEncoding, WeightedBranchModel
from .retrieval_losses import infonce_loss, triplet_loss
from .token_merge import adaptive_clip_count, bipartite_merge, merge_schedule, order_preserving_merge, redundancy

ADAPTIVE_SCHEDULE = (20, 12, 8, 5)   # bipartite merging steps from 32 clips, stopping at a video's count


@dataclass(frozen=True)
class GMMFormerV2Config(MSSLConfig):
    """GMMFormer-v2's model section (models/gmmformer2_*.json); MSC's switches all off."""

    clip_weight: float = 0.4
    frame_weight: float = 0.6
    max_query_tokens: int = 77
    input_dropout: float = 0.31
    dropout: float = 0.31
    gauss_widths: list = field(default_factory=lambda: [0.5, 1.0, 5.0, 10.0, 3.0, 0.1, 8.0])
    mix_temperature: float = 0.6          # softmax temperature over the attention layers (0.09 on TVR)
    ff_multiplier: int = 4                # feed-forward width of each attention layer, times hidden_size
    # MSC's remedies
    tcpl_distance_weight: float = 0.0
    tcpl_angle_weight: float = 0.0
    tcpl_angle_anchors: int = 128
    cbva_weight: float = 0.0
    token_merge: bool = False
    cbva_adaptive: bool = False
    redundancy_threshold: float = 0.8     # tau: 0.8 TVR / ActivityNet, 0.85 Charades, 0.7 QVHighlights


@dataclass(frozen=True)
class MSCConfig(GMMFormerV2Config):
    """MSC's model section (models/msc_*.json): GMMFormer-v2 with every remedy on."""

    tcpl_distance_weight: float = 15.0
    tcpl_angle_weight: float = 30.0
    cbva_weight: float = 0.1
    token_merge: bool = True
    cbva_adaptive: bool = True


class FeedForward(nn.Module):
    """Linear -> ReLU -> dropout -> linear, added back to the input and LayerNorm-ed."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.drop(self.net(x)))


class AttentionWithFeedForward(nn.Module):
    """A self-attention layer (optionally Gaussian-constrained and size-biased) followed by a feed-forward layer."""

    def __init__(self, dim: int, heads: int, ff_dim: int, dropout: float):
        super().__init__()
        self.attn = SelfAttentionLayer(dim, heads, dropout)
        self.ffn = FeedForward(dim, ff_dim, dropout)

    def forward(self, x, mask=None, weight=None, key_bias=None):
        return self.ffn(self.attn(x, mask, weight, key_bias))


class LayerMixer(nn.Module):
    """Per-token weights over K layer outputs: a weight token reads each output, an MLP scores it per token.

    `outputs` [K, B, L, D] -> weights [B, L, K] (softmax over K with `temperature`).
    """

    def __init__(self, dim: int, heads: int, n_tokens: int, dropout: float, temperature: float):
        super().__init__()
        self.read = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.read_norm = nn.LayerNorm(dim)
        self.read_ffn = FeedForward(dim, dim, dropout)
        self.drop = nn.Dropout(dropout)
        self.score = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, n_tokens))
        self.temperature = temperature

    def forward(self, outputs: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        K, B, L, D = outputs.shape
        flat = outputs.reshape(K * B, L, D)
        query = token.to(flat.dtype).expand(K * B, 1, D)
        read, _ = self.read(query, flat, flat, need_weights=False)
        read = self.read_ffn(self.read_norm(query + self.drop(read)))               # [K*B, 1, D]
        logits = self.score(read.view(K, B, D))[..., :L]                            # [K, B, L]
        return torch.softmax(logits.permute(1, 2, 0) / self.temperature, dim=-1)


class DynamicGMMBlock(nn.Module):
    """One unconstrained and one Gaussian-constrained attention layer per width, mixed per token by `LayerMixer`."""

    def __init__(self, dim: int, heads: int, ff_dim: int, dropout: float, widths, n_tokens: int,
                 temperature: float):
        super().__init__()
        self.widths = list(widths)
        self.layers = nn.ModuleList(AttentionWithFeedForward(dim, heads, ff_dim, dropout)
                                    for _ in range(len(self.widths) + 1))
        self.mixer = LayerMixer(dim, heads, n_tokens, dropout, temperature)

    def forward(self, x: torch.Tensor, weight_token: torch.Tensor, key_bias: torch.Tensor | None = None):
        """Tokens [B, L, D] (all valid: both branches have fixed lengths) -> [B, L, D]."""
        lengths = torch.full(x.shape[:1], x.shape[1], device=x.device)
        gaussians = [None] + [gaussian_weights(lengths, x.shape[1], w).to(x.dtype) for w in self.widths]
        outs = torch.stack([layer(x, None, g, key_bias) for layer, g in zip(self.layers, gaussians)])  # [K,B,L,D]
        weights = self.mixer(outs, weight_token)                                                     # [B, L, K]
        return torch.einsum("kbld,blk->bld", outs, weights)


class GMMFormerV2(WeightedBranchModel):
    """GMMFormer-v2 with MSC's switches (see module docstring); `MSC` is the same model with them on."""

    method = "gmmformer2"
    Config = GMMFormerV2Config

    def __init__(self, video_dim: int, text_dim: int, cfg: GMMFormerV2Config | dict | None = None):
        super().__init__(video_dim, text_dim, cfg)
        cfg = self.cfg
        D, drop, in_drop, heads = cfg.hidden_size, cfg.dropout, cfg.input_dropout, cfg.n_heads
        ff = cfg.ff_multiplier * D

        def block(n_tokens):
            return DynamicGMMBlock(D, heads, ff, drop, cfg.gauss_widths, n_tokens, cfg.mix_temperature)

        self.query_encoder = QueryEncoder(text_dim, cfg, AttentionWithFeedForward(D, heads, ff, drop))
        self.weight_token = nn.Parameter(torch.randn(1, 1, D))      # shared by both branches' mixers
        self.clip_proj = layers.InputProjection(video_dim, D, in_drop)
        self.clip_pos = layers.LearnedPositions(cfg.n_clips, D, in_drop)
        self.clip_block = block(cfg.n_clips)
        self.frame_proj = layers.InputProjection(video_dim, D, in_drop)
        self.frame_pos = layers.LearnedPositions(cfg.max_frames, D, in_drop)
        self.frame_block = block(cfg.max_frames)
        if cfg.cbva_weight > 0:
            self.align_proj = nn.Linear(D, D)                        # CBVA only: never used to encode
        init_weights(self, cfg.init_std)

    # ---- encoding -------------------------------------------------------------------------
    def _encode(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> dict:
        """Clip tokens [B, C, D], frame tokens [B, F, D], and what training and highlights need of them."""
        cfg = self.cfg
        lengths = frame_mask.bool().sum(1)
        T = frames.shape[1]
        resample = layers.uniform_bins(lengths, cfg.max_frames, T).to(frames.dtype)   # [B, F, T]: F fixed
        frame_in = resample @ frames
        if cfg.token_merge:
            clip_in, sizes, frame_to_clip = order_preserving_merge(frame_in, merge_schedule(cfg.max_frames, cfg.n_clips))
            clip_to_frame = F.one_hot(frame_to_clip, cfg.n_clips).transpose(1, 2).to(frames.dtype)
            clip_to_frame = clip_to_frame / clip_to_frame.sum(-1, keepdim=True).clamp(min=1)
            key_bias = sizes.log()
        else:
            clip_to_frame = layers.uniform_bins(torch.full_like(lengths, cfg.max_frames), cfg.n_clips,
                                                cfg.max_frames).to(frames.dtype)          # [B, C, F]
            clip_in, sizes, key_bias = clip_to_frame @ frame_in, None, None
            frame_to_clip = clip_to_frame.argmax(1)                                        # [B, F]
        l2 = cfg.l2_inputs
        clips = self.clip_block(self.clip_pos(self.clip_proj(l2_rows(clip_in, l2))), self.weight_token, key_bias)
        tokens = self.frame_block(self.frame_pos(self.frame_proj(l2_rows(frame_in, l2))), self.weight_token)
        return {"clips": clips, "frames": tokens, "clip_in": clip_in, "sizes": sizes,
                "frame_to_clip": frame_to_clip, "clip_attn": clip_to_frame @ resample, "frame_attn": resample}

    def encode_videos(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> VideoEncoding:
        enc = self._encode(frames, frame_mask)
        clips, tokens = enc["clips"], enc["frames"]
        ones = lambda t: torch.ones(t.shape[:2], dtype=torch.bool, device=t.device)  # noqa: E731
        store = self.cfg.store_attn
        return VideoEncoding(clips, ones(clips), tokens, ones(tokens),
                             enc["clip_attn"] if store else None, enc["frame_attn"] if store else None)

    def encode_queries(self, tokens: torch.Tensor, token_mask: torch.Tensor) -> QueryEncoding:
        q = self.query_encoder(tokens, token_mask)
        return QueryEncoding(clip=q, frame=q)

    # ---- scoring --------------------------------------------------------------------------
    def branch_scores(self, queries: QueryEncoding, videos: VideoEncoding) -> tuple[torch.Tensor, torch.Tensor]:
        """Best clip and best frame cosine per (query, video), each [Q, B]."""
        return (max_cosine(queries.clip, videos.clip, videos.clip_mask).values,
                max_cosine(queries.frame, videos.frame, videos.frame_mask).values)

    # ---- training -------------------------------------------------------------------------
    def forward(self, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        enc = self._encode(batch.frames, batch.frame_mask)
        q = self.query_encoder(batch.tokens, batch.token_mask)                        # [Q, D]
        vid = batch.video_index.long()
        clip_raw, clip_cos = (s.max(-1).values for s in dot_and_cosine(q, enc["clips"]))
        frame_raw, frame_cos = (s.max(-1).values for s in dot_and_cosine(q, enc["frames"]))
        hard, pool, margin = self.hard_negatives(batch.epoch), cfg.hard_pool_size, cfg.margin
        terms = {
            "clip_nce": cfg.clip_nce_weight * infonce_loss(clip_raw, vid),
            "clip_trip": triplet_loss(clip_cos, vid, margin, hard, hard_pool=pool, v2t_hard_pool=1),
            "frame_nce": cfg.frame_nce_weight * infonce_loss(frame_raw, vid),
            "frame_trip": triplet_loss(frame_cos, vid, margin, hard, hard_pool=pool, v2t_hard_pool=1),
        }
        if cfg.tcpl_distance_weight > 0 or cfg.tcpl_angle_weight > 0:
            teacher = last_valid_token(batch.tokens, batch.token_mask)
            if cfg.tcpl_distance_weight > 0:
                terms["tcpl_distance"] = cfg.tcpl_distance_weight * distance_distillation(q, teacher)
            if cfg.tcpl_angle_weight > 0:
                terms["tcpl_angle"] = cfg.tcpl_angle_weight * angle_distillation(q, teacher, cfg.tcpl_angle_anchors)
        if cfg.cbva_weight > 0:
            terms["cbva"] = cfg.cbva_weight * self._alignment(enc)
        loss = sum(terms.values())
        return loss, {k: float(v.detach()) for k, v in terms.items()}

    def _alignment(self, enc: dict) -> torch.Tensor:
        """CBVA between the projected frame and clip tokens; adaptive: per video, on its merged clip count."""
        frames, clips = self.align_proj(enc["frames"]), self.align_proj(enc["clips"])
        frame_to_clip = enc["frame_to_clip"]
        if not self.cfg.cbva_adaptive:
            return cross_branch_alignment(frames, clips, frame_to_clip)
        metric = F.normalize(enc["clip_in"].detach().float(), dim=-1)
        counts = adaptive_clip_count(redundancy(metric, self.cfg.redundancy_threshold, closure=True),
                                     clips.shape[1])
        sizes = enc["sizes"] if enc["sizes"] is not None else torch.ones(clips.shape[:2], device=clips.device)
        total = clips.new_zeros(())
        pending = torch.ones_like(counts, dtype=torch.bool)
        dim = clips.shape[-1]
        for target in (clips.shape[1],) + ADAPTIVE_SCHEDULE:
            if target < clips.shape[1]:
                joined, sizes, frame_to_clip = bipartite_merge(torch.cat([clips, metric.to(clips.dtype)], -1),
                                                               sizes, frame_to_clip, target, metric=metric)
                clips, metric = joined[..., :dim], joined[..., dim:]
            done = pending & (counts == target)
            if done.any():
                total = total + cross_branch_alignment(frames[done], clips[done], frame_to_clip[done]) * done.sum()
                pending = pending & ~done
            if not pending.any():
                break
            keep = pending
            frames, clips, metric, sizes = frames[keep], clips[keep], metric[keep], sizes[keep]
            frame_to_clip, counts, pending = frame_to_clip[keep], counts[keep], pending[keep]
        return total / enc["clips"].shape[0]


class MSC(GMMFormerV2):
    """MSC: GMMFormer-v2 with text-correlation preservation, cross-branch alignment and token merging."""

    method = "msc"
    Config = MSCConfig
