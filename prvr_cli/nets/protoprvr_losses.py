"""ProtoPRVR's own training objectives, as plain batched tensor functions.

Each function takes prototypes, tokens or attention maps already computed by the
model (`prvr_cli.protoprvr`) and returns a scalar (or the tensors a loss needs), so
every objective can be checked by hand and by gradient checks in isolation. The
retrieval losses (triplet ranking, InfoNCE) are shared with the baselines and live
in `prvr_cli.retrieval_losses`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def random_token_mask(token_mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """Pick round(ratio * length) (at least one) real token positions per query, uniformly at random."""
    noise = torch.rand(token_mask.shape, device=token_mask.device).masked_fill(~token_mask, 2.0)
    rank = noise.argsort(1).argsort(1)                    # real tokens get the lowest ranks
    n_masked = (token_mask.sum(1) * ratio).round().clamp(min=1)
    return (rank < n_masked[:, None]) & token_mask


def masked_token_nce(reconstructed: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE between reconstructed [M, D] and original [M, D] masked tokens on cosine / temperature.

    Row m's positive is target m; every other masked token of the batch is a negative.
    """
    logits = F.normalize(reconstructed, dim=-1) @ F.normalize(target, dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def broadcast_reconstruction(decoded: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Broadcast decoded prototypes [B, P, D] over frame positions with their attention [B, P, T].

    Frame t is rebuilt as the mix of all prototypes weighted by how much each attended to t,
    normalised over prototypes: recon[b, t] = sum_p attn[b, p, t] decoded[b, p] / sum_p attn[b, p, t].
    """
    weights = attn / attn.sum(1, keepdim=True).clamp(min=1e-12)
    return torch.einsum("bpt,bpd->btd", weights, decoded)


def reconstruction_l2(reconstructed: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error per feature, averaged over the real frames (`mask` [B, T]) of the batch."""
    per_frame = (reconstructed - target).pow(2).mean(-1)
    return (per_frame * mask).sum() / mask.sum().clamp(min=1)


def mix_videos(frames: torch.Tensor, frame_mask: torch.Tensor, partner: torch.Tensor,
               own_first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate each video with its partner at doubled frame rate (every second frame of each).

    Video i keeps frames 0, 2, 4, ... (ceil(T_i / 2) of them), as does its partner; the two halves
    are concatenated in time, video i first where `own_first[i]`. Returns the mixed frames
    [B, T', D], their mask [B, T'] and `first_half` [B, T'] (True on frames of the first video).
    """
    batch = torch.arange(len(frames), device=frames.device)
    half = (frame_mask.sum(1) + 1) // 2
    first = torch.where(own_first, batch, partner)
    second = torch.where(own_first, partner, batch)
    n_first, n_total = half[first], half[first] + half[second]
    t = torch.arange(int(n_total.max()), device=frames.device)[None]
    first_half = t < n_first[:, None]
    source = torch.where(first_half, first[:, None], second[:, None])
    frame = torch.where(first_half, 2 * t, 2 * (t - n_first[:, None])).clamp(0, frames.shape[1] - 1)
    mask = t < n_total[:, None]
    mixed = frames[source, frame] * mask[..., None].to(frames.dtype)
    return mixed, mask, first_half & mask


def attention_guidance(share_first: torch.Tensor, label_first: torch.Tensor, beta: float) -> torch.Tensor:
    """BCE with a margin on the share of the retrieved prototype's attention that falls on the first half.

    label_first [Q] is 1 where the query's own video is the first half of its mixed video.
    p_own = share_first if label_first else 1 - share_first; a query contributes
    BCE(share_first, label_first) = -log p_own while p_own < 0.5 + beta and nothing once
    p_own >= 0.5 + beta. Mean over queries.
    """
    p_own = torch.where(label_first, share_first, 1 - share_first)
    active = (p_own < 0.5 + beta).to(share_first.dtype)
    return (-torch.log(p_own.clamp(min=1e-6)) * active).mean()


def orthogonal_loss(prototypes: torch.Tensor) -> torch.Tensor:
    """Mean over videos of sum_{i != j} relu(cos(p_i, p_j)) / (P (P - 1)) for prototypes [B, P, D]."""
    n = prototypes.shape[1]
    if n < 2:
        return prototypes.new_zeros(())
    unit = F.normalize(prototypes, dim=-1)
    cos = unit @ unit.transpose(1, 2)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=prototypes.device)
    return (cos.clamp(min=0) * off_diagonal).sum((1, 2)).div(n * (n - 1)).mean()
