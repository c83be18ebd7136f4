"""Stage 4: turn a video's frame features into Lp prototypes per branch, and a query into one vector per branch.

Two builders share one interface:

- `ZeroShotPrototypes` works in CLIP space with no training. The frame branch
  clusters the (at most 128) frame tokens; the clip branch clusters the 528
  multi-scale spans of 32 clip tokens. Both start from spread-out seeds and run a
  few soft-assignment steps, the training-free analogue of ProtoPRVR's
  prototypes cross-attending to the video. Queries are CLIP's pooled text feature.
- `TrainedPrototypes` runs a checkpoint from `prvr train` (ProtoPRVR's video and
  query branches).

Each prototype carries its attention over the video's frames (rows sum to one):
highlights are read from it at search time. Every vector is L2-normalised, so a
video's score is a max of dot products.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..nets import layers
from .discover import hash_file
from ..errors import MismatchError, UsageError


@dataclass
class VideoPrototypes:
    """Per branch: prototypes [Lp, D] and their attention over the video's frames [Lp, T]."""

    clip: np.ndarray
    frame: np.ndarray
    clip_attn: np.ndarray
    frame_attn: np.ndarray


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def _farthest_points(x: torch.Tensor, k: int, first: int) -> torch.Tensor:
    """Indices of k rows of unit vectors `x` chosen greedily to be far apart (cosine), starting at `first`."""
    chosen = [first]
    closest = x @ x[first]
    for _ in range(k - 1):
        nxt = int(torch.argmin(closest))
        chosen.append(nxt)
        closest = torch.maximum(closest, x @ x[nxt])
    return torch.tensor(chosen)


def _soft_cluster(tokens: torch.Tensor, seeds: torch.Tensor, iterations: int, temperature: float):
    """Refine seed prototypes by attending over `tokens`; returns prototypes and attention [Lp, N]."""
    protos = seeds
    attn = torch.softmax(protos @ tokens.T / temperature, dim=-1)
    for _ in range(iterations):
        protos = _normalize(attn @ tokens)
        attn = torch.softmax(protos @ tokens.T / temperature, dim=-1)
    return protos, attn


class ZeroShotPrototypes:
    """Training-free prototypes in CLIP space."""

    kind = "zero-shot"

    def __init__(self, n_prototypes: int = 30, n_clips: int = 32, max_frames: int = 128, iterations: int = 2,
                 temperature: float = 0.03):
        self.n_prototypes, self.n_clips, self.max_frames = n_prototypes, n_clips, max_frames
        self.iterations, self.temperature = iterations, temperature
        self.branch_weights = (0.5, 0.5)
        self.span_to_token = layers.span_to_token(n_clips)

    def proxy_scorer(self):
        raise UsageError("--rerank needs an index built with a trained model that has a text-proxy head "
                         "(`prvr train --proxy-head`, then `prvr reindex --model proxy.pt`); this index is zero-shot")

    def spec(self) -> dict:
        return {"kind": self.kind, "n_prototypes": self.n_prototypes, "n_clips": self.n_clips,
                "max_frames": self.max_frames, "iterations": self.iterations, "temperature": self.temperature,
                "branch_weights": list(self.branch_weights), "fingerprint": f"zero-shot-{self.n_prototypes}"
                f"-{self.n_clips}-{self.max_frames}-{self.iterations}-{self.temperature}"}

    def output_dim(self, feature_dim: int) -> int:
        """Prototypes live in CLIP space: their dim is the features'."""
        return feature_dim

    def build(self, features: np.ndarray) -> VideoPrototypes:
        """Frame features [T, D] (L2-normalised CLIP features) -> prototypes of both branches."""
        frames = torch.from_numpy(np.asarray(features, dtype=np.float32))
        T, lp = frames.shape[0], self.n_prototypes
        length = torch.tensor([T])

        # frame branch: cluster the frame tokens, seeded by Lp uniform temporal segments
        pool, _ = layers.downsample_frames(length, self.max_frames, T)
        n_tok = min(T, self.max_frames)
        to_frame = pool[0, :n_tok]                                          # [N, T]
        tokens = _normalize(to_frame @ frames)
        seeds = _normalize(layers.uniform_bins(torch.tensor([n_tok]), lp, n_tok)[0] @ tokens)
        frame_protos, attn = _soft_cluster(tokens, seeds, self.iterations, self.temperature)
        frame_attn = attn @ to_frame

        # clip branch: cluster the multi-scale spans, seeded by far-apart spans from the whole video
        bins = layers.uniform_bins(length, self.n_clips, T)[0]              # [32, T]
        span_to_frame = self.span_to_token @ bins                           # [528, T]
        spans = _normalize(layers.span_means((bins @ frames)[None])[0])
        seeds = spans[_farthest_points(spans, lp, first=spans.shape[0] - 1)]
        clip_protos, attn = _soft_cluster(spans, seeds, self.iterations, self.temperature)
        clip_attn = attn @ span_to_frame

        return VideoPrototypes(clip_protos.numpy(), frame_protos.numpy(), clip_attn.numpy(), frame_attn.numpy())

    def encode_queries(self, encoder, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        q = encoder.encode_text(texts)
        return q, q


class TrainedPrototypes:
    """Prototypes and query vectors from a model trained with `prvr train`."""

    kind = "trained"

    def __init__(self, model, meta: dict, checkpoint: Path, device: str = "cpu"):
        self.model, self.meta, self.checkpoint = model.to(device), meta, Path(checkpoint).resolve()
        self.device = device
        self.branch_weights = (float(model.clip_weight), float(model.frame_weight))
        self.digest = hash_file(self.checkpoint, hashlib.sha1())[:16]

    @classmethod
    def load(cls, checkpoint: str | Path, encoder_spec: dict, device: str = "cpu") -> "TrainedPrototypes":
        """Load a checkpoint and check it was trained on features like this encoder's."""
        from ..nets.factory import load_checkpoint

        model, meta = load_checkpoint(checkpoint)
        dims, dim = meta["dims"], encoder_spec["dim"]
        if dims["video"] != dim or dims["text"] != dim:
            raise MismatchError(
                f"checkpoint {checkpoint} expects video/text features of dim {dims['video']}/{dims['text']}, "
                f"but the CLIP encoder {encoder_spec['clip_model']} gives {dim}; train on this encoder's features "
                "(prvr train --index ... --captions ...)")
        trained_on = meta.get("feature_source", {}).get("encoder_fingerprint")
        if trained_on and trained_on != encoder_spec["fingerprint"]:
            raise MismatchError(f"checkpoint {checkpoint} was trained on features of another CLIP encoder "
                                f"({meta['feature_source'].get('clip_model')}); use the same --clip-model and "
                                "--clip-pretrained as its training index")
        return cls(model, meta, Path(checkpoint), device)

    def spec(self) -> dict:
        cfg = self.meta["config"]
        return {"kind": self.kind, "method": cfg["method"], "preset": cfg.get("preset"),
                "checkpoint": str(self.checkpoint), "n_prototypes": int(cfg["model"].get("n_prototypes", 30)),
                "branch_weights": list(self.branch_weights), "fingerprint": f"{cfg['method']}-{self.digest}"}

    def output_dim(self, feature_dim: int) -> int:
        """Prototypes live in the model's joint space."""
        return int(self.model.output_dim)

    @torch.inference_mode()
    def build(self, features: np.ndarray) -> VideoPrototypes:
        frames = torch.from_numpy(np.asarray(features, dtype=np.float32))[None].to(self.device)
        mask = torch.ones(frames.shape[:2], dtype=torch.bool, device=self.device)
        enc = self.model.encode_videos(frames, mask)
        out = [_normalize(enc.clip[0]), _normalize(enc.frame[0]), enc.clip_attn[0], enc.frame_attn[0]]
        return VideoPrototypes(*(t.float().cpu().numpy() for t in out))

    def proxy_scorer(self) -> "ProxyScorer":
        """The checkpoint's text-proxy re-ranking head (`prvr train --proxy-head`)."""
        from ..nets.text_proxy import load_proxy_head

        head, gamma = load_proxy_head(self.meta, int(self.model.output_dim))
        return ProxyScorer(head.to(self.device), gamma, self.branch_weights, self.device)

    @torch.inference_mode()
    def encode_queries(self, encoder, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        tokens = encoder.encode_text_tokens(texts)
        L = max(t.shape[0] for t in tokens)
        padded = torch.zeros(len(tokens), L, tokens[0].shape[1])
        mask = torch.zeros(len(tokens), L, dtype=torch.bool)
        for i, t in enumerate(tokens):
            padded[i, :len(t)] = torch.from_numpy(t)
            mask[i, :len(t)] = True
        q = self.model.encode_queries(padded.to(self.device), mask.to(self.device))
        return _normalize(q.clip).cpu().numpy(), _normalize(q.frame).cpu().numpy()


class ProxyScorer:
    """Proxy scores of one query against its candidates' stored vectors, both branches, weighted as the first stage."""

    def __init__(self, head, gamma: float, branch_weights: tuple[float, float], device: str):
        self.head, self.gamma, self.weights, self.device = head, gamma, branch_weights, device

    @torch.inference_mode()
    def __call__(self, q_clip: np.ndarray, q_frame: np.ndarray, clip: np.ndarray, frame: np.ndarray) -> np.ndarray:
        """q_* [D] and the candidates' stored vectors [K, Lp, D] -> proxy score [K]."""
        from ..nets.text_proxy import weighted_pair_scores

        branches = []
        for q, vectors in ((q_clip, clip), (q_frame, frame)):
            v = torch.from_numpy(np.asarray(vectors, dtype=np.float32)).to(self.device)
            t = torch.from_numpy(np.asarray(q, dtype=np.float32)).to(self.device).expand(len(v), -1)
            branches.append((t, v, torch.ones(v.shape[:2], dtype=torch.bool, device=self.device)))
        return weighted_pair_scores(self.head, self.weights, branches).float().cpu().numpy()


ZERO_SHOT = "zero-shot"


def load_builder(model: str | None, encoder_spec: dict, device: str):
    """The prototype builder: a trained ProtoPRVR checkpoint, or zero-shot CLIP prototypes (no model or 'zero-shot')."""
    if not model or model == ZERO_SHOT:
        return ZeroShotPrototypes()
    builder = TrainedPrototypes.load(model, encoder_spec, device=device)
    if builder.meta["method"] != "protoprvr":
        raise UsageError(f"--model {model}: an index stores prototypes, so it needs a ProtoPRVR checkpoint, "
                         f"not {builder.meta['method']}")
    return builder
