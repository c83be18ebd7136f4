"""ProtoPRVR: every video stored as a few prototypes ("Prototypes are Balanced Units for
Efficient and Effective Partially Relevant Video Retrieval", ICCV 2025).

Per branch a video becomes `n_prototypes` vectors: globally shared learnable prototypes
refined by cross-attention over the branch's tokens.

    frame branch: frames -> <= max_frames tokens (mean-pooled when longer) -> InputProjection
                  -> positional embedding -> TransformerEncoderLayer -> prototype cross-attention
    clip branch:  frames -> n_clips uniform clip tokens -> InputProjection -> positional embedding
                  -> TransformerEncoderLayer -> mean of every contiguous span (528 for 32 clips)
                  -> prototype cross-attention
    query:        tokens -> InputProjection -> positional embedding -> TransformerEncoderLayer
                  -> one attention-pooling head per branch

The clip branch's transformer runs on the 32 clip tokens *before* span pooling (as MS-SL
encodes its clips before building its clip map): self-attention over 32 tokens is cheap
and every span mean then inherits context and position from the clips it covers.

What a prototype stores is the last round's output (`prototype_readout`): the block's output, its attention read-out
alone, or ("input") that attention applied to the unit-length input frame features, so the prototypes are weighted
means of real frame features and the queries are mapped into the input feature space. With `subtract_video_mean`
each such prototype then loses a learned share of its video's mean unit frame: what every moment of the video
shares (its setting, in a real video) says little about which moment a query describes. With `temporal_prior`
each prototype also has a learned place and width in the video, a Gaussian bias on its attention logits, so the
prototypes spread over time instead of gathering on the same frames.

Score per branch: max over the video's prototypes of cosine similarity; final score
`clip_weight * s_clip + frame_weight * s_frame` (0.7 / 0.3 by default, the MS-SL / GMMFormer
convention of favouring the clip branch). p*, the *retrieved prototype*, is the argmax.

Training objectives (formulas in `protoprvr_losses` and, for the retrieval pair, in the
`retrieval_losses` shared with MS-SL / GMMFormer; each has a weight in cfg.losses, 0 turns it off):
    triplet  per branch, hinge ranking on cosine scores, both directions; random negatives before
             `hard_negative_start_epoch`, hard ones after (as MS-SL / GMMFormer)
    nce      per branch, InfoNCE both directions (or text to video only: `nce_video_to_text`) on the max raw dot
             product (MS-SL's logits), or on the max cosine / nce_temperature; `negative_memory` adds earlier
             batches' prototypes as negatives (XBM), from epoch `negative_memory_start_epoch` on
    crecon   ~30% of the query tokens (after projection) replaced by a mask token; a decoder
             cross-attends to p* of the positive video alone, then self-attends; InfoNCE on cosine
             between reconstructed and original masked tokens of the batch (both branches' p*, averaged)
    urecon   every prototype decoded by an MLP into frame-feature space and broadcast over the frames,
             frame t taking the mix of prototypes weighted by their attention on t; L2 to the
             LayerNorm-ed raw frame features on real frames (both branches, averaged)
    attn     each video concatenated with a random partner at doubled frame rate (in a random
             order); the query's p* on the mixed video should put >= 0.5 + beta of its attention
             on the query's own video (BCE while below that margin)
    ortho    positive cosine similarities between a video's prototypes, per branch

MSC's remedies for semantic collapse, each a switch (off by default; see `msc_losses`, `token_merge`):
    tcpl_distance, tcpl_angle  both pooled queries keep the distances and angles of the frozen input
             features at each query's last valid token
    cbva     frame tokens against the clip tokens sharing their frames (and back), before the prototypes
             aggregate them, through a training-only projection
    clip_tokens="merged"  the clip tokens are 128 uniform frames merged by order-preserving token merging,
             their sizes a +log(size) bias in the clip encoder's attention
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import protoprvr_losses as L
from ..errors import UsageError
from .config import BranchModelConfig, Settings
from .retrieval_losses import infonce_loss, triplet_loss
from .layers import (AttentionPool, InputProjection, LearnedPositions, downsample_frames, encode_with_key_bias,
                     span_index, span_means, span_to_token, uniform_bins)
from .msc_losses import angle_distillation, cross_branch_alignment, distance_distillation, last_valid_token
from .token_merge import merge_schedule, order_preserving_merge, span_centres
from .retrieval import QueryEncoding, RetrievalModel, TrainBatch, VideoEncoding

BRANCHES = ("clip", "frame")


@dataclass(frozen=True)
class LossWeights(Settings):
    """Weight of each training objective (Table 8 of the paper; TVR's nce is 0.03, set by its preset); 0 turns it off."""

    nce: float = 0.06
    triplet: float = 1.0
    crecon: float = 0.1
    urecon: float = 1.0
    attn: float = 0.005
    ortho: float = 0.01
    tcpl_distance: float = 0.0      # MSC's remedies, off unless a preset turns them on (15 / 30 / 0.1 in MSC)
    tcpl_angle: float = 0.0
    cbva: float = 0.0


@dataclass(frozen=True)
class ProtoPRVRConfig(BranchModelConfig):
    """ProtoPRVR's model section (models/protoprvr_*.json)."""

    ff_size: int | None = None          # the encoder layers' feed-forward width; None: hidden_size
    n_prototypes: int = 30              # per branch
    iterations: int = 1                 # rounds of prototype cross-attention
    max_query_tokens: int = 77          # CLIP's text context; longer queries are truncated
    margin: float = 0.1
    losses: LossWeights = field(default_factory=LossWeights)
    crecon_mask_ratio: float = 0.3
    crecon_temperature: float = 0.07
    crecon_layers: int = 1
    attn_beta: float = 0.2
    nce_temperature: float = 0.0     # 0: InfoNCE on raw max dot products (MS-SL); > 0: on max cosine / temperature
    clip_tokens: str = "uniform"    # or "merged": MSC's order-preserving merging of 128 frames, +log(size) attention
    tcpl_angle_anchors: int = 128
    prototype_attention: str = "keys"   # softmax over the keys, or "competitive": over the prototypes (slot attention)
    prototype_readout: str = "block"    # the last round's block output; "attention": its attention read-out alone;
                                        # "input": its attention applied to the input frame features themselves
    video_self_attention: bool = True   # False: the prototypes read the projected frames and clips unmixed
    query_encoder: str = "attention"    # or "mean": each branch's query is a linear map of the mean input token
    negative_memory: int = 0            # > 0: the prototypes of this many earlier batches join InfoNCE as negatives
    negative_memory_start_epoch: int = 0    # the memory's negatives count from this epoch on (0-based; XBM's warm-up)
    nce_video_to_text: bool = True      # False: InfoNCE ranks videos for each query only (as the linear probe)
    temporal_prior: bool = False        # each prototype also prefers keys near a learned place in the video (a
                                        # Gaussian bias on its attention logits, anchors spread evenly at the start)
    temporal_prior_width: float = 1.5   # the prior's initial standard deviation (learned), in spacings of the
                                        # anchors (1 / n_prototypes): 0.05 of the video at 30, no gaps at fewer
    subtract_video_mean: bool = False   # "input" read-out only: each stored prototype loses a learned share (one per
                                        # branch, from 0) of its video's mean unit frame, what all its moments share

    def __post_init__(self):
        if self.negative_memory < 0:
            raise UsageError(f"model.negative_memory must be >= 0 (batches remembered), got {self.negative_memory}")
        if self.negative_memory and not self.nce_temperature > 0:
            raise UsageError("model.negative_memory needs model.nce_temperature > 0 (the memory's negatives are "
                             "scored by cosine)")
        if self.prototype_attention not in ("keys", "competitive"):
            raise UsageError(f"model.prototype_attention {self.prototype_attention!r} is not supported; "
                             "use 'keys' or 'competitive'")
        if self.prototype_readout not in ("block", "attention", "input"):
            raise UsageError(f"model.prototype_readout {self.prototype_readout!r} is not supported; "
                             "use 'block', 'attention' or 'input'")
        if self.query_encoder not in ("attention", "mean"):
            raise UsageError(f"model.query_encoder {self.query_encoder!r} is not supported; use 'attention' or 'mean'")
        if self.subtract_video_mean and self.prototype_readout != "input":
            raise UsageError("model.subtract_video_mean needs model.prototype_readout 'input' (it subtracts a share of "
                             "the mean input frame)")
        if self.prototype_readout == "input" and self.query_encoder != "mean":
            raise UsageError("model.prototype_readout 'input' needs model.query_encoder 'mean' (its queries are mapped "
                             "into the input feature space)")
        if self.temporal_prior and not self.temporal_prior_width > 0:
            raise UsageError(f"model.temporal_prior_width must be > 0, got {self.temporal_prior_width}")
        if self.clip_tokens not in ("uniform", "merged"):
            raise UsageError(f"model.clip_tokens {self.clip_tokens!r} is not supported; use 'uniform' or 'merged'")
        if self.clip_tokens == "merged" and self.max_frames < self.n_clips:
            raise UsageError(f"model.clip_tokens 'merged' needs max_frames >= n_clips, "
                             f"got {self.max_frames} and {self.n_clips}")


class CrossAttentionBlock(nn.Module):
    """Queries read a key/value sequence: cross-attention + residual + LayerNorm, then FFN + residual + LayerNorm.

    There is no self-attention among the queries: each query row is updated on its own.
    Returns the updated queries [B, Nq, D] and the attention averaged over heads [B, Nq, Nk]
    (exactly zero on masked keys; attention dropout is off so rows sum to one).
    """

    def __init__(self, dim: int, heads: int, ff_dim: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ff_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff_dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, queries, keys, key_mask=None, spans: bool = False, competitive: bool = False,
                readout: bool = False, bias: torch.Tensor | None = None):
        """Attend from `queries` [B, Nq, D] to `keys` [B, Nk, D].

        With `readout=True` the first output is the attention read-out alone (the output projection of
        the weighted values), before the residual, the LayerNorm and the FFN: a linear map of a convex
        combination of the keys, with nothing of the queries' own vectors added.

        With `competitive=True` the softmax runs over the queries instead of the keys (as in slot
        attention): the queries compete for each key, and each query then takes the weighted mean of
        the keys it won. Queries that lose every key still average the keys by their small weights.

        With `spans=True`, `keys` are clip tokens and the real keys are the means of all their contiguous
        spans. Projecting keys and values is linear (and the span means are convex), so the model
        projects the few clip tokens and then takes span means of the projections: the same result as
        projecting all 528 spans, for a fraction of the work.

        `bias` [B or 1, Nq, Nk], when given, is added to every head's attention logits.
        """
        n_batch, n_queries, dim = queries.shape
        heads, head_dim = self.attn.num_heads, dim // self.attn.num_heads
        w_q, w_k, w_v = self.attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.attn.in_proj_bias.chunk(3)
        k, v = F.linear(keys, w_k, b_k), F.linear(keys, w_v, b_v)
        if spans:
            k, v = span_means(k), span_means(v)
        split = lambda t: t.view(n_batch, t.shape[1], heads, head_dim).transpose(1, 2)  # noqa: E731
        scores = split(F.linear(queries, w_q, b_q)) @ split(k).transpose(-1, -2) / head_dim ** 0.5
        if bias is not None:
            scores = scores + bias[:, None].to(scores.dtype)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
        if competitive:
            weights = scores.softmax(-2)
            if key_mask is not None:
                weights = weights * key_mask[:, None, None, :]
            weights = weights / weights.sum(-1, keepdim=True).clamp(min=1e-8)
        else:
            weights = scores.softmax(-1)                                              # [B, heads, Nq, Nk]
        out = self.attn.out_proj((weights @ split(v)).transpose(1, 2).reshape(n_batch, n_queries, dim))
        if readout:
            return out, weights.mean(1)
        x = self.norm1(queries + self.drop(out))
        x = self.norm2(x + self.drop(self.ffn(x)))
        return x, weights.mean(1)


class PrototypeGenerator(nn.Module):
    """`n_prototypes` shared learnable vectors refined by `iterations` rounds of cross-attention over tokens.

    The rounds share one block (iterative refinement, as in slot attention). Prototypes never attend
    to each other, so each one's output depends only on its own initial vector and the tokens.
    Returns prototypes [B, P, D] and the last round's attention over tokens [B, P, N].
    """

    def __init__(self, n_prototypes: int, dim: int, heads: int, ff_dim: int, iterations: int, dropout: float,
                 competitive: bool = False, readout: bool = False, prior_width: float | None = None):
        super().__init__()
        if iterations < 1 or n_prototypes < 1:
            raise UsageError(f"protoprvr needs n_prototypes >= 1 and iterations >= 1, "
                             f"got {n_prototypes} and {iterations}")
        self.init = nn.Parameter(torch.randn(n_prototypes, dim))  # unit scale, like DETR's object queries
        self.block = CrossAttentionBlock(dim, heads, ff_dim, dropout)
        self.iterations = iterations
        self.competitive = competitive
        self.readout = readout     # the last round returns its attention read-out (see CrossAttentionBlock)
        if prior_width is not None:    # temporal prior: an anchor and a width per prototype, both learned
            self.anchor = nn.Parameter((torch.arange(n_prototypes, dtype=torch.float32) + 0.5) / n_prototypes)
            self.log_width = nn.Parameter(torch.full((n_prototypes,), float(prior_width)).log())
        self.has_prior = prior_width is not None

    def temporal_bias(self, places: torch.Tensor) -> torch.Tensor:
        """Logit bias [B, P, N] of each prototype for keys at `places` [B, N] (fractions of the video's length):
        -(place - anchor)^2 / (2 width^2), a Gaussian window around the prototype's anchor."""
        width = self.log_width.exp()[None, :, None]
        return -((places[:, None, :] - self.anchor[None, :, None]) ** 2) / (2 * width ** 2)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None, spans: bool = False,
                places: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """With `spans=True` the tokens are clip tokens and the prototypes attend over all their spans.
        With a temporal prior, `places` [B or 1, N] gives each key's centre as a fraction of the video's length."""
        x = self.init.to(tokens.dtype).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        bias = self.temporal_bias(places) if self.has_prior else None
        for round_ in range(self.iterations):
            last = round_ == self.iterations - 1
            x, attn = self.block(x, tokens, mask, spans, self.competitive, self.readout and last, bias)
        return x, attn


class NegativeMemory:
    """Cross-batch memory (XBM: Wang et al., CVPR 2020): the prototypes of the last `size` training batches,
    detached, with their videos' ids. A later batch's queries score them as extra InfoNCE negatives, so each
    query sees (size + 1) x batch videos for the cost of one batch's encoding. A video's own copy, remembered
    from an earlier epoch, is skipped by id. Training only: kept in last.pt for --resume, not in best.pt.
    """

    def __init__(self, size: int):
        self.entries: deque = deque(maxlen=size)

    def scores(self, queries: dict, owners: torch.Tensor | None) -> dict | None:
        """Per branch, each query's max cosine [Q, M] with every remembered video (-1e4 where it is its own video)."""
        if not self.entries:
            return None
        out = {}
        for b in BRANCHES:
            protos = torch.cat([entry[b][0] for entry in self.entries])
            masks = torch.cat([entry[b][1] for entry in self.entries])
            out[b] = max_cosine(queries[b], protos, masks).values
        if owners is not None and all(entry["ids"] is not None for entry in self.entries):
            own = owners[:, None] == torch.cat([entry["ids"] for entry in self.entries]).to(owners.device)[None]
            out = {b: s.masked_fill(own, -1e4) for b, s in out.items()}
        return out

    def add(self, prototypes: dict, masks: dict, video_ids: torch.Tensor | None) -> None:
        self.entries.append({**{b: (prototypes[b].detach(), masks[b]) for b in BRANCHES}, "ids": video_ids})

    def state(self) -> list:
        return list(self.entries)

    def load(self, entries: list, device: torch.device) -> None:
        self.entries.clear()
        for entry in entries:
            self.entries.append({**{b: tuple(t.to(device) for t in entry[b]) for b in BRANCHES},
                                 "ids": entry["ids"]})


def max_cosine(queries: torch.Tensor, prototypes: torch.Tensor, mask: torch.Tensor):
    """Max over each video's prototypes of the cosine similarity [Q, B] and the prototype reaching it, p* [Q, B]."""
    cos = torch.einsum("qd,bnd->qbn", F.normalize(queries, dim=-1), F.normalize(prototypes, dim=-1))
    return cos.masked_fill(~mask[None], -2.0).max(-1)


def max_dot(queries: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Max over each video's prototypes of the raw dot product [Q, B] (the logits of MS-SL's InfoNCE)."""
    return torch.einsum("qd,bnd->qbn", queries, prototypes).max(-1).values


class ProtoPRVR(RetrievalModel):
    """Prototype-based PRVR model: see the module docstring; hyper-parameters come from `cfg`."""

    method = "protoprvr"

    Config = ProtoPRVRConfig

    def __init__(self, video_dim: int, text_dim: int, cfg: ProtoPRVRConfig | dict | None = None):
        super().__init__(video_dim, text_dim, cfg)
        cfg = self.cfg
        hidden, heads, ff_dim, dropout = cfg.hidden_size, cfg.n_heads, cfg.ff_size or cfg.hidden_size, cfg.dropout
        n_prototypes, iterations = cfg.n_prototypes, cfg.iterations
        self.max_frames, self.n_clips, self.max_words = cfg.max_frames, cfg.n_clips, cfg.max_query_tokens
        self.clip_weight, self.frame_weight = cfg.clip_weight, cfg.frame_weight
        self.loss_weights = cfg.losses.as_dict()
        self.margin = cfg.margin
        self.hard_negative_start = cfg.hard_negative_start_epoch
        self.hard_pool = cfg.hard_pool_size
        self.crecon_ratio = cfg.crecon_mask_ratio
        self.crecon_temperature = cfg.crecon_temperature
        self.beta = cfg.attn_beta

        def encoder_layer():
            return nn.TransformerEncoderLayer(hidden, heads, ff_dim, dropout, batch_first=True)

        def prototypes():
            return PrototypeGenerator(n_prototypes, hidden, heads, ff_dim, iterations, dropout,
                                      cfg.prototype_attention == "competitive", cfg.prototype_readout != "block",
                                      cfg.temporal_prior_width / cfg.n_prototypes if cfg.temporal_prior else None)

        # video branches
        self.frame_proj = InputProjection(video_dim, hidden, dropout)
        self.frame_pos = LearnedPositions(self.max_frames, hidden, dropout)
        mixing = encoder_layer if cfg.video_self_attention else (lambda: None)
        self.frame_encoder, self.frame_prototypes = mixing(), prototypes()
        self.clip_proj = InputProjection(video_dim, hidden, dropout)
        self.clip_pos = LearnedPositions(self.n_clips, hidden, dropout)
        self.clip_encoder, self.clip_prototypes = mixing(), prototypes()
        self.register_buffer("span_to_clip", span_to_token(self.n_clips), persistent=False)
        self.register_buffer("span_bounds", torch.stack(span_index(self.n_clips)), persistent=False)  # first, last clip
        # each span's centre over equal clips, a fraction of the video's length (merged clips: per video, below)
        self.register_buffer("span_places", span_centres(torch.ones(1, self.n_clips), *self.span_bounds),
                             persistent=False)
        # query
        self.query_proj = InputProjection(text_dim, hidden, dropout)
        self.query_pos = LearnedPositions(self.max_words, hidden, dropout)
        self.query_encoder = encoder_layer()
        self.query_pool = nn.ModuleDict({b: AttentionPool(hidden) for b in BRANCHES})
        if cfg.prototype_readout == "input":   # stored prototypes live in the input feature space
            self.output_dim = video_dim
        if cfg.subtract_video_mean:    # per branch, the share of the video's mean unit frame taken off its prototypes
            self.video_mean_share = nn.ParameterDict({b: nn.Parameter(torch.zeros(())) for b in BRANCHES})
        if cfg.query_encoder == "mean":   # replaces the encoder and pools above when encoding queries
            self.query_mean = nn.ModuleDict({b: nn.Linear(text_dim, self.output_dim) for b in BRANCHES})
        # cross-modal masked reconstruction decoder: cross-attend to p*, then self-attend
        self.mask_token = nn.Parameter(torch.randn(hidden) * 0.02)
        self.crecon_pos = LearnedPositions(self.max_words, hidden, dropout)
        self.crecon_cross = CrossAttentionBlock(hidden, heads, ff_dim, dropout)
        self.crecon_self = nn.ModuleList(encoder_layer() for _ in range(cfg.crecon_layers))
        self.crecon_head = nn.Linear(hidden, hidden)
        # uni-modal reconstruction: one MLP per branch decodes prototypes into frame features
        self.urecon_decoder = nn.ModuleDict({
            b: nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, video_dim)) for b in BRANCHES})
        if cfg.losses.cbva > 0:
            self.align_proj = nn.Linear(hidden, hidden)   # CBVA only: never used to encode
        self.memory = NegativeMemory(cfg.negative_memory) if cfg.negative_memory else None

    # ------------------------------------------------------------------ encoding
    def encode_videos(self, frames: torch.Tensor, frame_mask: torch.Tensor | None = None) -> VideoEncoding:
        """Prototypes [B, P, output_dim] per branch and their attention over the input frames [B, P, T]."""
        return self._prototypes(self._video_tokens(frames, frame_mask))[0]

    def _video_tokens(self, frames: torch.Tensor, frame_mask: torch.Tensor | None) -> dict:
        """Both branches' encoded tokens, with the matrices mapping each token onto the input frames."""
        if frame_mask is None:
            frame_mask = torch.ones(frames.shape[:2], dtype=torch.bool, device=frames.device)
        n_frames = frames.shape[1]
        frames = frames.masked_fill(~frame_mask[..., None], 0.0)
        lengths = frame_mask.sum(1)

        # frame branch: <= max_frames tokens
        pool, token_mask = downsample_frames(lengths, min(self.max_frames, n_frames), n_frames)
        pool = pool.to(frames.dtype)
        x_frames = self.frame_pos(self.frame_proj(pool @ frames))
        if self.frame_encoder is not None:
            x_frames = self.frame_encoder(x_frames, src_key_padding_mask=~token_mask)

        # clip branch: n_clips tokens, uniform bins or merged neighbours (sizes as a +log(size) attention bias)
        if self.cfg.clip_tokens == "merged":
            resample = uniform_bins(lengths, self.max_frames, n_frames).to(frames.dtype)
            clip_in, sizes, frame_to_clip = order_preserving_merge(resample @ frames, merge_schedule(
                self.max_frames, self.n_clips))
            member = F.one_hot(frame_to_clip, self.n_clips).transpose(1, 2).to(frames.dtype)
            bins = (member / member.sum(-1, keepdim=True).clamp(min=1)) @ resample
            x_clips = self.clip_pos(self.clip_proj(clip_in))
            if self.clip_encoder is not None:
                x_clips = encode_with_key_bias(self.clip_encoder, x_clips, sizes.log())
            span_places = span_centres(sizes, *self.span_bounds)   # merged clips differ in length: per video
        else:
            bins = uniform_bins(lengths, self.n_clips, n_frames).to(frames.dtype)
            x_clips = self.clip_pos(self.clip_proj(bins @ frames))
            if self.clip_encoder is not None:
                x_clips = self.clip_encoder(x_clips)
            span_places = self.span_places
        tok = {"frames": x_frames, "frame_mask": token_mask, "frame_pool": pool, "clips": x_clips, "clip_bins": bins,
               "span_places": span_places}
        if self.cfg.prototype_readout == "input":   # what the stored prototypes average: the unit input frames
            tok["inputs"] = F.normalize(frames, dim=-1)
            if self.cfg.subtract_video_mean:
                tok["input_mean"] = tok["inputs"].sum(1, keepdim=True) / lengths.clamp(min=1).view(-1, 1, 1)
        return tok

    def _prototypes(self, tok: dict) -> tuple[VideoEncoding, dict]:
        """Per branch, the prototypes attend over the tokens (the clip branch: over every span of its clips).
        Returns the stored prototypes and, per branch, the prototypes in the hidden space (the same ones unless
        the read-out is "input": then the stored ones are the attention's weighted means of the unit input frames)."""
        mask, frame_places = tok["frame_mask"], None
        if self.cfg.temporal_prior:   # each frame token's centre, a fraction of the video's length
            frame_places = (torch.arange(mask.shape[1], device=mask.device)[None] + 0.5) / mask.sum(1, keepdim=True).clamp(min=1)
        frame_protos, attn = self.frame_prototypes(tok["frames"], mask, places=frame_places)
        frame_attn = attn @ tok["frame_pool"]
        clip_protos, attn = self.clip_prototypes(tok["clips"], None, spans=True, places=tok["span_places"])
        clip_attn = (attn @ self.span_to_clip.to(attn.dtype)) @ tok["clip_bins"]
        hidden = {"clip": clip_protos, "frame": frame_protos}
        if self.cfg.prototype_readout == "input":
            clip_protos, frame_protos = clip_attn @ tok["inputs"], frame_attn @ tok["inputs"]
            if self.cfg.subtract_video_mean:    # attention rows sum to one: the same as averaging frames minus the share
                clip_protos = clip_protos - self.video_mean_share["clip"] * tok["input_mean"]
                frame_protos = frame_protos - self.video_mean_share["frame"] * tok["input_mean"]
        all_true = torch.ones(clip_protos.shape[:2], dtype=torch.bool, device=clip_protos.device)
        return VideoEncoding(clip_protos, all_true, frame_protos, all_true.clone(), clip_attn, frame_attn), hidden

    def _encode_tokens(self, tokens: torch.Tensor, token_mask: torch.Tensor):
        """Query vectors per branch, plus the projected tokens and mask (targets of the masked reconstruction)."""
        tokens, token_mask = tokens[:, : self.max_words], token_mask[:, : self.max_words].clone()
        token_mask[:, 0] |= ~token_mask.any(1)  # an empty query still attends to something
        projected = self.query_proj(tokens)
        if self.cfg.query_encoder == "mean":
            weights = token_mask[..., None].to(tokens.dtype)
            mean = F.normalize((tokens * weights).sum(1) / weights.sum(1).clamp(min=1), dim=-1)
            return QueryEncoding(self.query_mean["clip"](mean), self.query_mean["frame"](mean)), projected, token_mask
        x = self.query_encoder(self.query_pos(projected), src_key_padding_mask=~token_mask)
        pooled = QueryEncoding(self.query_pool["clip"](x, token_mask), self.query_pool["frame"](x, token_mask))
        return pooled, projected, token_mask

    def encode_queries(self, tokens: torch.Tensor, token_mask: torch.Tensor) -> QueryEncoding:
        return self._encode_tokens(tokens, token_mask)[0]

    def score(self, queries: QueryEncoding, videos: VideoEncoding) -> torch.Tensor:
        s_clip = max_cosine(queries.clip, videos.clip, videos.clip_mask).values
        s_frame = max_cosine(queries.frame, videos.frame, videos.frame_mask).values
        return self.clip_weight * s_clip + self.frame_weight * s_frame

    # ------------------------------------------------------------------ training
    def training_state(self) -> dict:
        return {"negative_memory": self.memory.state()} if self.memory is not None else {}

    def load_training_state(self, state: dict) -> None:
        if self.memory is not None and "negative_memory" in state:
            self.memory.load(state["negative_memory"], next(self.parameters()).device)

    def forward(self, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted sum of the enabled objectives (weight > 0); terms are reported weighted, by name."""
        w = self.loss_weights
        tok = self._video_tokens(batch.frames, batch.frame_mask)
        videos, hidden = self._prototypes(tok)
        queries, projected, token_mask = self._encode_tokens(batch.tokens, batch.token_mask)
        vi, rows = batch.video_index, torch.arange(len(batch.video_index), device=batch.frames.device)
        protos = {"clip": videos.clip, "frame": videos.frame}
        query = {"clip": queries.clip, "frame": queries.frame}
        masks = {"clip": videos.clip_mask, "frame": videos.frame_mask}
        scores = {b: max_cosine(query[b], protos[b], masks[b]) for b in BRANCHES}  # (cosine [Q, B], p* [Q, B])
        losses = {}

        if w["triplet"] > 0:  # retrieval: triplet ranking per branch, hard negatives after the warm-up
            hard = batch.epoch >= self.hard_negative_start
            losses["triplet"] = sum(triplet_loss(scores[b][0], vi, self.margin, hard, self.hard_pool)
                                    for b in BRANCHES)
        if w["nce"] > 0:  # retrieval: InfoNCE per branch on raw dot products (as MS-SL), or on cosine / temperature
            tau = self.cfg.nce_temperature
            owners = None if batch.video_ids is None else batch.video_ids.to(vi.device)[vi]
            warm = batch.epoch >= self.cfg.negative_memory_start_epoch
            use_memory = self.memory is not None and self.training and warm
            extra = self.memory.scores(query, owners) if use_memory else None
            both = self.cfg.nce_video_to_text
            losses["nce"] = sum(infonce_loss(scores[b][0], vi, tau, None if extra is None else extra[b], both) if tau
                                else infonce_loss(max_dot(query[b], protos[b]), vi, video_to_text=both)
                                for b in BRANCHES)
        if self.memory is not None and self.training:
            self.memory.add(protos, masks, batch.video_ids)
        if w["crecon"] > 0:  # masked query tokens rebuilt from the retrieved prototype p* of the positive video
            p_star = torch.stack([hidden[b][vi, scores[b][1][rows, vi]] for b in BRANCHES])  # [2, Q, H]
            losses["crecon"] = self._cross_modal_reconstruction(projected, token_mask, p_star)
        if w["urecon"] > 0:  # all prototypes decoded and broadcast over the frames rebuild the features
            losses["urecon"] = self._uni_modal_reconstruction(batch, videos, hidden)
        if w["attn"] > 0 and len(batch.frames) > 1:  # needs a partner video to mix with
            losses["attn"] = self._attention_guidance(batch, query)
        if w["ortho"] > 0:
            losses["ortho"] = sum(L.orthogonal_loss(protos[b]) for b in BRANCHES) / len(BRANCHES)
        if w["tcpl_distance"] > 0 or w["tcpl_angle"] > 0:  # MSC: pooled queries keep the input text's relations
            teacher = last_valid_token(batch.tokens, batch.token_mask)
            if w["tcpl_distance"] > 0:
                losses["tcpl_distance"] = sum(distance_distillation(query[b], teacher) for b in BRANCHES) / 2
            if w["tcpl_angle"] > 0:
                anchors = self.cfg.tcpl_angle_anchors
                losses["tcpl_angle"] = sum(angle_distillation(query[b], teacher, anchors) for b in BRANCHES) / 2
        if w["cbva"] > 0:  # MSC: frame tokens against the clip tokens that share their frames, before prototypes
            holds = (tok["frame_pool"] @ tok["clip_bins"].transpose(1, 2)) > 0                  # [B, F, C]
            losses["cbva"] = cross_branch_alignment(self.align_proj(tok["frames"]), self.align_proj(tok["clips"]),
                                                    holds, tok["frame_mask"])

        weighted = {name: w[name] * value for name, value in losses.items()}
        total = sum(weighted.values()) if weighted else batch.frames.new_zeros(())
        return total, {name: float(value.detach()) for name, value in weighted.items()}

    def _cross_modal_reconstruction(self, projected, token_mask, p_star):
        """Mask query tokens, decode them attending to p* alone then to each other, InfoNCE against the originals.

        Both branches' p* decode the same masked sequence (stacked on the batch axis); the loss is their mean.
        """
        masked = L.random_token_mask(token_mask, self.crecon_ratio)
        x = self.crecon_pos(torch.where(masked[..., None], self.mask_token.to(projected.dtype), projected))
        n_branches, n_queries, hidden = p_star.shape
        x, _ = self.crecon_cross(x.repeat(n_branches, 1, 1), p_star.reshape(-1, 1, hidden))
        for layer in self.crecon_self:
            x = layer(x, src_key_padding_mask=~token_mask.repeat(n_branches, 1))
        recon = self.crecon_head(x).view(n_branches, n_queries, -1, hidden)[:, masked]  # [2, M, H]
        target = projected[masked]
        return sum(L.masked_token_nce(r, target, self.crecon_temperature) for r in recon) / n_branches

    def _uni_modal_reconstruction(self, batch: TrainBatch, videos: VideoEncoding, hidden: dict) -> torch.Tensor:
        """Per branch, decode every prototype with an MLP, broadcast over frames by attention, L2 to the frames.

        The target is the raw frame features normalised per frame (LayerNorm without affine), so the loss
        scale does not depend on the feature extractor and the target cannot collapse.
        """
        target = F.layer_norm(batch.frames, batch.frames.shape[-1:])
        loss = 0.0
        for branch, attn in zip(BRANCHES, (videos.clip_attn, videos.frame_attn)):
            recon = L.broadcast_reconstruction(self.urecon_decoder[branch](hidden[branch]), attn)
            loss = loss + L.reconstruction_l2(recon, target, batch.frame_mask)
        return loss / len(BRANCHES)

    def _attention_guidance(self, batch: TrainBatch, query: dict) -> torch.Tensor:
        """Mix each video with a random partner; the query's p* on the mix should attend to its own video."""
        n_videos = len(batch.frames)
        shift = int(torch.randint(1, n_videos, ()))
        partner = (torch.arange(n_videos, device=batch.frames.device) + shift) % n_videos
        own_first = torch.rand(n_videos, device=batch.frames.device) < 0.5
        mixed, mixed_mask, first_half = L.mix_videos(batch.frames, batch.frame_mask, partner, own_first)
        mix = self.encode_videos(mixed, mixed_mask)
        vi = batch.video_index
        loss = 0.0
        for protos, attn, q in ((mix.clip, mix.clip_attn, query["clip"]), (mix.frame, mix.frame_attn, query["frame"])):
            sims = torch.einsum("qd,qpd->qp", F.normalize(q, dim=-1), F.normalize(protos[vi], dim=-1))
            p_star = sims.argmax(-1)
            share_first = (attn[vi, p_star] * first_half[vi]).sum(-1)
            loss = loss + L.attention_guidance(share_first, own_first[vi], self.beta)
        return loss / len(BRANCHES)
