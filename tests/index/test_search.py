"""Scoring, highlights and the zero-shot prototype builder."""
from __future__ import annotations

import numpy as np
import pytest

from prvr_cli.pipeline.prototypes import ZeroShotPrototypes
from prvr_cli.index.search import Hit, attach_highlights, max_prototype_scores, highlight_ranges, rank


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_max_prototype_scores_match_brute_force(monkeypatch):
    rng = np.random.default_rng(0)
    protos = _unit(rng.normal(size=(50, 7, 16))).astype(np.float16)
    q = _unit(rng.normal(size=(3, 16))).astype(np.float32)
    monkeypatch.setattr("prvr_cli.index.search.BLOCK_ROWS", 21)  # several blocks
    best, arg = max_prototype_scores(protos, q)
    brute = np.einsum("nld,qd->qnl", protos.astype(np.float32), q)
    assert np.allclose(best, brute.max(-1), atol=1e-5) and (arg == brute.argmax(-1)).all()


def test_rank_combines_branches_with_weights():
    rng = np.random.default_rng(1)
    clip, frame = _unit(rng.normal(size=(2, 20, 5, 8)))
    q = _unit(rng.normal(size=(1, 8)))
    hits = rank([f"v{i}" for i in range(20)], clip, frame, q, q, (0.7, 0.3), k=5)[0]
    expected = 0.7 * (clip @ q[0]).max(-1) + 0.3 * (frame @ q[0]).max(-1)
    assert [h.path for h in hits] == [f"v{i}" for i in np.argsort(-expected)[:5]]
    assert np.isclose(hits[0].score, expected.max())


def test_highlights_follow_attention_and_stay_inside_the_video():
    fps, T = 2.0, 20
    stamps = (np.arange(T) + 0.5) / fps
    attn = np.full(T, 0.01)
    attn[6:10] = 1.0      # 3.0 s to 5.0 s
    attn[15] = 0.5        # 7.5 s to 8.0 s
    ranges = highlight_ranges(attn, stamps, duration=10.0, fps=fps, mass=0.9)
    assert ranges[0]["start"] == 3.0 and ranges[0]["end"] == 5.0
    assert ranges[1]["start"] == 7.5 and ranges[1]["end"] == 8.0
    edge = np.zeros(T)
    edge[0] = edge[-1] = 1
    for r in highlight_ranges(edge, stamps, duration=9.9, fps=fps):
        assert 0 <= r["start"] < r["end"] <= 9.9


def test_attach_highlights_uses_best_prototypes():
    T, lp = 10, 3
    attn_clip = np.zeros((lp, T)); attn_clip[:, 0] = 1; attn_clip[2] = 0; attn_clip[2, 7] = 1
    attn_frame = np.zeros((lp, T)); attn_frame[:, 0] = 1; attn_frame[1] = 0; attn_frame[1, 7] = 1
    row = {"timestamps": (np.arange(T) + 0.5).tolist(), "attn_clip": attn_clip.ravel(),
           "attn_frame": attn_frame.ravel(), "duration": 10.0, "fps": 1.0}
    hit = Hit(1, 1.0, "v", 0.5, 0.5, clip_prototype=2, frame_prototype=1)
    attach_highlights([hit], {"v": row}, (0.5, 0.5))
    assert hit.highlights[0]["start"] == 7.0 and hit.highlights[0]["end"] == 8.0


def test_zero_shot_prototypes_shapes_and_attention():
    rng = np.random.default_rng(2)
    builder = ZeroShotPrototypes(n_prototypes=6)
    for T in (1, 5, 40, 300):
        feats = _unit(rng.normal(size=(T, 16))).astype(np.float32)
        p = builder.build(feats)
        for protos, attn in ((p.clip, p.clip_attn), (p.frame, p.frame_attn)):
            assert protos.shape == (6, 16) and attn.shape == (6, T)
            assert np.allclose(np.linalg.norm(protos, axis=-1), 1, atol=1e-5)
            assert np.allclose(attn.sum(-1), 1, atol=1e-4) and (attn >= 0).all()


def test_zero_shot_prototypes_find_a_distinct_segment():
    """A video with a distinct middle segment gets a prototype that attends to that segment."""
    rng = np.random.default_rng(3)
    a, b = _unit(rng.normal(size=(2, 32)))
    feats = np.stack([a] * 30 + [b] * 10 + [a] * 20) + 0.01 * rng.normal(size=(60, 32))
    p = ZeroShotPrototypes(n_prototypes=4).build(_unit(feats).astype(np.float32))
    best = np.argmax(p.frame @ b)
    assert p.frame_attn[best, 30:40].sum() > 0.9
    best = np.argmax(p.clip @ b)
    assert p.clip_attn[best, 30:40].sum() > 0.6


def test_rerank_reorders_only_within_the_top_k():
    from prvr_cli.index.search import Hit, rerank

    hits = [Hit(r, s, f"v{r}.mp4", 0.0, 0.0, 0, 0) for r, s in enumerate([0.9, 0.8, 0.7, 0.6, 0.5], 1)]
    out = rerank(hits, 3, np.array([0.0, 0.0, 1.0]), gamma=0.5)
    assert [h.path for h in out] == ["v3.mp4", "v1.mp4", "v2.mp4", "v4.mp4", "v5.mp4"]
    assert [h.rank for h in out] == [1, 2, 3, 4, 5]
    assert out[0].score == pytest.approx(1.2) and out[3].score == pytest.approx(0.6)
    same = rerank([Hit(r, s, f"w{r}", 0.0, 0.0, 0, 0) for r, s in enumerate([0.9, 0.8], 1)], 2, np.zeros(2), 1.0)
    assert [h.path for h in same] == ["w1", "w2"]
