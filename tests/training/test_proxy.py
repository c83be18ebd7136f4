"""`prvr train --proxy-head` and re-ranked evaluation; `prvr search --rerank` on an index built with the result."""
import json
import re

import pytest
import torch

from prvr_cli.errors import ExitCode
from prvr_cli.nets.factory import create_model, load_checkpoint, save_checkpoint
from prvr_cli.training.proxy import GAMMAS, reranked_ranks
from tests.helpers import TEXT_DIM, VIDEO_DIM, write_h5_dataset

TINY = ["--set", "proxy.n_layers=1"]


def test_reranked_ranks_hand_case():
    first = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.9, 0.8, 0.7, 0.1]])
    top = torch.tensor([[0, 1, 2], [0, 1, 2]])
    proxy = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    gt = torch.tensor([2, 3])
    assert reranked_ranks(first, top, proxy, 0.0, gt).tolist() == [3, 4]
    assert reranked_ranks(first, top, proxy, 0.5, gt).tolist() == [1, 4]      # outside the top K: unchanged


@pytest.fixture
def base_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = create_model({"method": "protoprvr", "model": {"hidden_size": 16, "n_heads": 2, "ff_size": 16,
                                                           "n_prototypes": 4, "max_frames": 16, "n_clips": 4}},
                         video_dim=VIDEO_DIM, text_dim=TEXT_DIM)
    path = tmp_path / "base.pt"
    save_checkpoint(path, model, feature_source={"collection": "toy"}, metrics={"val": {"SumR": 1.0}})
    return path


def train_head(cli, tmp_path, base, out: str, *flags):
    """`prvr train --proxy-head BASE` on the toy h5 dataset under tmp_path/data."""
    return cli("train", "--proxy-head", base, "--data", tmp_path / "data", "--collection", "toy",
               "--out", tmp_path / out, *flags, index=False)


def test_train_proxy_head_writes_a_checkpoint_with_gamma(cli, tmp_path, base_checkpoint):
    write_h5_dataset(tmp_path / "data")
    code, out, err = train_head(cli, tmp_path, base_checkpoint, "proxy", "--epochs", "2", "--batch-videos", "8",
                                "--device", "cpu", "--json", *TINY)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["gamma"] in GAMMAS and sorted(float(g) for g in summary["val_sumr"]) == sorted(GAMMAS)
    per_epoch = [float(m) for m in re.findall(r"re-ranked top \d+ ([\d.]+) at gamma", err)]
    assert len(per_epoch) == 2 and per_epoch[summary["epoch"] - 1] == max(per_epoch)   # the best epoch is kept
    assert round(summary["val_sumr"][str(summary["gamma"])], 2) == max(per_epoch)
    assert ("keeps the first stage's order" in err) == (summary["gamma"] == 0)   # a head that changes nothing says so
    model, meta = load_checkpoint(tmp_path / "proxy" / "proxy.pt")
    base, _ = load_checkpoint(base_checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))
    assert meta["proxy"]["config"]["n_layers"] == 1 and meta["metrics"] == {"val": {"SumR": 1.0}}
    code, out, err = cli("bench", "rerank", "--checkpoint", tmp_path / "proxy" / "proxy.pt", "--data",
                         tmp_path / "data", "--collection", "toy", "--k", "2,3", "--device", "cpu", "--json", index=False)
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert [r["k"] for r in rows] == [0, 2, 3] and all(r["ms_per_query"] >= 0 for r in rows)
    if summary["gamma"] == 0:                                       # re-ranking with gamma 0 changes nothing
        assert all(r["SumR"] == rows[0]["SumR"] for r in rows)
    code, _, err = train_head(cli, tmp_path, base_checkpoint, "p2", "--set", "model.hidden_size=8")
    assert code == ExitCode.USAGE and "proxy.KEY" in err


def test_proxy_head_trains_on_the_base_models_video_subset(cli, tmp_path, base_checkpoint):
    """--train-videos N --seed S picks the same videos for the head as for the base run."""
    write_h5_dataset(tmp_path / "data")
    code, out, err = train_head(cli, tmp_path, base_checkpoint, "proxy", "--epochs", "1", "--train-videos", "6",
                                "--device", "cpu", "--json", *TINY)
    assert code == 0, err
    assert json.loads(out)["train_videos"] == 6
    code, _, err = train_head(cli, tmp_path, base_checkpoint, "p1", "--train-videos", "1")
    assert code == ExitCode.USAGE and "--train-videos 1" in err


def test_search_rerank_reorders_the_top_k_only(cli, videos, tmp_path):
    """An index built with a proxy checkpoint: --rerank K keeps the first stage's top-K set and everything after it."""
    from prvr_cli.nets.text_proxy import TextProxyHead

    torch.manual_seed(0)
    model = create_model("protoprvr_anet", video_dim=32, text_dim=32)
    head = TextProxyHead(model.output_dim)
    with torch.no_grad():
        head.theta.fill_(3.0)
    plain, with_proxy = tmp_path / "plain.pt", tmp_path / "proxy.pt"
    save_checkpoint(plain, model, feature_source={"layout": "test"})
    save_checkpoint(with_proxy, model, feature_source={"layout": "test"},
                    extra={"proxy": {"config": head.cfg.as_dict(), "state_dict": head.state_dict(), "gamma": 5.0,
                                     "n_vectors": 30}})
    assert cli.ingest(videos, extra=("--model", str(with_proxy)))[0] == 0
    _, first, _ = cli("search", "a red screen", "-k", "4", "--json")
    code, second, err = cli("search", "a red screen", "-k", "4", "--rerank", "2", "--json")
    assert code == 0, err
    first, second = json.loads(first)["results"], json.loads(second)["results"]
    assert {h["path"] for h in second[:2]} == {h["path"] for h in first[:2]}
    assert [h["path"] for h in second[2:]] == [h["path"] for h in first[2:]]
    assert [h["rank"] for h in second] == [1, 2, 3, 4]
    code, _, err = cli("search", "a red screen", "--rerank", "-1")
    assert code == ExitCode.USAGE
    assert cli("reindex", "--model", plain)[0] == 0                  # the same model without a head: refused
    code, _, err = cli("search", "a red screen", "--rerank", "2")
    assert code == ExitCode.USAGE and "no text-proxy head" in err
