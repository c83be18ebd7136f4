"""Tensor building blocks shared by ProtoPRVR, the baselines and the zero-shot builder.

Every function here is batched: videos of different lengths arrive padded to a
common length `T` with a boolean mask, and nothing loops over samples in Python.

The *token-to-frame* matrices returned here let any attention over tokens
(frame bins, clip bins or clip spans) be mapped back to the original frames:
`attn_over_frames = attn_over_tokens @ token_to_frame`. Each row of such a matrix
sums to one, so attention mass is preserved.
"""
from __future__ import annotations

import functools

import torch
from torch import nn


def uniform_bins(lengths: torch.Tensor, n_bins: int, t_max: int) -> torch.Tensor:
    """Matrix [B, n_bins, t_max] averaging each video's frames into `n_bins` uniform bins.

    Bin i of a video with T frames covers frames [floor(i*T/n), floor((i+1)*T/n)).
    When T < n_bins a bin takes the nearest single frame (frames repeat), so a
    clip sequence always has exactly `n_bins` tokens.
    """
    device = lengths.device
    T = lengths.to(torch.float64).clamp(min=1).view(-1, 1)                # [B, 1]
    i = torch.arange(n_bins, device=device, dtype=torch.float64).view(1, -1)
    start = torch.floor(i * T / n_bins)                                     # [B, n]
    end = torch.maximum(torch.floor((i + 1) * T / n_bins), start + 1)
    t = torch.arange(t_max, device=device, dtype=torch.float64).view(1, 1, -1)
    inside = (t >= start.unsqueeze(-1)) & (t < end.unsqueeze(-1))           # [B, n, t]
    weights = inside.to(torch.float32)
    return weights / weights.sum(-1, keepdim=True).clamp(min=1.0)


def downsample_frames(lengths: torch.Tensor, max_tokens: int, t_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame-branch pooling: at most `max_tokens` tokens, mean-pooled when longer, never upsampled.

    Returns the pooling matrix [B, max_tokens, t_max] and the token mask [B, max_tokens].
    A video with T <= max_tokens keeps its frames one-to-one (extra tokens masked).
    """
    device = lengths.device
    n_tokens = lengths.clamp(min=1, max=max_tokens)                          # [B]
    T = lengths.to(torch.float64).clamp(min=1).view(-1, 1)
    n = n_tokens.to(torch.float64).view(-1, 1)
    i = torch.arange(max_tokens, device=device, dtype=torch.float64).view(1, -1)
    start = torch.floor(i * T / n)
    end = torch.maximum(torch.floor((i + 1) * T / n), start + 1)
    t = torch.arange(t_max, device=device, dtype=torch.float64).view(1, 1, -1)
    mask = torch.arange(max_tokens, device=device).view(1, -1) < n_tokens.view(-1, 1)
    inside = (t >= start.unsqueeze(-1)) & (t < end.unsqueeze(-1)) & mask.unsqueeze(-1)
    weights = inside.to(torch.float32)
    return weights / weights.sum(-1, keepdim=True).clamp(min=1.0), mask


def span_index(n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Start and end (inclusive) of every contiguous span over `n_tokens` tokens.

    Ordered by length, then start: n spans of length 1, n-1 of length 2, ... 1 of
    length n; n(n+1)/2 in all (528 for 32 tokens).
    """
    starts, ends = [], []
    for length in range(1, n_tokens + 1):
        s = torch.arange(0, n_tokens - length + 1)
        starts.append(s)
        ends.append(s + length - 1)
    return torch.cat(starts), torch.cat(ends)


def span_means(tokens: torch.Tensor) -> torch.Tensor:
    """Mean of every contiguous span of `tokens` [B, N, D] -> [B, N(N+1)/2, D].

    One product with the span-averaging matrix: its backward is a product too, seven times faster
    on a CPU than the scatter that the backward of prefix-sum indexing needs.
    """
    return span_averages(tokens.shape[1], tokens.device, tokens.dtype) @ tokens


@functools.lru_cache(maxsize=16)
def span_averages(n_tokens: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The span-averaging matrix [N(N+1)/2, N] (cached; never modify it in place).

    Made outside inference mode even when first asked for inside it (a search), so training can use it later.
    """
    with torch.inference_mode(False):
        return span_to_token(n_tokens, device, torch.float64).to(dtype)


def span_to_token(n_tokens: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Matrix [N(N+1)/2, N]: each span spreads its weight evenly over the tokens it covers."""
    start, end = span_index(n_tokens)
    t = torch.arange(n_tokens).view(1, -1)
    inside = (t >= start.view(-1, 1)) & (t <= end.view(-1, 1))
    weights = inside.to(torch.float64)
    return (weights / weights.sum(-1, keepdim=True)).to(device=device, dtype=dtype)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None, dim: int = -1) -> torch.Tensor:
    """Softmax that gives zero weight where `mask` is False (mask broadcasts against scores)."""
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=dim)


class LearnedPositions(nn.Module):
    """Learned position vectors added to a sequence [B, L, D], then LayerNorm and dropout (all methods' encoders).

    Checkpoints of MS-SL and GMMFormer from before this layer was shared kept the vectors in an
    nn.Embedding (`embed.weight`); they load into `weight`.
    """

    def __init__(self, n_positions: int, dim: int, dropout: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_positions, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.norm(x + self.weight[: x.shape[1]]))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "embed.weight" in state_dict:
            state_dict[prefix + "weight"] = state_dict.pop(prefix + "embed.weight")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class InputProjection(nn.Sequential):
    """LayerNorm -> dropout -> linear -> ReLU: the feature projection used by MS-SL and its successors."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.1):
        super().__init__(nn.LayerNorm(in_dim), nn.Dropout(dropout), nn.Linear(in_dim, out_dim), nn.ReLU())


class AttentionPool(nn.Module):
    """Pools a masked token sequence [B, L, D] into one vector [B, D] with a learned scoring head."""

    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = masked_softmax(self.score(tokens).squeeze(-1), mask)
        return torch.einsum("bl,bld->bd", weights, tokens)


def encode_with_key_bias(layer: nn.TransformerEncoderLayer, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
    """Run a post-norm `layer` on x [B, L, D] with `key_bias` [B, L] added to every attention logit over each key.

    The layer's own forward is not used: its inference fast path returns NaN rows for a per-sample float
    mask (torch 2.15); the same computation through its public submodules gives the training path's result.
    """
    heads, L = layer.self_attn.num_heads, x.shape[1]
    mask = key_bias.to(x.dtype).repeat_interleave(heads, 0).unsqueeze(1).expand(-1, L, -1)    # [B*heads, L, L]
    attended, _ = layer.self_attn(x, x, x, attn_mask=mask, need_weights=False)
    x = layer.norm1(x + layer.dropout1(attended))
    return layer.norm2(x + layer.dropout2(layer.linear2(layer.dropout(layer.activation(layer.linear1(x))))))
