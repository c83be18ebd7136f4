"""Order-preserving token merging against a direct, one-video-at-a-time computation."""
from __future__ import annotations

import pytest
import torch

from prvr_cli.nets.layers import span_index
from prvr_cli.nets.token_merge import merge_adjacent_pairs, order_preserving_merge, span_centres


def direct_merge(x, sizes, frame_map, target):
    """The merging step written plainly for one video: x [N, D], sizes [N], frame_map [F]."""
    n = len(x)
    similarity = [float(x[2 * i] @ x[2 * i + 1]) for i in range(n // 2)]
    chosen = set(sorted(range(n // 2), key=lambda i: -similarity[i])[:n - target])  # stable: earlier pair first
    tokens, new_sizes, index_of = [], [], {}
    for i in range(n // 2):
        a, b = 2 * i, 2 * i + 1
        if i in chosen:
            tokens.append((x[a] * sizes[a] + x[b] * sizes[b]) / (sizes[a] + sizes[b]))
            new_sizes.append(sizes[a] + sizes[b])
            index_of[a] = index_of[b] = len(tokens) - 1
        else:
            for j in (a, b):
                tokens.append(x[j])
                new_sizes.append(sizes[j])
                index_of[j] = len(tokens) - 1
    return torch.stack(tokens), torch.stack(new_sizes), torch.tensor([index_of[int(j)] for j in frame_map])


def test_one_step_matches_the_direct_computation():
    torch.manual_seed(0)
    x = torch.randn(3, 16, 5, dtype=torch.float64)
    sizes = torch.randint(1, 4, (3, 16)).to(torch.float64)
    frame_map = torch.sort(torch.randint(0, 16, (3, 40)), dim=1).values
    out, out_sizes, out_map = merge_adjacent_pairs(x, sizes, frame_map, 11)
    assert out.shape == (3, 11, 5) and out_sizes.shape == (3, 11) and out_map.shape == (3, 40)
    for b in range(3):
        tokens, new_sizes, new_map = direct_merge(x[b], sizes[b], frame_map[b], 11)
        assert torch.allclose(out[b], tokens) and torch.equal(out_sizes[b], new_sizes)
        assert torch.equal(out_map[b], new_map)


def test_the_msc_schedule_keeps_order_sizes_and_the_frame_map():
    torch.manual_seed(1)
    frames = torch.randn(4, 128, 8)
    frames[:, 40:80] = frames[:, 40:41]            # a long static stretch: its neighbours are the most alike
    tokens, sizes, frame_map = order_preserving_merge(frames)
    assert tokens.shape == (4, 32, 8) and sizes.shape == (4, 32) and frame_map.shape == (4, 128)
    for b in range(4):
        # order kept: frames map to tokens 0..31 without going back, every token has frames
        assert torch.all(frame_map[b, 1:] >= frame_map[b, :-1]) and frame_map[b, 0] == 0 and frame_map[b, -1] == 31
        # a token's size is the number of frames mapped to it, and it is their mean
        counts = torch.bincount(frame_map[b], minlength=32).to(sizes.dtype)
        assert torch.equal(sizes[b], counts) and sizes[b].sum() == 128
        means = torch.zeros(32, 8).index_add_(0, frame_map[b], frames[b]) / counts.unsqueeze(1)
        assert torch.allclose(tokens[b], means, atol=1e-5)
    # the static stretch was merged into fewer, larger tokens than elsewhere
    static = sizes[0][frame_map[0, 40:80].unique()]
    assert static.float().mean() > sizes[0].float().mean()


def test_a_target_out_of_reach_is_refused():
    with pytest.raises(ValueError, match="cannot merge 8 tokens into 3"):
        merge_adjacent_pairs(torch.randn(1, 8, 2), torch.ones(1, 8), torch.arange(8)[None], 3)


def direct_bipartite(x, sizes, frame_map, target):
    """Bipartite merging written plainly for one video: best (even, odd) pairs first, each token used once."""
    n = len(x)
    unit = torch.nn.functional.normalize(x, dim=-1)
    candidates = sorted(((float(unit[a] @ unit[b]), a, b) for a in range(0, n, 2) for b in range(1, n, 2)),
                        key=lambda c: -c[0])                       # stable: ties keep the lower (even, odd)
    takes, used = {}, set()
    for _, a, b in candidates:
        if len(takes) == n - target:
            break
        if a in used or b in used:
            continue
        takes[a] = b
        used |= {a, b}
    tokens, new_sizes, index_of = [], [], {}
    for i in range(n):
        if i in takes.values():
            continue
        j = takes.get(i)
        if j is None:
            tokens.append(x[i])
            new_sizes.append(sizes[i])
        else:
            tokens.append((x[i] * sizes[i] + x[j] * sizes[j]) / (sizes[i] + sizes[j]))
            new_sizes.append(sizes[i] + sizes[j])
            index_of[j] = len(tokens) - 1
        index_of[i] = len(tokens) - 1
    return torch.stack(tokens), torch.stack(new_sizes), torch.tensor([index_of[int(f)] for f in frame_map])


def test_bipartite_merge_matches_the_direct_computation():
    from prvr_cli.nets.token_merge import bipartite_merge

    torch.manual_seed(4)
    x = torch.randn(3, 32, 6, dtype=torch.float64)
    sizes = torch.randint(1, 5, (3, 32)).to(torch.float64)
    frame_map = torch.sort(torch.randint(0, 32, (3, 128)), dim=1).values
    for target in (32, 20, 16):
        out, out_sizes, out_map = bipartite_merge(x, sizes, frame_map, target)
        for b in range(3):
            tokens, new_sizes, new_map = direct_bipartite(x[b], sizes[b], frame_map[b], target)
            assert torch.allclose(out[b], tokens) and torch.equal(out_sizes[b], new_sizes)
            assert torch.equal(out_map[b], new_map)


def test_redundancy_decides_how_many_clips_the_alignment_uses():
    from prvr_cli.nets.token_merge import adaptive_clip_count, redundancy

    torch.manual_seed(5)
    static = torch.randn(1, 1, 8).expand(1, 32, 8) + 0.01 * torch.randn(1, 32, 8)   # one scene throughout
    varied = torch.randn(1, 32, 8)                                                  # unrelated clips
    omega = redundancy(torch.cat([static, varied]), tau=0.8)
    assert omega[0] == 1.0 and omega[1] < 0.2
    assert adaptive_clip_count(torch.tensor([1.0, 0.8, 0.79, 0.6, 0.45, 0.2, 0.19, 0.0])).tolist() == \
        [5, 5, 8, 8, 12, 20, 32, 32]


def test_span_centres_are_the_middle_of_the_frames_each_span_of_merged_tokens_covers():
    torch.manual_seed(1)
    frames = torch.randn(2, 16, 6)
    _, sizes, frame_map = order_preserving_merge(frames, (10, 6, 4))
    first, last = span_index(4)
    centres = span_centres(sizes, first, last)
    for b in range(2):
        for s in range(len(first)):
            covered = [f for f in range(16) if first[s] <= frame_map[b, f] <= last[s]]   # contiguous: order kept
            assert covered == list(range(covered[0], covered[-1] + 1))
            assert centres[b, s].item() == pytest.approx((covered[0] + covered[-1] + 1) / 32)
    equal = span_centres(torch.ones(1, 4), first, last)       # equal tokens: the uniform clips' span centres
    assert torch.allclose(equal[0], (first + last + 1) / 8)
