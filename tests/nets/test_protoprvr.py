"""ProtoPRVR model: shapes, masks, prototype cross-attention, attention maps, loss switches, training."""
import pytest
import torch
import torch.nn.functional as F

from prvr_cli.nets import protoprvr_losses as L
from prvr_cli.errors import UsageError
from prvr_cli.nets.factory import create_model, load_checkpoint, load_config, override, save_checkpoint
from prvr_cli.nets.protoprvr import NegativeMemory, PrototypeGenerator, ProtoPRVR, max_cosine, max_dot
from prvr_cli.nets.retrieval import TrainBatch
from prvr_cli.nets.retrieval_losses import infonce_loss, triplet_loss


TINY = {"hidden_size": 16, "n_heads": 2, "ff_size": 32, "dropout": 0.0, "max_frames": 8, "n_clips": 4, "max_query_tokens": 10,
        "n_prototypes": 5, "iterations": 1, "hard_pool_size": 2}
VDIM, TDIM = 12, 7


def tiny_model(**changes):
    losses = changes.pop("losses", {})
    torch.manual_seed(0)
    return ProtoPRVR(VDIM, TDIM, {**TINY, **changes, "losses": losses})


def tiny_batch(n_videos=4, per_video=2, n_frames=20, n_words=6, seed=0, epoch=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, n_frames + 1, (n_videos,), generator=g)
    lengths[0] = n_frames                                    # longer than max_frames: downsampled
    lengths[-1] = 3                                          # shorter than n_clips: clips repeat frames
    frames = torch.randn(n_videos, n_frames, VDIM, generator=g)
    frame_mask = torch.arange(n_frames)[None] < lengths[:, None]
    n_queries = n_videos * per_video
    words = torch.randint(1, n_words + 1, (n_queries,), generator=g)
    tokens = torch.randn(n_queries, n_words, TDIM, generator=g)
    token_mask = torch.arange(n_words)[None] < words[:, None]
    video_index = torch.arange(n_videos).repeat_interleave(per_video)
    return TrainBatch(frames, frame_mask, tokens, token_mask, video_index, epoch)


# ------------------------------------------------------------------ encoding
def test_video_encoding_shapes_masks_and_attention_rows():
    model = tiny_model().eval()
    batch = tiny_batch()
    with torch.no_grad():
        enc = model.encode_videos(batch.frames, batch.frame_mask)
    B, T = batch.frame_mask.shape
    for protos, mask, attn in ((enc.clip, enc.clip_mask, enc.clip_attn), (enc.frame, enc.frame_mask, enc.frame_attn)):
        assert protos.shape == (B, 5, 16) and mask.shape == (B, 5) and mask.all()
        assert attn.shape == (B, 5, T)
        assert torch.allclose(attn.sum(-1), torch.ones(B, 5), atol=1e-5)
        assert (attn.masked_select(~batch.frame_mask[:, None, :].expand_as(attn)) == 0).all()
        assert (attn >= 0).all()


def test_query_encoding_and_score():
    model = tiny_model().eval()
    batch = tiny_batch()
    with torch.no_grad():
        q = model.encode_queries(batch.tokens, batch.token_mask)
        v = model.encode_videos(batch.frames, batch.frame_mask)
        s = model.score(q, v)
    assert q.clip.shape == q.frame.shape == (8, 16)
    assert s.shape == (8, 4)
    clip = max_cosine(q.clip, v.clip, v.clip_mask)[0]
    frame = max_cosine(q.frame, v.frame, v.frame_mask)[0]
    assert torch.allclose(s, 0.7 * clip + 0.3 * frame)
    assert (s.abs() <= 1 + 1e-6).all()


def test_query_padding_and_overlong_queries():
    model = tiny_model().eval()
    tokens, mask = torch.randn(2, 14, TDIM), torch.ones(2, 14, dtype=torch.bool)
    mask[1, 4:] = False
    with torch.no_grad():
        full = model.encode_queries(tokens, mask)
        garbage = tokens.clone()
        garbage[1, 4:] = 1e3
        alone = model.encode_queries(garbage[1:, :4], mask[1:, :4])
        padded = model.encode_queries(garbage, mask)
    assert torch.allclose(full.clip[1], alone.clip[0], atol=1e-5)      # padding tokens are ignored
    assert torch.allclose(padded.frame[1], alone.frame[0], atol=1e-5)
    assert torch.isfinite(full.clip).all()                               # 14 tokens > max_words: truncated


def test_branch_scores_hand_case():
    queries = torch.tensor([[1.0, 0.0]])
    protos = torch.tensor([[[0.0, 3.0], [2.0, 2.0], [-5.0, 0.0]]])
    cos, best = max_cosine(queries, protos, torch.ones(1, 3, dtype=torch.bool))
    assert cos.item() == pytest.approx(2 ** -0.5) and best.item() == 1 and max_dot(queries, protos).item() == 2.0
    cos, best = max_cosine(queries, protos, torch.tensor([[True, False, True]]))
    assert cos.item() == pytest.approx(0.0) and best.item() == 0


def test_single_video_eval_encoding_is_deterministic_and_padding_free():
    model = tiny_model().eval()
    batch = tiny_batch()
    with torch.no_grad():
        together = model.encode_videos(batch.frames, batch.frame_mask)
        n = int(batch.frame_mask[1].sum())
        alone = model.encode_videos(batch.frames[1:2, :n], batch.frame_mask[1:2, :n])
        again = model.encode_videos(batch.frames[1:2, :n], batch.frame_mask[1:2, :n])
    assert torch.equal(alone.clip, again.clip) and torch.equal(alone.frame_attn, again.frame_attn)
    assert torch.allclose(alone.clip[0], together.clip[1], atol=1e-5)
    assert torch.allclose(alone.frame[0], together.frame[1], atol=1e-5)
    assert torch.allclose(alone.clip_attn[0], together.clip_attn[1, :, :n], atol=1e-6)
    assert torch.allclose(alone.frame_attn[0], together.frame_attn[1, :, :n], atol=1e-6)


def test_frame_attention_maps_through_the_pooling_matrices():
    """A prototype attending to one frame token puts its mass on exactly that token's frames."""
    model = tiny_model().eval()
    frames, mask = torch.randn(1, 16, VDIM), torch.ones(1, 16, dtype=torch.bool)  # 16 frames -> 8 tokens of 2
    captured = {}

    def hook(module, args, output):
        captured.setdefault(module, output[1])

    for gen in (model.frame_prototypes, model.clip_prototypes):
        gen.block.register_forward_hook(hook)
    with torch.no_grad():
        enc = model.encode_videos(frames, mask)
    token_attn = captured[model.frame_prototypes.block]                   # [1, P, 8]
    assert torch.allclose(enc.frame_attn, token_attn.repeat_interleave(2, dim=-1) / 2, atol=1e-6)
    span_attn = captured[model.clip_prototypes.block]                     # [1, P, 10 spans of 4 clips]
    assert span_attn.shape[-1] == 10
    clip_attn = span_attn @ model.span_to_clip                            # [1, P, 4 clips of 4 frames]
    assert torch.allclose(enc.clip_attn, clip_attn.repeat_interleave(4, dim=-1) / 4, atol=1e-6)


# ------------------------------------------------------------------ prototype generator
@pytest.mark.parametrize("iterations", [1, 2])
def test_prototypes_use_cross_attention_only(iterations):
    torch.manual_seed(0)
    gen = PrototypeGenerator(4, 8, 2, 16, iterations, 0.0).eval()
    tokens, mask = torch.randn(2, 6, 8), torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    with torch.no_grad():
        before, attn = gen(tokens, mask)
        gen.init[2] += torch.randn(8)
        after, _ = gen(tokens, mask)
    unchanged = [0, 1, 3]
    assert torch.allclose(before[:, unchanged], after[:, unchanged], atol=1e-6)
    assert not torch.allclose(before[:, 2], after[:, 2])
    assert before.shape == (2, 4, 8) and attn.shape == (2, 4, 6)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 4)) and (attn[1, :, 3:] == 0).all()
    assert not any(isinstance(m, torch.nn.TransformerEncoderLayer) for m in gen.modules())


def test_invalid_config_is_a_usage_error():
    with pytest.raises(UsageError):
        ProtoPRVR(VDIM, TDIM, {**TINY, "iterations": 0})
    with pytest.raises(UsageError):
        ProtoPRVR(VDIM, TDIM, {**TINY, "losses": {"ncee": 1.0}})


# ------------------------------------------------------------------ training objectives
def test_forward_reports_every_weighted_term_and_their_sum():
    model = tiny_model().train()
    torch.manual_seed(1)
    loss, terms = model(tiny_batch())
    assert set(terms) == {"nce", "triplet", "crecon", "urecon", "attn", "ortho"}
    assert loss.item() == pytest.approx(sum(terms.values()), rel=1e-5)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ["nce", "triplet", "crecon", "urecon", "attn", "ortho"])
def test_each_loss_switch_removes_it(name):
    batch = tiny_batch()
    torch.manual_seed(3)
    _, full = tiny_model().train()(batch)
    model = tiny_model(losses={name: 0.0}).train()
    calls = []
    original = model._video_tokens
    model._video_tokens = lambda *a: calls.append(1) or original(*a)
    torch.manual_seed(3)
    loss, terms = model(batch)
    assert name not in terms and set(terms) == set(full) - {name}
    assert loss.item() == pytest.approx(sum(terms.values()), rel=1e-5)
    loss.backward()
    if name == "crecon":
        assert model.crecon_head.weight.grad is None and model.mask_token.grad is None
    if name == "urecon":
        assert all(p.grad is None for p in model.urecon_decoder.parameters())
    assert len(calls) == (1 if name == "attn" else 2)  # the mixed videos are only encoded for the guidance


def test_only_one_loss_gives_exactly_that_term():
    off = {k: 0.0 for k in ["nce", "triplet", "crecon", "urecon", "attn"]}
    model = tiny_model(losses={**off, "ortho": 0.5})
    loss, terms = model(tiny_batch())
    enc = model.encode_videos(tiny_batch().frames, tiny_batch().frame_mask)
    expected = 0.5 * (L.orthogonal_loss(enc.clip) + L.orthogonal_loss(enc.frame)) / 2
    assert list(terms) == ["ortho"] and loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_retrieval_terms_match_the_loss_functions():
    model = tiny_model(losses={"crecon": 0.0, "urecon": 0.0, "attn": 0.0, "ortho": 0.0, "nce": 0.5}).eval()
    batch = tiny_batch(epoch=100)
    q = model.encode_queries(batch.tokens, batch.token_mask)
    v = model.encode_videos(batch.frames, batch.frame_mask)
    expected_nce = expected_triplet = 0.0
    for qb, vb in ((q.clip, v.clip), (q.frame, v.frame)):
        cos, _ = max_cosine(qb, vb, torch.ones(vb.shape[:2], dtype=torch.bool))
        expected_nce += infonce_loss(max_dot(qb, vb), batch.video_index).item()
        expected_triplet += triplet_loss(cos, batch.video_index, 0.1, hard=True, hard_pool=1).item()
    model.hard_pool = 1
    _, terms = model(batch)
    assert terms["nce"] == pytest.approx(0.5 * expected_nce, rel=1e-5)
    assert terms["triplet"] == pytest.approx(expected_triplet, rel=1e-5)


def test_cross_modal_reconstruction_reads_only_the_retrieved_prototype():
    """Gradient of the masked reconstruction reaches exactly the prototypes p* of each query's own video."""
    off = {k: 0.0 for k in ["nce", "triplet", "urecon", "attn", "ortho"]}
    model = tiny_model(losses={**off, "crecon": 1.0})
    batch = tiny_batch()
    kept = []
    original = model._prototypes

    def encode_and_keep(*args):
        enc, hidden = original(*args)
        enc.clip.retain_grad()
        enc.frame.retain_grad()
        kept.append(enc)
        return enc, hidden

    model._prototypes = encode_and_keep
    loss, _ = model(batch)
    loss.backward()
    q = model.encode_queries(batch.tokens, batch.token_mask)
    enc = kept[0]
    for qb, protos in ((q.clip, enc.clip), (q.frame, enc.frame)):
        best = max_cosine(qb, protos, torch.ones(protos.shape[:2], dtype=torch.bool))[1]
        expected = torch.zeros(protos.shape[:2], dtype=torch.bool)
        expected[batch.video_index, best[torch.arange(len(best)), batch.video_index]] = True
        assert torch.equal(protos.grad.abs().sum(-1) > 0, expected)


def test_attention_guidance_uses_the_mixed_video_share():
    """The guidance equals the hand formula applied to p*'s attention on the query's own half."""
    off = {k: 0.0 for k in ["nce", "triplet", "crecon", "urecon", "ortho"]}
    model = tiny_model(losses={**off, "attn": 1.0}).eval()
    batch = tiny_batch()
    torch.manual_seed(5)
    _, terms = model(batch)
    torch.manual_seed(5)                                           # replay the same partner and order draws
    shift = int(torch.randint(1, 4, ()))
    partner = (torch.arange(4) + shift) % 4
    own_first = torch.rand(4) < 0.5
    mixed, mixed_mask, first_half = L.mix_videos(batch.frames, batch.frame_mask, partner, own_first)
    mix = model.encode_videos(mixed, mixed_mask)
    q = model.encode_queries(batch.tokens, batch.token_mask)
    expected = 0.0
    for qb, protos, attn in ((q.clip, mix.clip, mix.clip_attn), (q.frame, mix.frame, mix.frame_attn)):
        for i, v in enumerate(batch.video_index.tolist()):                  # per query, written out plainly
            p = torch.nn.functional.cosine_similarity(qb[i][None], protos[v]).argmax()
            share_first = attn[v, p][first_half[v]].sum()
            share_own = share_first if own_first[v] else 1 - share_first
            assert 0 <= share_first <= 1 + 1e-6
            expected += (-torch.log(share_own) if share_own < 0.7 else 0.0) / len(batch.video_index) / 2
    assert terms["attn"] == pytest.approx(float(expected.detach()), rel=1e-4)


def test_single_video_batch_trains():
    model = tiny_model()
    batch = tiny_batch(n_videos=1)
    loss, terms = model(batch)
    assert "attn" not in terms and torch.isfinite(loss)
    loss.backward()
    # one video has nothing to rank against: the ranking terms are zero, and the reconstruction and
    # orthogonality terms still train both video branches and the query projection, with finite gradients
    assert terms["triplet"] == 0.0 and terms["nce"] == 0.0 and terms["urecon"] > 0 and terms["crecon"] > 0
    for module in (model.frame_prototypes, model.clip_prototypes, model.frame_encoder, model.clip_encoder,
                   model.query_proj):
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_full_model_directional_gradient_matches_finite_difference():
    model = tiny_model().double().train()
    batch = tiny_batch(n_videos=3)
    batch = TrainBatch(batch.frames.double(), batch.frame_mask, batch.tokens.double(), batch.token_mask,
                       batch.video_index, epoch=100)

    def loss_fn():
        torch.manual_seed(7)  # same masks, partners and negatives every call
        return model(batch)[0]

    params = [p for p in model.parameters() if p.requires_grad]
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    torch.manual_seed(11)
    direction = [torch.randn_like(p) for p in params]
    analytic = sum((g * d).sum() for g, d in zip(grads, direction) if g is not None)
    eps = 1e-6
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(eps * d)
        up = loss_fn()
        for p, d in zip(params, direction):
            p.sub_(2 * eps * d)
        down = loss_fn()
        for p, d in zip(params, direction):
            p.add_(eps * d)
    numeric = (up - down) / (2 * eps)
    assert numeric.item() == pytest.approx(analytic.item(), rel=1e-4, abs=1e-6)


def test_a_few_steps_reduce_the_loss():
    model = tiny_model().train()
    batch = tiny_batch(n_videos=6, seed=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        torch.manual_seed(0)
        loss, _ = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0] and sum(losses[-3:]) < sum(losses[:3])


# ------------------------------------------------------------------ presets and checkpoints
@pytest.mark.parametrize("preset,nce,iterations,temperature", [
    ("protoprvr_tvr", 0.03, 1, 0.0), ("protoprvr_anet_paper", 0.06, 1, 0.0), ("protoprvr_qvh", 0.06, 1, 0.0),
    ("protoprvr_anet", 1.0, 1, 0.05)])   # the default: one round, InfoNCE on cosine / 0.05, mean-token queries
def test_presets_load(preset, nce, iterations, temperature):
    config = load_config(preset)
    # the default's input-space prototypes train at 1e-3 (docs/benchmarks.md, section 8); the papers' at 2.5e-4
    assert config["method"] == "protoprvr" and config["train"]["lr"] == (1e-3 if preset == "protoprvr_anet" else 2.5e-4)
    m = config["model"]
    assert (m["n_prototypes"], m["iterations"], m["hidden_size"], m["n_heads"]) == (30, iterations, 384, 4)
    assert m["losses"] == {"nce": nce, "triplet": 1.0, "crecon": 0.1, "urecon": 1.0, "attn": 0.005, "ortho": 0.01}
    assert m["attn_beta"] == 0.2 and m.get("nce_temperature", 0.0) == temperature
    # the default reads its queries as the mean token (docs/benchmarks.md, section 8); the papers' presets attend
    assert m.get("query_encoder", "attention") == ("mean" if preset == "protoprvr_anet" else "attention")
    assert m.get("prototype_readout", "block") == ("input" if preset == "protoprvr_anet" else "block")
    # the default's text-to-video InfoNCE also ranks a memory of 4 earlier batches from its second epoch
    # (docs/benchmarks.md, section 8, sixth session), and its rate holds until a cooldown over the last 20% of
    # the steps (ninth session); the papers' presets have neither
    default = preset == "protoprvr_anet"
    assert (m.get("negative_memory", 0), m.get("negative_memory_start_epoch", 0), m.get("nce_video_to_text", True),
            config["train"]["schedule"]) == ((4, 1, False, "cooldown") if default else (0, 0, True, "linear"))
    # and each of its prototypes has a learned place in the video (the temporal prior, twelfth and thirteenth
    # sessions); the papers' prototypes attend by content alone
    assert (m.get("temporal_prior", False), m.get("temporal_prior_width", 1.5)) == (default, 1.5)


def test_checkpoint_round_trip(tmp_path):
    config = override(load_config("protoprvr_tvr"), {f"model.{k}": v for k, v in TINY.items()})
    model = create_model(config, video_dim=VDIM, text_dim=TDIM).eval()
    save_checkpoint(tmp_path / "m.pt", model, feature_source={"name": "test"})
    loaded, meta = load_checkpoint(tmp_path / "m.pt")
    batch = tiny_batch()
    with torch.no_grad():
        a = model.encode_videos(batch.frames, batch.frame_mask)
        b = loaded.encode_videos(batch.frames, batch.frame_mask)
    assert meta["dims"] == {"video": VDIM, "text": TDIM}
    assert torch.equal(a.clip, b.clip) and torch.equal(a.frame_attn, b.frame_attn)


def test_hard_negatives_start_after_the_warm_up_epochs():
    off = {k: 0.0 for k in ["nce", "crecon", "urecon", "attn", "ortho"]}
    model = tiny_model(losses=off, hard_negative_start_epoch=5, hard_pool_size=1).eval()

    def triplets(epoch):
        batch = tiny_batch(n_videos=6, epoch=epoch)
        values = set()
        for seed in range(6):
            torch.manual_seed(seed)
            values.add(round(model(batch)[1]["triplet"], 6))
        return values

    assert len(triplets(4)) > 1    # random negatives during the warm-up
    assert len(triplets(5)) == 1   # the hardest negative afterwards: deterministic


def test_span_keys_shortcut_equals_attending_over_explicit_spans():
    """Projecting clip tokens then averaging spans gives exactly the attention over the 528 span means."""
    from prvr_cli.nets.layers import span_means

    torch.manual_seed(0)
    gen = PrototypeGenerator(5, 16, 2, 16, 2, 0.0).eval()
    clips = torch.randn(3, 32, 16, dtype=torch.float64)
    gen = gen.double()
    fast, fast_attn = gen(clips, None, spans=True)
    slow, slow_attn = gen(span_means(clips), None)
    assert fast_attn.shape == (3, 5, 528)
    assert torch.allclose(fast, slow, atol=1e-10) and torch.allclose(fast_attn, slow_attn, atol=1e-12)


def test_cross_attention_matches_torch_multihead_attention():
    from prvr_cli.nets.protoprvr import CrossAttentionBlock

    torch.manual_seed(1)
    block = CrossAttentionBlock(16, 4, 32, 0.0).eval()
    q, k = torch.randn(2, 3, 16), torch.randn(2, 7, 16)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    _, attn = block(q, k, mask)
    ref_out, ref_attn = block.attn(q, k, k, key_padding_mask=~mask, need_weights=True, average_attn_weights=True)
    assert torch.allclose(attn, ref_attn, atol=1e-6)
    assert (attn[1, :, 4:] == 0).all()


# ------------------------------------------------------------------ MSC's remedies as switches
MSC_SWITCHES = {"tcpl_distance": 15.0, "tcpl_angle": 30.0, "cbva": 0.1}


@pytest.mark.parametrize("name", list(MSC_SWITCHES))
def test_each_msc_switch_adds_only_its_loss(name):
    batch = tiny_batch()
    torch.manual_seed(3)
    _, base = tiny_model().train()(batch)
    model = tiny_model(losses={name: MSC_SWITCHES[name]}).train()
    torch.manual_seed(3)
    loss, terms = model(batch)
    assert set(terms) == set(base) | {name}
    assert loss.item() == pytest.approx(sum(terms.values()), rel=1e-5)
    loss.backward()
    assert hasattr(model, "align_proj") == (name == "cbva")        # the projection exists only to train CBVA


def test_tcpl_term_is_the_msc_loss_on_both_pooled_queries():
    from prvr_cli.nets.msc_losses import distance_distillation, last_valid_token
    off = {k: 0.0 for k in ["nce", "triplet", "crecon", "urecon", "attn", "ortho"]}
    model = tiny_model(losses={**off, "tcpl_distance": 2.0}).eval()
    batch = tiny_batch()
    _, terms = model(batch)
    q = model.encode_queries(batch.tokens, batch.token_mask)
    teacher = last_valid_token(batch.tokens, batch.token_mask)
    expected = sum(distance_distillation(v, teacher) for v in (q.clip, q.frame)) / 2
    assert terms == {"tcpl_distance": pytest.approx(2.0 * expected.item(), rel=1e-5)}


def test_cbva_positives_are_the_clips_sharing_a_frame_token():
    """A 3-frame video has 4 clips: some frame tokens are held by two clips, all of them positives."""
    from prvr_cli.nets import msc_losses
    model = tiny_model(losses={"cbva": 1.0}).eval()
    batch = tiny_batch()
    seen = {}
    original = msc_losses.cross_branch_alignment

    def spy(frames, clips, holds, mask=None):
        seen["holds"], seen["mask"] = holds, mask
        return original(frames, clips, holds, mask)
    import prvr_cli.nets.protoprvr as proto
    proto.cross_branch_alignment, saved = spy, proto.cross_branch_alignment
    try:
        model(batch)
    finally:
        proto.cross_branch_alignment = saved
    holds, mask = seen["holds"], seen["mask"]
    short = holds[-1][mask[-1]]                                          # the 3-frame video: 3 frame tokens
    assert short.shape == (3, 4) and short.any(1).all() and (short.sum(1) >= 1).all() and short.sum() == 4
    long = holds[0][mask[0]]                                             # 8 frame tokens over 4 clips: 2 each
    assert torch.equal(long.sum(0), torch.full((4,), 2)) and torch.equal(long.sum(1), torch.ones(8, dtype=torch.long))


def test_merged_clip_tokens_map_onto_real_frames_and_do_not_depend_on_the_batch():
    model = tiny_model(clip_tokens="merged").eval()
    batch = tiny_batch()
    with torch.no_grad():
        enc = model.encode_videos(batch.frames, batch.frame_mask)
        B, T = batch.frame_mask.shape
        assert torch.allclose(enc.clip_attn.sum(-1), torch.ones(B, 5), atol=1e-5)
        assert (enc.clip_attn.masked_select(~batch.frame_mask[:, None, :].expand_as(enc.clip_attn)) == 0).all()
        n = int(batch.frame_mask[1].sum())
        one = model.encode_videos(batch.frames[1:2, :n], batch.frame_mask[1:2, :n])
        assert torch.allclose(one.clip, enc.clip[1:2], atol=1e-5)
        uniform = tiny_model().eval().encode_videos(batch.frames, batch.frame_mask)
        assert not torch.allclose(uniform.clip, enc.clip, atol=1e-3)


def test_unknown_clip_tokens_is_a_usage_error():
    with pytest.raises(UsageError, match="clip_tokens"):
        tiny_model(clip_tokens="kmeans")


def test_nce_temperature_scores_the_max_cosine():
    off = {k: 0.0 for k in ["triplet", "crecon", "urecon", "attn", "ortho"]}
    model = tiny_model(nce_temperature=0.05, losses={**off, "nce": 1.0}).eval()
    batch = tiny_batch()
    _, terms = model(batch)
    q = model.encode_queries(batch.tokens, batch.token_mask)
    v = model.encode_videos(batch.frames, batch.frame_mask)
    expected = sum(infonce_loss(max_cosine(qb, pb, mb).values / 0.05, batch.video_index)
                   for qb, pb, mb in ((q.clip, v.clip, v.clip_mask), (q.frame, v.frame, v.frame_mask)))
    assert terms["nce"] == pytest.approx(expected.item(), rel=1e-5)
    # model.nce_video_to_text=false: each branch's term is the text-to-video cross-entropy alone
    one_way = tiny_model(nce_temperature=0.05, nce_video_to_text=False, losses={**off, "nce": 1.0}).eval()
    _, terms = one_way(batch)
    expected = sum(F.cross_entropy(max_cosine(qb, pb, mb).values / 0.05, batch.video_index)
                   for qb, pb, mb in ((q.clip, v.clip, v.clip_mask), (q.frame, v.frame, v.frame_mask)))
    assert terms["nce"] == pytest.approx(expected.item(), rel=1e-5)


def test_competitive_prototype_attention_normalises_over_prototypes_then_keys():
    """Slot-attention weights: softmax over the prototypes per key and head, masked keys zero, rows renormalised."""
    from prvr_cli.nets.protoprvr import CrossAttentionBlock

    torch.manual_seed(2)
    block = CrossAttentionBlock(16, 4, 32, 0.0).eval().double()
    q, k = torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(2, 7, 16, dtype=torch.float64)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    _, attn = block(q, k, mask, competitive=True)
    w_q, w_k, _ = block.attn.in_proj_weight.chunk(3)
    b_q, b_k, _ = block.attn.in_proj_bias.chunk(3)
    heads = []
    for h in range(4):
        cols = slice(4 * h, 4 * h + 4)
        logits = (q @ w_q[cols].T + b_q[cols]) @ (k @ w_k[cols].T + b_k[cols]).transpose(1, 2) / 2.0
        share = logits.softmax(1) * mask[:, None, :]
        heads.append(share / share.sum(-1, keepdim=True))
    assert torch.allclose(attn, torch.stack(heads).mean(0), atol=1e-12)
    assert (attn[1, :, 4:] == 0).all() and torch.allclose(attn.sum(-1), torch.ones(2, 3, dtype=torch.float64))


def test_competitive_prototypes_train_and_unknown_attention_is_a_usage_error():
    model = tiny_model(prototype_attention="competitive")
    loss, _ = model(tiny_batch())
    loss.backward()
    assert torch.isfinite(loss) and model.frame_prototypes.competitive
    with pytest.raises(UsageError, match="prototype_attention"):
        tiny_model(prototype_attention="sparse")


def test_attention_readout_prototypes_are_the_last_rounds_attention_output_alone():
    """With prototype_readout 'attention' the last round returns out_proj(softmax(QK^T) V): no residual, LayerNorm or
    FFN, so nothing of the shared initial vectors is added to a video's prototypes."""
    from prvr_cli.nets.protoprvr import PrototypeGenerator

    torch.manual_seed(3)
    tokens = torch.randn(2, 9, 16, dtype=torch.float64)
    for rounds in (1, 3):
        plain = PrototypeGenerator(5, 16, 4, 32, rounds, 0.0).eval().double()
        readout = PrototypeGenerator(5, 16, 4, 32, rounds, 0.0, readout=True).eval().double()
        readout.load_state_dict(plain.state_dict())
        x = plain.init[None].expand(2, -1, -1)
        for _ in range(rounds - 1):
            x, _ = plain.block(x, tokens)
        want, _ = plain.block.attn(x, tokens, tokens)
        got, attn = readout(tokens, None)
        assert torch.allclose(got, want, atol=1e-10) and torch.allclose(attn.sum(-1), torch.ones(2, 5, dtype=torch.float64))
        assert not torch.allclose(got, plain(tokens, None)[0])


def test_attention_readout_trains_and_unknown_readout_is_a_usage_error():
    model = tiny_model(prototype_readout="attention")
    loss, _ = model(tiny_batch())
    loss.backward()
    assert torch.isfinite(loss) and model.clip_prototypes.readout and model.frame_prototypes.readout
    with pytest.raises(UsageError, match="prototype_readout"):
        tiny_model(prototype_readout="mean")


@pytest.mark.parametrize("clip_tokens", ["uniform", "merged"])
def test_without_video_self_attention_prototypes_read_the_projected_tokens(clip_tokens):
    """video_self_attention False: no encoder layer mixes frames or clips; each token is its own projected input, so a
    video's prototypes do not change when a frame outside a token's bin changes the others' context."""
    model = tiny_model(video_self_attention=False, clip_tokens=clip_tokens).eval()
    assert model.frame_encoder is None and model.clip_encoder is None
    batch = tiny_batch()
    tok = model._video_tokens(batch.frames, batch.frame_mask)
    want = model.frame_pos(model.frame_proj(tok["frame_pool"] @ batch.frames.masked_fill(
        ~batch.frame_mask[..., None], 0.0)))
    assert torch.allclose(tok["frames"], want, atol=1e-6)
    trained = tiny_model(video_self_attention=False, clip_tokens=clip_tokens)
    loss, _ = trained(batch)
    loss.backward()
    assert torch.isfinite(loss)


def test_mean_query_encoder_is_a_linear_map_of_the_normalised_mean_token():
    """query_encoder 'mean': each branch's query is Linear(normalize(mean of the valid tokens)); padding is ignored."""
    model = tiny_model(query_encoder="mean").eval()
    batch = tiny_batch()
    tokens, mask = batch.tokens, batch.token_mask
    q = model.encode_queries(tokens, mask)
    for i in range(len(tokens)):
        mean = torch.nn.functional.normalize(tokens[i, mask[i]].mean(0), dim=-1)
        assert torch.allclose(q.clip[i], model.query_mean["clip"](mean), atol=1e-5)
        assert torch.allclose(q.frame[i], model.query_mean["frame"](mean), atol=1e-5)
    loss, _ = tiny_model(query_encoder="mean")(batch)
    loss.backward()
    assert torch.isfinite(loss)
    with pytest.raises(UsageError, match="query_encoder"):
        tiny_model(query_encoder="lstm")


def test_input_readout_prototypes_are_attention_weighted_means_of_the_unit_input_frames():
    """prototype_readout 'input': each stored prototype is the last round's attention over the input frames applied to
    the L2-normalised frame features, so prototypes and queries live in the input feature space (video_dim)."""
    model = tiny_model(prototype_readout="input", query_encoder="mean", iterations=2).eval()
    batch = tiny_batch()
    enc = model.encode_videos(batch.frames, batch.frame_mask)
    unit = torch.nn.functional.normalize(batch.frames.masked_fill(~batch.frame_mask[..., None], 0.0), dim=-1)
    assert model.output_dim == VDIM and enc.clip.shape[-1] == enc.frame.shape[-1] == VDIM
    assert torch.allclose(enc.clip, enc.clip_attn @ unit, atol=1e-6)
    assert torch.allclose(enc.frame, enc.frame_attn @ unit, atol=1e-6)
    assert torch.allclose(enc.frame_attn.sum(-1), torch.ones(enc.frame_attn.shape[:2]), atol=1e-5)
    q = model.encode_queries(batch.tokens, batch.token_mask)
    assert q.clip.shape == (len(batch.tokens), VDIM) and model.score(q, enc).shape == (len(batch.tokens), 4)
    every_loss = {"nce": 1.0, "triplet": 1.0, "crecon": 0.1, "urecon": 1.0, "attn": 0.005, "ortho": 0.01}
    trained = tiny_model(prototype_readout="input", query_encoder="mean", losses=every_loss)
    loss, terms = trained(batch)
    loss.backward()
    assert torch.isfinite(loss) and set(terms) == set(every_loss)
    assert trained.frame_prototypes.init.grad is not None and trained.frame_proj[2].weight.grad is not None
    with pytest.raises(UsageError, match="query_encoder 'mean'"):
        tiny_model(prototype_readout="input")


def test_negative_memory_adds_earlier_batches_as_negatives_and_skips_a_videos_own_copy():
    """negative_memory N: the queries' InfoNCE (text to video) also ranks the detached prototypes of the last N
    training batches; a remembered copy of a query's own video is left out, and nothing is remembered in eval."""
    off = {k: 0.0 for k in ["triplet", "crecon", "urecon", "attn", "ortho"]}
    model = tiny_model(nce_temperature=0.05, negative_memory=2, losses={**off, "nce": 1.0}).train()
    first = tiny_batch(seed=0)
    first.video_ids = torch.tensor([10, 11, 12, 13])
    model(first)
    second = tiny_batch(seed=1)
    second.video_ids = torch.tensor([20, 21, 12, 23])    # video 12 again, as in a new epoch
    _, terms = model(second)
    q = model.encode_queries(second.tokens, second.token_mask)
    v = model.encode_videos(second.frames, second.frame_mask)
    remembered = model.memory.entries[0]
    expected = 0.0
    for b, qb, pb, mb in (("clip", q.clip, v.clip, v.clip_mask), ("frame", q.frame, v.frame, v.frame_mask)):
        extra = max_cosine(qb, *remembered[b]).values
        extra[second.video_index == 2, 2] = -1e4           # the queries of video 12 skip its remembered copy
        expected = expected + infonce_loss(max_cosine(qb, pb, mb).values / 0.05, second.video_index,
                                           extra_negatives=extra / 0.05)
    assert terms["nce"] == pytest.approx(expected.item(), rel=1e-5)
    # the memory keeps the last N batches, detached; eval mode neither reads nor fills it
    model(tiny_batch(seed=2))
    assert len(model.memory.entries) == 2 and not model.memory.entries[-1]["clip"][0].requires_grad
    model.eval()
    _, eval_terms = model(second)
    plain = tiny_model(nce_temperature=0.05, losses={**off, "nce": 1.0})
    plain.load_state_dict(model.state_dict())
    assert eval_terms["nce"] == pytest.approx(plain.eval()(second)[1]["nce"], rel=1e-6)
    assert len(model.memory.entries) == 2


def test_negative_memory_is_empty_at_first_and_needs_a_cosine_temperature():
    memory = NegativeMemory(3)
    assert memory.scores({"clip": torch.zeros(2, 4), "frame": torch.zeros(2, 4)}, None) is None
    with pytest.raises(UsageError, match="nce_temperature"):
        tiny_model(negative_memory=4)
    with pytest.raises(UsageError, match="negative_memory"):
        tiny_model(nce_temperature=0.05, negative_memory=-1)


def test_negative_memory_fills_during_its_warm_up_but_counts_only_from_its_start_epoch():
    off = {k: 0.0 for k in ["triplet", "crecon", "urecon", "attn", "ortho"]}
    model = tiny_model(nce_temperature=0.05, negative_memory=2, negative_memory_start_epoch=1,
                       losses={**off, "nce": 1.0}).train()
    plain = tiny_model(nce_temperature=0.05, losses={**off, "nce": 1.0}).train()
    model(tiny_batch(seed=0, epoch=0))
    warm_up = tiny_batch(seed=1, epoch=0)
    assert model(warm_up)[1]["nce"] == pytest.approx(plain(warm_up)[1]["nce"], rel=1e-6)   # read in epoch 0: no
    assert len(model.memory.entries) == 2                                                 # filled: yes
    later = tiny_batch(seed=1, epoch=1)
    assert model(later)[1]["nce"] > plain(later)[1]["nce"] + 1e-4                         # extra negatives now


def test_subtract_video_mean_takes_a_learned_share_of_the_mean_unit_frame_off_each_prototype():
    """subtract_video_mean: prototype = attention @ unit frames - share[branch] * mean unit frame of the video; the
    shares start at 0 (the plain input read-out), learn from the scores, and need the input read-out."""
    plain = tiny_model(prototype_readout="input", query_encoder="mean").eval()
    model = tiny_model(prototype_readout="input", query_encoder="mean", subtract_video_mean=True).eval()
    batch = tiny_batch()
    assert torch.allclose(model.encode_videos(batch.frames, batch.frame_mask).clip,
                          plain.encode_videos(batch.frames, batch.frame_mask).clip)
    with torch.no_grad():
        model.video_mean_share["clip"].fill_(0.5)
        model.video_mean_share["frame"].fill_(-0.25)
    enc = model.encode_videos(batch.frames, batch.frame_mask)
    unit = torch.nn.functional.normalize(batch.frames.masked_fill(~batch.frame_mask[..., None], 0.0), dim=-1)
    mean = torch.stack([unit[i, batch.frame_mask[i]].mean(0) for i in range(len(unit))])[:, None]
    assert torch.allclose(enc.clip, enc.clip_attn @ unit - 0.5 * mean, atol=1e-6)
    assert torch.allclose(enc.frame, enc.frame_attn @ unit + 0.25 * mean, atol=1e-6)
    trained = tiny_model(prototype_readout="input", query_encoder="mean", subtract_video_mean=True,
                         losses={"nce": 1.0, "triplet": 1.0})
    trained(batch)[0].backward()
    assert all(share.grad is not None and share.grad != 0 for share in trained.video_mean_share.values())
    with pytest.raises(UsageError, match="subtract_video_mean"):
        tiny_model(subtract_video_mean=True)


def test_temporal_prior_adds_a_gaussian_window_around_each_prototypes_anchor_to_its_logits():
    """temporal_prior: logit bias -(place - anchor)^2 / (2 width^2); anchors start evenly spread over the video,
    widths at temporal_prior_width anchor spacings; both learn; a narrow window pins a prototype's attention near
    its anchor."""
    model = tiny_model(temporal_prior=True, temporal_prior_width=0.05).eval()    # 5 prototypes: 0.01 of the video
    gen = model.frame_prototypes
    n = len(gen.anchor)
    assert torch.allclose(gen.anchor, (torch.arange(n) + 0.5) / n) and torch.allclose(gen.log_width.exp(), 0.01 * torch.ones(n))
    places = torch.tensor([[0.1, 0.5, 0.9]])
    expected = -((places[:, None, :] - gen.anchor[None, :, None]) ** 2) / (2 * 0.01 ** 2)
    assert torch.allclose(gen.temporal_bias(places), expected)
    batch = tiny_batch()
    enc = model.encode_videos(batch.frames, batch.frame_mask)
    video = 1                                          # a video with fewer frames than max_frames: one token a frame
    length = int(batch.frame_mask[video].sum())
    peak = enc.frame_attn[video].argmax(-1).float()
    nearest = (gen.anchor.detach() * length - 0.5).clamp(0, length - 1)    # the frame index at the anchor
    assert ((peak - nearest).abs() <= 0.5).all()
    trained = tiny_model(temporal_prior=True, losses={"nce": 1.0, "triplet": 1.0})
    trained(batch)[0].backward()
    for branch in (trained.frame_prototypes, trained.clip_prototypes):
        assert branch.anchor.grad is not None and branch.log_width.grad is not None
    merged = tiny_model(temporal_prior=True, clip_tokens="merged", losses={"nce": 1.0, "triplet": 1.0})
    merged(batch)[0].backward()                        # merged clips: each video's spans have their own centres
    assert merged.clip_prototypes.anchor.grad is not None
