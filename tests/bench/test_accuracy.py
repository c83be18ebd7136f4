"""`prvr bench accuracy`: variants planned once, trained or reused, measured per storage type; training subsets."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prvr_cli.bench import accuracy as bench_accuracy
from prvr_cli.bench.common import matching_flops
from prvr_cli.training.feature_layouts import load_features
from prvr_cli.errors import DataError

from tests.helpers import VIDEO_DIM, synthetic, write_h5_dataset

SMALL = {
    "protoprvr": {"hidden_size": 16, "n_heads": 2, "ff_size": 16, "n_prototypes": 4, "n_clips": 4, "max_frames": 8},
    "mssl": {"hidden_size": 16, "n_heads": 2, "n_clips": 4, "max_frames": 8},
    "gmmformer": {"hidden_size": 16, "n_heads": 2, "n_clips": 4, "max_frames": 8},
    "msc": {"hidden_size": 16, "n_heads": 2, "n_clips": 4, "max_frames": 8, "gauss_widths": [0.5]},
}
TRAIN = {"batch_videos": 8, "max_epochs": 1, "lr": 1e-3}


@pytest.fixture
def tiny_bench(tmp_path):
    """A tiny dataset and tiny presets of the three methods (the shipped presets with small sizes)."""
    from prvr_cli.nets.factory import load_config

    write_h5_dataset(tmp_path / "data", data=synthetic(n_videos=(16, 6, 6)))
    presets = []
    for method, small in SMALL.items():
        cfg = load_config(f"{method}_anet")
        cfg["model"].update(small)
        cfg["train"].update(TRAIN)
        cfg.pop("preset")
        path = tmp_path / f"tiny_{method}.json"
        path.write_text(json.dumps(cfg))
        presets.append(str(path))
    return tmp_path / "data", presets


def test_plan_shares_the_full_model_between_tables(tiny_bench):
    _, presets = tiny_bench
    variants = bench_accuracy.plan_variants(presets, presets[0], [2, 4, 8], list(bench_accuracy.DEFAULT_TABLES), {})
    names = [v.name for v in variants]
    # 4 methods + 4 ablation rows that differ from the full model + 2 prototype counts that differ
    assert len(variants) == 10 and len(set(names)) == 10
    full = next(v for v in variants if v.name == "tiny_protoprvr")
    assert sorted(t for t, _ in full.rows) == ["ablation", "methods", "prototypes"]
    retrieval = next(v for v in variants if ("ablation", "retrieval") in v.rows)
    assert all(retrieval.config["model"]["losses"][x] == 0 for x in bench_accuracy.AUX_LOSSES)
    assert retrieval.config["model"]["losses"]["triplet"] > 0 and retrieval.config["model"]["losses"]["nce"] > 0
    plus_urecon = next(v for v in variants if ("ablation", "retrieval+crecon+urecon") in v.rows)
    on = {x for x in bench_accuracy.AUX_LOSSES if plus_urecon.config["model"]["losses"][x] > 0}
    assert on == {"crecon", "urecon"}
    assert next(v for v in variants if v.name == "tiny_protoprvr-p8").config["model"]["n_prototypes"] == 8


def test_bench_accuracy_trains_measures_and_reuses(cli, tiny_bench, tmp_path):
    data, presets = tiny_bench
    runs = tmp_path / "runs"
    args = ("bench", "accuracy", "--data", str(data), "--collection", "toy", "--runs", str(runs),
            "--presets", ",".join(presets), "--ablation-preset", presets[0], "--prototypes", "2,4",
            "--epochs", "1", "--device", "cpu")
    code, out, err = cli(*args, "--json", index=False)
    assert code == 0, err
    res = json.loads(out)
    rows = {(t, label): r for r in res["results"] for t, label in r["rows"]}
    assert {label for t, label in rows if t == "methods"} == {"protoprvr", "mssl", "gmmformer", "msc"}
    msc = rows[("methods", "msc")]
    assert msc["vectors_per_video"] == 4 + 8 and msc["bytes_per_video"] == 12 * 16 * 2   # 4 clips + 8 frame tokens
    assert len([1 for t, _ in rows if t == "ablation"]) == 5
    assert {label for t, label in rows if t == "prototypes"} == {"2", "4"}
    proto = rows[("methods", "protoprvr")]
    assert proto["vectors_per_video"] == 8                              # 4 prototypes x 2 branches
    # float16; the default preset stores prototypes in the input feature space (VIDEO_DIM), not hidden 16
    assert proto["bytes_per_video"] == 8 * VIDEO_DIM * 2
    assert proto["flops_per_query_per_video"] == matching_flops("protoprvr", 4, 4, VIDEO_DIM)
    assert set(proto["storage"]) == {"float32", "float16", "bfloat16", "int8"}
    assert proto["metrics"] == proto["storage"]["float16"]["metrics"]
    assert rows[("prototypes", "2")]["vectors_per_video"] == 4
    mssl = rows[("methods", "mssl")]
    assert mssl["vectors_per_video"] > 10                               # 10 spans of 4 clips + frame tokens
    for r in res["results"]:
        assert 0 < r["metrics"]["SumR"] <= 400 and r["training"]["epochs"] == 1
    assert all((runs / p).is_file() for p in ("sumr_vs_memory.png", "sumr_vs_prototypes.png",
                                              "bench_accuracy.json"))

    # a second run reuses every finished run and reports the same numbers, as Markdown
    code, md, err = cli(*args, index=False)
    assert code == 0, err
    assert err.count("reusing the finished run") == len(res["results"])
    assert f"| protoprvr | {proto['metrics']['R@1']:.2f} |" in md and "### Ablation" in md
    assert md.index("| retrieval |") < md.index("| retrieval+crecon |") < md.index("| retrieval+crecon+urecon+attn+ortho |")
    assert md.index("\n| 2 |") < md.index("\n| 4 |")

    # a partial rerun writes its own record and leaves the full one alone
    full = (runs / "bench_accuracy.json").read_text()
    code, out, err = cli(*args, "--tables", "prototypes", "--prototypes", "2", index=False)
    assert code == 0, err
    assert (runs / "bench_accuracy.json").read_text() == full and (runs / "bench_accuracy-prototypes.json").is_file()

    # reruns of one table with other presets add their rows to its record instead of replacing it
    for preset in presets[:2]:
        code, out, err = cli(*args, "--tables", "methods", "--presets", preset, index=False)
        assert code == 0, err
    kept = json.loads((runs / "bench_accuracy-methods.json").read_text())
    assert sorted(r["name"] for r in kept["results"]) == sorted(Path(p).stem for p in presets[:2])

    # other settings (here the batch size) never overwrite what is there
    code, out, err = cli(*args, "--batch-videos", "4", index=False)
    assert code == 2 and "another --runs" in err and "tiny_protoprvr" in err


def test_bench_accuracy_usage_errors(cli, tmp_path):
    code, _, err = cli("bench", "accuracy", "--data", str(tmp_path), "--collection", "x", "--runs", str(tmp_path),
                       "--tables", "speed", index=False)
    assert code == 2 and "--tables" in err
    code, _, err = cli("bench", "accuracy", "--data", str(tmp_path), "--collection", "x", "--runs", str(tmp_path),
                       "--epochs", "0", index=False)
    assert code == 2 and "--epochs" in err


def test_train_subset_keeps_whole_videos_with_their_queries(tmp_path):
    write_h5_dataset(tmp_path, data=synthetic(n_videos=(16, 6, 6)))
    data = load_features(tmp_path, "toy", "cg")
    full = data.splits["train"]
    sub = data.with_train_subset(5, seed=1)
    train = sub.splits["train"]
    assert train.n_videos == 5 and sub.source["train_subset"] == 5
    assert sub.splits["test"] is data.splits["test"]
    assert data.with_train_subset(5, seed=1).splits["train"].video_ids == train.video_ids   # seeded
    for i, vid in enumerate(train.video_ids):
        j = full.video_ids.index(vid)
        assert torch.equal(train.frames.batch(torch.tensor([i]))[0], full.frames.batch(torch.tensor([j]))[0])
        mine = [train.cap_ids[q] for q in train.queries_of(torch.tensor([i]))[0].tolist()]
        theirs = [full.cap_ids[q] for q in full.queries_of(torch.tensor([j]))[0].tolist()]
        assert mine == theirs
        q = train.cap_ids.index(mine[0])
        assert torch.equal(train.tokens.batch(torch.tensor([q]))[0],
                           full.tokens.batch(torch.tensor([full.cap_ids.index(mine[0])]))[0])
    assert data.with_train_subset(None) is data and data.with_train_subset(100) is data
    with pytest.raises(DataError):
        data.with_train_subset(1)


def test_msc_and_remedies_tables_are_planned_in_the_papers_shape():
    variants = bench_accuracy.plan_variants(["gmmformer2_anet", "msc_anet"], "protoprvr_anet", [],
                                            ["methods", "msc", "remedies"], {"train.max_epochs": 1})
    rows = {(t, label): v for v in variants for t, label in v.rows}
    msc = [rows[("msc", label)].config["model"] for label, _ in bench_accuracy.MSC_STEPS]
    assert rows[("msc", "GMMFormer-v2")] is rows[("methods", "gmmformer2")]        # one run, two tables
    assert rows[("msc", "+adaptive CBVA")] is rows[("methods", "msc")]
    on = [[m.get("tcpl_distance_weight", 0) > 0, m.get("cbva_weight", 0) > 0, m.get("token_merge", False),
           m.get("cbva_adaptive", False)] for m in msc]
    assert on == [[False] * 4, [True, False, False, False], [True, True, False, False], [True, True, True, False],
                  [True] * 4]
    remedies = {label: rows[("remedies", label)].config["model"] for t, label in rows if t == "remedies"}
    assert set(remedies) == {"ProtoPRVR", "+TCPL", "+CBVA", "+merged clips", "+all three"}
    assert remedies["+CBVA"]["losses"]["cbva"] == 0.1 and remedies["+CBVA"]["losses"]["tcpl_distance"] == 0
    assert remedies["+all three"]["clip_tokens"] == "merged" and remedies["+all three"]["losses"]["tcpl_angle"] == 30
    assert remedies["ProtoPRVR"]["clip_tokens"] == "uniform"


def test_methods_rows_sharing_a_method_are_named_by_preset(tmp_path):
    from prvr_cli.nets.factory import load_config

    variant = load_config("protoprvr_anet")
    variant["model"]["nce_temperature"] = 0.05
    variant.pop("preset")
    path = tmp_path / "protoprvr_cos.json"
    path.write_text(json.dumps(variant))
    variants = bench_accuracy.plan_variants(["protoprvr_anet", str(path), "mssl_anet"], "protoprvr_anet", [],
                                            ["methods"], {})
    assert [label for v in variants for _, label in v.rows] == ["protoprvr_anet", "protoprvr_cos", "mssl"]


def test_msc_and_remedies_rows_are_reported_and_plotted(tmp_path):
    metrics = {"R@1": 1.0, "R@5": 2.0, "R@10": 3.0, "R@100": 4.0, "SumR": 10.0}
    result = {"data": {"layout": "h5", "collection": "toy", "feature": "cg", "test_videos": 2, "test_queries": 3,
                       "train_videos": 4}, "budget": {}, "seed": 0, "date": "2026-11-24",
              "machine": {"processor": "x86_64", "device": "cpu"}, "storage_default": "float16",
              "results": [{"rows": [["msc", "+TCPL"]], "metrics": metrics, "bytes_per_video": 1234},
                          {"rows": [["remedies", "+CBVA"]], "metrics": metrics, "bytes_per_video": 99}]}
    md = bench_accuracy.markdown(result)
    assert "### MSC ablation" in md and "| +TCPL | 1.00 | 2.00 | 3.00 | 4.00 | 10.00 | 1,234 |" in md
    assert "### MSC's remedies on ProtoPRVR" in md and "| +CBVA |" in md
    assert bench_accuracy.plot(result, tmp_path) == []           # neither table has a plot
