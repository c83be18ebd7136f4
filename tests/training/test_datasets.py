"""Loaders of the h5, MS-SL and own-video layouts, their validation errors, and the recall metrics."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from prvr_cli.training import datasets
from prvr_cli.training.datasets import Packed
from prvr_cli.training.feature_layouts import detect_layout, load_features, load_h5, load_mssl
from prvr_cli.training.own_videos import load_index
from prvr_cli.errors import DataError
from prvr_cli.training.evaluate import gt_ranks, ranking, recall_metrics, score_matrix
from tests.helpers import (TEXT_DIM, VIDEO_DIM, synthetic, write_captions, write_h5_dataset,
                           write_mssl_dataset)

def check_matches(loaded, data, tol):
    for name in ("train", "val", "test"):
        split = loaded.splits[name]
        assert split.video_ids == [v for v, _, _ in data[name]]
        assert split.n_queries == sum(len(c) for _, _, c in data[name])
        frames, mask = split.frames.batch(torch.arange(split.n_videos))
        for i, (_, f, caps) in enumerate(data[name]):
            assert mask[i].sum() == len(f)
            np.testing.assert_allclose(frames[i, :len(f)].numpy(), f, atol=tol)
            assert frames.dtype == torch.float32
            queries, owner = split.queries_of(torch.tensor([i]))
            assert [split.cap_ids[q] for q in queries] == [c for c, _, _ in caps]
            tokens, tmask = split.tokens.batch(queries)
            for j, (_, text, tok) in enumerate(caps):
                np.testing.assert_allclose(tokens[j, :len(tok)].numpy(), tok, atol=tol)
                assert split.captions[int(queries[j])] == text
                assert int(tmask[j].sum()) == len(tok)


def test_h5_layout_loads_and_casts(tmp_path):
    data = write_h5_dataset(tmp_path)
    assert detect_layout(tmp_path, "toy", "cg") == "h5"
    loaded = load_features(tmp_path, "toy", "cg")
    assert loaded.source["layout"] == "h5" and loaded.video_dim == VIDEO_DIM and loaded.text_dim == TEXT_DIM
    check_matches(loaded, data, tol=2e-2)  # stored as float16


def test_mssl_layout_loads(tmp_path):
    data = write_mssl_dataset(tmp_path)
    assert detect_layout(tmp_path, "toy", "i3d") == "mssl"
    loaded = load_features(tmp_path, "toy", "i3d")
    assert loaded.source["layout"] == "mssl" and loaded.source["text_feature"] == "roberta_toy_query_feat.hdf5"
    check_matches(loaded, data, tol=1e-6)


def test_mssl_text_feature_override(tmp_path):
    write_mssl_dataset(tmp_path)
    text = tmp_path / "toy" / "TextData"
    (text / "roberta_toy_query_feat.hdf5").rename(text / "clip_query.h5")
    with pytest.raises(DataError, match="roberta_toy_query_feat.hdf5"):
        load_mssl(tmp_path, "toy", "i3d")
    assert load_mssl(tmp_path, "toy", "i3d", text_feature="clip_query.h5").text_dim == TEXT_DIM


def test_missing_val_split_is_carved_from_train(tmp_path):
    write_h5_dataset(tmp_path, splits=("train",))
    a, b = load_h5(tmp_path, "toy", "cg", seed=3), load_h5(tmp_path, "toy", "cg", seed=3)
    assert set(a.splits) == {"train", "val"}
    assert a.splits["val"].video_ids == b.splits["val"].video_ids
    assert not set(a.splits["val"].video_ids) & set(a.splits["train"].video_ids)
    assert a.splits["val"].n_videos == round(0.1 * 24)


def test_packed_batch_pads_with_zeros():
    packed = Packed.from_arrays([np.ones((2, 3)), 2 * np.ones((4, 3)), 3 * np.ones((1, 3))])
    x, mask = packed.batch(torch.tensor([2, 0]))
    assert x.shape == (2, 2, 3) and mask.tolist() == [[True, False], [True, True]]
    assert x[0, 0, 0] == 3 and x[0, 1].abs().sum() == 0 and x[1, 1, 0] == 1


# ------------------------------------------------------------------ validation errors

def test_missing_feature_file(tmp_path):
    write_h5_dataset(tmp_path)
    with pytest.raises(DataError, match="no features named 'i3d'"):
        load_features(tmp_path, "toy", "i3d")
    with pytest.raises(DataError, match="collection folder"):
        load_features(tmp_path, "nope", "cg")
    (tmp_path / "toy" / "TextData" / "toy_cg.h5").unlink()
    with pytest.raises(DataError, match="text feature file .*toy_cg.h5 not found"):
        load_h5(tmp_path, "toy", "cg")


def test_missing_train_captions(tmp_path):
    write_h5_dataset(tmp_path)
    (tmp_path / "toy" / "TextData" / "toytrain.caption.txt").unlink()
    with pytest.raises(DataError, match="toytrain.caption.txt not found"):
        load_h5(tmp_path, "toy", "cg")


def test_caption_video_without_features(tmp_path):
    write_h5_dataset(tmp_path)
    cap = tmp_path / "toy" / "TextData" / "toyval.caption.txt"
    cap.write_text(cap.read_text() + "ghost#enc#0 a video nobody extracted\n")
    with pytest.raises(DataError, match=r"video 'ghost' \(from .*toyval.caption.txt\) has no features"):
        load_h5(tmp_path, "toy", "cg")


def test_caption_without_text_features(tmp_path):
    write_h5_dataset(tmp_path)
    with h5py.File(tmp_path / "toy" / "TextData" / "toy_cg.h5", "a") as f:
        del f["v000#enc#1"]
    with pytest.raises(DataError, match=r"caption 'v000#enc#1' .* has no features in .*toy_cg.h5"):
        load_h5(tmp_path, "toy", "cg")


def test_mismatched_video_dims(tmp_path):
    write_h5_dataset(tmp_path)
    with h5py.File(tmp_path / "toy" / "FeatureData" / "toy_cg.h5", "a") as f:
        del f["v003"]
        f["v003"] = np.zeros((4, VIDEO_DIM + 1), np.float16)
    with pytest.raises(DataError, match="video 'v003' .* has dim 13, others have 12"):
        load_h5(tmp_path, "toy", "cg")


def test_empty_and_malformed_caption_files(tmp_path):
    write_h5_dataset(tmp_path)
    cap = tmp_path / "toy" / "TextData" / "toytest.caption.txt"
    cap.write_text("\n")
    with pytest.raises(DataError, match="toytest.caption.txt is empty"):
        load_h5(tmp_path, "toy", "cg")
    cap.write_text("v030#enc#0\n")
    with pytest.raises(DataError, match="toytest.caption.txt:1: expected"):
        load_h5(tmp_path, "toy", "cg")


def test_non_finite_features(tmp_path):
    write_h5_dataset(tmp_path)
    with h5py.File(tmp_path / "toy" / "TextData" / "toy_cg.h5", "a") as f:
        f["v001#enc#0"][0, 0] = np.nan
    with pytest.raises(DataError, match="'v001#enc#0' .* NaN"):
        load_h5(tmp_path, "toy", "cg")


def test_mssl_errors(tmp_path):
    write_mssl_dataset(tmp_path)
    feat_dir = tmp_path / "toy" / "FeatureData" / "i3d"
    (feat_dir / "shape.txt").write_text("3 12")
    with pytest.raises(DataError, match="id.txt lists .* frame ids but .*shape.txt says 3 rows"):
        load_mssl(tmp_path, "toy", "i3d")
    n = len((feat_dir / "id.txt").read_text().split())
    (feat_dir / "shape.txt").write_text(f"{n} 11")
    with pytest.raises(DataError, match="feature.bin has size .* expected"):
        load_mssl(tmp_path, "toy", "i3d")
    (feat_dir / "shape.txt").write_text(f"{n} 12")
    v2f = eval((feat_dir / "video2frames.txt").read_text())  # test-written literal
    v2f["v002"] = v2f["v002"] + ["no_such_frame"]
    (feat_dir / "video2frames.txt").write_text(repr(v2f))
    with pytest.raises(DataError, match="frame 'no_such_frame' of video 'v002'"):
        load_mssl(tmp_path, "toy", "i3d")
    (feat_dir / "video2frames.txt").write_text("__import__('os').system('echo unsafe')")
    with pytest.raises(DataError, match="not a Python dict literal"):
        load_mssl(tmp_path, "toy", "i3d")
    del v2f["v004"], v2f["v002"]
    (feat_dir / "video2frames.txt").write_text(repr(v2f))
    with pytest.raises(DataError, match="video 'v002' .* has no features in .*video2frames.txt"):
        load_mssl(tmp_path, "toy", "i3d")


# ------------------------------------------------------------------ own videos (index + captions)

class FakeIndex:
    root = "fake-index"

    def __init__(self, videos):
        self.videos = videos

    def file_states(self):
        return {path: (0, 0.0, f"hash-of-{Path(path).name}") for path in self.videos}

    def iter_frame_features(self):
        for path, feats in self.videos.items():
            yield path, np.arange(len(feats), dtype=np.float64), feats.astype(np.float16)

    encoder_spec = {"clip_model": "ViT-B-32", "clip_pretrained": "openai", "fingerprint": "abc", "dim": VIDEO_DIM}


class FakeEncoder:
    def encode_text_tokens(self, texts):
        return [np.full((len(t.split()), TEXT_DIM), float(len(t)), np.float32) for t in texts]


@pytest.fixture
def fake_store(monkeypatch, tmp_path):
    """An index of 12 videos, served through the `prvr_cli.index.store.Index` API."""
    rng = np.random.default_rng(0)
    videos = {str(tmp_path / "lib" / f"clip{i}.mp4"): rng.normal(size=(3 + i, VIDEO_DIM)) for i in range(12)}
    store = types.ModuleType("prvr_cli.index.store")
    store.Index = types.SimpleNamespace(open=lambda path: FakeIndex(videos))
    monkeypatch.setitem(sys.modules, "prvr_cli.index.store", store)
    return videos


def test_index_loader(tmp_path, fake_store):
    lines = [{"video": f"lib/clip{i}.mp4", "caption": f"a person does thing {j}", "start": 1.0, "end": 2}
             for i in range(12) for j in range(2)]
    caps = tmp_path / "caps.jsonl"
    caps.write_text("\n".join(json.dumps(x) for x in lines))
    data = load_index(tmp_path / "idx", caps, seed=1, encoder=FakeEncoder())
    assert set(data.splits) == {"train", "val"}
    assert data.splits["val"].n_videos == 1 and data.splits["train"].n_videos == 11
    assert data.splits["train"].n_queries == 22 and data.text_dim == TEXT_DIM and data.video_dim == VIDEO_DIM
    assert data.source["layout"] == "index" and data.source["clip_model"] == "ViT-B-32"
    again = load_index(tmp_path / "idx", caps, seed=1, encoder=FakeEncoder())
    assert again.splits["val"].video_ids == data.splits["val"].video_ids


def test_index_loader_takes_file_and_caption_lists(tmp_path, fake_store):
    """{"file", "captions": [...]} lines (one video, several captions) give one query per caption."""
    lines = [{"file": f"lib/clip{i}.mp4", "captions": [f"thing {i}", f"other {i}", f"third {i}"]} for i in range(12)]
    lines.append({"file": "lib/clip0.mp4", "captions": [], "source": "no caption yet: skipped"})
    caps = tmp_path / "caps.jsonl"
    caps.write_text("\n".join(json.dumps(x) for x in lines))
    data = load_index(tmp_path / "idx", caps, seed=1, encoder=FakeEncoder())
    assert data.splits["train"].n_queries == 33 and data.splits["val"].n_queries == 3
    for bad in ({"file": "lib/clip0.mp4", "captions": "one"}, {"file": "lib/clip0.mp4", "captions": ["ok", 3]},
                {"file": "lib/clip0.mp4", "captions": ["ok", " "]}):
        caps.write_text(json.dumps(bad) + "\n")
        with pytest.raises(DataError, match="caps.jsonl:1: expected"):
            load_index(tmp_path / "idx", caps, encoder=FakeEncoder())


def test_index_loader_errors(tmp_path, fake_store):
    caps = tmp_path / "caps.jsonl"
    caps.write_text(json.dumps({"video": "lib/missing.mp4", "caption": "x"}) + "\n")
    with pytest.raises(DataError, match=r"caps.jsonl:1: video 'lib/missing.mp4' \(.*/lib/missing.mp4\) is not in "
                                         "index fake-index, and no indexed video has its content or its file name"):
        load_index(tmp_path / "idx", caps, encoder=FakeEncoder())
    caps.write_text('{"video": "lib/clip0.mp4"}\n')
    with pytest.raises(DataError, match="caps.jsonl:1: expected"):
        load_index(tmp_path / "idx", caps, encoder=FakeEncoder())
    caps.write_text('{"video": "lib/clip0.mp4", "caption": "x", "start": "soon"}\n')
    with pytest.raises(DataError, match="'start' must be a number"):
        load_index(tmp_path / "idx", caps, encoder=FakeEncoder())
    caps.write_text("not json\n")
    with pytest.raises(DataError, match="caps.jsonl:1: not valid JSON"):
        load_index(tmp_path / "idx", caps, encoder=FakeEncoder())
    caps.write_text(json.dumps({"video": "lib/clip0.mp4", "caption": "only one video"}) + "\n")
    with pytest.raises(DataError, match="need at least 2"):
        load_index(tmp_path / "idx", caps, encoder=FakeEncoder())


# ------------------------------------------------------------------ recall metrics

def test_recall_on_a_hand_case():
    scores = torch.tensor([[0.9, 0.1, 0.5],    # gt 0 -> rank 1
                           [0.9, 0.1, 0.5],    # gt 1 -> rank 3
                           [0.2, 0.7, 0.7]])   # gt 2 -> tie with video 1 -> rank 2 (ties count against)
    ranks = gt_ranks(scores, torch.tensor([0, 1, 2]))
    assert ranks.tolist() == [1, 3, 2]
    m = recall_metrics(ranks, ks=(1, 2, 100))
    assert m["R@1"] == pytest.approx(100 / 3) and m["R@2"] == pytest.approx(200 / 3) and m["R@100"] == 100
    assert m["SumR"] == pytest.approx(100 / 3 + 200 / 3 + 100)


def test_constant_scorer_gets_no_credit():
    ranks = gt_ranks(torch.zeros(4, 10), torch.tensor([0, 3, 5, 9]))
    assert ranks.tolist() == [10] * 4


class DotModel(torch.nn.Module):
    """Scores a query by the max dot product of its mean token with a video's frames (same dims)."""

    def encode_videos(self, frames, mask):
        return types.SimpleNamespace(frames=frames, mask=mask)

    def encode_queries(self, tokens, mask):
        return (tokens * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)

    def score(self, q, v):
        s = torch.einsum("qd,btd->qbt", q, v.frames).masked_fill(~v.mask, -1e9)
        return s.max(-1).values


def test_chunked_scores_match_one_block():
    rng = np.random.default_rng(0)
    videos = [rng.normal(size=(int(rng.integers(1, 9)), 4)) for _ in range(23)]
    tokens = [rng.normal(size=(int(rng.integers(1, 6)), 4)) for _ in range(37)]
    split = datasets.Split("test", [f"v{i}" for i in range(23)], [f"c{i}" for i in range(37)], [""] * 37,
                           torch.sort(torch.tensor(rng.integers(0, 23, 37))).values,
                           Packed.from_arrays(videos), Packed.from_arrays(tokens))
    model = DotModel()
    full = score_matrix(model, split, video_chunk=100, query_chunk=100)
    chunked = score_matrix(model, split, video_chunk=5, query_chunk=7)
    torch.testing.assert_close(full, chunked)
    expected = torch.tensor([[max(float(t.mean(0) @ f) for f in v) for v in videos] for t in tokens])
    torch.testing.assert_close(full, expected, rtol=1e-5, atol=1e-5)
    out = ranking(model, split, top_k=5)
    assert out["top"].shape == (37, 5)
    assert torch.equal(out["top"][:, 0], full.argmax(1))
    assert out["metrics"]["R@100"] == 100.0


def test_index_loader_on_a_real_ingest(cli, videos, tmp_path):
    """End to end with `prvr ingest` (tiny random CLIP): frame features from the index, captions encoded by it."""
    code, summary, err = cli.ingest(videos)
    assert code == 0, err
    lines = [{"video": str(videos / name), "caption": f"{color} things happen"}
             for name, color in (("red_green.mp4", "red"), ("blue.mp4", "blue"), ("sub/yellow_magenta.avi", "yellow"),
                                 ("cyan red.mp4", "cyan"))]
    caps = tmp_path / "caps.jsonl"
    caps.write_text("\n".join(json.dumps(x) for x in lines))
    data = load_index(cli.index, caps, seed=0)
    assert data.splits["train"].n_videos == 3 and data.splits["val"].n_videos == 1
    assert data.source["layout"] == "index" and data.video_dim == data.text_dim  # one CLIP space
    frames, mask = data.splits["train"].frames.batch(torch.arange(3))
    assert mask.any(1).all() and torch.isfinite(frames).all()


def test_duplicate_caption_id(tmp_path):
    write_h5_dataset(tmp_path)
    cap = tmp_path / "toy" / "TextData" / "toytrain.caption.txt"
    cap.write_text(cap.read_text() + "v000#enc#0 said twice\n")
    with pytest.raises(DataError, match="repeats caption id 'v000#enc#0'"):
        load_h5(tmp_path, "toy", "cg")


def test_activitynet_features_keyed_without_the_v_prefix(tmp_path):
    """MSC_PRVR's ActivityNet release: caption ids carry `v_`, its h5 video keys do not."""
    data = synthetic(n_videos=(6, 2, 2))
    renamed = {split: [(f"v_{vid}", frames, [(f"v_{cap}", text, tok) for cap, text, tok in caps])
                       for vid, frames, caps in videos] for split, videos in data.items()}
    base = tmp_path / "activitynet"
    write_captions(base / "TextData", "activitynet", renamed)
    (base / "FeatureData").mkdir(parents=True)
    with h5py.File(base / "FeatureData" / "activitynet_clip_L14.h5", "w") as f:
        for videos in data.values():
            for vid, frames, _ in videos:
                f[vid] = frames.astype(np.float16)  # no v_ here
    with h5py.File(base / "TextData" / "activitynet_clip_L14.h5", "w") as f:
        for videos in renamed.values():
            for _, _, caps in videos:
                for cap, _, tok in caps:
                    f[cap] = tok.astype(np.float16)
    loaded = load_features(tmp_path, "activitynet", "clip_L14")
    assert loaded.splits["train"].video_ids[0] == "v_v000"
    check_matches(loaded, renamed, tol=2e-2)


def test_unknown_feature_name_lists_the_ones_there(tmp_path):
    write_h5_dataset(tmp_path, feat="cg")
    (tmp_path / "toy" / "FeatureData" / "clip_L14").mkdir()
    (tmp_path / "toy" / "FeatureData" / "clip_L14" / "feature.bin").write_bytes(b"")
    with pytest.raises(DataError, match="no features named 'i3d' in .*toy: .*; features there: cg, clip_L14$"):
        load_features(tmp_path, "toy", "i3d")


def test_captions_follow_a_copied_library(cli, videos, tmp_path):
    """Captions written for one folder still match after the library is copied elsewhere and ingested there."""
    import shutil

    lines = [{"video": name, "caption": f"{name} happens"}
             for name in ("red_green.mp4", "blue.mp4", "sub/yellow_magenta.avi", "cyan red.mp4")]
    caps = videos / "captions.jsonl"
    caps.write_text("\n".join(json.dumps(x) for x in lines))
    copy = tmp_path / "elsewhere"
    shutil.copytree(videos, copy)
    assert cli.ingest(copy)[0] == 0
    # the original files are still there: matched by content
    data = load_index(cli.index, caps, seed=0)
    paths = set(data.splits["train"].video_ids + data.splits["val"].video_ids)
    assert paths == {str(copy / line["video"]) for line in lines}
    # the originals are gone: matched by their unique file names
    shutil.rmtree(videos / "sub")
    (videos / "blue.mp4").unlink()
    data = load_index(cli.index, caps, seed=0)
    assert set(data.splits["train"].video_ids + data.splits["val"].video_ids) == paths
    # a name the index does not hold: the error names the line and the resolved path
    caps.write_text(json.dumps({"video": "green.mp4", "caption": "x"}) + "\n")
    with pytest.raises(DataError, match=rf"captions.jsonl:1: video 'green.mp4' \({videos}/green.mp4\) is not in"):
        load_index(cli.index, caps, seed=0)
