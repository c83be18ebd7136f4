"""Text proxies (TV-ProxyNet, arXiv 2410.06618) as a re-ranking stage over any method's stored vectors.

For a query vector t and a candidate video's stored vectors v_1..v_M (ProtoPRVR's prototypes, a
baseline's clips or frames), a small decoder (2 cross-attention layers, 1 head) reads the video with t
as its query and gives p. The proxy moves t towards what this video shows:

    director  d = normalize(delta * t - eta * p)
    dash      exp(theta * mean_m cos(t, v_m))   (learnable theta; or "linear": exp(W [cos(t, v_m)]_m), per dim)
    proxy     t + dash * d
    score     max_m cos(proxy, v_m), per branch, mixed with the method's branch weights

A re-ranked candidate scores `first_stage + gamma * proxy score`; gamma is chosen on the validation split
after training. The reference scores every query against every video, which no index can serve, and
compares the proxy with one pooled video vector; here it only reorders a first stage's top K, and compares
with the best-matching stored vector, as the first stage does (partial relevance).

Training (the base model frozen, its vectors computed once): per batch of videos with their queries,
    Lp    InfoNCE over the batch on proxy(q, j) . v_j (learnable temperature), weight alpha
    Lpos  InfoNCE on the positive pair's proxy proxy(q, own video) against every video j, weight beta
The reference's third term (InfoNCE on t . v) trains the base model, which stays fixed here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from .config import Settings
from .retrieval_losses import infonce_loss


@dataclass(frozen=True)
class ProxyConfig(Settings):
    """The proxy head's settings (the `proxy` section of a checkpoint); the reference's values by default."""

    n_layers: int = 2
    n_heads: int = 1
    ff_size: int | None = None        # None: the vectors' dimension
    dropout: float = 0.1
    delta: float = 1.0
    eta: float = 1.0
    dash: str = "theta"               # or "linear" (needs a fixed number of stored vectors per video)
    alpha: float = 0.75               # weight of Lp (ActivityNet's value)
    beta: float = 0.25                # weight of Lpos
    temperature: float = 0.05         # initial; learned

    def __post_init__(self):
        if self.dash not in ("theta", "linear"):
            raise UsageError(f"proxy.dash {self.dash!r} is not supported; use 'theta' or 'linear'")


class ProxyLayer(nn.Module):
    """Pre-normalised cross-attention from the proxies to the video's vectors, then a feed-forward layer."""

    def __init__(self, dim: int, heads: int, ff: int, dropout: float):
        super().__init__()
        self.norm_query, self.norm_memory = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_mid, self.norm_out = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        x = self.norm_query(x)
        memory = self.norm_memory(memory)
        if not self.training and x.shape[1] < memory.shape[1]:
            read = self.read_folded(x, memory, pad)
        else:
            read, _ = self.attn(x, memory, memory, key_padding_mask=pad, need_weights=False)
        x = self.norm_mid(x + self.drop(read))
        return self.norm_out(x + self.drop(self.ffn(x)))

    def read_folded(self, x: torch.Tensor, memory: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        """The attention's output without projecting the memory: with few query rows (re-ranking: one per pair)
        the key map is folded into the query, q.(Wk m + bk) = (q Wk).m + const, and the value map applied after
        averaging, sum_m a_m (Wv m + bv) = Wv (sum_m a_m m) + bv. Same result as `self.attn` in eval mode."""
        attn, dim = self.attn, x.shape[-1]
        heads, head_dim = attn.num_heads, dim // attn.num_heads
        w_q, w_k, w_v = attn.in_proj_weight.split(dim)
        b_q, _, b_v = attn.in_proj_bias.split(dim)
        n, rows = x.shape[:2]
        q = (x @ w_q.T + b_q).view(n, rows, heads, head_dim).transpose(1, 2)               # [N, H, R, dh]
        q_in_memory = torch.einsum("nhrd,hde->nhre", q, w_k.view(heads, head_dim, dim)) / math.sqrt(head_dim)
        scores = q_in_memory @ memory.unsqueeze(1).transpose(-1, -2)                       # [N, H, R, M]
        if pad is not None:
            scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
        averaged = scores.softmax(-1) @ memory.unsqueeze(1)                                # [N, H, R, D]
        read = torch.einsum("nhrd,hed->nrhe", averaged, w_v.view(heads, head_dim, dim)).reshape(n, rows, dim) + b_v
        return attn.out_proj(read)


class TextProxyHead(nn.Module):
    """Proxies and proxy scores for (query, video) pairs; see the module docstring."""

    def __init__(self, dim: int, cfg: ProxyConfig | dict | None = None, n_vectors: int | None = None):
        super().__init__()
        self.cfg = cfg if isinstance(cfg, ProxyConfig) else ProxyConfig.from_dict(cfg, "proxy")
        c = self.cfg
        self.layers = nn.ModuleList(ProxyLayer(dim, c.n_heads, c.ff_size or dim, c.dropout) for _ in range(c.n_layers))
        self.final_norm = nn.LayerNorm(dim)
        self.theta = nn.Parameter(torch.rand(1))
        if c.dash == "linear":
            if not n_vectors:
                raise UsageError("proxy.dash 'linear' needs a method that stores a fixed number of vectors per video")
            self.dash_map = nn.Linear(n_vectors, dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / c.temperature)))

    def proxies(self, t: torch.Tensor, videos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Proxy [Q, B, D] of each query t [Q, D] for each video's vectors [B, M, D] (mask [B, M])."""
        rows = t.unsqueeze(0).expand(videos.shape[0], -1, -1)                       # [B, Q, D]: queries are rows
        return self._steer(rows, videos, mask).transpose(0, 1)

    def pair_scores(self, t: torch.Tensor, videos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Proxy score [P] of P (query, video) pairs: t [P, D] with videos [P, M, D] (mask [P, M])."""
        proxy = self._steer(t.unsqueeze(1), videos, mask)                           # [P, 1, D]
        cos = torch.einsum("pd,pmd->pm", F.normalize(proxy[:, 0], dim=-1), F.normalize(videos, dim=-1))
        return cos.masked_fill(~mask, -2.0).max(-1).values

    def _steer(self, rows: torch.Tensor, videos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Proxies [N, R, D] for query rows [N, R, D], each row reading the vectors [N, M, D] of its item."""
        x = rows
        for layer in self.layers:
            x = layer(x, videos, ~mask)
        p = self.final_norm(x)
        director = F.normalize(self.cfg.delta * rows - self.cfg.eta * p, dim=-1)
        cos = F.normalize(rows, dim=-1) @ F.normalize(videos, dim=-1).transpose(1, 2)   # [N, R, M]
        if self.cfg.dash == "linear":
            dash = torch.exp(self.dash_map(cos.masked_fill(~mask.unsqueeze(1), 0.0)))     # [N, R, D]
        else:
            mean = (cos * mask.unsqueeze(1)).sum(-1) / mask.sum(-1, keepdim=True).clamp(min=1)
            dash = torch.exp(self.theta * mean).unsqueeze(-1)                               # [N, R, 1]
        return rows + dash * director

    def loss(self, t: torch.Tensor, videos: torch.Tensor, mask: torch.Tensor, video_index: torch.Tensor
             ) -> dict[str, torch.Tensor]:
        """Lp and Lpos (weighted) for queries t [Q, D] of a batch of videos; video_index [Q] gives each query's own."""
        proxy = self.proxies(t, videos, mask)                                       # [Q, B, D]
        scale = self.log_scale.exp().clamp(max=100.0)
        own = proxy[torch.arange(len(t), device=t.device), video_index]             # [Q, D]
        return {"proxy": self.cfg.alpha * infonce_loss(scale * best_cosine(proxy, videos, mask), video_index),
                "proxy_pos": self.cfg.beta * infonce_loss(scale * best_cosine(own.unsqueeze(1).expand_as(proxy),
                                                                               videos, mask), video_index)}


def weighted_pair_scores(head: TextProxyHead, weights, branches) -> torch.Tensor:
    """Sum over branches of weight * proxy pair score; `branches` holds one (t [P, D], videos [P, M, D],
    mask [P, M]) per weight, e.g. the clip and frame branches weighted as the first stage weights them."""
    return sum(w * head.pair_scores(t, videos, mask) for w, (t, videos, mask) in zip(weights, branches))


def best_cosine(proxies: torch.Tensor, videos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[Q, B]: for each pair, the best cosine between proxies [Q, B, D] and the video's vectors [B, M, D]."""
    cos = torch.einsum("qbd,bmd->qbm", F.normalize(proxies, dim=-1), F.normalize(videos, dim=-1))
    return cos.masked_fill(~mask.unsqueeze(0), -2.0).max(-1).values


def load_proxy_head(meta: dict, dim: int) -> tuple[TextProxyHead, float]:
    """The proxy head and gamma stored in a checkpoint's metadata (`prvr train --proxy-head` writes them)."""
    section = meta.get("proxy")
    if not section:
        raise UsageError("this model has no text-proxy head; add one with `prvr train --proxy-head CHECKPOINT ...` "
                         "and build the index with that checkpoint (--model)")
    head = TextProxyHead(dim, section["config"], n_vectors=section.get("n_vectors"))
    head.load_state_dict(section["state_dict"])
    return head.eval(), float(section["gamma"])
