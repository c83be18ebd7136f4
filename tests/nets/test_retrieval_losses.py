import math

import pytest
import torch

from prvr_cli.nets import retrieval_losses as RL

# 3 queries, 2 videos: queries 0 and 1 describe video 0, query 2 describes video 1.
SCORES = torch.tensor([[0.9, 0.5],
                       [0.6, 0.7],
                       [0.4, 0.8]])
VIDX = torch.tensor([0, 0, 1])


def lse(*xs):
    return math.log(sum(math.exp(x) for x in xs))


def test_triplet_hard_hand_case():
    # t2v: q1 violates by 0.2+0.7-0.6=0.3 -> 0.3/3
    # v2t: video 1's hardest negative is q1 (0.7): 0.2+0.7-0.8=0.1 -> 0.1/2
    loss = RL.triplet_loss(SCORES, VIDX, margin=0.2, hard=True, hard_pool=1, v2t_hard_pool=1)
    assert loss.item() == pytest.approx(0.1 + 0.05, abs=1e-6)


def test_triplet_random_negatives_cover_all():
    # video 1's negative is q0 (0.5: no violation) or q1 (0.7: 0.1); t2v is fixed (one negative per query)
    values = {round(RL.triplet_loss(SCORES, VIDX, 0.2, hard=False).item(), 5) for _ in range(200)}
    assert values == {0.1, 0.15}


def test_hard_pool_limits_sampling_to_best_negatives():
    scores = torch.tensor([[0.0, 0.9, 0.8, 0.1, 0.2]])
    negative = torch.tensor([[False, True, True, True, True]])
    picked = {round(RL._sample_negatives(scores, negative, torch.tensor([2])).item(), 3) for _ in range(300)}
    assert picked == {0.9, 0.8}
    anyneg = {round(RL._sample_negatives(scores, negative, None).item(), 3) for _ in range(400)}
    assert anyneg == {0.9, 0.8, 0.1, 0.2}


def test_triplet_single_video_has_no_negative_and_no_nan():
    s = torch.tensor([[0.3], [0.1]], requires_grad=True)
    loss = RL.triplet_loss(s, torch.tensor([0, 0]), 0.2, hard=True)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(s.grad).all()


def test_infonce_hand_case():
    s = torch.tensor([[1.0, 0.0], [0.5, 2.0], [0.0, 1.0]])
    t2v = ((lse(1, 0) - 1) + (lse(0.5, 2) - 0.5) + (lse(0, 1) - 1)) / 3
    v2t = ((lse(1, 0.5, 0) - lse(1, 0.5)) + (lse(0, 2, 1) - 1)) / 2
    assert RL.infonce_loss(s, VIDX).item() == pytest.approx(t2v + v2t, abs=1e-5)
    # a temperature divides the scores
    assert RL.infonce_loss(s * 10, VIDX, temperature=10.0).item() == pytest.approx(t2v + v2t, abs=1e-5)


def test_infonce_extra_negatives_join_the_text_to_video_softmax_only():
    s = torch.tensor([[1.0, 0.0], [0.5, 2.0], [0.0, 1.0]])
    extra = torch.tensor([[0.3], [-1.0], [0.8]])
    t2v = ((lse(1, 0, 0.3) - 1) + (lse(0.5, 2, -1.0) - 0.5) + (lse(0, 1, 0.8) - 1)) / 3
    v2t = ((lse(1, 0.5, 0) - lse(1, 0.5)) + (lse(0, 2, 1) - 1)) / 2
    assert RL.infonce_loss(s, VIDX, extra_negatives=extra).item() == pytest.approx(t2v + v2t, abs=1e-5)
    # the temperature divides them as well
    assert RL.infonce_loss(s * 10, VIDX, 10.0, extra * 10).item() == pytest.approx(t2v + v2t, abs=1e-5)
    # without the video-to-text direction only the queries' softmax over videos is left
    assert RL.infonce_loss(s, VIDX, extra_negatives=extra, video_to_text=False).item() == pytest.approx(t2v, abs=1e-5)


def test_paired_infonce_hand_case():
    a, b, c, d = 1.0, 0.2, -0.5, 0.7
    s = torch.tensor([[a, b], [c, d]])
    expect = ((lse(a, b, a, c) - a) + (lse(c, d, b, d) - d)) / 2
    assert RL.paired_infonce_loss(s).item() == pytest.approx(expect, abs=1e-5)


def test_query_diverse_hand_case():
    q = torch.tensor([[1.0, 0.0], [0.0, 3.0], [1.0, 1.0]])  # q0 and q1 share video 0 and are orthogonal
    loss = RL.query_diverse_loss(q, VIDX, margin=0.2, alpha=32.0)
    assert loss.item() == pytest.approx(2 * math.log1p(math.exp(32 * 0.2)) / 3, rel=1e-5)
    # queries that all describe different videos are not pushed
    assert RL.query_diverse_loss(q, torch.tensor([0, 1, 2]), 0.2, 32.0).item() == 0.0


def test_losses_are_differentiable():
    s = torch.randn(6, 4, requires_grad=True)
    vi = torch.tensor([0, 0, 1, 2, 3, 3])
    total = RL.triplet_loss(s, vi, 0.2, hard=False) + RL.infonce_loss(s, vi) + RL.paired_infonce_loss(s[:4])
    total.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
