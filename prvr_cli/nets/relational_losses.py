"""Text-correlation preservation (MSC's TCPL): the pooled query vectors of a batch should keep the relations
that the frozen input text features have, so that queries about different moments do not collapse together.

Both terms compare a student (pooled query vectors [Q, D]) with a teacher (frozen text features [Q, D'],
e.g. CLIP's end-of-text token), through relations that do not depend on either space's scale or origin:

- distance: pairwise Euclidean distances, each matrix divided by the mean of its non-zero entries;
- angle: for an anchor i and two others j, k, the cosine between (x_j - x_i) and (x_k - x_i).

Both use smooth L1 and take no gradient through the teacher. The angle term is cubic in Q: with
`anchors`, it is averaged over that many anchors drawn at random (each with all its pairs), an
unbiased estimate of the full mean at a fraction of the cost; without, every anchor is used.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _scaled_distances(x: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(x, x)
    return d / d[d > 0].mean().clamp(min=1e-12)


def distance_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Smooth L1 between the mean-normalised pairwise distances of `student` and of `teacher` (both [Q, *])."""
    with torch.no_grad():
        target = _scaled_distances(teacher.float())
    return F.smooth_l1_loss(_scaled_distances(student.float()), target)


def _angles(x: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """[A, Q, Q]: cosine between x_j - x_a and x_k - x_a for each anchor a (a zero difference gives 0)."""
    diffs = F.normalize(x.unsqueeze(0) - x[anchors].unsqueeze(1), dim=-1)             # [A, Q, D]
    return diffs @ diffs.transpose(1, 2)


def angle_distillation(student: torch.Tensor, teacher: torch.Tensor, anchors: int | None = None) -> torch.Tensor:
    """Smooth L1 between the anchored angles of `student` and of `teacher`, over all or `anchors` random anchors."""
    n = student.shape[0]
    pick = torch.arange(n, device=student.device) if anchors is None or anchors >= n else \
        torch.randperm(n, device=student.device)[:anchors]
    with torch.no_grad():
        target = _angles(teacher.float(), pick)
    return F.smooth_l1_loss(_angles(student.float(), pick), target)
