"""End to end through the CLI: ingest synthesized videos with a tiny random CLIP, then search."""
from __future__ import annotations

import json
import os
import time


from prvr_cli.errors import ExitCode

from tests.helpers import PALETTE, TINY_CLIP, make_video


def test_ingest_then_search_json_and_jsonl(cli, videos):
    code, summary, err = cli.ingest(videos)
    assert code == 0, err
    assert summary["new"] == 4 and summary["failed"] == 0 and summary["frames"] > 0
    assert "indexed 4 new" in err

    code, out, err = cli("search", "a red screen", "-k", "3", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["query"] == "a red screen" and len(doc["results"]) == 3
    assert [h["rank"] for h in doc["results"]] == [1, 2, 3]
    scores = [h["score"] for h in doc["results"]]
    assert scores == sorted(scores, reverse=True)
    for hit in doc["results"]:
        assert os.path.isabs(hit["path"]) and hit["path"].startswith(str(videos))
        assert hit["highlights"], hit
        for r in hit["highlights"]:
            assert 0.0 <= r["start"] < r["end"] <= hit["duration"] + 1e-6
        assert set(hit["branch_scores"]) == {"clip", "frame"}

    code, out, _ = cli("search", "a red screen", "-k", "2", "--jsonl")
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 2 and all(line["query"] == "a red screen" for line in lines)
    assert lines[0]["path"] == doc["results"][0]["path"]


def test_paths_only_nul_and_stdin_queries(cli, videos, monkeypatch):
    import io

    assert cli.ingest(videos)[0] == 0
    code, out, _ = cli("search", "blue", "-k", "4", "--paths-only", "-0")
    assert code == 0
    paths = out.split("\0")
    assert paths[-1] == "" and len(paths[:-1]) == 4
    monkeypatch.setattr("sys.stdin", io.StringIO("first query\n\nsecond query\n"))
    code, out, _ = cli("search", "-", "-k", "2", "--jsonl")
    assert code == 0
    queries = [json.loads(line)["query"] for line in out.splitlines()]
    assert queries == ["first query"] * 2 + ["second query"] * 2


def test_second_run_encodes_nothing(cli, videos, monkeypatch):
    assert cli.ingest(videos)[0] == 0

    def no_encoder(*args, **kwargs):
        raise AssertionError("the encoder must not be loaded when nothing changed")

    monkeypatch.setattr("prvr_cli.pipeline.encode.FrameTextEncoder.load", no_encoder)
    code, summary, err = cli.ingest(videos)
    assert code == 0, err
    assert summary["unchanged"] == 4 and summary["new"] == summary["changed"] == summary["frames"] == 0


def test_changed_touched_and_moved_files(cli, videos, monkeypatch):
    assert cli.ingest(videos)[0] == 0
    # changed content: re-encoded
    make_video(videos / "blue.mp4", [PALETTE[2], PALETTE[4], PALETTE[4]])
    # same content, new mtime: not re-encoded
    later = time.time() + 10
    os.utime(videos / "red_green.mp4", (later, later))
    # moved: not re-encoded
    (videos / "cyan red.mp4").rename(videos / "sub" / "moved.mp4")
    code, summary, err = cli.ingest(videos)
    assert code == 0, err
    assert summary["changed"] == 1 and summary["moved"] == 1 and summary["new"] == 0
    assert summary["unchanged"] == 2
    code, out, _ = cli("list", "--json")
    listed = {json.loads(line)["path"] for line in out.splitlines()}
    assert str(videos / "sub" / "moved.mp4") in listed and str(videos / "cyan red.mp4") not in listed
    assert len(listed) == 4


def test_prune_removes_missing_files_only_when_asked(cli, videos):
    assert cli.ingest(videos)[0] == 0
    (videos / "blue.mp4").unlink()
    code, summary, _ = cli.ingest(videos)
    assert summary["pruned"] == 0
    _, out, _ = cli("list", "--json")
    assert len(out.splitlines()) == 4
    code, summary, _ = cli.ingest(videos, extra=["--prune"])
    assert code == 0 and summary["pruned"] == 1
    _, out, _ = cli("list", "--json")
    assert len(out.splitlines()) == 3


def test_corrupt_file_among_good_ones(cli, videos):
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    (videos / "empty.mp4").write_bytes(b"")
    (videos / "notes.mkv").write_text("not a video at all\n")
    code, summary, err = cli.ingest(videos)
    assert code == ExitCode.PARTIAL
    assert summary["new"] == 4 and summary["failed"] == 3
    failed = {e["path"] for e in summary["errors"]}
    assert failed == {str(videos / n) for n in ("broken.mp4", "empty.mp4", "notes.mkv")}
    for name in ("broken.mp4", "empty.mp4", "notes.mkv"):
        assert sum(name in line for line in err.splitlines()) >= 1
    # the good videos are searchable
    code, out, _ = cli("search", "anything", "-k", "10", "--paths-only")
    assert code == 0 and len(out.splitlines()) == 4


def test_search_errors_have_exit_codes(cli, videos, tmp_path):
    code, _, err = cli("search", "x")
    assert code == ExitCode.NO_INDEX and "prvr ingest" in err
    assert cli.ingest(videos)[0] == 0
    code, _, err = cli("search", "   ")
    assert code == ExitCode.USAGE and "empty query" in err
    code, _, err = cli("search", "x", "-k", "0")
    assert code == ExitCode.USAGE and "-k 0" in err
    code, _, err = cli("search", "x", "--json", "--jsonl")
    assert code == ExitCode.USAGE
    code, _, err = cli("search", "x" * 5000)
    assert code == ExitCode.USAGE and "too long" in err


def test_encoder_mismatch_is_refused(cli, videos, tmp_path):
    assert cli.ingest(videos)[0] == 0
    other = tmp_path / "other-tiny.json"
    config = json.loads(open(TINY_CLIP).read())
    config["embed_dim"] = 16
    other.write_text(json.dumps(config))
    code, _, err = cli("search", "x", "--clip-model", str(other), "--clip-pretrained", "none")
    assert code == ExitCode.MISMATCH and "other-tiny" in err
    code, _, err = cli("ingest", videos, "--clip-model", str(other), "--clip-pretrained", "none", "--quiet")
    assert code == ExitCode.MISMATCH
    code, out, _ = cli("list", "--json")
    assert len(out.splitlines()) == 4  # nothing lost


def test_info_and_list(cli, videos):
    assert cli.ingest(videos)[0] == 0
    code, out, _ = cli("info", "--json")
    info = json.loads(out)
    assert code == 0 and info["videos"] == 4 and info["encoder"]["clip_model"] == "prvr-tiny-clip"
    assert info["builder"]["kind"] == "zero-shot" and info["table_versions"]["videos"] >= 1
    code, out, err = cli("list")
    assert code == 0 and len(out.splitlines()) == 4 and "4 videos" in err


def test_index_from_environment_variable(cli, videos, monkeypatch, tmp_path):
    monkeypatch.setenv("PRVR_INDEX", str(tmp_path / "env-index"))
    code, out, err = cli("ingest", videos, "--json", "--quiet", index=False, tiny=True)
    assert code == 0, err
    assert json.loads(out)["index"] == str(tmp_path / "env-index")


def test_real_clips_ingest_and_search(cli, shared_videos):
    code, summary, err = cli.ingest(shared_videos)
    assert code == 0, err
    assert summary["new"] == 8 and summary["failed"] == 0
    # 3 frames per second over 6.6 to 18 s clips
    assert 8 * 6 * 3 <= summary["frames"] <= 8 * 18 * 3 + 8
    code, out, _ = cli("search", "a woman applying eye makeup", "-k", "8", "--json")
    hits = json.loads(out)["results"]
    # every clip once, ranked 1..8 by falling score, each with highlights inside its duration
    assert code == 0 and sorted(h["path"] for h in hits) == sorted(str(p) for p in shared_videos.iterdir()
                                                                   if p.suffix in (".mp4", ".avi"))
    assert [h["rank"] for h in hits] == list(range(1, 9))
    assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))
    assert all(h["highlights"] and all(0 <= r["start"] < r["end"] <= h["duration"] for r in h["highlights"])
               for h in hits)
    # a smaller k is the head of the same ranking
    code, out, _ = cli("search", "a woman applying eye makeup", "-k", "3", "--json")
    assert [h["path"] for h in json.loads(out)["results"]] == [h["path"] for h in hits[:3]]


def test_trained_model_ingest_and_reindex_round_trip(cli, videos, tmp_path):
    """--model builds prototypes with a checkpoint; reindex swaps builders from stored frame features."""
    from prvr_cli.nets.factory import create_model, save_checkpoint

    ckpt = tmp_path / "tiny.pt"
    save_checkpoint(ckpt, create_model("protoprvr_anet", video_dim=32, text_dim=32), feature_source={"layout": "test"})
    assert cli.ingest(videos)[0] == 0
    _, zero_shot, _ = cli("search", "a red screen", "-k", "4", "--json")

    code, _, err = cli("reindex", "--model", ckpt)
    assert code == 0, err
    code, out, _ = cli("info", "--json")
    assert json.loads(out)["builder"]["kind"] == "trained"
    code, trained, err = cli("search", "a red screen", "-k", "4", "--json")
    assert code == 0, err
    assert json.loads(trained)["results"][0]["highlights"]
    code, _, err = cli("search", "a red screen", "--model", "zero-shot")
    assert code == ExitCode.MISMATCH and "reindex" in err

    # back to zero-shot from the stored frame features: exactly the original ranking and scores
    assert cli("reindex", "--model", "zero-shot")[0] == 0
    _, again, _ = cli("search", "a red screen", "-k", "4", "--json")
    assert [h["path"] for h in json.loads(again)["results"]] == [h["path"] for h in json.loads(zero_shot)["results"]]
    assert [h["score"] for h in json.loads(again)["results"]] == [h["score"] for h in json.loads(zero_shot)["results"]]


def test_wrong_checkpoint_dims_are_refused(cli, videos, tmp_path):
    from prvr_cli.nets.factory import create_model, save_checkpoint

    ckpt = tmp_path / "other.pt"
    save_checkpoint(ckpt, create_model("protoprvr_anet", video_dim=512, text_dim=384), feature_source={})
    code, _, err = cli("ingest", videos, "--quiet", "--model", ckpt, tiny=True)
    assert code == ExitCode.MISMATCH and "512/384" in err
    assert not cli.index.exists()  # refused before a new index was made
    (tmp_path / "truncated.pt").write_bytes(ckpt.read_bytes()[:1000])
    code, _, err = cli("ingest", videos, "--quiet", "--model", tmp_path / "truncated.pt", tiny=True)
    assert code == ExitCode.CORRUPT and "truncated.pt" in err


def test_train_on_own_videos_then_ingest_and_search_with_it(cli, videos, tmp_path):
    """The own-videos path end to end: ingest, train on captions, then ingest and search with the checkpoint."""
    assert cli.ingest(videos)[0] == 0
    captions = tmp_path / "captions.jsonl"
    lines = [{"video": str(videos / "red_green.mp4"), "caption": "a red screen turns green"},
             {"video": str(videos / "blue.mp4"), "caption": "everything is blue"},
             {"video": str(videos / "sub" / "yellow_magenta.avi"), "caption": "yellow then magenta"},
             {"video": str(videos / "cyan red.mp4"), "caption": "cyan and then red", "start": 0.0, "end": 1.0}]
    captions.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    run = tmp_path / "run"
    code, out, err = cli("train", "--captions", captions, "--preset", "protoprvr_anet", "--out", run,
                         "--epochs", "1", "--json")
    assert code == 0, err
    assert (run / "best.pt").exists() and json.loads(out)["method"] == "protoprvr"

    code, _, err = cli("reindex", "--model", run / "best.pt")
    assert code == 0, err
    code, out, err = cli("search", "everything is blue", "-k", "4", "--json")
    assert code == 0, err
    reindexed = [(h["path"], h["score"]) for h in json.loads(out)["results"]]
    assert len(reindexed) == 4

    other = tmp_path / "index2"
    code, out, err = cli("ingest", videos, "--json", "--quiet", "--model", run / "best.pt", "--index", other,
                         index=False, tiny=True)
    assert code == 0, err
    code, out2, _ = cli("search", "everything is blue", "-k", "4", "--json", "--index", other, index=False)
    fresh = [(h["path"], h["score"]) for h in json.loads(out2)["results"]]
    assert code == 0 and fresh == reindexed  # ingest --model and reindex --model store the same prototypes


def test_unknown_config_file_keys_are_refused(cli, videos, tmp_path, monkeypatch):
    config = tmp_path / "config.toml"
    config.write_text("topk = 2\n")
    monkeypatch.setenv("PRVR_CONFIG", str(config))
    code, out, err = cli("search", "red")
    assert code == 2 and "topk" in err and "top_k" in err and str(config) in err
    config.write_text("top_k = 2\n")
    assert cli.ingest(videos)[0] == 0
    code, out, err = cli("search", "red", "--jsonl")
    assert code == 0 and len(out.splitlines()) == 2
