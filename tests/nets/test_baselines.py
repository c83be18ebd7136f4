import math

import pytest
import torch
import torch.nn.functional as F

from prvr_cli.nets import layers, mssl as mssl_mod
from prvr_cli.errors import UsageError
from prvr_cli.nets.factory import create_model, load_checkpoint, save_checkpoint
from prvr_cli.nets.gmmformer import GMMFormer, gaussian_weights
from prvr_cli.nets.gmmformer2 import MSC, GMMFormerV2
from prvr_cli.nets.mssl import MSSL
from prvr_cli.nets.retrieval import TrainBatch
from prvr_cli.nets.retrieval_losses import query_diverse_loss

VDIM, TDIM = 12, 10
SMALL = {"hidden_size": 16, "n_heads": 2, "max_frames": 16, "input_dropout": 0.0, "dropout": 0.0}


def make_videos(lengths, t_max=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    T = t_max or int(lengths.max())
    frames = torch.randn(len(lengths), T, VDIM, generator=g)
    mask = torch.arange(T).view(1, -1) < lengths.view(-1, 1)
    return frames * mask.unsqueeze(-1), mask


def make_queries(n, L=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n, L, TDIM, generator=g)
    mask = torch.arange(L).view(1, -1) < torch.randint(2, L + 1, (n, 1), generator=g)
    return tokens, mask


V2_SMALL = {**SMALL, "n_clips": 4, "gauss_widths": [0.5, 5.0]}


@pytest.fixture(params=[(MSSL, SMALL), (GMMFormer, SMALL), (GMMFormerV2, V2_SMALL), (MSC, V2_SMALL)],
                ids=["mssl", "gmmformer", "gmmformer2", "msc"])
def model(request):
    torch.manual_seed(0)
    cls, cfg = request.param
    return cls(VDIM, TDIM, dict(cfg)).eval()


# ---- MS-SL -------------------------------------------------------------------------------------

def test_mssl_encoding_shapes_masks_and_attention():
    m = MSSL(VDIM, TDIM, dict(SMALL)).eval()
    frames, mask = make_videos([40, 9, 3])
    with torch.no_grad():
        enc = m.encode_videos(frames, mask)
    assert enc.clip.shape == (3, 528, 16) and enc.clip_mask.all()         # 32 * 33 / 2 span proposals
    assert enc.frame.shape == (3, 16, 16)
    assert enc.frame_mask.sum(1).tolist() == [16, 9, 3]                    # pooled to 16 tokens, never upsampled
    assert enc.clip_attn.shape == (3, 528, 40) and enc.frame_attn.shape == (3, 16, 40)
    assert torch.allclose(enc.clip_attn.sum(-1), torch.ones(3, 528), atol=1e-5)
    assert (enc.clip_attn[1, :, 9:] == 0).all() and (enc.frame_attn[2, :, 3:] == 0).all()
    # the first span is the first clip bin; the longest one weighs every clip bin equally
    bins = layers.uniform_bins(torch.tensor([40]), 32, 40)[0]
    assert torch.allclose(enc.clip_attn[0, 0], bins[0])
    assert torch.allclose(enc.clip_attn[0, -1], bins.mean(0), atol=1e-6)


def test_mssl_branch_scores_match_direct_computation():
    m = MSSL(VDIM, TDIM, dict(SMALL)).eval()
    frames, mask = make_videos([30, 12])
    tokens, tmask = make_queries(3)
    with torch.no_grad():
        v, q = m.encode_videos(frames, mask), m.encode_queries(tokens, tmask)
        clip, frame = m.branch_scores(q, v)
        total = m.score(q, v)
        for i in range(3):
            for b in range(2):
                cos = F.cosine_similarity(q.clip[i].view(1, -1), v.clip[b], dim=-1)
                assert clip[i, b] == pytest.approx(cos.max().item(), abs=1e-5)
                guide = v.clip[b, cos.argmax()]                              # the key clip
                n = int(v.frame_mask[b].sum())
                keys, values = m.guide_key(v.frame[b, :n]), m.guide_value(v.frame[b, :n])
                feat = torch.softmax(keys @ guide, 0) @ values
                assert frame[i, b] == pytest.approx(F.cosine_similarity(q.frame[i], feat, dim=0).item(), abs=1e-5)
    assert torch.allclose(total, 0.7 * clip + 0.3 * frame, atol=1e-6)


def test_mssl_frame_loss_uses_key_clip_of_own_video():
    m = MSSL(VDIM, TDIM, dict(SMALL))
    assert not m.hard_negatives(19) and m.hard_negatives(20)
    frames, mask = make_videos([20, 8, 14])
    tokens, tmask = make_queries(5)
    loss, terms = m(TrainBatch(frames, mask, tokens, tmask, torch.tensor([0, 1, 2, 0, 2]), epoch=0))
    assert set(terms) == {"clip_nce", "clip_trip", "frame_nce", "frame_trip"}
    assert loss.item() == pytest.approx(sum(terms.values()), rel=1e-5)


# ---- GMMFormer ---------------------------------------------------------------------------------

def test_gaussian_mask_hand_case():
    # width 1 -> sigma 1/9; centres i/3, key positions 0, 1/2, 1; each row scaled to max 1
    w = gaussian_weights(torch.tensor([3]), 3, 1.0)[0]
    s2 = 2 * (1 / 9) ** 2
    g = lambda d: math.exp(-d * d / s2)  # noqa: E731
    expect = torch.tensor([[g(0), g(0.5), g(1)],
                           [g(1 / 3) / g(1 / 6), 1.0, g(2 / 3) / g(1 / 6)],
                           [g(2 / 3) / g(1 / 6), 1.0, g(1 / 3) / g(1 / 6)]])
    assert torch.allclose(w, expect, atol=1e-6, rtol=1e-4)


def test_gaussian_mask_width_normalisation_and_padding():
    narrow, wide = (gaussian_weights(torch.tensor([32, 5]), 32, w) for w in (0.5, 5.0))
    assert torch.allclose(narrow.max(-1).values, torch.ones(2, 32))       # every row peaks at 1
    assert (narrow[1, :, 5:] == 0).all()                                    # padded keys get nothing
    assert narrow[0].sum() < wide[0].sum()                                  # narrower width, less spread
    assert (wide[0] > 0.15).all() and (narrow[0, 0, 10:] < 1e-6).all()      # sigma = width / 9


def test_gmmformer_block_has_free_and_gaussian_branches():
    m = GMMFormer(VDIM, TDIM, dict(SMALL))
    assert len(m.clip_blocks) == 2 and len(m.frame_blocks) == 2
    assert len(m.clip_blocks[0].constrained) == 3                          # widths 0.5, 1, 5 + one free layer


def test_gmmformer_encoding_and_scores():
    m = GMMFormer(VDIM, TDIM, dict(SMALL)).eval()
    frames, mask = make_videos([40, 9, 3])
    tokens, tmask = make_queries(4)
    with torch.no_grad():
        v, q = m.encode_videos(frames, mask), m.encode_queries(tokens, tmask)
        clip, frame = m.branch_scores(q, v)
        total = m.score(q, v)
    assert v.clip.shape == (3, 32, 16) and v.frame.shape == (3, 1, 16)
    assert v.clip_mask.all() and v.frame_mask.all()
    assert v.clip_attn.shape == (3, 32, 40) and v.frame_attn.shape == (3, 1, 40)
    assert torch.allclose(v.frame_attn.sum(-1), torch.ones(3, 1), atol=1e-5)
    assert (v.frame_attn[1, :, 9:] == 0).all()
    cos = F.cosine_similarity(q.clip.view(4, 1, 1, -1), v.clip.unsqueeze(0), dim=-1).max(-1).values
    assert torch.allclose(clip, cos, atol=1e-5)
    assert torch.allclose(frame, F.cosine_similarity(q.frame.view(4, 1, -1), v.frame[:, 0].unsqueeze(0), dim=-1),
                          atol=1e-5)
    assert torch.allclose(total, 0.7 * clip + 0.3 * frame, atol=1e-6)


def test_query_diverse_term_hand_case():
    # queries 0 and 1 share a video at 60 degrees (cos 0.5); query 2 is alone
    q = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2], [0.0, 1.0]])
    loss = query_diverse_loss(q, torch.tensor([1, 1, 0]), margin=0.15, alpha=32.0)
    assert loss.item() == pytest.approx(2 * math.log1p(math.exp(32 * 0.65)) / 3, rel=1e-5)


def test_gmmformer_loss_terms():
    m = GMMFormer(VDIM, TDIM, {**SMALL, "hard_negative_start_epoch": 30})
    assert not m.hard_negatives(29) and m.hard_negatives(30)
    frames, mask = make_videos([20, 8, 14])
    tokens, tmask = make_queries(5)
    loss, terms = m(TrainBatch(frames, mask, tokens, tmask, torch.tensor([0, 0, 1, 2, 2]), epoch=0))
    assert set(terms) == {"clip_nce", "clip_trip", "frame_nce", "frame_trip", "query_diverse"}
    assert loss.item() == pytest.approx(sum(terms.values()), rel=1e-5)


# ---- both --------------------------------------------------------------------------------------

def test_single_video_encoding_matches_batch(model):
    frames, mask = make_videos([30, 11, 5])
    tokens, tmask = make_queries(3)
    with torch.no_grad():
        batch = model.encode_videos(frames, mask)
        q = model.encode_queries(tokens, tmask)
        full = model.score(q, batch)
        for b, n in enumerate([30, 11, 5]):
            one = model.encode_videos(frames[b:b + 1, :n], mask[b:b + 1, :n])
            assert torch.allclose(model.score(q, one)[:, 0], full[:, b], atol=1e-5)


def test_score_is_chunked_consistently(model, monkeypatch):
    frames, mask = make_videos([25, 7, 13, 18, 4])
    tokens, tmask = make_queries(6)
    with torch.no_grad():
        v, q = model.encode_videos(frames, mask), model.encode_queries(tokens, tmask)
        whole = model.score(q, v)
        monkeypatch.setattr(mssl_mod, "SCORE_BLOCK_ELEMENTS", 1)             # one video per block
        import prvr_cli.nets.gmmformer as gm
        monkeypatch.setattr(gm, "video_chunk_size", lambda *a: 1)
        assert torch.allclose(model.score(q, v), whole, atol=1e-6)
        assert torch.allclose(model.score(q, v.index(slice(1, 3))), whole[:, 1:3], atol=1e-6)


def test_inputs_are_l2_normalised(model):
    frames, mask = make_videos([20, 6])
    tokens, tmask = make_queries(3)
    with torch.no_grad():
        a = model.score(model.encode_queries(tokens, tmask), model.encode_videos(frames, mask))
        b = model.score(model.encode_queries(5 * tokens, tmask), model.encode_videos(3 * frames, mask))
    assert torch.allclose(a, b, atol=1e-5)


def test_unknown_setting_is_a_usage_error():
    with pytest.raises(UsageError, match="hiden_size"):
        MSSL(VDIM, TDIM, {"hiden_size": 8})
    with pytest.raises(UsageError):
        GMMFormer(VDIM, TDIM, {"gauss_width": [1.0]})


@pytest.mark.parametrize("preset", ["mssl_anet", "mssl_tvr", "gmmformer_anet", "gmmformer_tvr"])
def test_presets_build_and_checkpoint_round_trip(preset, tmp_path):
    m = create_model(preset, video_dim=VDIM, text_dim=TDIM)
    assert (m.video_dim, m.text_dim) == (VDIM, TDIM) and m.cfg.clip_weight == 0.7
    path = tmp_path / "m.pt"
    save_checkpoint(path, m, feature_source={"collection": "test"})
    loaded, meta = load_checkpoint(path)
    assert meta["method"] == m.method
    for a, b in zip(m.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def synthetic_batch(n_videos=6, per_video=2, seed=3):
    """Videos whose frames carry a signature the captions also carry, so retrieval is learnable."""
    g = torch.Generator().manual_seed(seed)
    sig = torch.randn(n_videos, VDIM, generator=g)
    lengths = torch.tensor([24, 10, 17, 6, 20, 13][:n_videos])
    T = int(lengths.max())
    frames = 0.3 * torch.randn(n_videos, T, VDIM, generator=g) + sig.unsqueeze(1)
    mask = torch.arange(T).view(1, -1) < lengths.view(-1, 1)
    owner = torch.arange(n_videos).repeat_interleave(per_video)
    proj = torch.randn(VDIM, TDIM, generator=g)
    tokens = (sig @ proj)[owner].unsqueeze(1) + 0.3 * torch.randn(len(owner), 5, TDIM, generator=g)
    tmask = torch.ones(len(owner), 5, dtype=torch.bool)
    return TrainBatch(frames * mask.unsqueeze(-1), mask, tokens, tmask, owner, epoch=5)


@pytest.mark.parametrize("cls,cfg", [(MSSL, SMALL), (GMMFormer, SMALL), (GMMFormerV2, V2_SMALL)],
                         ids=["mssl", "gmmformer", "gmmformer2"])
def test_optimisation_reduces_loss(cls, cfg):
    torch.manual_seed(0)
    # hard negatives from the start with a pool of 1: the loss is deterministic given the weights
    m = cls(VDIM, TDIM, {**cfg, "hard_negative_start_epoch": 0, "hard_pool_size": 1})
    batch = synthetic_batch()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first, first_terms = m(batch)
    for _ in range(10):
        loss, _ = m(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    last, last_terms = m(batch)
    assert last.item() < 0.7 * first.item()
    assert last_terms["clip_trip"] < first_terms["clip_trip"]
