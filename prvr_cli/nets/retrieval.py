"""The contract every retrieval method implements (ProtoPRVR, MS-SL, GMMFormer).

A method turns padded frame features into a few *stored vectors* per branch
(what the index keeps per video) and query tokens into one vector per branch,
and scores the two. Training code, evaluation and the benchmark only speak
this contract, so every method is trained and measured the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import BranchModelConfig


@dataclass
class VideoEncoding:
    """Stored vectors of a batch of videos, per branch, with masks and frame attention.

    clip / frame: [B, N, D] (N is the method's number of stored vectors per video).
    *_mask: [B, N] bool, False for padding.
    *_attn: [B, N, T] attention of each stored vector over the input frames
    (rows sum to 1), or None when the method has no such notion.
    """

    clip: torch.Tensor
    clip_mask: torch.Tensor
    frame: torch.Tensor
    frame_mask: torch.Tensor
    clip_attn: torch.Tensor | None = None
    frame_attn: torch.Tensor | None = None

    def index(self, idx) -> "VideoEncoding":
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return VideoEncoding(self.clip[idx], self.clip_mask[idx], self.frame[idx], self.frame_mask[idx],
                             pick(self.clip_attn), pick(self.frame_attn))


@dataclass
class QueryEncoding:
    """One vector per query and branch: clip / frame [Q, D]."""

    clip: torch.Tensor
    frame: torch.Tensor


@dataclass
class TrainBatch:
    """Videos with all their queries.

    frames [B, T, Dv] with frame_mask [B, T]; tokens [Q, L, Dt] with token_mask [Q, L];
    video_index [Q] says which video of the batch each query describes; epoch is
    the current epoch (hard-negative mining starts after a warm-up); video_ids [B], when given, are
    the videos' rows in their split (a memory of earlier batches uses them to skip a video's own copy).
    """

    frames: torch.Tensor
    frame_mask: torch.Tensor
    tokens: torch.Tensor
    token_mask: torch.Tensor
    video_index: torch.Tensor
    epoch: int = 0
    video_ids: torch.Tensor | None = None

    def to(self, device) -> "TrainBatch":
        ids = None if self.video_ids is None else self.video_ids.to(device)
        return TrainBatch(self.frames.to(device), self.frame_mask.to(device), self.tokens.to(device),
                          self.token_mask.to(device), self.video_index.to(device), self.epoch, ids)


class RetrievalModel(nn.Module):
    """Base class: subclasses implement the four methods below; `Config` is the dataclass of their model section."""

    method: str = ""
    Config: type = BranchModelConfig

    def __init__(self, video_dim: int, text_dim: int, cfg=None):
        """Feature dims from the data; `cfg` a Config, or a dict (None: the defaults) checked key by key."""
        super().__init__()
        self.video_dim, self.text_dim = video_dim, text_dim
        self.cfg = cfg if isinstance(cfg, self.Config) else self.Config.from_dict(cfg, f"{self.method} model")
        self.output_dim = getattr(self.cfg, "hidden_size", None)  # where stored and query vectors live

    def encode_videos(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> VideoEncoding:
        raise NotImplementedError

    def encode_queries(self, tokens: torch.Tensor, token_mask: torch.Tensor) -> QueryEncoding:
        raise NotImplementedError

    def score(self, queries: QueryEncoding, videos: VideoEncoding) -> torch.Tensor:
        """Similarity [Q, B] of every query with every video (higher is better)."""
        raise NotImplementedError

    def forward(self, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Total training loss and its named, weighted terms (floats, for logging)."""
        raise NotImplementedError

    def training_state(self) -> dict:
        """State that training builds up outside the weights (saved in last.pt so --resume is exact)."""
        return {}

    def load_training_state(self, state: dict) -> None:
        """Restore what `training_state` returned."""


class WeightedBranchModel(RetrievalModel):
    """A baseline whose score is cfg's clip_weight * clip score + frame_weight * frame score.

    Subclasses implement `branch_scores(queries, videos) -> (clip [Q, B], frame [Q, B])`.
    """

    def score(self, queries: QueryEncoding, videos: VideoEncoding) -> torch.Tensor:
        clip, frame = self.branch_scores(queries, videos)
        return self.cfg.clip_weight * clip + self.cfg.frame_weight * frame

    def hard_negatives(self, epoch: int) -> bool:
        """Whether triplet negatives are the hardest ones yet (after the warm-up epochs; -1 means never)."""
        start = self.cfg.hard_negative_start_epoch
        return start >= 0 and epoch >= start
