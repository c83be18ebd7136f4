"""MSC's text-correlation preservation terms on hand-computed cases."""
from __future__ import annotations

import math

import pytest
import torch

from prvr_cli.nets.relational_losses import angle_distillation, distance_distillation


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

