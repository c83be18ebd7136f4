"""What an earlier prvr wrote still opens: indexes and checkpoints made at commit eaec745 (tests/fixtures/legacy)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import FIXTURES, TINY_CLIP, make_video, PALETTE

LEGACY = FIXTURES / "legacy"
TINY = ["--clip-model", TINY_CLIP, "--clip-pretrained", "none"]


@pytest.fixture
def legacy(tmp_path) -> Path:
    dst = tmp_path / "legacy"
    shutil.copytree(LEGACY, dst)
    return dst


def _answers(text: str) -> list[tuple[str, float]]:
    return [(Path(h["path"]).name, round(h["score"], 4)) for h in json.loads(text)["results"]]


@pytest.mark.parametrize("name, extra", [("index_zero_shot", []), ("index_trained", ["--model", "protoprvr_tiny.pt"])])
def test_a_legacy_index_answers_as_it_did(cli, legacy, name, extra):
    index = legacy / name
    extra = [str(legacy / a) if a.endswith(".pt") else a for a in extra]
    code, out, err = cli("search", "a red screen", "--json", "--index", index, *TINY, *extra, index=False)
    assert code == 0, err
    now, then = _answers(out), _answers((legacy / f"{name}.search.json").read_text())
    # the same ranking; scores within the rounding of the bfloat16 search cache (then: float32)
    assert [p for p, _ in now] == [p for p, _ in then]
    assert all(abs(a - b) <= 1e-3 for (_, a), (_, b) in zip(now, then)), (now, then)
    code, out, err = cli("info", "--json", "--index", index, index=False)
    assert code == 0 and json.loads(out)["videos"] == 2, err
    code, out, err = cli("list", "--index", index, index=False)
    assert code == 0 and len(out.splitlines()) == 2, err


def test_a_legacy_index_says_which_local_file_moved(cli, legacy):
    code, _, err = cli("search", "a red screen", "--index", legacy / "index_zero_shot", index=False)
    assert code == 2 and "/tmp/legacy/out/prvr-tiny-clip.json, which is gone" in err and "--clip-model" in err


def test_a_legacy_trained_index_takes_new_videos_and_keeps_its_model(cli, legacy):
    index = legacy / "index_trained"
    make_video(legacy / "videos" / "green.mp4", [PALETTE[1]] * 2, fps=6, size=(32, 32))
    code, out, err = cli("ingest", legacy / "videos", "--json", "--quiet", "--index", index, *TINY,
                         "--model", legacy / "protoprvr_tiny.pt", index=False)
    assert code == 0 and json.loads(out)["new"] == 1, err
    assert (index / "model.pt").read_bytes() == (legacy / "protoprvr_tiny.pt").read_bytes()
    (legacy / "protoprvr_tiny.pt").unlink()                 # from now on the index's own copy serves
    code, out, err = cli("search", "green", "--json", "--index", index, *TINY, index=False)
    assert code == 0 and len(json.loads(out)["results"]) == 3, err


@pytest.mark.parametrize("name", ["protoprvr_tiny.pt", "mssl_tiny.pt", "gmmformer_tiny.pt"])
def test_legacy_checkpoints_load_and_run(name):
    from prvr_cli.nets.factory import load_checkpoint

    model, meta = load_checkpoint(LEGACY / name)
    frames, tokens = torch.randn(2, 12, 32), torch.randn(3, 5, 32)
    with torch.no_grad():
        videos = model.encode_videos(frames, torch.ones(2, 12, dtype=torch.bool))
        queries = model.encode_queries(tokens, torch.ones(3, 5, dtype=torch.bool))
        scores = model.score(queries, videos)
    assert scores.shape == (3, 2) and torch.isfinite(scores).all()
    assert meta["dims"] == {"video": 32, "text": 32}
