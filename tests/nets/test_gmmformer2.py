"""GMMFormer-v2's dynamic block and MSC's switches, each against a direct computation."""
import json

import pytest
import torch
import torch.nn.functional as F

from prvr_cli.nets.factory import create_model, list_presets, load_config
from prvr_cli.nets.gmmformer2 import MSC, GMMFormerV2, LayerMixer
from prvr_cli.nets.msc_losses import cross_branch_alignment, last_valid_token
from prvr_cli.nets.mssl import SelfAttentionLayer
from prvr_cli.nets.retrieval import TrainBatch
from prvr_cli.nets.token_merge import adaptive_clip_count, bipartite_merge, redundancy

VDIM, TDIM = 12, 10
SMALL = {"hidden_size": 16, "n_heads": 2, "max_frames": 16, "n_clips": 4, "gauss_widths": [0.5, 5.0],
         "input_dropout": 0.0, "dropout": 0.0}


def batch(n_videos=4, per_video=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([20, 7, 3, 12, 16, 9][:n_videos])
    T = int(lengths.max())
    mask = torch.arange(T).view(1, -1) < lengths.view(-1, 1)
    frames = torch.randn(n_videos, T, VDIM, generator=g) * mask.unsqueeze(-1)
    owner = torch.arange(n_videos).repeat_interleave(per_video)
    tokens = torch.randn(len(owner), 6, TDIM, generator=g)
    tmask = torch.arange(6).view(1, -1) < torch.randint(2, 7, (len(owner), 1), generator=g)
    return TrainBatch(frames, mask, tokens, tmask, owner)


def test_proportional_attention_counts_a_merged_token_as_its_frames():
    """A token of size 2 with a +log 2 bias is attended exactly as two copies of it would be."""
    torch.manual_seed(0)
    layer = SelfAttentionLayer(8, 2, 0.0).eval()
    a, b = torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    merged = layer(torch.cat([a, b], 1), key_bias=torch.tensor([[1.0, 2.0]]).log())
    copies = layer(torch.cat([a, b, b], 1))
    assert torch.allclose(merged[:, 0], copies[:, 0], atol=1e-6)
    assert torch.allclose(merged[:, 1], copies[:, 1], atol=1e-6)


def test_redundancy_closure_is_the_transitive_closure():
    """Chains of links count with closure=True: a Floyd-Warshall loop over the link matrix says which pairs."""
    g = torch.Generator().manual_seed(3)
    clips = torch.randn(3, 9, 5, generator=g)
    clips[0, 1] = clips[0, 0] + 0.01                      # 0-1 linked, 1-2 linked, 0-2 only through 1
    clips[0, 2] = clips[0, 1] + 0.3 * torch.randn(5, generator=g)
    tau = 0.8
    unit = F.normalize(clips, dim=-1)
    for video, omega in enumerate(redundancy(clips, tau, closure=True)):
        reach = (unit[video] @ unit[video].t()) > tau
        for k in range(9):
            reach = reach | (reach[:, k:k + 1] & reach[k:k + 1, :])
        upper = torch.triu(torch.ones(9, 9, dtype=torch.bool), 1)
        assert omega.item() == pytest.approx(reach[upper].float().mean().item())
    assert (redundancy(clips, tau, closure=True) >= redundancy(clips, tau)).all()


def test_adaptive_alignment_matches_a_per_video_loop():
    """Each video's clips are bipartite-merged down to its own count, then aligned; the batch mean of those."""
    torch.manual_seed(1)
    cfg = {**SMALL, "max_frames": 64, "n_clips": 32, "token_merge": False}
    model = MSC(VDIM, TDIM, cfg)
    g = torch.Generator().manual_seed(2)
    B, D = 5, 16
    base = torch.randn(B, 1, 8, generator=g)
    spread = torch.tensor([0.05, 0.3, 0.6, 1.0, 3.0]).view(-1, 1, 1)   # from redundant to varied
    clip_in = base + spread * torch.randn(B, 32, 8, generator=g)
    enc = {"frames": torch.randn(B, 64, D, generator=g), "clips": torch.randn(B, 32, D, generator=g),
           "clip_in": clip_in, "sizes": None, "frame_to_clip": torch.arange(64).div(2, rounding_mode="floor").repeat(B, 1)}
    got = model._alignment(enc)

    metric = F.normalize(clip_in, dim=-1)
    counts = adaptive_clip_count(redundancy(metric, model.cfg.redundancy_threshold, closure=True))
    assert len(set(counts.tolist())) >= 3                                # the case covers several counts
    frames, clips = model.align_proj(enc["frames"]), model.align_proj(enc["clips"])
    losses = []
    for b in range(B):
        c, m, s, f2c = clips[b:b + 1], metric[b:b + 1], torch.ones(1, 32), enc["frame_to_clip"][b:b + 1]
        for target in (20, 12, 8, 5):
            if c.shape[1] == counts[b]:
                break
            j, s, f2c = bipartite_merge(torch.cat([c, m], -1), s, f2c, target, metric=m)
            c, m = j[..., :D], j[..., D:]
        assert c.shape[1] == counts[b]
        losses.append(cross_branch_alignment(frames[b:b + 1], c, f2c))
    assert torch.allclose(got, torch.stack(losses).mean(), atol=1e-5)


def test_token_merge_feeds_sizes_and_the_frame_map():
    torch.manual_seed(0)
    model = MSC(VDIM, TDIM, SMALL).eval()
    b = batch()
    enc = model._encode(b.frames, b.frame_mask)
    assert enc["clips"].shape == (4, 4, 16) and enc["sizes"].shape == (4, 4)
    assert torch.equal(enc["sizes"].sum(1), torch.full((4,), 16.0))          # every resampled frame, once
    counted = torch.stack([torch.bincount(m, minlength=4) for m in enc["frame_to_clip"]]).float()
    assert torch.equal(counted, enc["sizes"])
    assert torch.allclose(enc["clip_attn"].sum(-1), torch.ones(4, 4), atol=1e-5)   # highlights map to real frames
    assert (enc["clip_attn"][1, :, 7:] == 0).all()                                # nothing on padding


def test_each_switch_removes_its_loss():
    b = batch()
    names = lambda cfg: set(MSC(VDIM, TDIM, {**SMALL, **cfg})(b)[1])  # noqa: E731
    base = {"clip_nce", "clip_trip", "frame_nce", "frame_trip"}
    assert names({}) == base | {"tcpl_distance", "tcpl_angle", "cbva"}
    assert names({"tcpl_distance_weight": 0, "tcpl_angle_weight": 0}) == base | {"cbva"}
    assert names({"cbva_weight": 0}) == base | {"tcpl_distance", "tcpl_angle"}
    assert set(GMMFormerV2(VDIM, TDIM, SMALL)(b)[1]) == base
    merged = MSC(VDIM, TDIM, {**SMALL, "token_merge": True})._encode(b.frames, b.frame_mask)["sizes"]
    uniform = MSC(VDIM, TDIM, {**SMALL, "token_merge": False})._encode(b.frames, b.frame_mask)["sizes"]
    assert merged is not None and uniform is None


def test_tcpl_teacher_is_the_last_valid_token():
    tokens = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert last_valid_token(tokens, mask).flatten().tolist() == [2.0, 7.0]


def test_layer_mixer_weights_are_a_softmax_over_layers():
    torch.manual_seed(0)
    mixer = LayerMixer(8, 2, n_tokens=5, dropout=0.0, temperature=0.6).eval()
    outs = torch.randn(3, 2, 5, 8)
    w = mixer(outs, torch.randn(1, 1, 8))
    assert w.shape == (2, 5, 3) and torch.allclose(w.sum(-1), torch.ones(2, 5), atol=1e-6)
    sharp = mixer(outs, torch.zeros(1, 1, 8))
    mixer.temperature = 6.0                                        # a higher temperature flattens the same logits
    flat = mixer(outs, torch.zeros(1, 1, 8))
    assert sharp.amax(-1).mean() > flat.amax(-1).mean()


NEW_PRESETS = [p for p in list_presets() if p.split("_")[0] in ("gmmformer2", "msc")]


def test_presets_cover_four_datasets_per_new_method():
    assert sorted(NEW_PRESETS) == sorted(f"{m}_{d}" for m in ("gmmformer2", "msc")
                                         for d in ("anet", "charades", "qvh", "tvr"))
    assert load_config("gmmformer2_tvr")["model"]["mix_temperature"] == 0.09
    assert load_config("msc_charades")["model"]["redundancy_threshold"] == 0.85


@pytest.mark.parametrize("preset", NEW_PRESETS)
def test_new_presets_train_one_step(preset):
    torch.manual_seed(0)
    model = create_model(preset, video_dim=VDIM, text_dim=TDIM)
    b = batch(n_videos=3)
    loss, terms = model(b)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(sum(terms.values()), rel=1e-4)
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("query_encoder"))
    expected = json.loads(json.dumps(load_config(preset)["model"]))
    assert {k: getattr(model.cfg, k) for k in expected} == expected
