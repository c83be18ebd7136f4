"""`prvr bench` functions on tiny sizes: well-formed results (speed is measured by the command, never asserted)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from prvr_cli.bench import common, latency, storage
from prvr_cli.bench.ingest import bench_ingest
from tests.helpers import PALETTE, TINY_CLIP, make_video


def test_mssl_kernel_matches_the_model_score():
    from prvr_cli.nets.mssl import MSSL

    torch.manual_seed(0)
    model = MSSL(video_dim=12, text_dim=8, cfg={"hidden_size": 16, "n_heads": 2, "n_clips": 4, "max_frames": 6}).eval()
    frames, mask = torch.randn(5, 9, 12), torch.ones(5, 9, dtype=torch.bool)
    with torch.no_grad():
        enc = model.encode_videos(frames, mask)
        enc.clip = torch.nn.functional.normalize(enc.clip, dim=-1)  # the benchmark stores unit-norm spans
        q = model.encode_queries(torch.randn(3, 4, 8), torch.ones(3, 4, dtype=torch.bool))
        ref = model.score(q, enc).numpy()
        keys, values = model.guide_key(enc.frame).numpy(), model.guide_value(enc.frame).numpy()
    got = latency.mssl_scores(enc.clip.numpy(), keys, values, q.clip.numpy())
    assert np.allclose(got, ref, atol=1e-5)


def test_gmmformer_kernel_matches_the_model_score():
    from prvr_cli.nets.gmmformer import GMMFormer

    torch.manual_seed(0)
    model = GMMFormer(video_dim=12, text_dim=8, cfg={"hidden_size": 16, "n_heads": 2, "n_clips": 4,
                                                     "max_frames": 6}).eval()
    with torch.no_grad():
        enc = model.encode_videos(torch.randn(5, 9, 12), torch.ones(5, 9, dtype=torch.bool))
        q = model.encode_queries(torch.randn(3, 4, 8), torch.ones(3, 4, dtype=torch.bool))
        ref = model.score(q, enc).numpy()
    norm = lambda t: torch.nn.functional.normalize(t, dim=-1).numpy()  # noqa: E731
    qn = norm(q.clip)
    got = latency.two_branch_scores(norm(enc.clip), norm(enc.frame), qn)
    assert np.allclose(got, ref, atol=1e-5)


def test_bench_search_tiny_is_well_formed(tmp_path):
    res = latency.bench_search([8, 20], list(common.METHODS), n_queries=3, repeats=2, lancedb=True, frames=5,
                             mem_gib=10 * 420_000 / (1 << 30), cell_budget_s=5.0)
    cells = res["cells"]
    # per method and size: 1 query and a batch; ProtoPRVR also its clip branch alone and LanceDB
    assert {(c["method"], c["engine"]) for c in cells} >= {("protoprvr", "in-process"), ("mssl", "in-process"),
                                                          ("gmmformer", "in-process"), ("protoprvr-clip", "lancedb")}
    for c in cells:
        assert c["median_ms"] > 0 and 1 <= c["runs"] <= 2 and c["n_videos"] in (8, 20)
    # MS-SL at 20 videos does not fit the tiny budget: streamed over fewer resident videos, and said so
    streamed = [c for c in cells if c["streamed"]]
    assert streamed and all(c["method"] == "mssl" and "does not fit" in c["note"] for c in streamed)
    assert all(chk["top10_overlap"] == 1.0 for chk in res["lancedb_checks"])
    assert res["bytes_per_video"]["protoprvr"]["model_bytes_fp16"] == 60 * 384 * 2
    assert res["bytes_per_video"]["mssl"]["model_vectors"] == 528 + 5
    assert {r["what"] for r in res["ratios"]} >= {"mssl / protoprvr", "gmmformer / protoprvr"}
    json.dumps(res)
    png = latency.plot_search(res, tmp_path / "img" / "latency.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_streamed_scores_equal_resident_scores():
    rng = np.random.default_rng(0)
    store = latency.synthetic_store("gmmformer", 4, rng)
    q = common.random_unit((2, common.DIM), rng, np.float32)
    full = {k: np.concatenate([v, v, v[:1]]) for k, v in store.items()}  # 9 videos = 2 passes of 4 + 1
    top_streamed = latency.search_once("gmmformer", store, q, 9)
    exact = latency.two_branch_scores(full["clip"], full["frame"], q)
    assert np.allclose(np.take_along_axis(exact, top_streamed, 1), -np.sort(-exact, 1)[:, :common.TOP_K])


def test_storage_synthetic_is_well_formed():
    res = storage.bench_storage_synthetic(n_videos=50, n_queries=8)
    b = res["bytes_per_video"]
    assert b["protoprvr"] == {"float32": 60 * 1536, "float16": 60 * 768, "bfloat16": 60 * 768, "int8": 60 * 388}
    eff = res["synthetic_protoprvr"]["effect"]
    assert eff["float32"]["max_abs_score_error"] == 0.0 and eff["float32"]["recall@10_overlap"] == 1.0
    assert 0 < eff["float16"]["max_abs_score_error"] < eff["bfloat16"]["max_abs_score_error"] \
        < eff["int8"]["max_abs_score_error"] < 0.05
    # float16 is what an index stores: its ranking must match float32's; int8 may move a few near-ties
    assert eff["float16"]["recall@10_overlap"] >= 0.99 and eff["float16"]["top1_agreement"] >= 0.95
    assert eff["int8"]["recall@10_overlap"] >= 0.9 and eff["int8"]["top1_agreement"] >= 0.75


def test_bench_ingest_on_two_tiny_videos(tmp_path):
    root = tmp_path / "videos"
    make_video(root / "a.mp4", [PALETTE[0], PALETTE[1]])
    make_video(root / "b.mp4", [PALETTE[2]])
    res = bench_ingest(root, TINY_CLIP, "none", "cpu", fps=3.0, workers=2, batch_size=4, profile=True)
    assert res["files"] == 2 and res["failed"] == 0 and res["frames"] == 9
    assert res["decode"]["frames"] == res["encoder"]["frames"] == res["full_ingest"]["frames"] == 9
    for stage in ("decode", "encoder", "full_ingest"):
        assert res[stage]["frames_per_s"] > 0
    assert res["ratio_full_over_encoder_time"] > 0 and "run_ingest" in res["profile"]


def test_cli_bench_commands(cli, tmp_path):
    code, out, err = cli("bench", "search", "--sizes", "10", "--queries", "2", "--repeats", "1", "--no-lancedb",
                         "--methods", "gmmformer,protoprvr", "--json", index=False)
    assert code == 0, err
    res = json.loads(out)
    assert {c["method"] for c in res["cells"]} == {"gmmformer", "protoprvr", "protoprvr-clip"}
    code, out, err = cli("bench", "search", "--sizes", "10,x", index=False)
    assert code == 2 and "--sizes" in err
    code, out, err = cli("bench", "search", "--methods", "colbert", index=False)
    assert code == 2 and "colbert" in err
    code, out, err = cli("bench", "storage", "--videos", "20", "--queries", "4", index=False)
    assert code == 0 and "int8" in out and "load average" in out
    code, out, err = cli("bench", "storage", "--checkpoint", str(tmp_path / "x.pt"), index=False)
    assert code == 2 and "--data" in err


@pytest.mark.parametrize("method", ["protoprvr", "mssl"])
def test_storage_on_a_checkpoint_reports_sumr_per_type(tmp_path, method):
    from prvr_cli.nets.factory import create_model, load_config, save_checkpoint
    from tests.helpers import TEXT_DIM, VIDEO_DIM, write_h5_dataset

    write_h5_dataset(tmp_path / "data")
    small = {"protoprvr": {"hidden_size": 16, "n_heads": 2, "n_prototypes": 4, "n_clips": 4, "max_frames": 8},
             "mssl": {"hidden_size": 16, "n_heads": 2, "n_clips": 4, "max_frames": 8}}[method]
    config = load_config(f"{method}_anet")
    config["model"] = {**{k: v for k, v in config["model"].items() if k in small or method == "protoprvr"}, **small}
    torch.manual_seed(0)
    model = create_model(config, video_dim=VIDEO_DIM, text_dim=TEXT_DIM)
    save_checkpoint(tmp_path / "m.pt", model, feature_source={})
    res = storage.bench_storage_real(str(tmp_path / "m.pt"), str(tmp_path / "data"), "toy", "cg", "test")
    assert res["method"] == method and res["n_videos"] == 6
    kinds = res["kinds"]
    assert set(kinds) == {"float32", "float16", "bfloat16", "int8"}
    assert kinds["float32"]["max_abs_score_error"] == 0.0
    assert kinds["int8"]["bytes_per_video"] < kinds["float16"]["bytes_per_video"] < kinds["float32"]["bytes_per_video"]
    for k in kinds.values():
        assert 0 <= k["metrics"]["SumR"] <= 400


def test_bench_train_times_real_steps_and_profiles_them(cli, tmp_path):
    """`prvr bench train` runs the loop's own steps on real batches; the profile names torch operators."""
    from tests.helpers import write_h5_dataset

    write_h5_dataset(tmp_path / "data")
    code, out, err = cli("bench", "train", "--data", tmp_path / "data", "--collection", "toy", "--steps", "2",
                         "--warmup", "1", "--batch-videos", "8", "--device", "cpu", "--profile", "--json",
                         "--set", "model.hidden_size=16", "--set", "model.n_heads=2", "--set", "model.ff_size=16",
                         index=False)
    assert code == 0, err
    res = json.loads(out)
    assert res["method"] == "protoprvr" and res["batch_videos"] == 8 and res["steps"] == 2
    assert res["step_ms"] > 0 and res["prepare_ms"] >= 0 and res["step_ms_min_max"][0] <= res["step_ms"]
    assert "aten::" in res["profile"]
    code, _, err = cli("bench", "train", "--data", tmp_path / "data", "--collection", "toy", "--steps", "500",
                       "--batch-videos", "8", "--device", "cpu", index=False)
    assert code == 2 and "fewer --steps" in err


def test_end_to_end_on_a_trained_checkpoint_uses_its_query_branch(tmp_path):
    """The end-to-end bench shaped by a checkpoint: prototypes of the model's dimension, its query branch exported,
    and whole `prvr search` processes (cold and served) answer on that index."""
    from prvr_cli.bench.end_to_end import bench_end_to_end
    from prvr_cli.index.store import Index
    from tests.helpers import FIXTURES

    checkpoint = FIXTURES / "legacy" / "protoprvr_tiny.pt"
    result = bench_end_to_end([40], TINY_CLIP, "none", tmp_path, repeats=1, clients=1, requests=2,
                              checkpoint=checkpoint)
    (cell,) = result["cells"]
    assert result["builder"]["kind"] == "trained" and result["prototype_dim"] != result["dim"]
    assert cell["n_videos"] == 40 and cell["median_wall_s"] > 0 and cell["load"]["errors"] == 0
    (root,) = [p for p in tmp_path.iterdir() if p.name.endswith("-40")]
    assert (root / "text" / "query_branch.json").is_file()
    assert Index.open(root).meta["proto_dim"] == result["prototype_dim"]
