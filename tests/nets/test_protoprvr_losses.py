"""ProtoPRVR objectives: hand-computed cases and float64 gradient checks."""
import math

import pytest
import torch

from prvr_cli.nets import protoprvr_losses as L


def f64(x):
    return torch.tensor(x, dtype=torch.float64)


# ------------------------------------------------------------------ masked token reconstruction
def test_random_token_mask_counts_and_positions():
    torch.manual_seed(0)
    token_mask = torch.arange(10)[None] < torch.tensor([10, 4, 1, 7])[:, None]
    masked = L.random_token_mask(token_mask, 0.3)
    assert masked.sum(1).tolist() == [3, 1, 1, 2]
    assert not (masked & ~token_mask).any()
    assert len({tuple(L.random_token_mask(token_mask, 0.3)[0].tolist()) for _ in range(10)}) > 1


def test_masked_token_nce_hand_case():
    target = torch.eye(3, dtype=torch.float64)
    loss = L.masked_token_nce(2.0 * target, target, temperature=0.5)  # cosine: 1 on the diagonal, 0 elsewhere
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + 2))
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_masked_token_nce_gradcheck():
    recon = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r, t: L.masked_token_nce(r, t, 0.1), (recon, target))


# ------------------------------------------------------------------ uni-modal reconstruction
def test_broadcast_reconstruction_hand_case():
    decoded = f64([[[1.0, 0.0], [0.0, 2.0]]])                 # 2 prototypes, 2-d features
    attn = f64([[[0.5, 0.5, 0.0], [0.1, 0.3, 0.6]]])          # each row sums to one over 3 frames
    recon = L.broadcast_reconstruction(decoded, attn)
    # frame 0: weights 0.5 / 0.6 and 0.1 / 0.6; frame 1: 0.5 / 0.8, 0.3 / 0.8; frame 2: prototype 1 only
    expected = f64([[[5 / 6, 2 * 1 / 6], [5 / 8, 2 * 3 / 8], [0.0, 2.0]]])
    assert torch.allclose(recon, expected)


def test_reconstruction_l2_counts_only_real_frames():
    recon = torch.zeros(1, 3, 2, dtype=torch.float64)
    target = f64([[[1.0, 1.0], [2.0, 0.0], [100.0, 100.0]]])
    mask = torch.tensor([[True, True, False]])
    assert L.reconstruction_l2(recon, target, mask).item() == pytest.approx((1.0 + 2.0) / 2)


def test_uni_modal_reconstruction_gradcheck():
    decoded = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    attn = torch.softmax(torch.randn(2, 3, 5, dtype=torch.float64), -1).requires_grad_()
    target = torch.randn(2, 5, 4, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    fn = lambda d, a: L.reconstruction_l2(L.broadcast_reconstruction(d, a), target, mask)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (decoded, attn))


# ------------------------------------------------------------------ video mixing and attention guidance
def test_mix_videos_halves_frame_rate_and_marks_the_first_video():
    lengths = torch.tensor([5, 3, 1])
    frames = (100 * torch.arange(3).view(3, 1, 1) + torch.arange(5).view(1, 5, 1)).float()
    mask = torch.arange(5)[None] < lengths[:, None]
    partner = torch.tensor([1, 2, 0])
    own_first = torch.tensor([True, False, True])
    mixed, mixed_mask, first_half = L.mix_videos(frames, mask, partner, own_first)
    assert mixed.shape == (3, 5, 1)
    assert mixed[0, :, 0].tolist() == [0, 2, 4, 100, 102]        # own (even frames), then partner
    assert mixed[1, :3, 0].tolist() == [200, 100, 102]           # partner first, own second
    assert mixed[2, :4, 0].tolist() == [200, 0, 2, 4]
    assert mixed_mask.sum(1).tolist() == [5, 3, 4]
    assert first_half.tolist() == [[True, True, True, False, False],
                                   [True, False, False, False, False],
                                   [True, False, False, False, False]]
    assert (mixed[~mixed_mask] == 0).all()


def test_attention_guidance_hand_case_and_margin():
    share_first = f64([0.8, 0.8, 0.6])
    label_first = torch.tensor([True, False, True])
    # own shares 0.8 (>= 0.7: satisfied), 0.2 and 0.6 (active)
    expected = (-math.log(0.2) - math.log(0.6)) / 3
    assert L.attention_guidance(share_first, label_first, beta=0.2).item() == pytest.approx(expected, rel=1e-9)
    assert L.attention_guidance(f64([0.9, 0.05]), torch.tensor([True, False]), beta=0.2).item() == 0.0


def test_attention_guidance_gradcheck():
    share = f64([0.3, 0.55, 0.2]).requires_grad_()
    label = torch.tensor([True, False, True])
    assert torch.autograd.gradcheck(lambda s: L.attention_guidance(s, label, 0.2), (share,))


# ------------------------------------------------------------------ orthogonal
def test_orthogonal_loss_is_zero_for_orthogonal_or_opposed_prototypes():
    assert L.orthogonal_loss(torch.eye(4, dtype=torch.float64)[None] * 3).item() == 0.0
    opposed = f64([[[1.0, 0.0], [-1.0, 0.0]]])
    assert L.orthogonal_loss(opposed).item() == 0.0


def test_orthogonal_loss_hand_case():
    s = 1 / math.sqrt(2)
    first = f64([[1.0, 0.0], [0.0, 1.0], [s, s]])               # cosines 0, s, s (each counted twice)
    second = f64([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])         # no positive cosine
    loss = L.orthogonal_loss(torch.stack([first, second]))
    assert loss.item() == pytest.approx((2 * 2 * s / 6 + 0.0) / 2, rel=1e-9)


def test_orthogonal_loss_gradcheck():
    torch.manual_seed(1)
    protos = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(L.orthogonal_loss, (protos,))
