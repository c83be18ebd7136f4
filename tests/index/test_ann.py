"""Approximate candidates (index.ann): the layout, its recall against exact search, and its use by search."""
import json
import os

import numpy as np
import pytest

from prvr_cli.index import ann
from prvr_cli.index.search import exact_scores, rank
from prvr_cli.library import Library

WEIGHTS = (0.7, 0.3)


def clustered(n_videos: int, lp: int = 8, dim: int = 32, topics: int = 40, seed: int = 0):
    """Unit prototypes [N, Lp, D] per branch drawn around a few topics (as a model's are), and queries near topics."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((topics, dim)).astype(np.float32)

    def around(idx, spread):
        x = centres[idx] + spread * rng.standard_normal((*idx.shape, dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    clip = around(rng.integers(0, topics, (n_videos, lp)), 0.6)
    frame = around(rng.integers(0, topics, (n_videos, lp)), 0.6)
    q = around(rng.integers(0, topics, 30), 0.5)
    return clip, frame, q, around(rng.integers(0, topics, 30), 0.5)


def test_centroid_count_grows_as_the_square_root_within_bounds():
    assert ann.centroid_count(1) == 64
    assert ann.centroid_count(4096 ** 2) == 4096
    assert ann.centroid_count(10 ** 12) == 16384
    assert ann.subspaces(384) == 32 and ann.subspaces(512) == 32 and ann.subspaces(36) == 18


def test_kmeans_finds_separated_clusters():
    rng = np.random.default_rng(0)
    centres = np.eye(4, 8, dtype=np.float32) * 10
    points = np.concatenate([c + 0.1 * rng.standard_normal((50, 8)).astype(np.float32) for c in centres])
    found = ann.kmeans(points, 4, rng)
    assert np.allclose(np.sort(np.linalg.norm(found, axis=1)), 10, atol=0.2)
    assert sorted(np.argmin(((found[:, None] - centres[None]) ** 2).sum(-1), axis=1).tolist()) == [0, 1, 2, 3]


def test_the_layout_lists_every_prototype_once_with_codes_that_approximate_it(tmp_path):
    clip, frame, _, _ = clustered(300)
    info = ann.build(tmp_path, clip, frame)
    layout = ann.AnnCandidates.open(tmp_path)
    assert layout is not None and info["videos"] == 300 and json.loads((tmp_path / ann.MARKER).read_text()) == info
    for branch, protos in (("clip", clip), ("frame", frame)):
        p = layout.parts[branch]
        rows = np.asarray(p["rows"])
        assert sorted(rows.tolist()) == list(range(300 * 8))                        # every prototype, once
        for c in range(len(p["centroids"])):                                        # each in its centroid's list
            listed = rows[p["offsets"][c]:p["offsets"][c + 1]]
            assert (np.asarray(p["codes"]).ravel()[listed] == c).all()
        # centroid + decoded residual is closer to the prototype than the centroid alone
        flat = protos.reshape(-1, protos.shape[-1])[rows]
        centroid = p["centroids"][np.asarray(p["codes"]).ravel()[rows]]
        width = p["codebooks"].shape[2]
        pq = np.asarray(p["pq"])[rows]
        decoded = np.concatenate([p["codebooks"][s][pq[:, s]] for s in range(len(p["codebooks"]))], 1)
        assert decoded.shape[1] == len(p["codebooks"]) * width == protos.shape[-1]
        assert np.linalg.norm(flat - centroid - decoded, axis=1).mean() < 0.6 * np.linalg.norm(flat - centroid,
                                                                                               axis=1).mean()


def test_candidates_find_the_exact_top_ten_and_every_score_is_exact(tmp_path):
    clip, frame, q_clip, q_frame = clustered(3000)
    ann.build(tmp_path, clip, frame)
    layout = ann.AnnCandidates.open(tmp_path)
    paths = [f"/v/{i}.mp4" for i in range(3000)]
    exact = rank(paths, clip, frame, q_clip, q_frame, WEIGHTS, 10)
    approx = rank(paths, clip, frame, q_clip, q_frame, WEIGHTS, 10, ann=layout, ann_settings=ann.AnnSettings(8, 200))
    recall = np.mean([len({h.video for h in a} & {h.video for h in e}) / 10 for a, e in zip(approx, exact)])
    assert recall >= 0.9
    for qi, hits in enumerate(approx):                  # reported scores are the exact scores of those videos
        for h in hits:
            c = exact_scores(clip, np.array([h.video]), q_clip[qi])
            f = exact_scores(frame, np.array([h.video]), q_frame[qi])
            assert h.clip_score == pytest.approx(float(c[0][0]), abs=1e-6) and h.clip_prototype == int(c[1][0])
            assert h.score == pytest.approx(WEIGHTS[0] * float(c[0][0]) + WEIGHTS[1] * float(f[0][0]), abs=1e-6)
    # a deeper search can only find more of the exact top ten
    deeper = rank(paths, clip, frame, q_clip, q_frame, WEIGHTS, 10, ann=layout, ann_settings=ann.AnnSettings(64, 3000))
    assert [[h.video for h in hits] for hits in deeper] == [[h.video for h in hits] for hits in exact]


def test_a_narrow_filter_falls_back_to_scanning_every_video(tmp_path):
    clip, frame, q_clip, q_frame = clustered(500)
    ann.build(tmp_path, clip, frame)
    layout = ann.AnnCandidates.open(tmp_path)
    paths = [f"/v/{i}.mp4" for i in range(500)]
    allowed = np.zeros(500, dtype=bool)
    allowed[[3, 77, 401]] = True
    got = rank(paths, clip, frame, q_clip[:3], q_frame[:3], WEIGHTS, 5, allowed=allowed, ann=layout,
               ann_settings=ann.AnnSettings(1, 2))
    want = rank(paths, clip, frame, q_clip[:3], q_frame[:3], WEIGHTS, 5, allowed=allowed)
    assert [[h.video for h in hits] for hits in got] == [[h.video for h in hits] for hits in want]
    assert all(sorted(h.video for h in hits) == [3, 77, 401] for hits in got)


def test_modes_exact_auto_and_ann_which_builds_the_layout(tmp_path):
    clip, frame, _, _ = clustered(200)
    assert ann.for_search("exact", tmp_path, clip, frame) is None
    assert ann.for_search("auto", tmp_path, clip, frame) is None           # no layout: auto scans
    layout = ann.for_search("ann", tmp_path, clip, frame)
    assert layout is not None and (tmp_path / ann.MARKER).exists()
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    assert ann.for_search("auto", tmp_path, clip, frame) is not None
    with pytest.raises(Exception, match="auto, ann or exact"):
        ann.check_mode("fast")


def test_the_search_cache_builds_candidates_for_large_libraries_and_reuses_their_centroids(cli, videos, tmp_path,
                                                                                         monkeypatch):
    monkeypatch.setattr(ann, "ANN_MIN_VIDEOS", 3)
    real_build = ann.build
    assert cli.ingest(videos)[0] == 0
    library = Library.open(cli.index, tmp_path / "cache")
    assert library.search(["red"], 2, torch_free=False).hits[0]
    first = [f for f in (cli.index / "cache").glob("videos-v*") if (f / ann.MARKER).exists()]
    assert len(first) == 1 and json.loads((first[0] / ann.MARKER).read_text())["trained"]
    centroids = np.load(first[0] / "ann_clip_centroids.npy")
    library.forget([next(p for p in library.videos())["path"]])         # a new version of the table
    assert library.search(["red"], 2, torch_free=False).hits[0]
    second = [f for f in (cli.index / "cache").glob("videos-v*") if (f / ann.MARKER).exists()]
    assert second and second[0] != first[0]
    assert not json.loads((second[0] / ann.MARKER).read_text())["trained"]
    assert np.array_equal(np.load(second[0] / "ann_clip_centroids.npy"), centroids)
    builds = []
    monkeypatch.setattr(ann, "build", lambda *a, **k: builds.append(a[3] if len(a) > 3 else k.get("previous"))
                        or real_build(*a, **k))
    code, out, _ = cli("optimize", "--json")
    assert code == 0 and json.loads(out)["candidates"]["trained"]
    assert builds == [None]        # trained once, afresh: not built with old centroids and then again


def test_cli_candidates_flag_gives_the_exact_hits_on_a_small_library(cli, videos):
    assert cli.ingest(videos)[0] == 0
    code, out, _ = cli("info")
    assert code == 0 and "exact: every video is scored" in out     # a small library: no candidates
    code, exact, _ = cli("search", "a red screen", "--json", "--candidates", "exact")
    assert code == 0
    code, approx, _ = cli("search", "a red screen", "--json", "--candidates", "ann")
    assert code == 0 and json.loads(approx) == json.loads(exact)     # depth beyond the library: every video
    code, out, err = cli("optimize")
    assert code == 0 and "candidates retrained" in out
    code, out, _ = cli("info", "--json")
    assert code == 0 and json.loads(out)["candidates"]["videos"] == 4
    code, out, _ = cli("info")
    assert "approximate candidates, scored exactly" in out
    code, _, err = cli("search", "red", "--candidates", "fast")
    assert code == 2 and "auto, ann or exact" in err


def test_bench_search_ann_reports_recall_latency_and_memory(cli, tmp_path):
    """`prvr bench search --ann` on libraries made of a (random) checkpoint's prototypes of a toy benchmark."""
    import torch

    from prvr_cli.nets.factory import create_model, save_checkpoint
    from tests.helpers import TEXT_DIM, VIDEO_DIM, write_h5_dataset

    write_h5_dataset(tmp_path / "data")
    torch.manual_seed(0)
    model = create_model({"method": "protoprvr", "model": {"hidden_size": 16, "n_heads": 2, "ff_size": 16,
                                                           "n_prototypes": 4, "max_frames": 16, "n_clips": 4}},
                         video_dim=VIDEO_DIM, text_dim=TEXT_DIM)
    save_checkpoint(tmp_path / "m.pt", model, feature_source={"collection": "toy"})
    args = ["bench", "search", "--ann", "--sizes", "200,400", "--checkpoint", tmp_path / "m.pt", "--queries", "5",
            "--probes", "2,64", "--depths", "400", "--folder", tmp_path / "libs"]
    code, _, err = cli(*args, index=False)
    assert code == 2 and "--data" in err                      # the benchmark is needed to encode it the first time
    code, out, err = cli(*args, "--data", tmp_path / "data", "--collection", "toy", "--json", index=False)
    assert code == 0, err
    result = json.loads(out)
    assert [c["n_videos"] for c in result["cells"]] == [200, 400] and result["queries"] == 5
    for cell in result["cells"]:
        assert cell["exact"]["p50_ms"] > 0 and cell["exact"]["peak_rss_mib"] > 0 and cell["build_s"] >= 0
        assert [(a["probe"], a["depth"]) for a in cell["ann"]] == [(2, 400), (64, 400)]
        assert cell["ann"][1]["recall_at_10"] == 1.0          # every centroid probed and every video scored: exact
        assert 0 <= cell["ann"][0]["recall_at_10"] <= 1
    assert all("cold" not in a for cell in result["cells"] for a in cell["ann"])
    code, out, _ = cli(*args, "--cold", index=False)           # the encoding and the libraries are reused
    assert code == 0 and "candidates, cold" in out and "recall@10" in out


def test_candidates_read_from_cache_files_are_prefetched_and_rank_as_in_memory(tmp_path):
    """Over the bfloat16 cache files, each query's candidates are prefetched (both branches, every candidate) before
    they are scored, and the hits equal those of the same values held in memory."""
    from prvr_cli.index.matrices import PrototypeFile, from_bfloat16, to_bfloat16

    clip, frame, q_clip, q_frame = clustered(1500)
    asked = []

    class Recording(PrototypeFile):
        def prefetch(self, videos):
            asked.append(np.asarray(videos).copy())
            super().prefetch(videos)

    for name, protos in (("clip", clip), ("frame", frame)):
        np.save(tmp_path / f"proto_{name}.npy", to_bfloat16(protos))
    files = [Recording(tmp_path / f"proto_{name}.npy") for name in ("clip", "frame")]
    arrays = [from_bfloat16(to_bfloat16(p)) for p in (clip, frame)]
    ann.build(tmp_path, *arrays)
    layout, settings = ann.AnnCandidates.open(tmp_path), ann.AnnSettings(8, 100)
    paths = [f"/v/{i}.mp4" for i in range(1500)]
    from_files = rank(paths, *files, q_clip[:4], q_frame[:4], WEIGHTS, 10, ann=layout, ann_settings=settings)
    in_memory = rank(paths, *arrays, q_clip[:4], q_frame[:4], WEIGHTS, 10, ann=layout, ann_settings=settings)
    assert [[(h.video, h.score) for h in row] for row in from_files] == \
        [[(h.video, h.score) for h in row] for row in in_memory]
    assert len(asked) == 8 and all(len(a) == 100 for a in asked)
    for qi in range(4):
        want = layout.candidates(q_clip[qi], q_frame[qi], WEIGHTS, settings, np.zeros(1500, bool))
        assert np.array_equal(asked[2 * qi], want) and np.array_equal(asked[2 * qi + 1], want)
        assert {h.video for h in from_files[qi]} <= set(want.tolist())
