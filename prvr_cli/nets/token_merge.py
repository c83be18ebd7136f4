"""Order-preserving token merging (MSC, "Mitigating Semantic Collapse in PRVR", NeurIPS 2025).

Instead of averaging frames into clips over fixed bins, neighbours that look alike are merged:
each step pairs tokens (0, 1), (2, 3), ... and merges the pairs whose two members are most
similar (dot product), as a size-weighted average, until the sequence has the target length.
Order is kept (a merged pair sits where the pair was), so clip tokens stay in time order, and
each token remembers how many frames it covers (its size) and which frames map to it.

The schedule 128 -> 80 -> 52 -> 32 turns 128 uniformly averaged frames into the 32 clip tokens.
A token's size enters attention as a +log(size) bias (proportional attention), so a merged token
counts for the frames it stands for.
"""
from __future__ import annotations

import torch

MSC_SCHEDULE = (80, 52, 32)


def merge_adjacent_pairs(tokens: torch.Tensor, sizes: torch.Tensor, frame_map: torch.Tensor,
                         target: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One merging step: tokens [B, N, D] (N even) with sizes [B, N] -> `target` tokens.

    The N/2 disjoint pairs (2i, 2i+1) are ranked by the dot product of their two tokens; the
    N - target most similar are merged (ties: the earlier pair first). `frame_map` [B, F] says which
    token each original frame belongs to; the returned map points into the merged sequence.
    """
    n_batch, n, dim = tokens.shape
    if n % 2 or not n // 2 <= target <= n:
        raise ValueError(f"cannot merge {n} tokens into {target} by adjacent pairs")
    pairs = tokens.view(n_batch, n // 2, 2, dim)
    pair_sizes = sizes.view(n_batch, n // 2, 2)
    similarity = (pairs[:, :, 0] * pairs[:, :, 1]).sum(-1)                             # [B, N/2]
    order = torch.argsort(similarity, dim=1, descending=True, stable=True)
    merged = torch.zeros(n_batch, n // 2, dtype=torch.bool, device=tokens.device)
    merged.scatter_(1, order[:, :n - target], True)
    weights = pair_sizes / pair_sizes.sum(-1, keepdim=True)                             # [B, N/2, 2]
    average = (pairs * weights.unsqueeze(-1)).sum(2)                                    # [B, N/2, D]
    first = torch.where(merged.unsqueeze(-1), average, pairs[:, :, 0])
    slots = torch.stack([first, pairs[:, :, 1]], 2).view(n_batch, n, dim)
    slot_sizes = torch.stack([torch.where(merged, pair_sizes.sum(-1), pair_sizes[:, :, 0]), pair_sizes[:, :, 1]],
                             2).view(n_batch, n)
    kept = torch.stack([torch.ones_like(merged), ~merged], 2).view(n_batch, n)          # a merged pair's 2nd slot goes
    new_index = kept.long().cumsum(1) - 1                                               # slot -> its merged token
    keep = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)[:, :target]        # kept slots, in order
    out = slots.gather(1, keep.unsqueeze(-1).expand(-1, -1, dim))
    return out, slot_sizes.gather(1, keep), new_index.gather(1, frame_map)


def span_centres(sizes: torch.Tensor, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Centre [B, S] of each span of merged tokens (tokens first..last), as a fraction of the frames merged:
    midway from the start of its first token's frames to the end of its last token's (merging keeps order)."""
    ends = sizes.cumsum(-1)
    return ((ends - sizes)[:, first] + ends[:, last]) / (2 * ends[:, -1:])


def merge_schedule(n_tokens: int, target: int) -> tuple[int, ...]:
    """MSC's 128 -> 80 -> 52 -> 32; for other lengths, steps keeping about 5/8 of the tokens (an even count)."""
    if (n_tokens, target) == (128, 32):
        return MSC_SCHEDULE
    steps = []
    while n_tokens > target:
        n_tokens = max(target, 2 * round(n_tokens * 5 / 16))
        steps.append(n_tokens)
    return tuple(steps)


def order_preserving_merge(frames: torch.Tensor, schedule=MSC_SCHEDULE) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    """Frames [B, N, D] merged step by step to schedule[-1] tokens: (tokens, sizes [B, K], frame -> token [B, N])."""
    n_batch, n, _ = frames.shape
    tokens = frames
    sizes = torch.ones(n_batch, n, dtype=frames.dtype, device=frames.device)
    frame_map = torch.arange(n, device=frames.device).expand(n_batch, n)
    for target in schedule:
        tokens, sizes, frame_map = merge_adjacent_pairs(tokens, sizes, frame_map, target)
    return tokens, sizes, frame_map


# ---------------------------------------------------------------------------- adaptive clip counts (MSC's CBVA)

# How many clips a video's alignment uses, by its redundancy: at least 0.8 -> 5, ... , else all. MSC reaches them
# from 32 clips by bipartite merging in steps 32 -> 20 -> 12 -> 8 -> 5, stopping at the video's count.
ADAPTIVE_COUNTS = ((0.8, 5), (0.6, 8), (0.4, 12), (0.2, 20))


def redundancy(clips: torch.Tensor, tau: float, closure: bool = False) -> torch.Tensor:
    """omega [B]: the share of a video's clip pairs [B, S, D] whose cosine similarity exceeds `tau`.

    With `closure`, a pair also counts when a chain of such links joins it (the transitive closure,
    as MSC's code computes it), found by squaring the link matrix log2(S) times.
    """
    unit = torch.nn.functional.normalize(clips.float(), dim=-1)
    linked = (unit @ unit.transpose(1, 2)) > tau
    if closure:
        linked = linked | torch.eye(linked.shape[1], dtype=torch.bool, device=linked.device)
        for _ in range(max(1, (linked.shape[1] - 1).bit_length())):
            linked = (linked.float() @ linked.float()) > 0
    upper = torch.triu(torch.ones_like(linked[0]), diagonal=1)
    return linked[:, upper].float().mean(-1)


def adaptive_clip_count(omega: torch.Tensor, n_clips: int = 32) -> torch.Tensor:
    """How many clips a video's alignment uses: fewer for redundant (static) videos, all for varied ones."""
    counts = torch.full_like(omega, n_clips, dtype=torch.long)
    for threshold, count in reversed(ADAPTIVE_COUNTS):
        counts = torch.where(omega >= threshold, torch.tensor(count, device=omega.device), counts)
    return counts


def bipartite_merge(tokens: torch.Tensor, sizes: torch.Tensor, frame_map: torch.Tensor, target: int,
                    metric: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge N tokens [B, N, D] to `target` by bipartite matching: even positions against odd ones.

    The most similar (even, odd) pair by cosine of `metric` (default: the tokens) is merged first, then
    the next among tokens not yet used, until N - target pairs are merged (ties: the lower index). The
    odd token joins the even one as a size-weighted average at the even one's place; order is kept.
    """
    n_batch, n, dim = tokens.shape
    n_merge = n - target
    if n % 2 or not 0 <= n_merge <= n // 2:
        raise ValueError(f"cannot merge {n} tokens into {target} by bipartite matching")
    unit = torch.nn.functional.normalize((tokens if metric is None else metric).float(), dim=-1)
    sim = unit[:, 0::2] @ unit[:, 1::2].transpose(1, 2)                                  # [B, N/2 even, N/2 odd]
    partner = torch.full((n_batch, n // 2), -1, dtype=torch.long, device=tokens.device)  # even -> odd it takes
    rows = torch.arange(n_batch, device=tokens.device)
    for _ in range(n_merge):
        best = sim.flatten(1).argmax(1)                                                   # first max: lower index
        even, odd = best // (n // 2), best % (n // 2)
        partner[rows, even] = odd
        sim[rows, even, :] = float("-inf")
        sim[rows, :, odd] = float("-inf")
    absorbed_into = torch.arange(n, device=tokens.device).repeat(n_batch, 1)              # token -> token it joins
    has = partner >= 0
    evens = torch.arange(0, n, 2, device=tokens.device).expand(n_batch, -1)
    absorbed_into.scatter_(1, (2 * partner + 1).clamp(min=0)[has].view(n_batch, n_merge),
                           evens[has].view(n_batch, n_merge))
    weight = sizes.unsqueeze(-1)
    summed = torch.zeros_like(tokens).scatter_add_(1, absorbed_into.unsqueeze(-1).expand(-1, -1, dim),
                                                   tokens * weight)
    new_sizes = torch.zeros_like(sizes).scatter_add_(1, absorbed_into, sizes)
    kept = absorbed_into == torch.arange(n, device=tokens.device)
    keep = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)[:, :target]
    new_index = kept.long().cumsum(1) - 1                                                 # kept token -> position
    position = new_index.gather(1, absorbed_into)                                         # every token -> position
    out_sizes = new_sizes.gather(1, keep)
    out = summed.gather(1, keep.unsqueeze(-1).expand(-1, -1, dim)) / out_sizes.unsqueeze(-1)
    return out, out_sizes, position.gather(1, frame_map)
