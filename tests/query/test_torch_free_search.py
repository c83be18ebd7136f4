"""The torch-free query path: tokenizer, numpy towers and searcher against open_clip, ProtoPRVR and the full path."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from prvr_cli.index.matrices import POINTER
from prvr_cli.library import Library
from prvr_cli.pipeline.encode import FrameTextEncoder
from prvr_cli.pipeline.text_side import export_query_branch, export_text_tower, text_tower_export
from prvr_cli.pipeline.prototypes import TrainedPrototypes
from prvr_cli.query.searcher import Searcher
from prvr_cli.query.tokenizer import Tokenizer
from prvr_cli.query.towers import QueryBranch, TextTower
from tests.helpers import TINY_CLIP, make_video

TEXTS = ["a person cooking", "Chase grabs his COFFEE!!", "naïve café — 2024's “best” <start_of_text> x",
         "&amp;lt;b&amp;gt; don't   STOP", "日本語のテキスト 😀🎉", "x" * 300, " ".join(["word"] * 100), "",
         "12345 3.14 a-b_c", "it's we'll they're I'm you've he'd", "Ünïcödé\u200b\tTAB\nnew"]


@pytest.fixture(scope="module")
def encoder():
    return FrameTextEncoder.load(TINY_CLIP, "none", "cpu")


def test_tokenizer_gives_open_clips_ids(encoder):
    from open_clip.tokenizer import default_bpe

    ours = Tokenizer(default_bpe())
    assert (ours(TEXTS) == encoder.tokenizer(TEXTS).numpy()).all()
    assert [ours.cut_tokens(t) for t in TEXTS] == [encoder.cut_tokens(t) for t in TEXTS]
    assert ours.cut_tokens(" ".join(["word"] * 100)) == 25


def test_text_tower_matches_open_clip(encoder, tmp_path):
    assert export_text_tower(encoder, tmp_path)
    tower, tokenizer = TextTower(tmp_path / "text"), Tokenizer(tmp_path / "text" / "vocab.txt.gz")
    ids = tokenizer(TEXTS)
    assert np.abs(tower.pooled(ids) - encoder.encode_text(TEXTS)).max() < 1e-5
    for ours, theirs in zip(tower.per_token(ids), encoder.encode_text_tokens(TEXTS)):
        assert ours.shape == theirs.shape and np.abs(ours - theirs).max() < 1e-5


@pytest.mark.parametrize("query_encoder", ["attention", "mean"])
def test_query_branch_matches_the_trained_model(encoder, tmp_path, query_encoder):
    from prvr_cli.nets.factory import create_model, load_config, save_checkpoint

    torch.manual_seed(3)
    ckpt = tmp_path / "tiny.pt"
    config = load_config("protoprvr_anet")
    config["model"]["query_encoder"] = query_encoder
    if query_encoder == "attention":   # input-space prototypes need mean-token queries
        config["model"]["prototype_readout"] = "attention"
    model = create_model(config, video_dim=32, text_dim=32)
    save_checkpoint(ckpt, model, feature_source={})
    builder = TrainedPrototypes.load(ckpt, encoder.spec())
    export_query_branch(builder, tmp_path)
    branch = QueryBranch(tmp_path / "text")
    q_clip, q_frame = builder.encode_queries(encoder, TEXTS)
    for i, tokens in enumerate(encoder.encode_text_tokens(TEXTS)):
        clip, frame = branch(tokens)
        assert np.abs(clip - q_clip[i]).max() < 1e-5 and np.abs(frame - q_frame[i]).max() < 1e-5


def test_unsupported_text_towers_are_not_exported(tmp_path):
    config = json.loads(Path(TINY_CLIP).read_text())
    config["text_cfg"]["ls_init_value"] = 0.1    # layer scale: not what the numpy tower computes
    (tmp_path / "ls-clip.json").write_text(json.dumps(config))
    other = FrameTextEncoder.load(str(tmp_path / "ls-clip.json"), "none", "cpu")
    assert text_tower_export(other) is None and not export_text_tower(other, tmp_path)
    assert not (tmp_path / "text" / "clip_text.json").exists()


def _hits(results):
    """Each query's hits without their scores (compared apart, to float32's precision)."""
    return [[(h.path, h.highlights, h.copies) for h in hits] for hits in results.hits]


def _scores(results):
    return [h.score for hits in results.hits for h in hits]


@pytest.mark.parametrize("trained", [False, True])
def test_searcher_gives_the_full_paths_results(cli, videos, tmp_path, trained):
    assert cli.ingest(videos)[0] == 0
    if trained:
        from prvr_cli.nets.factory import create_model, save_checkpoint

        save_checkpoint(tmp_path / "tiny.pt", create_model("protoprvr_anet", video_dim=32, text_dim=32),
                        feature_source={})
        assert cli("reindex", "--model", tmp_path / "tiny.pt")[0] == 0
    library = Library.open(cli.index, tmp_path / "cache")
    assert (cli.index / "text" / "clip_text.json").exists()
    assert (cli.index / "text" / "query_branch.json").exists() == trained
    searcher = Searcher.open(library.root, library.cache / "indexes")
    assert searcher is not None
    queries = ["a red screen", "blue then yellow"]
    fast, full = searcher.search(queries, 4), library.search(queries, 4, torch_free=False)
    assert _hits(fast) == _hits(full) and fast.hits[0][0].highlights
    assert _scores(fast) == pytest.approx(_scores(full), abs=1e-5)   # rounding to 5 places could straddle


def test_a_stale_or_missing_cache_falls_back_to_the_full_path(cli, videos, tmp_path, monkeypatch):
    from prvr_cli.index.store import Index

    assert cli.ingest(videos)[0] == 0
    library = Library.open(cli.index, tmp_path / "cache")
    assert Searcher.open(library.root) is not None
    (cli.index / "cache" / POINTER).unlink()
    assert Searcher.open(library.root) is None
    assert len(library.search(["red"], 10).hits[0]) == 4       # the full path, which points at its cache again
    assert Searcher.open(library.root) is not None

    # a writer that stopped before refreshing the cache: the newest table version has none
    monkeypatch.setattr(Index, "publish", lambda self: None)
    make_video(videos / "new_white.mp4", [(255, 255, 255)] * 2)
    assert cli.ingest(videos)[0] == 0
    assert Searcher.open(library.root) is None
    assert "new_white.mp4" in {Path(h.path).name for h in library.search(["white"], 10).hits[0]}


def test_cli_search_imports_neither_torch_nor_lancedb(cli, videos, tmp_path):
    assert cli.ingest(videos)[0] == 0
    assert cli("search", "red")[0] == 0
    script = ("import sys\nfrom prvr_cli.cli import main\ncode = main(sys.argv[1:])\n"
              "print(sorted(m for m in ('torch', 'lancedb', 'open_clip') if m in sys.modules), file=sys.stderr)\n"
              "sys.exit(code)")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    done = subprocess.run([sys.executable, "-c", script, "search", "a red screen", "--index", str(cli.index),
                           "--paths-only"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "[]" and len(done.stdout.splitlines()) == 4


def test_every_scan_ranks_alike_bfloat16_resident_streamed_and_in_memory(tmp_path):
    """The server's approximate bfloat16 scan, the streamed cache and float32 arrays give identical hits, including
    exact ties between duplicate prototypes and k beyond the number of videos."""
    from prvr_cli.index.matrices import PrototypeFile, ResidentPrototypes, from_bfloat16, to_bfloat16
    from prvr_cli.index.search import rank

    rng = np.random.default_rng(0)
    protos = rng.standard_normal((2, 300, 6, 16)).astype(np.float32)
    protos[:, :, 3] = protos[:, :, 1]                           # duplicate prototypes: exact ties inside a video
    protos /= np.linalg.norm(protos, axis=-1, keepdims=True)
    exact = from_bfloat16(to_bfloat16(protos))                  # the values every path scores
    for b, name in enumerate(("clip", "frame")):
        np.save(tmp_path / f"proto_{name}.npy", to_bfloat16(protos[b]))
    files = [PrototypeFile(tmp_path / f"proto_{name}.npy") for name in ("clip", "frame")]
    resident = [ResidentPrototypes(f) for f in files]
    paths = [f"/v/{i}.mp4" for i in range(300)]
    copy_of = np.arange(300)
    copy_of[7] = 5                                              # an identical copy
    q = rng.standard_normal((4, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    for k in (1, 10, 400):
        hits = [[[(h.path, h.score, h.clip_prototype, h.frame_prototype, h.copies) for h in row]
                 for row in rank(paths, clip, frame, q, q[::-1], (0.7, 0.3), k, copy_of)]
                for clip, frame in ((exact[0], exact[1]), files, resident)]
        assert hits[0] == hits[1] == hits[2]
        assert len(hits[0][0]) == min(k, 299)


def test_a_search_holding_a_cache_survives_its_removal_by_a_newer_version(cli, videos, tmp_path):
    """A writer that publishes a newer table version removes older caches; searches already holding one go on."""
    from prvr_cli.index.matrices import load_matrices
    from prvr_cli.index.search import rank

    assert cli.ingest(videos)[0] == 0
    library = Library.open(cli.index, tmp_path / "cache")
    searcher = Searcher.open(library.root)
    dim = searcher.clip.shape[2]
    matrices = load_matrices(library.index().videos, dim, [cli.index / "cache"])
    before = searcher.search(["a red screen"], 4)
    shutil.rmtree(searcher.cache)
    after = searcher.search(["a red screen"], 4)
    assert _hits(after) == _hits(before) and _scores(after) == _scores(before)
    q = np.ones((1, dim), np.float32) / dim ** 0.5
    assert len(rank(matrices.paths, matrices.clip, matrices.frame, q, q, (0.5, 0.5), 4)[0]) == 4


def test_building_an_older_versions_cache_keeps_a_newer_one(cli, videos, tmp_path):
    from prvr_cli.index.matrices import CACHE_KIND, cache_version, load_matrices

    assert cli.ingest(videos)[0] == 0
    library = Library.open(cli.index, tmp_path / "cache")
    table, dim = library.index().videos, Searcher.open(library.root).clip.shape[2]
    current = cli.index / "cache" / f"videos-v{table.version}-{CACHE_KIND}"
    newer = current.with_name(f"videos-v{table.version + 1}-{CACHE_KIND}")
    other_layout = current.with_name(f"videos-v{table.version}-f32-1")
    shutil.copytree(current, newer)                 # as if another process had published a newer version meanwhile
    other_layout.mkdir()
    shutil.rmtree(current)
    load_matrices(table, dim, [cli.index / "cache"])    # builds the current version's cache again
    names = {p.name for p in (cli.index / "cache").glob("videos-v*")}
    assert current.name in names and newer.name in names and other_layout.name not in names
    assert cache_version(newer) == (table.version + 1, CACHE_KIND)
