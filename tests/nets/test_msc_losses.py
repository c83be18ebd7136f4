"""MSC's text-correlation preservation terms on hand-computed cases."""
from __future__ import annotations

import math

import pytest
import torch

from prvr_cli.nets.msc_losses import angle_distillation, distance_distillation


def smooth_l1(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def test_distance_term_on_a_hand_case():
    # teacher: a unit right triangle (distances 1, 1, sqrt2); student: three points on a line (1, 2, 3)
    teacher = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    student = torch.tensor([[0.0], [1.0], [3.0]])
    t = [[0, 1, 1], [1, 0, math.sqrt(2)], [1, math.sqrt(2), 0]]
    s = [[0, 1, 3], [1, 0, 2], [3, 2, 0]]
    t_mean, s_mean = (2 + math.sqrt(2)) / 3, 2.0                 # means of the non-zero entries
    expected = sum(smooth_l1(s[i][j] / s_mean, t[i][j] / t_mean) for i in range(3) for j in range(3)) / 9
    assert distance_distillation(student, teacher).item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_angle_term_on_a_hand_case():
    teacher = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    student = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])

    def angles(p):
        out = []
        for a in range(3):
            for j in range(3):
                for k in range(3):
                    u = [p[j][c] - p[a][c] for c in range(2)]
                    v = [p[k][c] - p[a][c] for c in range(2)]
                    nu, nv = math.hypot(*u), math.hypot(*v)
                    out.append(0.0 if nu == 0 or nv == 0 else (u[0] * v[0] + u[1] * v[1]) / (nu * nv))
        return out

    expected = sum(smooth_l1(s, t) for s, t in zip(angles(student.tolist()), angles(teacher.tolist()))) / 27
    assert angle_distillation(student, teacher).item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_both_terms_ignore_scale_and_origin_and_teach_only_the_student():
    torch.manual_seed(0)
    teacher = torch.randn(12, 16)
    assert distance_distillation(3 * teacher + 5, teacher).item() < 1e-10
    assert angle_distillation(3 * teacher + 5, teacher).item() < 1e-10
    student = torch.randn(12, 16, requires_grad=True)
    frozen = teacher.clone().requires_grad_(True)
    (distance_distillation(student, frozen) + angle_distillation(student, frozen, anchors=4)).backward()
    assert student.grad.abs().sum() > 0 and frozen.grad is None


def test_sampled_anchors_estimate_the_full_angle_term():
    torch.manual_seed(1)
    student, teacher = torch.randn(40, 8), torch.randn(40, 8)
    full = angle_distillation(student, teacher).item()
    sampled = sum(angle_distillation(student, teacher, anchors=5).item() for _ in range(200)) / 200
    assert abs(sampled - full) < 0.02 * full



def direct_alignment(frames, clips, frame_to_clip):
    """CBVA for one video, written out: frames [L, D], clips [S, D], frame_to_clip [L]."""
    sim = frames @ clips.detach().T            # frame -> clip: the clips are targets
    L, S = sim.shape
    f2c = []
    for i in range(L):
        row = torch.exp(sim[i] - sim[i].max().detach())
        own = int(frame_to_clip[i])
        pos = row[own]
        neg = sum(row[j] for j in range(S) if j != own) / max(S - 1, 1e-8) if S > 1 else torch.tensor(0.0)
        f2c.append(-torch.log(pos / (pos + neg)))
    sim = frames.detach() @ clips.T            # clip -> frame: the frames are targets
    c2f = []
    for j in range(S):
        col = torch.exp(sim[:, j] - sim[:, j].max().detach())
        mine = [i for i in range(L) if int(frame_to_clip[i]) == j]
        others = [i for i in range(L) if int(frame_to_clip[i]) != j]
        pos = sum(col[i] for i in mine) / len(mine)
        neg = sum(col[i] for i in others) / len(others)
        c2f.append(-torch.log(pos / (pos + neg)))
    return torch.stack(f2c).mean() + torch.stack(c2f).mean()


def test_alignment_matches_the_direct_computation_per_video():
    from prvr_cli.nets.msc_losses import cross_branch_alignment

    torch.manual_seed(2)
    frames, clips = torch.randn(3, 9, 4, dtype=torch.float64), torch.randn(3, 4, 4, dtype=torch.float64)
    frame_to_clip = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 3, 3], [0, 1, 1, 1, 1, 2, 3, 3, 3], [0, 0, 0, 1, 2, 2, 2, 3, 3]])
    f1, c1 = frames.clone().requires_grad_(True), clips.clone().requires_grad_(True)
    f2, c2 = frames.clone().requires_grad_(True), clips.clone().requires_grad_(True)
    expected = torch.stack([direct_alignment(f1[b], c1[b], frame_to_clip[b]) for b in range(3)]).mean()
    got = cross_branch_alignment(f2, c2, frame_to_clip)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    expected.backward()
    got.backward()                             # same gradients: each direction detaches its targets
    assert torch.allclose(f1.grad, f2.grad) and torch.allclose(c1.grad, c2.grad)


def test_alignment_ignores_padding_and_rewards_frames_on_their_own_clip():
    from prvr_cli.nets.msc_losses import cross_branch_alignment

    torch.manual_seed(3)
    frames, clips = torch.randn(1, 6, 4, dtype=torch.float64), torch.randn(1, 3, 4, dtype=torch.float64)
    frame_to_clip = torch.tensor([[0, 0, 1, 1, 2, 2]])
    base = cross_branch_alignment(frames, clips, frame_to_clip)
    # a padded frame and a padded clip, full of garbage, change nothing
    padded_frames = torch.cat([frames, 50 * torch.randn(1, 1, 4, dtype=torch.float64)], 1)
    padded_clips = torch.cat([clips, 50 * torch.randn(1, 1, 4, dtype=torch.float64)], 1)
    padded = cross_branch_alignment(padded_frames, padded_clips, torch.tensor([[0, 0, 1, 1, 2, 2, 3]]),
                                    torch.tensor([[True] * 6 + [False]]), torch.tensor([[True] * 3 + [False]]))
    assert padded.item() == pytest.approx(base.item(), rel=1e-9)
    # frames that sit on their own, distinct clips leave almost nothing to align
    orthogonal = 5 * torch.eye(4, dtype=torch.float64)[:3].unsqueeze(0)           # three distinct clips
    aligned = orthogonal[0, frame_to_clip[0]].unsqueeze(0)                        # each frame on its own clip
    assert cross_branch_alignment(aligned, orthogonal, frame_to_clip) < 0.01 < base
