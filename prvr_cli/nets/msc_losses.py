"""MSC's two remedies for semantic collapse ("Mitigating Semantic Collapse in PRVR", NeurIPS 2025), as losses.

Text-correlation preservation (TCPL): the pooled query vectors of a batch should keep the relations
that the frozen input text features have, so that queries about different moments do not collapse together.

Both terms compare a student (pooled query vectors [Q, D]) with a teacher (frozen text features [Q, D'],
e.g. CLIP's end-of-text token), through relations that do not depend on either space's scale or origin:

- distance: pairwise Euclidean distances, each matrix divided by the mean of its non-zero entries;
- angle: for an anchor i and two others j, k, the cosine between (x_j - x_i) and (x_k - x_i).

Both use smooth L1 and take no gradient through the teacher. The angle term is cubic in Q: with
`anchors`, it is averaged over that many anchors drawn at random (each with all its pairs), an
unbiased estimate of the full mean at a fraction of the cost; without, every anchor is used.

Cross-branch video alignment (CBVA): within each video, a frame token should be closer to the clip token
that contains it than to the video's other clips, and a clip token closer to its own frames than to the
video's other frames, so that one video's moments do not collapse into one vector.
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


def last_valid_token(tokens: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """The feature at each query's last valid token [Q, D] (CLIP's end-of-text token: its sentence embedding)."""
    last = token_mask.bool().long().cumsum(1).argmax(1)                        # where the count reaches its total
    return tokens[torch.arange(len(tokens), device=tokens.device), last]


def _contrast(similarity: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, valid: torch.Tensor,
              dim: int) -> torch.Tensor:
    """Per row (dim=-1) or column (dim=-2) of `similarity`: -log(mean exp to positives / (that + mean exp to
    negatives)), with the max taken out for stability; averaged over the valid rows or columns of each video."""
    allowed = positive | negative
    shift = similarity.masked_fill(~allowed, float("-inf")).amax(dim, keepdim=True).detach()
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))     # a row with nothing allowed
    exp = torch.exp((similarity - shift).masked_fill(~allowed, 0.0))
    pos = (exp * positive).sum(dim) / (positive.sum(dim) + 1e-8)
    neg = (exp * negative).sum(dim) / (negative.sum(dim) + 1e-8)
    loss = -torch.log(pos / (pos + neg + 1e-8) + 1e-12)
    return (loss * valid).sum(-1) / valid.sum(-1).clamp(min=1)


def cross_branch_alignment(frames: torch.Tensor, clips: torch.Tensor, frame_to_clip: torch.Tensor,
                           frame_mask: torch.Tensor | None = None, clip_mask: torch.Tensor | None = None
                           ) -> torch.Tensor:
    """CBVA over a batch: frames [B, L, D], clips [B, S, D], frame_to_clip [B, L] (the clip holding each frame),
    or a bool [B, L, S] saying which clips hold each frame (several when clips share frames).

    Frame -> clip with the clips detached, plus clip -> frame with the frames detached; the mean over videos.
    Masks [B, L] and [B, S] leave out padded frames and clips.
    """
    n_batch, n_frames, _ = frames.shape
    n_clips = clips.shape[1]
    frame_mask = torch.ones(n_batch, n_frames, dtype=torch.bool, device=frames.device) if frame_mask is None \
        else frame_mask
    clip_mask = torch.ones(n_batch, n_clips, dtype=torch.bool, device=frames.device) if clip_mask is None \
        else clip_mask
    valid = frame_mask.unsqueeze(2) & clip_mask.unsqueeze(1)                                  # [B, L, S]
    holds = frame_to_clip if frame_to_clip.dtype == torch.bool else F.one_hot(frame_to_clip, n_clips).bool()
    positive = holds & valid
    negative = ~positive & valid
    to_clips = _contrast(frames @ clips.detach().transpose(1, 2), positive, negative, frame_mask, dim=-1)
    to_frames = _contrast(frames.detach() @ clips.transpose(1, 2), positive, negative, clip_mask, dim=-2)
    return (to_clips + to_frames).mean()
